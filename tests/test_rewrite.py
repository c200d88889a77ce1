"""IUPOP3 1.8's message rewriting: From: patching, X-POP3 lines, foreign messages, exact sizes.

Rule tests call worker.rewrite directly; session tests drive a real sans-IO Session with a real
ServerContext, users table and temporary Maildir, and assert the exact bytes on the wire.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from shared import settings as settings_mod
from shared.logsetup import THREAD, log
from shared.stats import StatsArea
from shared.users import parse_users
from worker import rewrite
from worker.context import build_context
from worker.maildir import Maildir
from worker.store import FOREIGN_FOLDER
from worker.pop3 import Session
from worker.rewrite import NOTICE, Rewriter, Rules, new_id, patch_from

HOST = "pop.example.org"
SERVER_LINE = f"X-POP3-Server: {HOST} IUPOP3 V2.0\r\n".encode()
ID_LINE = re.compile(rb"X-POP3-ID: (\d{4}-\d\d-\d\d\.\d\d:\d\d:\d\d\.\d{3}\.\d{18})\r\n")
X_LINES = re.compile(re.escape(SERVER_LINE) + ID_LINE.pattern)  # what the server adds


# -- the README's rules -----------------------------------------------------------------------
@pytest.mark.parametrize("vms, internet", [
    ('SMTP%"hughes@indiana.edu"', "hughes@indiana.edu"),
    ('MYGATE::"hughes@indiana.edu"', "hughes@indiana.edu"),
    ("MYVAX::HUGHES", "hughes@myvax"),
    ("HUGHES", "hughes@localhostname"),
])
def test_readme_from_examples(vms, internet):
    """The four examples of the IUPOP3 1.8 README, exactly."""
    assert patch_from(vms, "localhostname") == internet


def test_personal_name_kept_only_with_the_option():
    """PERSONAL_NAME gives '"larry hughes" <addr>'; without it only the address is served."""
    value = 'SMTP%"hughes@indiana.edu" "larry hughes"'
    assert patch_from(value, "h") == "hughes@indiana.edu"
    assert patch_from(value, "h", personal_name=True) == '"larry hughes" <hughes@indiana.edu>'
    assert patch_from('MYVAX::HUGHES "Larry Hughes"', "h", True) == '"Larry Hughes" <hughes@myvax>'


@pytest.mark.parametrize("value", [
    "hughes@indiana.edu", "Larry Hughes <hughes@indiana.edu>", '"a::b" <x@y.org>',
    "hughes@indiana.edu (Larry)", "undisclosed-recipients:;", 'SMTP%""', "",
])
def test_internet_and_odd_from_values_are_left_alone(value):
    """A From: that is not VMS syntax (an Internet address, a group, an empty quote) stays."""
    assert patch_from(value, "localhostname") is None


def test_decnet_path_uses_the_last_node():
    """A DECnet path A::B::USER becomes user@b; a quoted address after a path is used as is."""
    assert patch_from("A::B::USER", "h") == "user@b"
    assert patch_from('A::SMTP%"x@y.org"', "h") == "x@y.org"


def test_x_pop3_id_is_fixed_width_and_unique():
    """X-POP3-ID: date, time with ms, then slot/pid/counter digits; no two alike."""
    ids = {new_id(7, now=739_880_363.167) for _ in range(1000)}
    assert len(ids) == 1000
    one = next(iter(ids))
    assert ID_LINE.fullmatch(f"X-POP3-ID: {one}\r\n".encode())
    assert one.split(".")[3].startswith(f"007{os.getpid() % 10**7:07d}")
    assert len(one) == rewrite.ID_WIDTH


def test_x_pop3_id_differs_in_a_forked_child():
    """A forked worker restarts its counter but its pid makes its IDs differ from the parent's."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(write, new_id(1, now=0).encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 100).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert child != new_id(1, now=0) and child.endswith("00000001")


# -- a session on a temporary Maildir ---------------------------------------------------------
class Drop:
    """A real ServerContext, users table and Maildir with a logged-in Session."""

    def __init__(self, root: str, **overrides):
        self.root = Path(root)
        self.maildir = self.root / "alice"
        for sub in ("new", "cur", "tmp"):
            (self.maildir / sub).mkdir(parents=True, exist_ok=True)
        values = dict(users="unused", mail=f"maildir:{root}/%u", hostname=HOST, maxmsg=0)
        values.update(overrides)
        self.ctx = build_context(settings_mod.Settings(**values), StatsArea.create(2, 0), 1,
                                 parse_users("alice:{PLAIN}secret::::::\n"))
        self.serial = 0
        self.out: list[bytes] = []
        self.session: Session | None = None

    def close(self) -> None:
        os.close(self.ctx.stats.area.fd)  # the mapping stays valid until collected

    def deliver(self, data: bytes, sub: str = "new") -> Path:
        self.serial += 1
        path = self.maildir / sub / f"{1_700_000_000 + self.serial}.M{self.serial}.test"
        path.write_bytes(data)
        return path

    def login(self) -> Session:
        self.session = Session(self.ctx, self.out.append, "127.0.0.1:4000", "t")
        assert self.talk("USER alice").startswith(b"+OK")
        assert self.talk("PASS secret").startswith(b"+OK")
        return self.session

    def talk(self, line: str) -> bytes:
        self.out.clear()
        self.session.handle_line(line.encode())
        return b"".join(self.out)

    def retr(self, n: int) -> tuple[int, bytes]:
        """(LIST n's octets, RETR n unstuffed), checking RETR's status line and terminator."""
        listed = int(self.talk(f"LIST {n}").split()[2])
        wire = self.talk(f"RETR {n}")
        status, _, body = wire.partition(b"\r\n")
        assert status == f"+OK {listed} octets".encode()
        return listed, unstuff(body)


def unstuff(body: bytes) -> bytes:
    assert body.endswith(b"\r\n.\r\n") or body == b".\r\n"
    lines = body[:-3].split(b"\r\n")[:-1]
    return b"".join((l[1:] if l.startswith(b".") else l) + b"\r\n" for l in lines)


def x_lines(served: bytes) -> bytes:
    found = X_LINES.search(served)
    assert found, served
    return found.group(0)


@pytest.fixture
def drop(tmp_path):
    drop = Drop(str(tmp_path))
    yield drop
    drop.close()


def test_retr_exact_bytes_with_vms_from(drop):
    """A VMS From: is patched, X-VMS-From/X-POP3 lines end the header, the body is untouched."""
    drop.deliver(b'From: SMTP%"hughes@indiana.edu" "larry hughes"\nSubject: hi\n\n.dot\nend\n')
    drop.login()
    listed, served = drop.retr(1)
    assert served == (b"From: hughes@indiana.edu\r\nSubject: hi\r\n"
                      b'X-VMS-From: SMTP%"hughes@indiana.edu" "larry hughes"\r\n'
                      + x_lines(served) + b"\r\n.dot\r\nend\r\n")
    assert listed == len(served)


def test_local_user_gets_the_server_host_and_personal_name_option(tmp_path):
    """A bare USER becomes user@<hostname>; -personal_name keeps the sender's name."""
    drop = Drop(str(tmp_path), personal_name=True)
    drop.deliver(b'From: HUGHES "Larry Hughes"\r\nTo: x\r\n\r\nbody\r\n')
    drop.login()
    listed, served = drop.retr(1)
    assert served.startswith(b'From: "Larry Hughes" <hughes@pop.example.org>\r\nTo: x\r\n'
                             b'X-VMS-From: HUGHES "Larry Hughes"\r\n' + SERVER_LINE)
    assert listed == len(served)


def test_ignore_mail11_headers_serves_from_untouched(tmp_path):
    """-ignore_mail11_headers: no patching and no X-VMS-From, but the X-POP3 lines still come."""
    drop = Drop(str(tmp_path), ignore_mail11_headers=True)
    drop.deliver(b"From: MYVAX::HUGHES\nSubject: s\n\nbody\n")
    drop.login()
    listed, served = drop.retr(1)
    assert served == b"From: MYVAX::HUGHES\r\nSubject: s\r\n" + x_lines(served) + b"\r\nbody\r\n"
    assert listed == len(served)


def test_internet_from_and_headers_only_message(drop):
    """An Internet From: stays; a message without body or final LF still gets its lines."""
    drop.deliver(b"From: a@b.org\nSubject: no body")
    drop.login()
    listed, served = drop.retr(1)
    assert served == b"From: a@b.org\r\nSubject: no body\r\n" + x_lines(served)
    assert listed == len(served)


def test_retr_logs_the_x_pop3_id_at_thread_level(drop):
    """The RETR log line carries the X-POP3-ID the client got, at THREAD level."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(THREAD)
    handler.emit = records.append
    old_level = log.level
    log.addHandler(handler)
    log.setLevel(THREAD)
    try:
        drop.deliver(b"Subject: s\n\nbody\n")
        drop.login()
        _, served = drop.retr(1)
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
    xid = X_LINES.search(served).group(1).decode()
    lines = [r.getMessage() for r in records if r.levelno == THREAD]
    assert any(l.startswith("RETR 1 uid ") and l.endswith(f"X-POP3-ID {xid}") for l in lines)


def test_top_rewrites_like_retr(drop):
    """TOP n k: the same patched header and X-POP3 lines, the blank line, k body lines."""
    drop.deliver(b"From: MYVAX::HUGHES\nSubject: s\n\none\ntwo\n.three\n")
    drop.login()
    wire = drop.talk("TOP 1 0")
    head = b"From: hughes@myvax\r\nSubject: s\r\nX-VMS-From: MYVAX::HUGHES\r\n"
    assert wire == b"+OK top of message follows\r\n" + head + x_lines(wire) + b"\r\n.\r\n"
    wire = drop.talk("TOP 1 2")
    assert wire.endswith(x_lines(wire) + b"\r\none\r\ntwo\r\n.\r\n")
    wire = drop.talk("TOP 1 9")
    assert wire.endswith(b"\r\none\r\ntwo\r\n..three\r\n.\r\n")


def test_big_message_goes_out_in_large_writes(drop):
    """A 1 MB body is streamed in about 64 KiB writes, never line by line."""
    body = b"".join(b"line %d of a long message\n" % i for i in range(40_000))
    drop.deliver(b"Subject: big\n\n" + body)
    drop.login()
    listed = int(drop.talk("LIST 1").split()[2])
    drop.out.clear()
    drop.session.handle_line(b"RETR 1")
    assert len(drop.out) <= len(body) // (64 * 1024) + 3
    assert len(unstuff(b"".join(drop.out).partition(b"\r\n")[2])) == listed


def test_crlf_across_read_boundaries_and_huge_headers(drop):
    """A CRLF split by a 64 KiB read counts once; a header block over 1 MiB is cut at a line."""
    head = b"Subject: x\n\n"
    straddle = head + b"a" * (65536 - len(head) - 1) + b"\r\nb\r\nlast"
    drop.deliver(straddle)
    huge = b"".join(b"X-Long-%d: %s\n" % (i, b"v" * 90) for i in range(12_000)) + b"\nbody\n"
    drop.deliver(huge)
    drop.login()
    listed, served = drop.retr(1)
    assert served == b"Subject: x\r\n" + x_lines(served) + _normal(straddle[11:])
    assert listed == len(served)
    listed, served = drop.retr(2)
    assert listed == len(served) == len(_normal(huge)) + len(x_lines(served))
    assert served.endswith(b"\r\n\r\nbody\r\n")


# -- foreign messages -------------------------------------------------------------------------
@pytest.mark.parametrize("purge", [False, True])
def test_foreign_message_is_a_notice_and_kept_in_mail_folder(tmp_path, purge):
    """A NUL message: headers and a notice are sent, DELE says +OK, QUIT moves it to .MAIL."""
    drop = Drop(str(tmp_path), purge_reclaim=purge)
    stored = b"Subject: binary\nFrom: HUGHES\n\nab\0cd\n" * 3
    binary = drop.deliver(stored)
    plain = drop.deliver(b"Subject: text\n\nhello\n")
    drop.login()
    listed, served = drop.retr(1)
    assert served == (b"Subject: binary\r\nFrom: hughes@pop.example.org\r\n"
                      b"X-VMS-From: HUGHES\r\n" + x_lines(served) + b"\r\n" + NOTICE)
    assert listed == len(served)
    assert drop.talk("DELE 1") == b"+OK message 1 deleted\r\n"
    assert drop.talk("DELE 2") == b"+OK message 2 deleted\r\n"
    assert drop.talk("QUIT").startswith(b"+OK")
    kept = drop.maildir / FOREIGN_FOLDER
    assert [p.name for p in (kept / "cur").iterdir()] == [binary.name + ":2,"]
    assert (kept / "cur" / (binary.name + ":2,")).read_bytes() == stored
    assert (kept / "maildirfolder").exists()
    assert not binary.exists() and not plain.exists()
    trash = drop.maildir / ".Trash" / "cur"
    assert purge or [p.name for p in trash.iterdir()] == [plain.name + ":2,"]


def test_headerless_message_is_foreign_with_no_headers(drop):
    """Text with no header block is foreign: only the X-POP3 lines and the notice are sent."""
    drop.deliver(b"just some text\nwithout headers\n")
    drop.deliver(b"")
    drop.login()
    for n in (1, 2):
        listed, served = drop.retr(n)
        assert served == x_lines(served) + b"\r\n" + NOTICE
        assert listed == len(served)
    wire = drop.talk("TOP 1 1")
    assert wire.endswith(x_lines(wire) + b"\r\n" + NOTICE.split(b"\r\n")[0] + b"\r\n.\r\n")


def test_commit_without_session_never_unlinks_foreign(tmp_path):
    """Maildir.commit moves a foreign message to .MAIL even with purge, and says how many."""
    drop = Drop(str(tmp_path))
    drop.deliver(b"\0")
    maildrop = Maildir(str(drop.maildir), purge=True, sizing=Rewriter(Rules(HOST, "2.0")))
    maildrop.lock()
    messages = maildrop.scan(0)
    assert messages[0].foreign
    assert maildrop.commit(messages) == 1
    maildrop.unlock()
    assert len(list((drop.maildir / FOREIGN_FOLDER / "cur").iterdir())) == 1


# -- the size cache ---------------------------------------------------------------------------
def test_second_scan_reads_no_file_and_a_changed_file_is_read_again(tmp_path):
    """The cache is keyed by name, inode, size and mtime: a hit costs no read, a change misses."""
    drop = Drop(str(tmp_path))
    paths = [drop.deliver(b"Subject: %d\n\nbody\n" % i) for i in range(5)]
    rewriter = Rewriter(Rules(HOST, "2.0"))
    maildrop = Maildir(str(drop.maildir), sizing=rewriter)
    first = maildrop.scan(0)
    assert rewriter.files_read == 5
    assert [m.size for m in maildrop.scan(0)] == [m.size for m in first]
    assert rewriter.files_read == 5
    # A Maildir file never changes in place, so the worker's scan cache (by folder listing)
    # trusts names; the size cache below it still notices a file rewritten in place.
    paths[0].write_bytes(b"Subject: 0\n\nlonger body\n")
    st = os.stat(paths[0])
    key = ("maildir", first[0].base, st.st_ino, st.st_size, st.st_mtime_ns)
    size, _ = rewriter.size_of(key, lambda: open(paths[0], "rb"))
    assert rewriter.files_read == 6 and size == first[0].size + 7


def test_rewriter_opens_no_file_by_path():
    """worker/rewrite.py never opens or stats a path: the stores open messages relative to
    their directory descriptors and hand it an opener (``measure`` opened by
    path, following symlinks)."""
    import ast

    tree = ast.parse(Path(rewrite.__file__).read_text())
    by_path = {"open", "stat", "lstat", "fdopen"}
    calls = [node.func for node in ast.walk(tree) if isinstance(node, ast.Call)]
    names = {f.id if isinstance(f, ast.Name) else f.attr for f in calls
             if isinstance(f, (ast.Name, ast.Attribute))}
    assert not names & by_path, names & by_path
    assert not hasattr(Rewriter, "measure")


def test_cache_is_bounded():
    """The in-process cache forgets the least recently used entries past its limit."""
    cache = rewrite.MemoryCache(limit=3)
    for i in range(5):
        cache.put(("m", i, 0, 0), (i, False))
    assert len(cache) == 3 and cache.get(("m", 0, 0, 0)) is None
    assert cache.get(("m", 4, 0, 0)) == (4, False)


# -- properties -------------------------------------------------------------------------------
_FIELD = re.compile(rb"[!-9;-~]+[ \t]*:")
_HEADER = re.compile(rb"(?:(?:[!-9;-~]+[ \t]*:|From )[^\n]*(?:\n|\Z)"
                     rb"(?:(?:[ \t]|[!-9;-~]+[ \t]*:)[^\n]*(?:\n|\Z))*)?")


def _normal(data: bytes) -> bytes:
    out = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return out + b"\r\n" if out and not out.endswith(b"\n") else out


def model(stored: bytes, xid: bytes, personal: bool = False) -> bytes:
    """What RETR must send, written independently of worker.rewrite's parser."""
    header = stored[:_HEADER.match(stored).end()]
    rest = stored[len(header):]
    foreign = not header or b"\0" in stored
    if foreign and b"\0" in header:
        header = b""
    fields: list[bytes] = []
    for line in re.findall(rb"[^\n]*\n|[^\n]+\Z", header):
        if fields and line[:1] in (b" ", b"\t"):
            fields[-1] += line
        else:
            fields.append(line)
    vms = b""
    for i, field in enumerate(fields):
        name, colon, value = field.partition(b":")
        if colon and name.strip().lower() == b"from" and _FIELD.match(field):
            unfolded = re.sub(r"\r?\n(?=[ \t])", "", value.decode("latin-1")).strip(" \t\r\n")
            new = patch_from(unfolded, HOST, personal)
            if new is not None:
                fields[i] = b"From: " + new.encode("latin-1") + b"\n"
                vms = _normal(b"X-VMS-From:" + value)
            break
    head = _normal(b"".join(fields)) + vms + SERVER_LINE + b"X-POP3-ID: " + xid + b"\r\n"
    if foreign:
        return head + b"\r\n" + NOTICE
    return head + _normal(rest)


_from_values = st.sampled_from([
    b' SMTP%"hughes@indiana.edu" "larry hughes"', b" MYVAX::HUGHES", b" HUGHES", b" a@b.org",
    b' MYGATE::"x@y.org"\n  "folded name"', b" Larry <l@x.org>", b"\tROOT\r", b" SMTP%\"\"",
])
_header_lines = st.one_of(
    st.tuples(st.sampled_from([b"From:", b"from :", b"FROM:"]), _from_values).map(b"".join),
    st.tuples(st.sampled_from([b"Subject:", b".Dot:", b"X-A:", b" cont", b"\tcont"]),
              st.binary(max_size=20).map(lambda b: b.replace(b"\n", b""))).map(b"".join),
)
_messages = st.one_of(
    st.binary(max_size=200),
    st.tuples(st.lists(_header_lines, max_size=6),
              st.sampled_from([b"\n", b"\r\n"]),
              st.sampled_from([b"\n", b"\r\n", b"", b"not a header\n"]),
              st.lists(st.sampled_from([b".", b"\r", b"\n", b"\r\n", b"a", b"\0", b" ", b"\xe9"]),
                       max_size=60).map(b"".join))
    .map(lambda t: t[1].join(t[0]) + (t[1] if t[0] else b"") + t[2] + t[3]),
)


@hsettings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stored=_messages, personal=st.booleans())
def test_retr_is_stored_message_plus_documented_headers(stored, personal):
    """For any stored bytes: RETR unstuffed == the model (CRLF, From: rules, X lines, foreign
    notice), and LIST's octets == its length."""
    with tempfile.TemporaryDirectory() as root:
        drop = Drop(root, personal_name=personal)
        drop.deliver(stored)
        drop.login()
        listed, served = drop.retr(1)
        xid = X_LINES.search(served).group(1)
        assert served == model(stored, xid, personal)
        assert listed == len(served)
        assert drop.talk("STAT") == f"+OK 1 {listed}\r\n".encode()
        drop.close()


@hsettings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stored=_messages, lines=st.integers(0, 5))
def test_top_is_head_of_retr(stored, lines):
    """TOP n k == RETR's header block, the blank line and the first k body lines."""
    with tempfile.TemporaryDirectory() as root:
        drop = Drop(root)
        drop.deliver(stored)
        drop.login()
        status, _, body = drop.talk(f"TOP 1 {lines}").partition(b"\r\n")
        drop.close()
        top = unstuff(body)
        added = X_LINES.search(top)
        whole = model(stored, added.group(1))
        head_end = whole.index(added.group(0)) + len(added.group(0))
        head, after = whole[:head_end], whole[head_end:]
        if after.startswith(b"\r\n"):
            head, after = head + b"\r\n", after[2:]
        body = b"".join(line + b"\n" for line in after.split(b"\n")[:-1][:lines])
        assert status == b"+OK top of message follows"
        assert top == head + body


# -- the real server --------------------------------------------------------------------------
def test_real_server_patches_logs_the_id_and_keeps_foreign_mail(start_server):
    """Through the real server: From: patched, the RETR log line names the X-POP3-ID the client
    got, a foreign message's LIST size is exact and DELE+QUIT moves it to .MAIL."""
    from conftest import write_message

    server = start_server("-personal_name", "-hostname", HOST)
    alice = server.maildir("alice")
    write_message(alice, "1500000000.M1.test", b'From: MYVAX::HUGHES "Larry"\nSubject: v\n\nhi\n')
    write_message(alice, "1500000001.M2.test", b"Subject: bin\n\n\0\x01\x02\n")
    client = server.login("alice")
    sizes = {int(n): int(o) for n, o in (l.split() for l in client.list()[1])}
    for n in (1, 2):
        served = b"\r\n".join(client.retr(n)[1]) + b"\r\n"
        assert len(served) == sizes[n]
        xid = X_LINES.search(served).group(1).decode()
        server.wait_for(rf"RETR {n} uid 1500000\d+\.M{n}\.test, {sizes[n]} octets.*"
                        rf"X-POP3-ID {re.escape(xid)}")
        if n == 1:
            assert served.startswith(b'From: "Larry" <hughes@myvax>\r\nSubject: v\r\n'
                                     b'X-VMS-From: MYVAX::HUGHES "Larry"\r\n')
        else:
            assert served.endswith(b"\r\n\r\n" + NOTICE)
    client.dele(2)
    client.quit()
    assert [p.name for p in (alice / ".MAIL" / "cur").iterdir()] == ["1500000001.M2.test:2,"]
