"""Small per-process hash tables in shared memory: a count per key (address or user name).

Each process writes only its own table (one writer per table, like the statistics slots);
anyone reads and sums a key over every process's table. Entries are three 8-byte words:
key digest (0 = empty), value, and the time it last changed. Open addressing with a short
linear probe; when the probe run is full the stalest entry is reused, so a flood of distinct
keys costs old entries, never memory. Used for connections per address and failed logins per
address and per user.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

ENTRY_WORDS = 3
PROBES = 16


def digest(key: str) -> int:
    value = int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogateescape"),
                                           digest_size=8).digest(), "little")
    return value or 1  # 0 marks an empty entry


class KeyTable:
    """A view of one process's table; ``words`` is a slice of a 'Q' memoryview."""

    def __init__(self, words: memoryview, capacity: int):
        self.words = words
        self.capacity = capacity

    def _find(self, key: int) -> int | None:
        start = key % self.capacity
        for i in range(PROBES):
            at = ((start + i) % self.capacity) * ENTRY_WORDS
            if self.words[at] == key:
                return at
        return None

    def get(self, key: int, since: int = 0) -> int:
        """The value of ``key``, or 0 if absent or last changed before ``since``."""
        at = self._find(key)
        if at is None or self.words[at + 2] < since:
            return 0
        return self.words[at + 1]

    def add(self, key: int, delta: int, now: int, since: int = 0) -> int:
        """Add ``delta`` (values never go below 0); an entry older than ``since`` restarts at 0."""
        at = self._find(key)
        if at is None:
            at = self._claim(key)
            self.words[at + 1] = 0
        elif self.words[at + 2] < since:
            self.words[at + 1] = 0
        value = max(0, self.words[at + 1] + delta)
        self.words[at + 1] = value
        self.words[at + 2] = now
        return value

    def _claim(self, key: int) -> int:
        start = key % self.capacity
        stalest, stalest_time = None, None
        for i in range(PROBES):
            at = ((start + i) % self.capacity) * ENTRY_WORDS
            if self.words[at] == 0 or (self.words[at + 1] == 0):
                stalest = at
                break
            if stalest_time is None or self.words[at + 2] < stalest_time:
                stalest, stalest_time = at, self.words[at + 2]
        # Writing the key last-but-one: a reader that sees the new key may see a value of 0.
        self.words[stalest + 1] = 0
        self.words[stalest] = key
        return stalest


def total(tables: Iterable[KeyTable], key: int, since: int = 0) -> int:
    """The sum of ``key`` over every process's table."""
    return sum(t.get(key, since) for t in tables)
