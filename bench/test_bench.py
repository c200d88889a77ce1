"""Unit tests of the benchmark's own checks (run: .venv/bin/pytest bench).

The benchmark is only worth its figures if its reply checks catch wrong replies; these pin the
checker, the message generator, the percentile and the py-spy summary on made-up inputs.
"""

from __future__ import annotations

import pytest

from bench.mailgen import BLOCK, make_message, seed_of
from bench.pop3client import Pop3Error, check_message, unstuff
from bench.profile import hot_spots
from bench.scenarios import percentile, split


def wire(stored: bytes) -> bytes:
    """What a correct server sends for a stored message: CRLF lines, dot-stuffed."""
    crlf = stored.replace(b"\n", b"\r\n")
    stuffed = crlf.replace(b"\r\n.", b"\r\n..")
    return b"." + stuffed if stuffed.startswith(b".") else stuffed


def test_messages_are_deterministic_and_name_their_seed():
    """The same seed and size give the same bytes, and the header names both."""
    one = make_message(42, 5000)
    assert one == make_message(42, 5000)
    assert one != make_message(43, 5000)
    head = one.split(b"\n\n", 1)[0]
    assert seed_of(head) == (42, 5000)
    assert abs(len(one) - 5000) < 200


def test_text_block_exercises_dot_stuffing():
    """The body text has lines starting with '.' and lines that are only '.'."""
    assert b"\n.\n" in BLOCK
    assert BLOCK.count(b"\n.") > 100


def test_check_accepts_a_correct_reply():
    """A correctly stuffed CRLF copy with LIST's size passes and yields the seed."""
    stored = make_message(7, 20000)
    body = wire(stored)
    assert check_message(body, len(stored.replace(b"\n", b"\r\n"))) == 7


def test_check_ignores_headers_the_server_adds():
    """X-POP3-* and X-VMS-From: lines (with continuations) are not counted as changes."""
    stored = make_message(8, 3000)
    head, body = stored.split(b"\n\n", 1)
    served = (b"X-POP3-Server: host\nX-POP3-ID: 123\n\tfolded\nX-VMS-From: A::B\n" + head
              + b"\n\n" + body)
    data = wire(served)
    assert check_message(data, len(unstuff(data))) == 8


def test_check_rejects_a_changed_byte():
    """One changed body byte is a content error even when the size is right."""
    stored = make_message(9, 3000)
    data = bytearray(wire(stored))
    data[-10] = ord("#") if data[-10] != ord("#") else ord("%")
    with pytest.raises(Pop3Error) as caught:
        check_message(bytes(data), len(unstuff(bytes(data))))
    assert caught.value.kind == "content"


def test_check_rejects_a_size_that_differs_from_list():
    """The octets received must equal what LIST said."""
    stored = make_message(10, 3000)
    data = wire(stored)
    with pytest.raises(Pop3Error) as caught:
        check_message(data, len(unstuff(data)) + 1)
    assert caught.value.kind == "size != LIST"


def test_check_rejects_unstuffed_dot_lines():
    """A server that forgets dot-stuffing is caught (the line loses its dot)."""
    stored = b"X-Bench-Seed: 1 10\n\n" + b"..x\n"
    sent = stored.replace(b"\n", b"\r\n")  # not stuffed: the client strips one dot
    with pytest.raises(Pop3Error):
        check_message(sent, len(sent))


def test_unstuff_removes_one_dot_per_line_including_the_first():
    """RFC 1939: '..' at a line start is one '.', also on the first line."""
    assert unstuff(b"..a\r\n...b\r\nc.\r\n") == b".a\r\n..b\r\nc.\r\n"


def test_percentile_is_nearest_rank():
    """p50 of 1..100 is 50 and p99 is 99; no values give NaN."""
    values = [float(x) for x in range(100, 0, -1)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile([], 50) != percentile([], 50)


def test_split_deals_items_round_robin():
    """Users are dealt to load generators evenly and never duplicated."""
    parts = split(list(range(7)), 3)
    assert sorted(x for p in parts for x in p) == list(range(7))
    assert [len(p) for p in parts] == [3, 2, 2]


def test_hot_spots_leave_out_waiting_samples(tmp_path):
    """Samples parked in the libev loop or a pool lock are waiting, not hot spots."""
    raw = tmp_path / "raw.txt"
    raw.write_text("a (x.py:1);b (x.py:2) 30\n"
                   "a (x.py:1);c (x.py:3) 10\n"
                   "Hub.run (gevent/hub.py:631) 50\n"
                   "t (y.py:1);acquire_with_timeout (gevent/_threading.py:34) 10\n")
    spots = hot_spots(str(raw))
    assert spots["busy_samples"] == 40 and spots["waiting_samples"] == 60
    assert spots["own"][0] == ["b (x.py:2)", 75.0]
    assert spots["inclusive"][0] == ["a (x.py:1)", 100.0]
