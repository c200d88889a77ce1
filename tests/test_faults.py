"""Faults the mail must survive (issue 5): kill -9 of a worker in the middle of RETR and of
QUIT's UPDATE, a full disk under Maildir and mbox, an mbox rewrite interrupted at any point.

No message is ever lost, and none is deleted that the client did not commit with QUIT. The
full-disk tests mount a small tmpfs (root only; skipped where mount is not permitted).
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import ROOT, USERS, assert_healthy, write_message
from processes import wait_until
from worker import replies as R
from worker.mbox import Mbox
from worker.mboxformat import format_record

WHEN = 1_790_000_000


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"


def _names(folder: Path) -> set[str]:
    """Maildir unique names (without flags) in folder's new/ and cur/."""
    return {p.name.split(":")[0] for sub in ("new", "cur") if (folder / sub).is_dir()
            for p in (folder / sub).iterdir()}


def _message(n: int, size: int = 300) -> str:
    body = "".join(f"line {k} of message {n}\n" for k in range(max(1, size // 24)))
    return f"From: s{n}@example.org\nSubject: fault {n}\nMessage-ID: <f{n}@example.org>\n\n{body}"


def _kill_worker_of(server, client_port: int) -> int:
    slot = server.worker_of(client_port)
    pid = server.worker_pids()[slot]
    mark = server.mark()
    os.kill(pid, signal.SIGKILL)
    server.wait_for(rf"worker {slot} \(pid {pid}\) killed by signal 9", start=mark)
    server.wait_for(rf"worker {slot} ready", start=mark, timeout=30)
    return pid


# -- kill -9 ---------------------------------------------------------------------------------------
def test_kill_9_in_the_middle_of_retr(start_server):
    """A worker killed while it streams a 16 MiB RETR: the client gets a cut transfer (no final
    dot), the message and the session's uncommitted DELE are untouched, a new session gets it
    whole."""
    server = start_server("-loglevel", "THREAD", deliver=False)  # THREAD: worker_of
    inbox = server.maildir("alice")
    for n in range(1, 4):
        write_message(inbox, f"{1700000000 + n}.M{n}.k", _message(n))
    body = b"".join(b"%08d the quick brown fox jumps over the lazy dog\n" % k
                    for k in range(300_000))
    write_message(inbox, "1700000009.M9.k", b"Subject: big\n\n" + body)
    before = _names(inbox)
    raw = server.raw(timeout=20)
    raw.line()
    raw.command("USER alice")
    raw.command(f"PASS {USERS['alice']}")
    assert raw.command("DELE 1").startswith(b"+OK")
    raw.send(b"RETR 4\r\n")
    first = raw.sock.recv(65536)
    assert first.startswith(b"+OK")
    _kill_worker_of(server, raw.local_port)
    received = len(first)
    cut = b""
    with contextlib.suppress(OSError):
        while chunk := raw.sock.recv(1 << 20):  # ends at the close the kill caused
            received += len(chunk)
            cut = (cut + chunk)[-5:]
    raw.close()
    assert not cut.endswith(b"\r\n.\r\n")
    assert received < len(body)
    assert _names(inbox) == before
    client = server.login("alice")
    assert client.stat()[0] == 4  # the killed session's DELE was never applied
    _, lines, _ = client.retr(4)
    got = b"\n".join(lines[lines.index(b"") + 1:]) + b"\n"
    assert got == body
    client.quit()
    print(f"\nkill -9 mid-RETR: cut after {received} of {len(body)} octets; 4 messages checked,"
          " the 16 MiB one byte for byte")
    assert "Traceback" not in server.output


@pytest.mark.parametrize("purge", [False, True], ids=["wastebasket", "purge"])
def test_kill_9_in_the_middle_of_update(start_server, purge):
    """A worker killed after moving 37 of 60 deleted messages at QUIT: every message is in
    exactly one place, only messages the client deleted are gone from the inbox, and the next
    session finishes the job."""
    total, stop_after = 120, 37
    args = ["-maxmsg", "0", "-loglevel", "THREAD"] + (["-purge_reclaim"] if purge else [])
    server = start_server(*args, deliver=False,
                          env={"IUPOP3_TEST_STOP_UPDATE_AFTER": str(stop_after)})
    inbox = server.maildir("alice")
    names = [f"{1700000000 + n}.M{n}.u" for n in range(1, total + 1)]
    for n, name in enumerate(names, 1):
        write_message(inbox, name, _message(n))
    deleted = {names[i] for i in range(0, total, 2)}
    raw = server.raw(timeout=20)
    raw.line()
    raw.command("USER alice")
    assert raw.command(f"PASS {USERS['alice']}") == R.LOGIN_OK.encode()
    for n in range(1, total + 1, 2):
        assert raw.command(f"DELE {n}").startswith(b"+OK")
    raw.send(b"QUIT\r\n")
    slot = server.worker_of(raw.local_port)
    pid = server.worker_pids()[slot]
    assert wait_until(lambda: _state(pid) == "T", 15), "the worker never reached the UPDATE hook"
    _kill_worker_of(server, raw.local_port)
    assert raw.closed() and b"+OK" not in raw.buffer  # no QUIT reply: the update did not end
    raw.close()
    trash = _names(inbox / ".Trash")
    left = _names(inbox)
    assert left | trash <= set(names) and not left & trash
    assert set(names) - deleted <= left  # nothing the client kept is gone
    gone = set(names) - left
    assert gone <= deleted and len(gone) == stop_after
    assert trash == (set() if purge else gone)
    client = server.login("alice")
    assert client.stat()[0] == total - stop_after
    listing = [line.split()[1].decode() for line in client.uidl()[1]]
    for n, uid in enumerate(listing, 1):
        if uid in deleted:
            client.dele(n)
    assert client.quit().startswith(b"+OK")
    assert _names(inbox) == set(names) - deleted
    assert _names(inbox / ".Trash") == (set() if purge else deleted)
    print(f"\nkill -9 mid-UPDATE ({'purge' if purge else 'wastebasket'}): {stop_after} of"
          f" {len(deleted)} deletions applied before the kill; {total} messages checked,"
          " none lost, none deleted uncommitted")
    assert "Traceback" not in server.output


# -- a full disk --------------------------------------------------------------------------------
@contextlib.contextmanager
def tmpfs(where: Path, size: str, inodes: int = 0):
    """A small tmpfs at ``where`` for the test's duration (skips where mount is refused)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    where.mkdir()
    options = f"size={size}" + (f",nr_inodes={inodes}" if inodes else "")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill(disk: Path, leave: int = 0, inodes: bool = False) -> list[Path]:
    """Take the filesystem's free blocks (all but about ``leave`` octets) and, if asked, its
    free inodes too; returns the files to delete to undo it."""
    made = []
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize - leave
    filler = disk / f"filler{len(list(disk.glob('filler*')))}"
    made.append(filler)
    with open(filler, "wb") as fh:
        chunk = b"\0" * 65536
        with contextlib.suppress(OSError):
            while free > 0:  # ends: free shrinks each turn, or ENOSPC
                fh.write(chunk[:min(free, len(chunk))])
                fh.flush()
                free -= len(chunk)
    if not inodes:
        return made
    for n in range(os.statvfs(disk).f_favail + 10):  # bounded by the inodes left
        path = disk / f"inode{len(made)}.{n}"
        try:
            path.touch()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
            break
        made.append(path)
    return made


def unfill(made: list[Path]) -> None:
    for path in made:
        path.unlink(missing_ok=True)


def test_full_disk_maildir(start_server, tmp_path):
    """Maildir on a full disk: login and an UPDATE that needs a new folder answer [SYS/TEMP]
    and lose nothing; renames into an existing wastebasket still work; space back, all is well."""
    with tmpfs(tmp_path / "disk", "2m", inodes=200) as disk:
        server = start_server("-mail", f"maildir:{disk}/%u", "-loglevel", "INFO",
                              deliver=False)
        inbox = disk / "alice"
        for n in range(1, 6):
            write_message(inbox, f"{1700000000 + n}.M{n}.d", _message(n))
        everything = _names(inbox)
        try:
            made = fill(disk, inodes=True)
            raw = server.raw()
            raw.line()
            raw.command("USER alice")
            assert raw.command(f"PASS {USERS['alice']}") == R.MAILDROP_UNAVAILABLE.encode()
            raw.close()
            unfill(made)
            client = server.login("alice")
            for n in (1, 2, 3):
                client.dele(n)
            made = fill(disk, inodes=True)  # no room for the wastebasket folder now
            with pytest.raises(Exception) as failed:
                client.quit()
            assert R.UPDATE_FAILED.encode() in str(failed.value).encode()
            assert _names(inbox) == everything
            client = server.login("alice")  # the lock file exists: no inode needed
            assert client.stat()[0] == 5
            client.quit()
            unfill(made)
            client = server.login("alice")
            client.dele(1)
            client.quit()
            made = fill(disk, inodes=True)
            client = server.login("alice")  # the wastebasket exists: rename needs no space
            client.dele(1)
            assert client.quit().startswith(b"+OK")
            assert len(_names(inbox)) == 3 and len(_names(inbox / ".Trash")) == 2
            assert _names(inbox) | _names(inbox / ".Trash") == everything
            unfill(made)
            print("\nfull disk (Maildir): login and UPDATE answered [SYS/TEMP]; 5 messages"
                  " checked, none lost")
            assert_healthy(server, errors_allowed=True)  # ERROR lines name the full disk
        finally:
            server.stop()


def _spool_messages(n: int) -> list[bytes]:
    return [_message(k, 20_000).encode() for k in range(n)]


def read_spool(path: Path) -> list[bytes]:
    if not path.exists():
        return []
    box = Mbox(str(path))
    box.lock()
    try:
        out = []
        for message in box.scan():
            with box.open_message(message) as fh:
                out.append(fh.read())
        return out
    finally:
        box.unlock()


def test_full_disk_mbox(start_server, tmp_path):
    """An mbox spool on a full disk: the rewrite, the login and RETR answer [SYS/TEMP], the
    spool stays whole, no dot-lock is left behind to block delivery; space back, all is well."""
    with tmpfs(tmp_path / "disk", "2m") as disk:
        server = start_server("-mail", f"mbox:{disk}/%u", "-maxmsg", "0", "-loglevel", "INFO",
                              deliver=False)
        messages = _spool_messages(30)
        spool = disk / "alice"
        spool.write_bytes(b"".join(format_record(m, "a@example.org", WHEN + k)
                                   for k, m in enumerate(messages)))
        original = spool.read_bytes()
        try:
            client = server.login("alice")
            assert client.stat()[0] == 30
            client.dele(1)
            client.dele(2)
            made = fill(disk, leave=len(original) // 3)  # the trash fits, the new spool not
            with pytest.raises(Exception) as failed:
                client.quit()
            assert R.UPDATE_FAILED.encode() in str(failed.value).encode()
            assert spool.read_bytes() == original
            assert not (disk / ".alice.iupop3.new").exists() and not (disk / "alice.lock").exists()
            made += fill(disk)  # not a block left
            raw = server.raw()
            raw.line()
            raw.command("USER alice")
            assert raw.command(f"PASS {USERS['alice']}") == R.MAILDROP_UNAVAILABLE.encode()
            raw.close()
            assert not (disk / "alice.lock").exists()  # an empty lock would stall delivery
            unfill(made)
            started = time.monotonic()
            client = server.login("alice")
            assert time.monotonic() - started < 5
            assert client.stat()[0] == 30
            assert client.retr(3)[1][-1] == messages[2].rstrip(b"\n").split(b"\n")[-1]
            made = fill(disk)
            with pytest.raises(Exception) as failed:
                client.retr(4)
            assert str(failed.value).startswith("b'-ERR [SYS/TEMP]")
            unfill(made)
            client.dele(1)
            client.dele(2)
            assert client.quit().startswith(b"+OK")
            assert read_spool(spool) == messages[2:]
            # once each: the failed update's append was undone at once (worker.mboxjournal)
            assert read_spool(disk / "alice.Trash") == messages[:2]
            print("\nfull disk (mbox): rewrite, login and RETR answered [SYS/TEMP]; spool"
                  " byte-identical after the failed update; 30 messages checked")
            assert_healthy(server, errors_allowed=True)  # ERROR lines name the full disk
        finally:
            server.stop()


# -- an mbox rewrite interrupted -------------------------------------------------------------------
CRASHER = textwrap.dedent("""
    import signal, sys
    from worker import mbox, mboxformat
    spool, stage, nth, picks = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    mbox._CHUNK = mboxformat.BLOCK = 512  # many small copies: the kill lands mid-file
    box = mbox.Mbox(spool)
    box.lock()
    found = box.scan()
    calls = 0
    def hook(name):
        global calls
        if name == stage:
            calls += 1
            if calls == nth:
                print("stopped", flush=True)
                signal.pause()
    box.hook = hook
    box.commit([found[int(i)] for i in picks.split(",")])
    print("finished", flush=True)
""")


@pytest.mark.parametrize("rounds", [pytest.param(12, id="ci"),
                                    pytest.param(100, id="full", marks=pytest.mark.long)])
def test_mbox_rewrite_interrupted_anywhere(tmp_path, rounds):
    """kill -9 of a committing process at a random stage and chunk (worker.mbox's hook), with a
    random set of deletions: the spool is the whole old one or the whole new one, every deleted
    message is in the wastebasket or still in the spool, exactly once, once the next lock has
    settled the journal (worker.mboxjournal), and the next session completes."""
    rng = random.Random(11)
    checked = 0
    for round_ in range(rounds):
        folder = tmp_path / f"r{round_}"
        folder.mkdir()
        spool = folder / "jones"
        messages = [_message(k, rng.randint(100, 3000)).encode() for k in range(10)]
        spool.write_bytes(b"".join(format_record(m, "j@example.org", WHEN + k)
                                   for k, m in enumerate(messages)))
        old = spool.read_bytes()
        picks = sorted(rng.sample(range(10), rng.randint(1, 9)))
        kept = [m for k, m in enumerate(messages) if k not in picks]
        stage = rng.choice(["journaled", "appended", "copying", "copying", "written", "renamed"])
        nth = rng.randint(1, 20) if stage == "copying" else 1
        child = subprocess.Popen([sys.executable, "-c", CRASHER, str(spool), stage, str(nth),
                                  ",".join(map(str, picks))], stdout=subprocess.PIPE, cwd=ROOT)
        try:
            ready, _, _ = select.select([child.stdout], [], [], 30)
            assert ready
            said = child.stdout.readline()
        finally:
            child.kill()
            child.wait()
        now = read_spool(spool)
        assert now in (messages, kept), (round_, stage, nth, said)
        assert spool.read_bytes() == old or now == kept
        trashed = read_spool(folder / "jones.Trash")  # after the journal was settled
        deleted = [messages[k] for k in picks]
        assert trashed == (deleted if now == kept else [])  # each message exactly once
        box = Mbox(str(spool))
        box.lock_wait = 2
        box.lock()
        found = box.scan()
        box.commit([m for m, text in zip(found, now) if text in deleted])
        box.unlock()
        assert read_spool(spool) == kept
        assert read_spool(folder / "jones.Trash") == deleted
        checked += len(messages)
    print(f"\nmbox rewrite interrupted: {rounds} kills at random stages and chunks,"
          f" {checked} messages checked, none lost, none deleted uncommitted")
