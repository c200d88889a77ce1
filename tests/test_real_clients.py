"""Real third-party POP3 clients against the real server: fetchmail, getmail6 and curl.

Each test delivers known messages into a Maildir, lets a client from Debian or PyPI fetch them,
and checks what arrived byte for byte (modulo the client's own additions: fetchmail's Received:,
getmail's Return-Path: and header re-folding) and what the maildrop holds on disk afterwards.
"""

from __future__ import annotations

import getpass
import importlib.util
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import USERS, write_message
from shared.version import VERSION
from worker.rewrite import ID_WIDTH, NOTICE

HOST = "mail.test"
SERVER_ARGS = ("-hostname", HOST, "-workers", "1")
FETCHMAIL = shutil.which("fetchmail")
CURL = shutil.which("curl")
X_SERVER = f"X-POP3-Server: {HOST} IUPOP3 V{VERSION}\n".encode()
XID = re.compile(rb"X-POP3-ID: (\d{4}-\d\d-\d\d\.\d\d:\d\d:\d\d\.\d{3}\.\d{18})\n")
RECEIVED = re.compile(rb"Received: [^\n]*\n(?:[ \t][^\n]*\n)*")
MESSAGE_ID = re.compile(rb"(?im)^message-id:[ \t]*(<[^>\n]+>)")

needs_fetchmail = pytest.mark.skipif(FETCHMAIL is None, reason="fetchmail is not installed")


# -- the messages -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Mail:
    """One stored message and the header block the server serves for it (before X-POP3)."""

    name: str          # Maildir unique name: delivery time first, so the order is known
    data: bytes        # the stored file, LF line ends
    head: bytes = b""  # served header lines when they differ from the stored ones
    foreign: bool = False

    @property
    def msgid(self) -> bytes:
        return MESSAGE_ID.search(self.data).group(1)

    def served(self, xid: bytes) -> bytes:
        """What RETR sends (LF line ends, unstuffed): headers, X-POP3 lines, the rest."""
        stored_head, sep, rest = self.data.partition(b"\n\n")
        head = self.head or stored_head + b"\n"
        x_lines = X_SERVER + b"X-POP3-ID: " + xid + b"\n"
        if self.foreign:
            return head + x_lines + b"\n" + NOTICE.replace(b"\r\n", b"\n")
        return head + x_lines + b"\n" + rest


def mail(n: int, body: bytes, extra: bytes = b"", sender: bytes = b"") -> Mail:
    head = (b"From: " + (sender or f"sender{n}@example.org".encode()) + b"\n"
            b"To: alice@example.org\nSubject: message " + str(n).encode() + b"\n"
            b"Date: Thu, 26 Nov 2026 10:00:0" + str(n % 10).encode() + b" +0000\n"
            b"Message-ID: <" + str(n).encode() + b"@example.org>\n" + extra)
    return Mail(f"{1700000000 + n}.M{n}P1.example", head + b"\n" + body)


def corpus(foreign: bool = False) -> list[Mail]:
    """Messages that exercise dot-stuffing, 8-bit text, long lines, chunking and From: patching."""
    big = b"".join(b"%s line %06d of the big one, padded to vary its length %s\n"
                   % (b"." if i % 7 == 0 else b"", i, b"x" * (i % 53)) for i in range(4000))
    vms = mail(5, b"Sent from the VAX.\n", sender=b'MYVAX::HUGHES "larry hughes"')
    vms_head = vms.data.partition(b"\n\n")[0].replace(
        b'From: MYVAX::HUGHES "larry hughes"', b"From: hughes@myvax") + b"\n"
    mails = [
        mail(1, b"Hello Alice.\n"),
        mail(2, b".\n..\n.leading dot\nFrom the start of a line\n>From quoted\n\n. \nend\n"),
        mail(3, "Grüße, naïve café\n".encode() + b"latin-1 \xe9\xe8\n" + b"y" * 990 + b"\n"
             b"\ttab and trailing spaces   \n",
             extra=b"X-Folded: first part\n\tsecond part of a folded header\n"),
        mail(4, big),
        Mail(vms.name, vms.data, vms_head + b'X-VMS-From: MYVAX::HUGHES "larry hughes"\n'),
    ]
    if foreign:
        blob = mail(6, b"binary \x00\x01\x02 VMS MAIL/FOREIGN data\n")
        mails.append(Mail(blob.name, blob.data, foreign=True))
    return mails


def deliver(maildir: Path, mails: list[Mail]) -> None:
    for m in mails:
        write_message(maildir, m.name, m.data)


def stored(folder: Path) -> dict[str, bytes]:
    """The messages of a Maildir folder (new/ and cur/), by file name relative to it."""
    found = {}
    for sub in ("new", "cur"):
        if (folder / sub).is_dir():
            for path in (folder / sub).iterdir():
                found[f"{sub}/{path.name}"] = path.read_bytes()
    return found


def check_arrived(delivered: bytes, m: Mail, server, client_head: re.Pattern[bytes]) -> bytes:
    """``delivered`` is ``m`` as served, byte for byte, after the client's own header lines;
    its X-POP3-ID has the fixed width and names a line in the server's log. Returns the ID."""
    added = client_head.match(delivered)
    assert added, delivered[:300]
    rest = delivered[added.end():]
    found = XID.search(rest)
    assert found, rest[:600]
    xid = found.group(1)
    assert len(xid) == ID_WIDTH
    assert rest == m.served(xid), (m.name, rest[:600])
    server.wait_for(re.escape(f"X-POP3-ID {xid.decode()}"))  # the drain thread may lag
    return xid


# -- fetchmail --------------------------------------------------------------------------------
class Fetchmail:
    """fetchmail run once per ``run`` with a generated rcfile; an MDA stores each message."""

    def __init__(self, home: Path, keep: bool):
        self.home = home
        self.out = home / "delivered"
        self.out.mkdir(parents=True, exist_ok=True)
        self.idfile = home / "fetchids"
        self.keep = keep

    def run(self, server, user: str = "alice") -> tuple[int, dict[bytes, bytes]]:
        """(fetchmail's exit status, the messages it delivered by Message-ID)."""
        mode = "keep" if self.keep else "fetchall\n  no keep"
        rc = self.home / "fetchmailrc"
        rc.write_text(
            "set no syslog\nset no bouncemail\n"
            f"poll 127.0.0.1 with proto POP3 port {server.port} uidl timeout 20\n"
            f'  user "{user}" there with password "{USERS[user]}" is "{getpass.getuser()}" here\n'
            f"  {mode}\n  sslproto ''\n  no sslcertck\n  no rewrite\n"
            f'  mda "cat > $(mktemp {self.out}/msg.XXXXXXXX)"\n')
        rc.chmod(0o600)  # fetchmail refuses an rcfile others can read
        before = set(self.out.iterdir())
        env = dict(os.environ, HOME=str(self.home), FETCHMAILHOME=str(self.home))
        done = subprocess.run([FETCHMAIL, "-f", str(rc), "--nodetach", "-i", str(self.idfile)],
                              env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
        assert done.returncode in (0, 1), done.stderr.decode(errors="replace")[-2000:]
        got = {}
        for path in set(self.out.iterdir()) - before:
            data = path.read_bytes()
            got[MESSAGE_ID.search(data).group(1)] = data
        return done.returncode, got


@needs_fetchmail
@pytest.mark.parametrize("purge", [False, True], ids=["wastebasket", "purge_reclaim"])
def test_fetchmail_download_and_delete(start_server, tmp_path, purge):
    """fetchmail fetchall without keep: every message arrives byte-exact, new/ and cur/ end
    empty, deleted mail sits in .Trash (or, with -purge_reclaim, is gone with the old trash),
    and the foreign message arrives as a notice and is kept in .MAIL whatever -purge_reclaim."""
    mails = corpus(foreign=True)
    args = (*SERVER_ARGS, "-purge_reclaim") if purge else SERVER_ARGS
    server = start_server(*args, deliver=False, root=tmp_path / "srv")
    box = server.maildir("alice")
    deliver(box, mails)
    old = b"From: old@example.org\nSubject: deleted last week\n\nold\n"
    write_message(box / ".Trash", "1600000000.M0P1.example:2,S", old, sub="cur")

    status, got = Fetchmail(tmp_path / "fm", keep=False).run(server)
    assert status == 0
    assert sorted(got) == sorted(m.msgid for m in mails)
    for m in mails:
        check_arrived(got[m.msgid], m, server, RECEIVED)
    server.wait_for(r"THREAD worker-1 \S+ update: 6 messages deleted, 1 of them foreign")

    assert stored(box) == {}
    trash = {} if purge else {f"cur/{m.name}:2,": m.data for m in mails if not m.foreign}
    if not purge:
        trash["cur/1600000000.M0P1.example:2,S"] = old
    assert stored(box / ".Trash") == trash
    assert stored(box / ".MAIL") == {f"cur/{m.name}:2,": m.data for m in mails if m.foreign}

    status, got = Fetchmail(tmp_path / "fm", keep=False).run(server)
    assert (status, got) == (1, {})  # fetchmail's "no mail": the foreign one is not served again


@needs_fetchmail
def test_fetchmail_leave_on_server_with_uidl(start_server, tmp_path):
    """fetchmail keep + uidl: the first run gets all, the next (after a restart, one new
    delivery and a local MUA moving a message to cur/) gets only the new one; nothing on disk
    changes but the files we changed; the idfile holds the Maildir unique names."""
    mails = corpus()
    root = tmp_path / "srv"
    server = start_server(*SERVER_ARGS, deliver=False, root=root)
    box = server.maildir("alice")
    deliver(box, mails)
    disk = stored(box)
    client = Fetchmail(tmp_path / "fm", keep=True)

    status, got = client.run(server)
    assert status == 0
    assert sorted(got) == sorted(m.msgid for m in mails)
    for m in mails:
        check_arrived(got[m.msgid], m, server, RECEIVED)
    assert stored(box) == disk
    ids = client.idfile.read_text().split()
    assert sorted(ids[1::2]) == sorted(m.name for m in mails)

    server.stop()  # UIDLs are stable across a restart ...
    server = start_server(*SERVER_ARGS, deliver=False, root=root)
    first = box / "new" / mails[0].name  # ... and across a move new/ -> cur/ with flags
    first.rename(box / "cur" / f"{mails[0].name}:2,S")
    new = mail(7, b"Delivered between two polls.\n")
    deliver(box, [new])
    disk = stored(box)

    status, got = client.run(server)
    assert status == 0
    assert list(got) == [new.msgid]
    check_arrived(got[new.msgid], new, server, RECEIVED)
    assert stored(box) == disk

    status, got = client.run(server)
    assert (status, got) == (1, {})
    assert stored(box) == disk


@needs_fetchmail
def test_fetchmail_maxmsg_two_of_five_oldest_first(start_server, tmp_path):
    """-maxmsg 2 with five messages: each fetch-and-delete run gets the two oldest left."""
    mails = [mail(n, f"Body {n}.\n".encode()) for n in range(1, 6)]
    server = start_server(*SERVER_ARGS, "-maxmsg", "2", deliver=False, root=tmp_path / "srv")
    box = server.maildir("alice")
    deliver(box, list(reversed(mails)))  # the order of delivery to disk must not matter
    client = Fetchmail(tmp_path / "fm", keep=False)
    for batch in (mails[0:2], mails[2:4], mails[4:5]):
        status, got = client.run(server)
        assert status == 0
        assert sorted(got) == sorted(m.msgid for m in batch)
        for m in batch:
            check_arrived(got[m.msgid], m, server, RECEIVED)
        left = mails[mails.index(batch[-1]) + 1:]
        assert sorted(stored(box)) == sorted(f"new/{m.name}" for m in left)
    assert client.run(server) == (1, {})
    assert len(stored(box / ".Trash")) == 5


# -- getmail ----------------------------------------------------------------------------------
def _getmail() -> tuple[str, str]:
    """(getmail script, user to deliver as) or a skip saying why getmail cannot run here."""
    if importlib.util.find_spec("getmailcore") is None:  # getmail6's package
        pytest.skip("getmail6 is not installed (pip install getmail6)")
    here = os.path.dirname(sys.executable)  # the venv's bin/ first, then PATH
    script = shutil.which("getmail", path=here) or shutil.which("getmail")
    if script is None:
        pytest.skip("getmail6 is installed but its getmail script is not found")
    if os.geteuid() != 0:
        return script, ""
    try:
        pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("getmail refuses to deliver as root and there is no user nobody")
    return script, "nobody"


def _fields(head: bytes) -> list[tuple[str, str]]:
    """Header fields as (lower-case name, value with folding and white space runs collapsed)."""
    unfolded = re.sub(rb"\r?\n[ \t]+", b" ", head)
    fields = []
    for line in unfolded.decode("utf-8", "replace").splitlines():
        name, _, value = line.partition(":")
        fields.append((name.strip().lower(), " ".join(value.split())))
    return fields


def test_getmail_leave_on_server_with_uidl(start_server, tmp_path):
    """getmail6 (delete = false, read_all = false): the first run gets all, the second only a
    new delivery; bodies arrive byte-exact, headers equal modulo Return-Path and re-folding."""
    script, deliver_as = _getmail()
    mails = corpus()
    server = start_server(*SERVER_ARGS, deliver=False, root=tmp_path / "srv")
    box = server.maildir("alice")
    deliver(box, mails)
    disk = stored(box)
    # getmail delivers as ``user`` when run as root (it refuses to deliver as root): that user
    # needs a Maildir it can reach, and pytest's tmp_path is private to root.
    outside = Path(tempfile.mkdtemp(prefix="iupop3-getmail-"))
    try:
        outside.chmod(0o755)
        dest = outside / "Maildir"
        for sub in ("", "new", "cur", "tmp"):
            (dest / sub).mkdir(exist_ok=True)
            if deliver_as:
                entry = pwd.getpwnam(deliver_as)
                os.chown(dest / sub, entry.pw_uid, entry.pw_gid)
        gm = tmp_path / "getmail"
        gm.mkdir()
        (gm / "getmailrc").write_text(
            "[retriever]\ntype = SimplePOP3Retriever\nserver = 127.0.0.1\n"
            f"port = {server.port}\nusername = alice\npassword = {USERS['alice']}\n\n"
            f"[destination]\ntype = Maildir\npath = {dest}/\n"
            + (f"user = {deliver_as}\n" if deliver_as else "")
            + "\n[options]\ndelete = false\nread_all = false\nverbose = 0\n"
            "delivered_to = false\nreceived = false\n")

        def run() -> dict[bytes, bytes]:
            before = set((dest / "new").iterdir())
            done = subprocess.run([sys.executable, script, "--getmaildir", str(gm),
                                   "--rcfile", "getmailrc"], capture_output=True,
                                  stdin=subprocess.DEVNULL, timeout=60)
            assert done.returncode == 0, (done.stdout + done.stderr).decode(errors="replace")
            arrived = [p.read_bytes() for p in set((dest / "new").iterdir()) - before]
            return {MESSAGE_ID.search(data).group(1): data for data in arrived}

        got = run()
        assert sorted(got) == sorted(m.msgid for m in mails)
        new = mail(7, b"Delivered between two polls.\n")
        deliver(box, [new])
        again = run()
        assert list(again) == [new.msgid]
        got.update(again)
        for m in [*mails, new]:
            head, _, body = got[m.msgid].partition(b"\n\n")
            fields = [f for f in _fields(head) if f[0] != "return-path"]
            xid = XID.search(head + b"\n").group(1)
            want_head, _, want_body = m.served(xid).partition(b"\n\n")
            assert body == want_body, m.name
            assert fields == _fields(want_head), m.name
            server.wait_for(re.escape(f"X-POP3-ID {xid.decode()}"))
        assert stored(box) == {**disk, f"new/{new.name}": new.data}
    finally:
        shutil.rmtree(outside, ignore_errors=True)


# -- curl -------------------------------------------------------------------------------------
@pytest.mark.skipif(CURL is None, reason="curl is not installed")
def test_curl_list_uidl_and_retr_match_stored_bytes(start_server, tmp_path):
    """curl's LIST sizes are the exact octets its RETR receives (X-POP3 lines included), UIDL
    gives the Maildir names, and RETR is the stored message plus the two X-POP3 lines, CRLF."""
    mails = corpus()
    server = start_server(*SERVER_ARGS, deliver=False, root=tmp_path / "srv")
    deliver(server.maildir("alice"), mails)
    url = f"pop3://127.0.0.1:{server.port}/"

    def curl(*args: str) -> bytes:
        done = subprocess.run([CURL, "-s", "-S", "--max-time", "30", "-u",
                               f"alice:{USERS['alice']}", *args], capture_output=True,
                              stdin=subprocess.DEVNULL, timeout=60)
        assert done.returncode == 0, done.stderr.decode(errors="replace")
        return done.stdout

    listing = [line.split() for line in curl(url).decode().splitlines()]
    uidl = [line.split() for line in curl("-X", "UIDL", url).decode().splitlines()]
    assert [uid for _, uid in uidl] == [m.name for m in mails]
    for (number, size), m in zip(listing, mails, strict=True):
        data = curl(url + number)
        xid = XID.search(data.replace(b"\r\n", b"\n")).group(1)
        assert data == m.served(xid).replace(b"\n", b"\r\n"), m.name
        assert len(data) == int(size), m.name
        server.wait_for(rf"THREAD worker-1 \S+ RETR {number} uid {re.escape(m.name)}, "
                        rf"{size} octets, X-POP3-ID {xid.decode()}")
