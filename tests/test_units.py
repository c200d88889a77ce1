"""Pure logic: the dot-stuffer, the verb table, the handoff frames and the stats layout."""

from __future__ import annotations

import array
import os
import socket

import pytest
from hypothesis import given, strategies as st

from shared import handoff, stats
from shared.handoff import Kind
from worker.maildir import uid_for
from worker.storebase import wire_size
from worker.pop3 import ALLOWED, State, verbs
from worker.wire import DotStuffer, stuff_whole


def _unstuff(wire: bytes) -> bytes:
    assert wire.endswith(b"\r\n.\r\n") or wire == b".\r\n"
    lines = wire[:-3].split(b"\r\n")[:-1]
    return b"".join((l[1:] if l.startswith(b".") else l) + b"\r\n" for l in lines)


def test_stuffer_first_line_dot_and_crlf_once():
    """A first line starting with '.' is stuffed, CRLF input is not doubled (Twisted's misses)."""
    assert stuff_whole(b".a\r\nb\n.c") == b"..a\r\nb\r\n..c\r\n.\r\n"
    assert stuff_whole(b"") == b".\r\n"
    assert stuff_whole(b"x\r\r\n") == b"x\r\r\n.\r\n"


@given(st.binary(max_size=400), st.lists(st.integers(1, 50), max_size=20))
def test_stuffer_chunking_is_invisible(data, cuts):
    """However the message is cut into chunks, the wire bytes are the same."""
    whole = stuff_whole(data)
    stuffer, out, pos = DotStuffer(), b"", 0
    for cut in cuts:
        out += stuffer.feed(data[pos:pos + cut])
        pos += cut
    out += stuffer.feed(data[pos:]) + stuffer.finish()
    assert out == whole


@given(st.binary(max_size=400))
def test_stuffer_round_trip_and_size(data):
    """Unstuffed wire == message with CRLF line ends; wire_size counts exactly that."""
    normal = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    expected = normal if normal.endswith(b"\n") or not normal else normal + b"\r\n"
    assert _unstuff(stuff_whole(data)) == expected
    assert wire_size(data) == len(normal)


def test_allowed_table_matches_methods():
    """Every verb in ALLOWED has a pop_ method and every pop_ method is allowed somewhere."""
    allowed = set().union(*ALLOWED.values())
    assert allowed == verbs()
    assert ALLOWED[State.UPDATE] == frozenset()


def test_uidl_is_maildir_unique_name_or_digest():
    """UIDLs are the unique name when it fits RFC 1939, else a stable digest."""
    assert uid_for("1700000000.M1P2.host") == "1700000000.M1P2.host"
    long = "x" * 80
    assert uid_for(long) == uid_for(long) and len(uid_for(long)) <= 70
    assert " " not in uid_for("a b")


def test_handoff_passes_exactly_one_descriptor():
    """A CONNECTION frame carries one fd; the receiver gets a working duplicate."""
    a, b = handoff.channel_pair()
    left, right = socket.socketpair()
    handoff.send_frame(a, Kind.CONNECTION, fd=left.fileno())
    frame = handoff.recv_frame(b)
    assert frame.kind is Kind.CONNECTION and frame.fd is not None
    os.write(frame.fd, b"hi")
    assert right.recv(2) == b"hi"
    os.close(frame.fd)
    for s in (a, b, left, right):
        s.close()


def test_handoff_rejects_surplus_descriptors_and_closes_them():
    """Two fds on a frame is an error and neither leaks into the receiver."""
    a, b = handoff.channel_pair()
    r, w = os.pipe()
    data = handoff.HEADER.pack(handoff.MAGIC, handoff.VERSION, Kind.CONNECTION, 0, 0, 0)
    a.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r, w]))])
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(handoff.HandoffError, match="2 descriptors"):
        handoff.recv_frame(b)
    assert set(os.listdir("/proc/self/fd")) <= before
    for fd in (r, w):
        os.close(fd)
    a.close()
    b.close()


def test_handoff_bad_magic_and_eof():
    """Garbage frames raise; a closed peer reads as None."""
    a, b = handoff.channel_pair()
    a.send(b"x" * handoff.HEADER.size)
    with pytest.raises(handoff.HandoffError):
        handoff.recv_frame(b)
    a.close()
    assert handoff.recv_frame(b) is None
    b.close()


def test_stats_sum_min_max_and_users():
    """Totals sum counters over slots, take min/max where they mean that, list users."""
    area = stats.StatsArea.create(3, 0)
    area.add(1, stats.Counter.TOTAL, 5)
    area.add(2, stats.Counter.TOTAL, 7)
    area.set(1, stats.Counter.RETR_MIN, 300)
    area.set(2, stats.Counter.RETR_MIN, 200)
    area.set(1, stats.Counter.RETR_MAX, 900)
    area.set_user(1, 0, "hughes")
    area.set_user(2, 3, "levanon")
    totals = area.totals()
    assert totals[stats.Counter.TOTAL] == 12
    assert totals[stats.Counter.RETR_MIN] == 200 and totals[stats.Counter.RETR_MAX] == 900
    assert sorted(area.users()) == ["hughes", "levanon"]
    other = stats.StatsArea.attach(area.fd)  # what a worker maps
    assert other.totals() == totals
    area.set_user(1, 0, "")
    assert other.users() == ["levanon"]


def test_scan_cache_sees_a_delivery_at_once(tmp_path):
    """The worker's scan cache is checked against the folders' names, so a message delivered
    right after a scan (even in the same mtime tick) is in the next scan."""
    from worker.maildir import Maildir, ensure_maildir

    ensure_maildir(str(tmp_path))
    (tmp_path / "new" / "1700000001.M1.host").write_bytes(b"Subject: a\n\nx\n")
    drop = Maildir(str(tmp_path))
    assert [m.uid for m in drop.scan()] == ["1700000001.M1.host"]
    (tmp_path / "new" / "1700000002.M2.host").write_bytes(b"Subject: b\n\ny\n")
    assert len(drop.scan()) == 2
    (tmp_path / "new" / "1700000001.M1.host").rename(tmp_path / "cur" / "1700000001.M1.host:2,S")
    again = drop.scan()
    assert [m.uid for m in again] == ["1700000001.M1.host", "1700000002.M2.host"]
    assert again[0].path.endswith(":2,S")


def test_non_ascii_digits_in_a_maildir_name_are_not_a_time(tmp_path):
    """A name starting with a digit like "²" sorts by mtime instead of failing the scan."""
    from worker.maildir import Maildir, ensure_maildir

    ensure_maildir(str(tmp_path))
    (tmp_path / "new" / "\u00b21.M1.host").write_bytes(b"Subject: a\n\nx\n")
    assert len(Maildir(str(tmp_path)).scan()) == 1
