"""Moving from Dovecot without a re-download, against a real Dovecot (issue 13 item 5).

A private Dovecot (Debian dovecot-pop3d, installed by ``dev.py test``, its own config, base
and state directories, a loopback port) serves a Maildir; fetchmail --keep polls it; then
iupop3 serves the same Maildir and must give the identical UIDL list in the same order, and
fetchmail's next poll must fetch nothing. Courier's file: tests/test_ledger.py and the
sans-IO parser tests.
"""

from __future__ import annotations

import getpass
import os
import poplib
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

from bench.servers import DOVECOT, DOVECOT_POP3, free_port, wait_for_greeting
from conftest import USERS, sample, write_message

FETCHMAIL = shutil.which("fetchmail")
NOBODY = 65534
pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="a private Dovecot serves mail as another uid"),
    pytest.mark.skipif(not (os.path.exists(DOVECOT) and os.path.exists(DOVECOT_POP3)),
                       reason="dovecot-pop3d is not installed (dev.py test installs it)"),
    pytest.mark.skipif(FETCHMAIL is None, reason="fetchmail is not installed"),
]

DOVECOT_CONF = """\
instance_name = iupop3-test-{port}
base_dir = {work}/base
state_dir = {work}/state
protocols = pop3
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
mail_location = maildir:{mail}/%u
log_path = {work}/dovecot.log
info_log_path = /dev/null
pop3_uidl_format = %08Xu%08Xv
passdb {{
  driver = passwd-file
  args = scheme=PLAIN {work}/passwd
}}
userdb {{
  driver = passwd-file
  args = {work}/passwd
}}
service pop3-login {{
  inet_listener pop3 {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener pop3s {{
    port = 0
  }}
}}
service imap-login {{
  inet_listener imap {{
    port = 0
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
"""


@pytest.fixture
def shared_root():
    """A folder outside pytest's 0700 tmp tree, so Dovecot's mail process (as nobody) can
    reach the Maildir; removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="iupop3-migration-", dir="/tmp"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


class PrivateDovecot:
    """dovecot -F with its own config; stopped by its pid (it is our child)."""

    def __init__(self, work: Path, mail: Path):
        self.work, self.mail = work, mail
        self.proc: subprocess.Popen | None = None

    def start(self) -> "PrivateDovecot":
        for sub in ("base", "state"):
            (self.work / sub).mkdir(parents=True, exist_ok=True)
        (self.work / "passwd").write_text(
            f"alice:{{PLAIN}}{USERS['alice']}:{NOBODY}:{NOBODY}::{self.mail}/alice::\n")
        for _ in range(3):  # a port taken between choosing and binding: try another
            self.port = free_port()
            conf = self.work / "dovecot.conf"
            conf.write_text(DOVECOT_CONF.format(work=self.work, mail=self.mail, port=self.port))
            self.proc = subprocess.Popen([DOVECOT, "-F", "-c", str(conf)],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
            try:
                wait_for_greeting(self.port, self.proc, timeout=20)
                return self
            except Exception:
                self.stop()
        pytest.fail("Dovecot did not start: " + (self.work / "dovecot.log").read_text()[-2000:])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # only the group we started
                self.proc.wait(5)


def fetchmail_keep(home: Path, port: int) -> tuple[int, int]:
    """One fetchmail --keep poll with UIDLs (its idfile in ``home``): (status, delivered)."""
    out = home / "delivered"
    out.mkdir(parents=True, exist_ok=True)
    rc = home / "fetchmailrc"
    rc.write_text("set no syslog\nset no bouncemail\n"
                  f"poll 127.0.0.1 with proto POP3 port {port} uidl timeout 20\n"
                  f'  user "alice" there with password "{USERS["alice"]}" is '
                  f'"{getpass.getuser()}" here\n'
                  "  keep\n  sslproto ''\n  no sslcertck\n  no rewrite\n"
                  f'  mda "cat > $(mktemp {out}/msg.XXXXXXXX)"\n')
    rc.chmod(0o600)
    before = len(list(out.iterdir()))
    env = dict(os.environ, HOME=str(home), FETCHMAILHOME=str(home))
    done = subprocess.run([FETCHMAIL, "-f", str(rc), "--nodetach", "-i", str(home / "ids")],
                          env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    assert done.returncode in (0, 1), done.stderr.decode(errors="replace")[-2000:]
    return done.returncode, len(list(out.iterdir())) - before


def uidl_list(port: int) -> list[bytes]:
    client = poplib.POP3("127.0.0.1", port, timeout=20)
    client.user("alice")
    client.pass_(USERS["alice"])
    listed = client.uidl()[1]
    client.quit()
    return listed


def deliver(box: Path, count: int) -> None:
    for n in range(1, count + 1):
        sub = "cur" if n % 3 == 0 else "new"
        name = f"{1700000000 + n}.M{n}P1Q{n}.host" + (":2,S" if sub == "cur" else "")
        write_message(box, name, sample(n), sub=sub)
    for path in [box, *box.rglob("*")]:
        os.chown(path, NOBODY, NOBODY)


def test_dovecot_uidls_are_kept_and_fetchmail_fetches_nothing(start_server, shared_root):
    """Dovecot serves a Maildir and fetchmail --keep polls it; iupop3 (-maxmsg 0) then gives
    the identical UIDL list in the same order, fetchmail's first poll of iupop3 fetches
    nothing, and a message delivered afterwards gets iupop3's own UIDL and is fetched once."""
    mail = shared_root / "mail"
    box = mail / "alice"
    deliver(box, 7)
    dovecot = PrivateDovecot(shared_root / "dovecot", mail).start()
    try:
        theirs = uidl_list(dovecot.port)
        status, got = fetchmail_keep(shared_root / "fetch", dovecot.port)
        assert (status, got) == (0, 7)
    finally:
        dovecot.stop()
    assert theirs[0].split()[1].startswith(b"00000001") and len(theirs) == 7
    assert (box / "dovecot-uidlist").exists()

    server = start_server("-maxmsg", "0", root=shared_root, deliver=False)
    assert uidl_list(server.port) == theirs
    server.wait_for(r"7 UIDLs imported from dovecot-uidlist")
    assert fetchmail_keep(shared_root / "fetch", server.port) == (1, 0)  # 1: no mail

    write_message(box, "1800000000.M99P1Q99.host", sample(99))
    os.chown(box / "new" / "1800000000.M99P1Q99.host", NOBODY, NOBODY)
    ours = uidl_list(server.port)
    assert ours[:7] == theirs and ours[7] == b"8 1800000000.M99P1Q99.host"
    assert fetchmail_keep(shared_root / "fetch", server.port) == (0, 1)
    (box / ".iupop3.ledger").unlink()  # a lost ledger: the imported UIDLs stay
    assert uidl_list(server.port) == ours

