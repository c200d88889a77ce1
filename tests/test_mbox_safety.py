"""An mbox spool is reached only through its owner's own directories.

A local user who controls a directory on the way to the spool (``-mail mbox:~/mail/inbox``) or
can plant names beside it (a shared ``/var/mail``) tries to read or empty another user's
spool, or to have root write through the lock files. Each attack runs against the real server
as root and shows the target unchanged; the lock helpers' by-path steps are pinned by unit
tests (a dot-lock is touched only after a minute of copying). Root only: chown to other uids.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import time
from pathlib import Path

import pytest

from conftest import USERS, sample
from test_store_safety import SiteServer, _python_for_nobody
from worker import mboxlock
from worker import replies as R
from worker.mbox import Mbox
from worker.mboxformat import format_record
from worker.safefs import UnsafeEntry

ALICE, BOB = 12345, 12346
SECRET = b"root: $6$secret-hash-nobody-may-see:19000:0:99999:7:::\n"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the attacks need root: files of "
                                "other uids, and the server reading them as root")


def _spool(path: Path, *numbers: int, uid: int = 0) -> Path:
    path.write_bytes(b"".join(format_record(sample(n).encode()) for n in numbers))
    os.chown(path, uid, uid)
    return path


def _snapshot(path: Path) -> tuple:
    st = os.lstat(path)
    content = path.read_bytes() if stat.S_ISREG(st.st_mode) else None
    return st.st_mode, st.st_uid, st.st_nlink, st.st_mtime_ns, content


class Homes:
    """A root-owned 0755 folder (outside pytest's 0700 tmp, so ``-user nobody`` can enter it)
    with the homes of alice (uid 12345) and bob (12346); the server runs as root or, in the
    ``user`` mode, with ``-user nobody``: then the directories are sticky and world-writable,
    as a site running mbox with ``-user`` must make them for the locks, and bob's 0644 spool
    is readable to the server."""

    def __init__(self, mode: str):
        self.mode = mode
        self.top = Path(tempfile.mkdtemp(prefix="iupop3-mbox-safety-"))
        self.top.chmod(0o755)
        self.server: SiteServer | None = None

    def make(self, with_uids: bool = True) -> Path:
        """The homes (and the users file, with the uids or without); returns the homes."""
        self.root, self.homes = _homes(self.top, with_uids)
        for home in self.homes.iterdir():
            self.open_up(home)
        return self.homes

    def open_up(self, directory: Path) -> None:
        if self.mode == "user":
            directory.chmod(0o1777)

    def start(self, *args: str) -> SiteServer:
        server = SiteServer(self.root, ["-workers", "1", *args])
        server.users_file.chmod(0o644)
        if self.mode == "user":
            found = _python_for_nobody()
            if found is None:
                pytest.skip("no Python with gevent that the user nobody can run")
            server.python, server.pythonpath = found
            server.args += ["-user", "nobody"]
        self.server = server
        return server.start()

    def bob_still_has(self, count: int) -> None:
        """Bob's own login still sees all his mail."""
        assert self.server is not None
        _bob_still_has(self.server, count)

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
        shutil.rmtree(self.top, ignore_errors=True)


@pytest.fixture(params=["root", "user"])
def homes(request):
    made = Homes(request.param)
    yield made
    made.close()


def _homes(tmp_path: Path, with_uids: bool = True) -> tuple[Path, Path]:
    """Server root and the homes of alice (uid 12345) and bob (12346), in its users file."""
    root, homes = tmp_path / "srv", tmp_path / "home"
    root.mkdir()
    lines = []
    for user, uid in (("alice", ALICE), ("bob", BOB)):
        (homes / user).mkdir(parents=True)
        os.chown(homes / user, uid, uid)
        ids = f"{uid}:{uid}" if with_uids else ":"
        lines.append(f"{user}:{{PLAIN}}{USERS[user]}:{ids}::{homes / user}::\n")
    (root / "users").write_text("".join(lines))
    return root, homes


def _login(server, user: str = "alice"):
    raw = server.raw(timeout=15)
    assert raw.line().startswith(b"+OK")
    assert raw.command(f"USER {user}").startswith(b"+OK")
    return raw, raw.command(f"PASS {USERS[user]}")


def _bob_still_has(server, count: int) -> None:
    raw, reply = _login(server, "bob")
    assert reply == R.LOGIN_OK.encode()
    assert int(raw.command("STAT").split()[1]) == count
    assert raw.command("QUIT").startswith(b"+OK")


# -- item 1: the walk to the spool ---------------------------------------------------------------
def test_symlinked_mail_directory_never_reaches_another_users_spool(homes):
    """alice's ~/mail -> ../bob/mail under -mail mbox:~/mail/inbox: her login is refused and
    bob's spool is neither served nor emptied (old code: served bob's message, and DELE + QUIT
    as root left his spool empty with an inbox.Trash beside it)."""
    bob_mail = homes.make() / "bob" / "mail"
    bob_mail.mkdir()
    os.chown(bob_mail, BOB, BOB)
    homes.open_up(bob_mail)
    inbox = _spool(bob_mail / "inbox", 1, uid=BOB)
    (homes.homes / "alice" / "mail").symlink_to("../bob/mail")
    os.chown(homes.homes / "alice" / "mail", ALICE, ALICE, follow_symlinks=False)
    before = _snapshot(inbox)
    server = homes.start("-mail", "mbox:~/mail/inbox")
    raw, reply = _login(server)
    if reply.startswith(b"+OK"):  # the old code: what alice could do with it
        raw.command("DELE 1")
        raw.command("QUIT")
    assert reply == R.MAILDROP_UNAVAILABLE.encode()
    server.wait_for(r"alice: .*mail.* symlink.*refused")
    assert _snapshot(inbox) == before
    assert sorted(os.listdir(bob_mail)) == ["inbox"]
    homes.bob_still_has(1)


@pytest.mark.parametrize("with_uids", [True, False], ids=["uid-in-users-file", "no-uid"])
def test_hard_link_to_another_users_spool_is_not_served(homes, with_uids):
    """alice's ~/mbox as a hard link to bob's spool (-mail mbox:~/mbox): refused at login, with
    or without a uid in the users file (old code: read path checked neither owner nor links,
    so RETR served bob's mail)."""
    homes.make(with_uids)
    spool = _spool(homes.homes / "bob" / "mbox", 1, 2, uid=BOB)
    os.link(spool, homes.homes / "alice" / "mbox")  # root may (fs.protected_hardlinks aside)
    before = _snapshot(spool)
    server = homes.start("-mail", "mbox:~/mbox")
    raw, reply = _login(server)
    if reply.startswith(b"+OK"):
        raw.command("RETR 1")
    assert reply == R.MAILDROP_UNAVAILABLE.encode()
    server.wait_for(r"alice: .*(links|owned by uid 12346).*refused")
    assert _snapshot(spool) == before
    (homes.homes / "alice" / "mbox").unlink()  # while linked, bob's own login is refused too
    homes.bob_still_has(2)


def test_own_spool_in_the_home_is_served_and_committed_as_root():
    """The walk refuses only what it must: alice's own ~/mbox (uid in the users file) is
    served, and DELE + QUIT rewrites it and fills ~/mbox.Trash, both still hers."""
    homes = Homes("root")
    try:
        spool = _spool(homes.make() / "alice" / "mbox", 1, 2, uid=ALICE)
        server = homes.start("-mail", "mbox:~/mbox")
        raw, reply = _login(server)
        assert reply == R.LOGIN_OK.encode()
        assert raw.command("DELE 1").startswith(b"+OK")
        assert raw.command("QUIT").startswith(b"+OK")
        trash = spool.with_name("mbox.Trash")
        assert b"message 2" in spool.read_bytes() and b"message 1" not in spool.read_bytes()
        assert b"message 1" in trash.read_bytes()
        assert {os.stat(spool).st_uid, os.stat(trash).st_uid} == {ALICE}
    finally:
        homes.close()


def test_spool_of_another_owner_is_refused_for_reading(tmp_path):
    """A spool whose owner is not the account's uid is not read, even with one link."""
    _spool(tmp_path / "alice", 1, uid=BOB)
    box = Mbox((str(tmp_path), ("alice",)), owner=ALICE)
    box.lock()
    try:
        with pytest.raises(UnsafeEntry, match="owned by uid 12346"):
            box.scan()
    finally:
        box.unlock()


# -- item 10: the lock files ---------------------------------------------------------------------
def _shared_spool_dir(tmp_path: Path) -> tuple[Path, Path]:
    """A root-owned sticky /var/mail look-alike with alice's spool of two messages."""
    root = tmp_path / "srv"
    spools = root / "spool"
    spools.mkdir(parents=True)
    spools.chmod(0o1777)
    _spool(spools / "alice", 1, 2)
    return root, spools


def test_session_lock_hard_linked_to_roots_file_is_never_written(start_server, tmp_path):
    """.alice.iupop3.lock as a hard link to root's file: the login is refused and the file is
    untouched (old code: opened it, flocked it and wrote the session stamp over it)."""
    root, spools = _shared_spool_dir(tmp_path)
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    secret.chmod(0o600)
    os.link(secret, spools / ".alice.iupop3.lock")
    before = _snapshot(secret)
    server = start_server("-mail", f"mbox:{spools}/%u", "-workers", "1", root=root,
                          deliver=False)
    raw, reply = _login(server)
    assert reply == R.MAILDROP_UNAVAILABLE.encode()
    server.wait_for(r"alice: .*session lock .*one link.*refused")
    assert _snapshot(secret) == before


def test_planted_dot_lock_temp_names_do_not_fail_the_login(start_server, tmp_path):
    """The names .lkPID.N.HOST the worker would use, planted in the shared spool directory:
    the login is served (old code: the predictable name's O_EXCL failed the lock, -ERR)."""
    root, spools = _shared_spool_dir(tmp_path)
    server = start_server("-mail", f"mbox:{spools}/%u", "-workers", "1", root=root,
                          deliver=False)
    pid = server.worker_pids()[1]
    for n in range(64):
        (spools / f".lk{pid}.{n}.{mboxlock.HOST}").symlink_to("/nonexistent")
    raw, reply = _login(server)
    assert reply == R.LOGIN_OK.encode()
    assert int(raw.command("STAT").split()[1]) == 2
    assert raw.command("QUIT").startswith(b"+OK")
    assert len([p for p in spools.iterdir() if p.name.startswith(".lk")]) == 64


def test_dot_lock_takes_the_next_temp_name_when_one_is_planted(tmp_path, monkeypatch):
    """A planted temp name (any kind of file) is passed over for the next one."""
    names = iter([".lk-planted", ".lk-fresh"])
    monkeypatch.setattr(mboxlock, "_temp_name", lambda: next(names))
    (tmp_path / ".lk-planted").symlink_to(tmp_path / "victim")
    lock = mboxlock.DotLock(str(tmp_path / "alice.lock"))
    lock.acquire(time.monotonic() + 5)
    assert (tmp_path / "alice.lock").read_text().split()[0] == str(os.getpid())
    lock.release()
    assert not (tmp_path / "victim").exists() and not (tmp_path / ".lk-fresh").exists()


@pytest.mark.parametrize("relative", [True, False], ids=["dir-fd", "path"])
def test_touch_never_follows_a_symlink_put_in_place_of_the_lock(tmp_path, relative):
    """A dot-lock replaced by a symlink during a long copy: touch leaves the target's times
    (old code: os.utime followed it, so root touched any file), and release keeps the link."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    old = time.time() - 3600
    os.utime(victim, (old, old))
    before = _snapshot(victim)
    directory = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        lock = (mboxlock.DotLock("alice.lock", directory, label=str(tmp_path / "alice.lock"))
                if relative else mboxlock.DotLock(str(tmp_path / "alice.lock")))
        lock.acquire(time.monotonic() + 5)
        (tmp_path / "planted").symlink_to(victim)
        os.rename(tmp_path / "planted", tmp_path / "alice.lock")
        lock._touched = time.monotonic() - mboxlock.TOUCH_SECONDS - 1
        lock.touch()
        lock.release()
    finally:
        os.close(directory)
    assert _snapshot(victim) == before and (tmp_path / "alice.lock").is_symlink()
