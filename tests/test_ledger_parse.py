"""Differential tests of the ledger's fast parser (one anchored regex) against the plain
line-by-line one: the same ledger, or LedgerCorrupt from both, for any input (issue 15)."""

from __future__ import annotations

import random

import pytest

from worker import ledger

NOW = 1_800_000_000
ALPHABET = "ab1.:-_,=/\\"


def random_ledger(rng: random.Random, count: int) -> ledger.Ledger:
    book = ledger.Ledger("abc", last_login=rng.choice([None, NOW - 5]))
    for i in range(count):
        name = f"{1700000000 + i}.M{i}P{rng.randrange(99)}." + "".join(
            rng.choice(ALPHABET) for _ in range(rng.randrange(1, 12)))
        uidl = rng.choice([name[:70], f"{i:08x}6b0f1ae5", "H" + "0" * 40])
        book.learn(name, uidl, rng.randrange(1 << 20), rng.randrange(1 << 20),
                   rng.random() < 0.1, rng.choice([-1, rng.randrange(1 << 40)]))
        if rng.random() < 0.3:
            book.retrieved(name, uidl, NOW - rng.randrange(10**6))
    return book


def outcome(parser, data: bytes, sizing: str):
    try:
        return parser(data, sizing, NOW)
    except ledger.LedgerCorrupt:
        return "corrupt"


MUTATIONS = [
    lambda t, r: t,
    lambda t, r: t.replace(ledger.HEADER.encode(), b"iupop3-ledger 1"),  # v2 lines, v1 header
    lambda t, r: _at(t, r, b" "),
    lambda t, r: _at(t, r, b"\n"),
    lambda t, r: _at(t, r, b"-"),
    lambda t, r: _at(t, r, bytes([r.randrange(256)])),
    lambda t, r: _cut(t, r),
    lambda t, r: t + t[t.index(b"\nm ") + 1:],                  # every message twice
    lambda t, r: t + b"m x y 281474976710656 1 0 - -\n",         # MAX_NUMBER
    lambda t, r: t + b"m x y 281474976710655 1 0 - 281474976710656\n",
    lambda t, r: t + f"m x y 1 1 0 {NOW + 86401} -\n".encode(),  # retrieved in the future
    lambda t, r: t + f"m x y 1 1 0 {NOW + 86400} 7\n".encode(),  # just within the slack
    lambda t, r: t + "m x y 1 1 0 - \u0661\n".encode(),          # a non-ASCII digit
    lambda t, r: t + b"m x y 1 1 0 -\n",                         # a v1 line in a v2 file
    lambda t, r: t + b"m " + b"n" * 256 + b" y 1 1 0 - -\n",     # a name too long
    lambda t, r: t + b"m x " + b"u" * 71 + b" 1 1 0 - -\n",      # a UIDL too long
    lambda t, r: t + b"m x y 0001 - 1 - 0000000000000000\n",
]


def _at(text: bytes, rng: random.Random, what: bytes) -> bytes:
    where = rng.randrange(len(text))
    return text[:where] + what + text[where + rng.randrange(2):]


def _cut(text: bytes, rng: random.Random) -> bytes:
    where = rng.randrange(len(text))
    return text[:where] + text[where + rng.randrange(1, 40):]


@pytest.mark.parametrize("seed", range(40))
def test_fast_parse_agrees_with_the_plain_parse(seed):
    """For valid and damaged ledgers, v1 and v2, the fast parser returns what the plain one
    returns (entries, login, dirty) or both refuse the file as corrupt."""
    rng = random.Random(seed)
    text = random_ledger(rng, rng.randrange(1, 60)).text()
    if seed % 4 == 0:  # the version 1 format: seven words, no inode
        text = text.replace(ledger.HEADER.encode(), b"iupop3-ledger 1")
        text = b"\n".join(line.rsplit(b" ", 1)[0] if line.startswith(b"m ") else line
                          for line in text.split(b"\n"))
    for mutate in MUTATIONS:
        for sizing in ("abc", "other"):
            data = mutate(text, rng)
            assert outcome(ledger.parse, data, sizing) == outcome(ledger.parse_lines, data,
                                                                  sizing)


def test_inode_round_trips_and_version_1_reads_without_one():
    """The inode the fast login path relies on is written and read back; a version 1 ledger
    (no inode) still reads, its inodes unknown."""
    book = ledger.Ledger("abc")
    book.learn("1700000001.M1.h", "u1", 10, 9, False, 1234)
    again = ledger.parse(book.text(), "abc", NOW)
    assert again.entries["1700000001.M1.h"].inode == 1234
    old = b"iupop3-ledger 1\nsizing abc\nlogin -\nm 1700000001.M1.h u1 10 9 0 -\n"
    entry = ledger.parse(old, "abc", NOW).entries["1700000001.M1.h"]
    assert (entry.size, entry.stored, entry.inode) == (10, 9, -1)
