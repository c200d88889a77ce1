"""Issue 10 "Critical": nothing outside a maildrop is reached through a POP3 session.

A local user who can write their own Maildir plants symlinks, FIFOs and hard links in it; each
attack runs against the real server once as root and once with ``-user nobody``, and shows the
target unchanged and the attack refused. Root only (chown, -user); skipped with the reason
otherwise.
"""

from __future__ import annotations

import functools
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from conftest import ROOT, USERS, Server, sample, write_message
from worker import replies as R

SECRET = b"root: $6$secret-hash-nobody-may-see:19000:0:99999:7:::\n"
MODES = ["root", "user"]


@functools.lru_cache(maxsize=1)
def _python_for_nobody() -> tuple[str, str] | None:
    from test_daemon import _python_for  # the same interpreter search as the -user tests

    nobody = pwd.getpwnam("nobody")
    found = _python_for(nobody.pw_uid, nobody.pw_gid)
    return None if found is None else (found[0], found[1]["PYTHONPATH"])


class SiteServer(Server):
    """Server with the interpreter and PYTHONPATH the service user can run (``-user`` mode)."""

    python = sys.executable
    pythonpath = str(ROOT)

    def start(self) -> "SiteServer":
        cmd = [self.python, "-m", "supervisor", "-users", str(self.users_file),
               "-mail", f"maildir:{self.mail}/%u", "-listen", "127.0.0.1", "-port", "0",
               "-loglevel", "DEBUG", *self.args]
        env = dict(os.environ, PYTHONPATH=self.pythonpath, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=self.root, env=env,
                                     start_new_session=True)
        threading.Thread(target=self._drain, daemon=True).start()
        self.port = int(self.wait_for(r"listening on 127\.0\.0\.1:(\d+)", timeout=30).group(1))
        workers = int(self.args[self.args.index("-workers") + 1])
        for slot in range(1, workers + 1):
            self.wait_for(rf"worker {slot} ready", timeout=30)
        return self


class Site:
    """A root-owned 0755 folder (outside pytest's 0700 tmp) whose mail belongs to ``nobody``:
    the maildrops of local users, as the server sees them under ``-mail maildir:.../%u``."""

    def __init__(self, mode: str):
        self.mode = mode
        self.nobody = pwd.getpwnam("nobody")
        self.root = Path(tempfile.mkdtemp(prefix="iupop3-safety-"))
        self.root.chmod(0o755)
        self.mail = self.root / "mail"
        for user in USERS:
            for n in (1, 2, 3):
                write_message(self.mail / user, f"{1700000000 + n}.M{n}.test", sample(n))
        self.alice = self.mail / "alice"
        self.own(self.mail, *self.mail.rglob("*"))
        # What the attacker wants: root's secret (the server as root can read it), or with
        # -user a file the service user can read but that is nobody's mail (the users file).
        self.secret = self.root / "secret"
        self.secret.write_bytes(SECRET)
        self.secret.chmod(0o600 if mode == "root" else 0o644)
        self.servers: list[SiteServer] = []

    def own(self, *paths: Path) -> None:
        """Give paths to the local user (nobody), as if they had made them (never a hard link
        to root's file: chown would change the file itself)."""
        for path in paths:
            os.chown(path, self.nobody.pw_uid, self.nobody.pw_gid, follow_symlinks=False)

    def start(self, *args: str) -> SiteServer:
        server = SiteServer(self.root, ["-workers", "1", *args])
        server.users_file.chmod(0o644)
        if self.mode == "user":
            found = _python_for_nobody()
            if found is None:
                pytest.skip("no Python with gevent that the user nobody can run")
            server.python, server.pythonpath = found
            server.args += ["-user", "nobody"]
        self.servers.append(server)
        return server.start()

    def snapshot(self, path: Path) -> tuple:
        st = os.lstat(path)
        content = path.read_bytes() if stat.S_ISREG(st.st_mode) else None
        return st.st_mode, st.st_uid, st.st_nlink, st.st_mtime_ns, content

    def close(self) -> None:
        for server in self.servers:
            server.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(params=MODES)
def site(request):
    if os.geteuid() != 0:
        pytest.skip("the attacks need root: a maildrop of another user, chown, -user nobody")
    made = Site(request.param)
    yield made
    made.close()


def _login(server: SiteServer, user: str = "alice"):
    raw = server.raw(timeout=15)
    assert raw.line().startswith(b"+OK")
    assert raw.command(f"USER {user}").startswith(b"+OK")
    return raw, raw.command(f"PASS {USERS[user]}")


def _retr_all(raw, count: int) -> bytes:
    got = b""
    for n in range(1, count + 1):
        status = raw.command(f"RETR {n}")
        if status.startswith(b"+OK"):
            got += b"\n".join(raw.multiline())
    return got


def _served_count(raw) -> int:
    return int(raw.command("STAT").split()[1])


# -- the attacks ---------------------------------------------------------------------------------
def test_symlink_in_cur_to_a_secret_is_neither_counted_nor_served(site):
    """cur/NAME -> a secret file: not in STAT, never sent, one escaped INFO line (old code:
    counted by STAT and served by RETR, the secret's lines as headers)."""
    name = "1700000009.M9.host\nFAKE ERROR line"
    link = site.alice / "cur" / name
    link.parent.mkdir(exist_ok=True)
    link.symlink_to(site.secret)
    site.own(link.parent, link)
    before = site.snapshot(site.secret)
    server = site.start()
    raw, reply = _login(server)
    assert reply == R.LOGIN_OK.encode()
    assert _served_count(raw) == 3
    assert b"secret-hash" not in _retr_all(raw, 4)
    assert raw.command("QUIT").startswith(b"+OK")
    server.wait_for(r"INFO .*skipped .*1700000009\.M9\.host\\nFAKE ERROR line")
    assert "\nFAKE ERROR line" not in server.output
    assert site.snapshot(site.secret) == before and link.is_symlink()


def test_cur_symlinked_to_another_directory_is_refused(site):
    """cur -> a directory elsewhere: the maildrop is refused, nothing there is listed or served
    (old code: listed and served the other directory's files)."""
    elsewhere = site.mail / "elsewhere"
    elsewhere.mkdir()
    victim = elsewhere / "1700000009.M9.other"
    victim.write_bytes(b"Subject: not yours\n\n" + SECRET)
    shutil.rmtree(site.alice / "cur", ignore_errors=True)
    (site.alice / "cur").symlink_to(elsewhere)
    site.own(elsewhere, victim, site.alice / "cur")
    before = site.snapshot(victim)
    server = site.start()
    raw, reply = _login(server)
    assert reply == R.MAILDROP_UNAVAILABLE.encode()
    server.wait_for(r"alice: .*cur.* symlink")
    assert site.snapshot(victim) == before and sorted(os.listdir(elsewhere)) == [victim.name]


def test_purge_never_empties_a_symlinked_wastebasket_folder(site):
    """.Trash/cur -> elsewhere with -purge_reclaim: QUIT deletes only the session's message;
    the files elsewhere stay (old code: unlinked every file there)."""
    elsewhere = site.mail / "elsewhere"
    elsewhere.mkdir()
    victim = elsewhere / "precious"
    victim.write_bytes(b"keep me\n")
    trash = site.alice / ".Trash"
    for sub in ("new", "tmp"):
        (trash / sub).mkdir(parents=True)
    (trash / "cur").symlink_to(elsewhere)
    site.own(elsewhere, victim, trash, *trash.iterdir())
    before = site.snapshot(victim)
    server = site.start("-purge_reclaim")
    raw, reply = _login(server)
    assert reply == R.LOGIN_OK.encode()
    assert raw.command("DELE 1").startswith(b"+OK")
    assert raw.command("QUIT").startswith(b"+OK")
    assert site.snapshot(victim) == before
    server.wait_for(r"INFO .*\.Trash/cur.* symlink")
    assert len(os.listdir(site.alice / "new")) + len(os.listdir(site.alice / "cur")) == 2


def test_lock_file_symlink_creates_nothing(site):
    """.iupop3.lock -> a file that does not exist: login refused, the file is not created
    (old code: created it, as root a file anywhere)."""
    planted = site.mail / "planted-by-lock"
    (site.alice / ".iupop3.lock").symlink_to(planted)
    site.own(site.alice / ".iupop3.lock")
    server = site.start()
    raw, reply = _login(server)
    assert reply == R.MAILDROP_UNAVAILABLE.encode()
    assert not os.path.lexists(planted)
    server.wait_for(r"alice: .*iupop3\.lock")


def test_fifo_in_cur_blocks_nothing(site):
    """A FIFO in cur/: skipped at the scan, the login answers at once, other sessions go on
    (old code: the scan opened it and a pool thread blocked forever; the login never answered)."""
    fifo = site.alice / "cur" / "1700000009.M9.fifo"
    fifo.parent.mkdir(exist_ok=True)
    os.mkfifo(fifo)
    site.own(fifo.parent, fifo)
    server = site.start()
    raw, reply = _login(server)
    assert reply == R.LOGIN_OK.encode()
    assert _served_count(raw) == 3
    assert raw.command("QUIT").startswith(b"+OK")
    server.wait_for(r"INFO .*skipped .*1700000009\.M9\.fifo.*not a regular file")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_message_swapped_for_a_fifo_after_login_blocks_no_session(site):
    """A message replaced by a FIFO after login: RETR is refused, and another session of the
    same worker is answered meanwhile (old code: open() on the event loop froze the worker)."""
    server = site.start()
    raw, reply = _login(server)
    assert reply == R.LOGIN_OK.encode()
    other, reply = _login(server, "bob")
    assert reply == R.LOGIN_OK.encode()
    message = site.alice / "new" / "1700000001.M1.test"
    message.unlink()
    os.mkfifo(message)
    site.own(message)
    raw.send(b"RETR 1\r\n")
    started = time.monotonic()
    assert other.command("NOOP").startswith(b"+OK")
    print(f"\nNOOP of another session while RETR met a FIFO: {time.monotonic() - started:.3f} s")
    assert raw.line() == R.NO_SUCH_MESSAGE.encode()
    assert raw.command("QUIT").startswith(b"+OK")
    assert stat.S_ISFIFO(os.lstat(message).st_mode)


def test_hard_link_to_a_file_of_another_owner_is_refused(site):
    """A hard link in cur/ to root's file: not counted, not served, not moved or deleted by
    DELE + QUIT with -purge_reclaim (old code: served it, and purge unlinked the link)."""
    link = site.alice / "cur" / "1700000000.M0.link"
    link.parent.mkdir(exist_ok=True)
    site.own(link.parent)
    os.link(site.secret, link)  # root may link any file (fs.protected_hardlinks aside)
    before = site.snapshot(site.secret)
    server = site.start("-purge_reclaim")
    raw, reply = _login(server)
    assert reply == R.LOGIN_OK.encode()
    assert _served_count(raw) == 3
    assert b"secret-hash" not in _retr_all(raw, 4)
    for n in (1, 2, 3):
        assert raw.command(f"DELE {n}").startswith(b"+OK")
    assert raw.command("QUIT").startswith(b"+OK")
    server.wait_for(r"INFO .*skipped .*1700000000\.M0\.link.*owner")
    assert site.snapshot(site.secret) == before
    assert os.path.samefile(link, site.secret)
