"""Issue 15: what a logged-in session holds, and that holding less is as safe.

Between commands a session holds its socket and its maildrop's lock file, never the maildrop's
directory; each command walks to the directory again and must find the one it locked at login.
A local user who swaps their Maildir (or mbox directory) for another directory or a symlink
between login and RETR or DELE+QUIT gets -ERR: nothing of the other directory is read, nothing
is deleted. The descriptor budget that the worker publishes follows from these counts.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest

from conftest import sample, write_message
from processes import wait_until
from shared import descriptors
from test_store_safety import SECRET, _login, site  # noqa: F401 (site is a fixture)
from worker import replies as R
from worker import store, streamslots
from worker.maildir import Maildir
from worker.mbox import Mbox
from worker.mboxformat import format_record
from worker.safefs import UnsafeEntry

SESSIONS = 12


def _fds(pid: int) -> list[str]:
    """Where each descriptor of ``pid`` points (unreadable entries skipped)."""
    found = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            found.append(os.readlink(f"/proc/{pid}/fd/{name}"))
        except OSError:
            pass
    return found


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# -- the count on a real worker --------------------------------------------------------------
def test_each_logged_in_session_adds_exactly_two_descriptors_to_its_worker(start_server):
    """N idle logged-in sessions add exactly 2N descriptors (socket + lock file) to the worker,
    none of them a Maildir directory; QUIT gives them all back."""
    users = {f"user{n:02d}": f"pw{n}" for n in range(SESSIONS)}
    server = start_server("-workers", "1", users=users)
    (pid,) = server.worker_pids().values()
    before = len(_fds(pid))
    clients = [server.raw(timeout=15) for _ in users]
    for raw, (user, password) in zip(clients, users.items()):
        assert raw.line().startswith(b"+OK")
        assert raw.command(f"USER {user}").startswith(b"+OK")
        assert raw.command(f"PASS {password}") == R.LOGIN_OK.encode()
    assert wait_until(lambda: len(_fds(pid)) == before + 2 * SESSIONS), (before, _fds(pid))
    held = _fds(pid)
    mail = str(server.mail)
    assert sum(target.endswith("/.iupop3.lock") for target in held) == SESSIONS
    assert not [t for t in held if t.startswith(mail) and not t.endswith("/.iupop3.lock")]
    for raw in clients:
        assert raw.command("QUIT").startswith(b"+OK")
    assert wait_until(lambda: len(_fds(pid)) == before), _fds(pid)


# -- the redirect attacks against the real server --------------------------------------------
def test_maildir_swapped_for_a_symlink_after_login_reads_and_deletes_nothing(site):  # noqa: F811
    """alice's Maildir moved away and replaced by a symlink (hers, so a login would follow it)
    to bob's after login: RETR is -ERR, DELE+QUIT is -ERR and neither Maildir changes; moved
    back, the same session reads its message again."""
    server = site.start()
    raw, reply = _login(server)
    assert reply == R.LOGIN_OK.encode()
    bob = site.mail / "bob"
    moved = site.mail / "alice.moved"
    bob_before, alice_before = _tree(bob), _tree(site.alice)
    site.alice.rename(moved)
    site.alice.symlink_to(bob)
    site.own(site.alice)
    assert raw.command("RETR 1") == R.MAILDROP_UNAVAILABLE.encode()
    server.wait_for(r"is not the directory locked at login.*mail/alice")
    assert raw.command("DELE 1").startswith(b"+OK")
    assert raw.command("DELE 2").startswith(b"+OK")
    other, _ = _login(server, "carol")  # the worker goes on serving others meanwhile
    assert other.command("QUIT").startswith(b"+OK")
    assert raw.command("QUIT") == R.UPDATE_FAILED.encode()
    assert _tree(bob) == bob_before and _tree(moved) == alice_before


def test_maildir_swapped_for_another_directory_after_login_serves_none_of_it(site):  # noqa: F811
    """alice's Maildir replaced after login by another directory of hers holding a message of
    the same name: RETR is -ERR and sends none of it; moved back, RETR works (the check is the
    directory, not the path); replaced again, DELE+QUIT is -ERR and deletes nothing."""
    server = site.start()
    raw, reply = _login(server)
    assert reply == R.LOGIN_OK.encode()
    moved = site.mail / "alice.moved"
    site.alice.rename(moved)
    write_message(site.alice, "1700000001.M1.test", "Subject: decoy\n\n" + SECRET.decode())
    site.own(site.alice, *site.alice.rglob("*"))
    alice_before = _tree(moved)
    assert raw.command("RETR 1") == R.MAILDROP_UNAVAILABLE.encode()
    assert raw.command("DELE 1").startswith(b"+OK")
    shutil.rmtree(site.alice)
    moved.rename(site.alice)
    assert raw.command("RETR 2").startswith(b"+OK")
    assert b"secret-hash" not in b"\n".join(raw.multiline())
    site.alice.rename(moved)
    (site.alice).mkdir()
    site.own(site.alice)
    assert raw.command("QUIT") == R.UPDATE_FAILED.encode()
    assert _tree(moved) == alice_before and _tree(site.alice) == {}


# -- the stores themselves (both kinds, one process) -------------------------------------------
def _maildir(tmp_path: Path) -> Maildir:
    for n in (1, 2):
        write_message(tmp_path / "box", f"{1700000000 + n}.M{n}.test", sample(n))
    return Maildir((str(tmp_path), ("box",)))


def _mbox(tmp_path: Path) -> Mbox:
    (tmp_path / "spool").mkdir()
    (tmp_path / "spool" / "jones").write_bytes(
        b"".join(format_record(sample(n).encode()) for n in (1, 2)))
    return Mbox((str(tmp_path), ("spool", "jones")))


@pytest.mark.parametrize("make", [_maildir, _mbox], ids=["maildir", "mbox"])
def test_a_locked_maildrop_holds_one_descriptor_between_commands(tmp_path, make):
    """After the login's lock and scan a Maildir or mbox holds its lock file only; unlock gives
    that back too."""
    drop = make(tmp_path)
    before = descriptors.open_count()
    messages = store.lock_and_scan(drop, 0)
    assert len(messages) == 2
    assert descriptors.open_count() == before + 1
    with drop.open_message(messages[0]) as fh:
        assert b"Subject" in fh.read()
    assert descriptors.open_count() == before + 1
    drop.unlock()
    assert descriptors.open_count() == before


@pytest.mark.parametrize("make,folder", [(_maildir, "box"), (_mbox, "spool")],
                         ids=["maildir", "mbox"])
def test_a_maildrop_directory_swapped_after_the_scan_is_refused(tmp_path, make, folder):
    """The maildrop's directory renamed and another put in its place after the scan: reading
    and committing raise UnsafeEntry and neither directory changes."""
    drop = make(tmp_path)
    messages = store.lock_and_scan(drop, 0)
    (tmp_path / folder).rename(tmp_path / "moved")
    shutil.copytree(tmp_path / "moved", tmp_path / folder)
    before = (_tree(tmp_path / "moved"), _tree(tmp_path / folder))
    with pytest.raises(UnsafeEntry, match="not the directory locked at login"):
        drop.open_message(messages[0])
    with pytest.raises(UnsafeEntry):
        drop.commit(messages)
    assert (_tree(tmp_path / "moved"), _tree(tmp_path / folder)) == before
    drop.unlock()


def test_a_maildrop_directory_removed_after_the_scan_is_refused(tmp_path):
    """A Maildir renamed away (nothing in its place): RETR's open is UnsafeEntry, not "no such
    message", and commit deletes nothing."""
    drop = _maildir(tmp_path)
    messages = store.lock_and_scan(drop, 0)
    (tmp_path / "box").rename(tmp_path / "moved")
    before = _tree(tmp_path / "moved")
    with pytest.raises(UnsafeEntry, match="gone since login"):
        drop.open_message(messages[0])
    with pytest.raises(UnsafeEntry):
        drop.commit(messages)
    assert _tree(tmp_path / "moved") == before and len(before) == 4  # + lock file and ledger
    drop.unlock()


# -- the budget -------------------------------------------------------------------------------
def test_the_budget_counts_two_descriptors_a_session_and_the_spare_for_transient_opens():
    """A session costs FDS_PER_SESSION = 2; the spare covers every stream slot and every pool
    thread's transient opens; at the hard limit 20,000, 11 workers hold 100,000 sessions."""
    assert descriptors.FDS_PER_SESSION == 2
    assert descriptors.WORKER_SPARE_FDS >= (descriptors.STREAMS_AT_ONCE + descriptors.POOL_THREADS
                                            * descriptors.FDS_PER_POOL_TASK)
    per_worker = descriptors.session_capacity(20_000)
    assert per_worker == (20_000 - descriptors.WORKER_BASE_FDS
                          - descriptors.WORKER_SPARE_FDS) // 2
    assert per_worker * 11 >= 100_000
    assert descriptors.maxclients_problem(100_000, 11, 20_000) is None
    assert descriptors.maxclients_problem(100_000, 10, 20_000) is not None
    # A full worker, every stream slot and pool thread busy, stays under the limit.
    busy = (descriptors.WORKER_BASE_FDS + per_worker * descriptors.FDS_PER_SESSION
            + descriptors.STREAMS_AT_ONCE + descriptors.POOL_THREADS
            * descriptors.FDS_PER_POOL_TASK)
    assert busy <= 20_000
    assert descriptors.stream_slots(20_000) == descriptors.STREAMS_AT_ONCE
    # A small limit keeps a quarter for the worker and still serves sessions.
    assert descriptors.session_capacity(200) == (200 - descriptors.WORKER_BASE_FDS - 50) // 2
    assert descriptors.stream_slots(200) == 1


class _Slots:
    def __init__(self) -> None:
        self.taken = 0

    def acquire(self) -> None:
        self.taken += 1

    def release(self) -> None:
        self.taken -= 1


def test_a_stream_slot_is_given_back_once_whatever_happens(tmp_path):
    """A stream slot goes back when the file closes (once, even closed twice), when nothing was
    opened (None) and when opening raised."""
    slots = _Slots()
    path = tmp_path / "m"
    path.write_bytes(b"Subject: x\n\nbody\n")
    opened = streamslots.counted(slots, lambda: open(path, "rb"))
    assert slots.taken == 1
    with opened as fh:
        assert fh.read(7) == b"Subject" and fh.read() == b": x\n\nbody\n"
    opened.close()
    assert slots.taken == 0
    assert streamslots.counted(slots, lambda: None) is None and slots.taken == 0
    with pytest.raises(FileNotFoundError):
        streamslots.counted(slots, lambda: open(tmp_path / "missing", "rb"))
    assert slots.taken == 0
    assert stat.S_ISREG(os.stat(path).st_mode)
