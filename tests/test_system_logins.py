"""Logins of real system accounts through the real server (issue 12): ``-users shadow:`` and
``-users pam:SERVICE`` with ``-mail maildir:~/Maildir``, every refusal answered alike, and the
folders the server makes in a Maildir owned by the account. The users are made with useradd
(named ``iupt`` and random hex) and deleted at the end, even on failure; these tests run as
root when CI is set or --system-accounts is given, and skip with the reason otherwise.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, Server, sample, write_message
from shared import accountsource
from shared.accountsource import Verdict
from shared.users import Account
from systemaccounts import PREFIX, run, system_site, why_not_system_accounts
from worker import replies as R
from worker.accounts import Accounts

SOURCES = ("shadow", "pam")
PAM_EXAMPLE = (ROOT / "etc" / "pam.d" / "iupop3").read_text()


@pytest.fixture(scope="module")
def site(request):
    """Users for each refusal, two that log in (one per source) and the example PAM service
    installed under a name of the tests' own; all deleted on the way out."""
    reason = why_not_system_accounts(request.config)
    if reason:
        pytest.skip(reason)
    with system_site() as made:
        made.add_group(made.group)
        member = ("-s", "/bin/bash", "-G", made.group)
        for role in ("okshadow", "okpam", "wrong", "pen", "hup"):
            made.add_user(role, *member)
        made.add_user("lock", *member)
        run("usermod", "-L", made.users["lock"])
        made.add_user("exp", *member)
        run("chage", "-E", "0", made.users["exp"])
        made.add_user("nol", "-s", "/usr/sbin/nologin", "-G", made.group)
        made.add_user("out", "-s", "/bin/bash")
        made.add_user("nohome", *member)
        shutil.rmtree(pwd.getpwnam(made.users["nohome"]).pw_dir)  # useradd without -m, LDAP
        made.install(Path("/etc/pam.d") / f"{PREFIX}{made.suffix}", PAM_EXAMPLE)
        yield made


@pytest.fixture(scope="module")
def servers(site, tmp_path_factory):
    """One real server per source, serving the site's users from their homes."""
    started: dict[str, Server] = {}
    try:
        for source in SOURCES:
            users = "shadow:" if source == "shadow" else f"pam:{PREFIX}{site.suffix}"
            root = tmp_path_factory.mktemp(source)
            started[source] = Server(root, [
                "-users", users, "-mail", "maildir:~/Maildir", "-allow-groups", site.group,
                "-workers", "1", "-apop", "-trusted-networks", "127.0.0.0/8"], users={}).start()
        yield started
    finally:
        for server in started.values():
            server.stop()


def _refusal(server: Server, user: str, password: str) -> bytes:
    """The server's answer to USER/PASS on a fresh connection."""
    client = server.raw()
    try:
        client.line()
        assert client.command(f"USER {user}").startswith(b"+OK")
        return client.command(f"PASS {password}")
    finally:
        client.close()


def _owned(path: Path, entry: pwd.struct_passwd, mode: int) -> None:
    st = os.lstat(path)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (
        entry.pw_uid, entry.pw_gid, mode), f"{path}: {st.st_uid}:{st.st_gid} {oct(st.st_mode)}"


@pytest.mark.parametrize("source", SOURCES)
def test_system_user_logs_in_and_owns_what_the_server_makes(site, servers, source):
    """A Unix user logs in with its own password; the Maildir made at its first login, its
    lock, and the wastebasket a DELE+QUIT makes belong to the user with the Maildir's mode."""
    server, name = servers[source], site.users[f"ok{source}"]
    entry = pwd.getpwnam(name)
    maildir = Path(entry.pw_dir) / "Maildir"
    assert not maildir.exists()
    client = server.pop()
    client.user(name)
    assert client.pass_(site.passwords[f"ok{source}"]).startswith(b"+OK")
    assert client.stat() == (0, 0)
    client.quit()
    _owned(maildir, entry, 0o700)
    for sub in ("cur", "new", "tmp"):
        _owned(maildir / sub, entry, 0o700)
    _owned(maildir / ".iupop3.lock", entry, 0o600)

    delivered = write_message(maildir, "1700000001.M1.test", sample(1))
    os.chown(delivered, entry.pw_uid, entry.pw_gid)  # as the user's own delivery agent would
    client = server.pop()
    client.user(name)
    client.pass_(site.passwords[f"ok{source}"])
    assert client.stat()[0] == 1
    client.dele(1)
    client.quit()
    trash = maildir / ".Trash"
    for folder in (trash, trash / "cur", trash / "new", trash / "tmp"):
        _owned(folder, entry, 0o700)
    _owned(trash / "maildirfolder", entry, 0o600)
    assert [p.name for p in (trash / "cur").iterdir()] == ["1700000001.M1.test:2,"]
    server.wait_for(rf"user {name} logged in from 127\.0\.0\.1")
    server.wait_for(r"running as root: -users (shadow:|pam:\S+) serves system accounts")


@pytest.mark.parametrize("source", SOURCES)
def test_missing_home_is_refused_not_made_as_root(site, servers, source):
    """A system account whose home does not exist gets the maildrop -ERR and an ERROR line
    saying why; the server makes no home (it would be root's and lock the user out)."""
    server, name = servers[source], site.users["nohome"]
    home = Path(pwd.getpwnam(name).pw_dir)
    try:
        reply = _refusal(server, name, site.passwords["nohome"])
        assert reply == R.MAILDROP_UNAVAILABLE.encode()
        server.wait_for(rf"user {name}: home {re.escape(str(home))} does not exist: not made")
        assert not home.exists()
    finally:
        if home.exists():  # the old behaviour: a root-owned home userdel -r may not remove
            shutil.rmtree(home)


@pytest.mark.parametrize("source", SOURCES)
def test_every_refusal_reads_the_same(site, servers, source):
    """Locked, expired, no-login shell, outside -allow-groups, wrong password and unknown user
    get the one ``-ERR [AUTH] ... not accessible``; only the log says why."""
    server, mark = servers[source], servers[source].mark()
    unknown = f"{PREFIX}{site.suffix}none"
    tries = {role: (site.users[role], site.passwords[role])
             for role in ("lock", "exp", "nol", "out")}
    tries["wrong"] = (site.users["wrong"], site.passwords["wrong"] + "x")
    tries["unknown"] = (unknown, "whatever it is")
    replies = {role: _refusal(server, user, password).replace(user.encode(), b"NAME")
               for role, (user, password) in tries.items()}
    assert set(replies.values()) == {R.NOT_ACCESSIBLE.format(user="NAME").encode()}, replies
    reasons = {"lock": "locked", "exp": "expired", "nol": "no-login shell /usr/sbin/nologin",
               "out": "not in -allow-groups", "unknown": "unknown user",
               "wrong": "wrong password" if source == "shadow" else "PAM"}
    for role, (user, _) in tries.items():
        server.wait_for(rf"login of {user} refused: .*{re.escape(reasons[role])}", start=mark)
        server.wait_for(rf"login failed for {user} from 127\.0\.0\.1 port", start=mark)
    assert not [line for line in server.lines[mark:] if " ERROR " in line]


@pytest.mark.parametrize("source", SOURCES)
def test_useradd_after_start_logs_in_without_reload(site, servers, source):
    """Accounts are looked up at each login: a user added while the server runs logs in
    at once, no SIGHUP."""
    server = servers[source]
    with system_site() as later:
        later.add_user("new", "-s", "/bin/bash", "-G", site.group)
        client = server.pop()
        client.user(later.users["new"])
        assert client.pass_(later.passwords["new"]).startswith(b"+OK")
        client.quit()


@pytest.mark.parametrize("source", SOURCES)
def test_sighup_swaps_the_source_and_logins_go_on(site, servers, source):
    """SIGHUP rebuilds a system source (a fresh dummy; accounts need no reload) and keeps
    serving; there is no file to watch."""
    server, mark = servers[source], servers[source].mark()
    server.signal(signal.SIGHUP)
    server.wait_for(r"users source (shadow:|pam:\S+) reloaded \(reload request\)", start=mark)
    client = server.pop()
    client.user(site.users["hup"])
    assert client.pass_(site.passwords["hup"]).startswith(b"+OK")
    client.quit()


def test_failed_login_penalty_holds_for_system_accounts(site, servers):
    """The per-user failed-login delay applies to system accounts as to a passwd-file."""
    server, mark, name = servers["shadow"], servers["shadow"].mark(), site.users["pen"]
    for _ in range(2):
        _refusal(server, name, "not the password")
    server.wait_for(rf"login failed for {name} from 127\.0\.0\.1 port \d+ \(attempt 1\), "
                    r"delay 1s", start=mark)


@pytest.mark.parametrize("source", SOURCES)
def test_apop_refused_for_system_accounts(site, servers, source):
    """APOP needs a {PLAIN} secret from a passwd-file: a system account is refused like a
    wrong digest, with the same reply."""
    server, name = servers[source], site.users[f"ok{source}"]
    client = server.raw()
    try:
        client.line()
        reply = client.command(f"APOP {name} {'0' * 32}")
    finally:
        client.close()
    assert reply == R.NOT_ACCESSIBLE.format(user=name).encode()
    server.wait_for(rf"login of {name} refused: APOP needs")


@pytest.mark.parametrize("source", ["shadow:", "pam:"])
def test_system_accounts_with_user_refused_at_start(tmp_path, source):
    """-users shadow: (or pam:) with -user: one line on stderr and exit 2, nothing started."""
    out = subprocess.run([sys.executable, "-m", "supervisor", "-users", source, "-user",
                          "nobody", "-listen", "127.0.0.1", "-port", "0"], cwd=tmp_path,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2
    assert out.stdout == ""
    assert out.stderr.count("\n") == 1
    assert "needs the workers to keep root" in out.stderr and "-user nobody" in out.stderr


# -- the padding, without system accounts ----------------------------------------------------------
class _InstantSource:
    """A system-like source whose verdicts cost nothing: what is left is the padding's."""

    CHECKS_PER_LOGIN = 2
    spec = "shadow:"

    def __init__(self, accept: bool = False):
        self.accept = accept

    def cost_examples(self, limit: int) -> list[str]:
        return [accountsource.site_dummy([])]  # libxcrypt's default method and cost

    def needs_thread(self, name: str) -> bool:
        return True

    def lookup(self, name: str) -> Account | None:
        return None

    def authenticate(self, name: str, password: bytes, rhost: str = "") -> Verdict:
        return Verdict(Account(name, "")) if self.accept else Verdict(None, "unknown user")


def test_system_source_refusals_are_padded_to_the_site_hash_cost():
    """A refusal that cost nothing still lasts what a check of the site's hash class costs;
    an accepted login is not padded (worker/accounts.py, every source)."""
    waits: list[float] = []
    accounts = Accounts(_InstantSource(), sleep=waits.append)
    assert accounts.slowest > 0
    assert accounts.authenticate("jones", b"x", "127.0.0.1").account is None
    assert len(waits) == 1 and 0 < waits[0] <= accounts.slowest
    accounts = Accounts(_InstantSource(accept=True), sleep=waits.append)
    assert accounts.authenticate("jones", b"x", "127.0.0.1").account is not None
    assert len(waits) == 1
    assert accounts.authenticate_apop("jones", "<1.2@host>", "0" * 32).account is None


def test_one_slow_system_check_does_not_pad_every_refusal_for_good():
    """After a check that took long (a stuck NSS or PAM backend), ordinary checks bring the
    padding back down: it follows the load, it does not ratchet up."""
    accounts = Accounts(_InstantSource(), sleep=lambda seconds: None)
    usual = accounts.slowest
    accounts._observe(accounts.source, "jones", usual * 100)
    assert accounts.slowest > usual * 10
    for _ in range(40):
        accounts._observe(accounts.source, "jones", usual)
    assert accounts.slowest < usual * 1.5
