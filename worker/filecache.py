"""What a worker parsed from a maildrop's own small files (the ledger, the import table),
kept by the identity of the file it read, so a warm login does not read and parse them again.

The user may rewrite these files: the key is what changes when anyone writes one (device,
inode, size, mtime and ctime in ns of the descriptor that was opened safely and checked).
Nobody can set a ctime: a write moves it to the clock's current tick, so a rewrite within
that tick and to the same size is the only one the key can miss, and only the user's own
maildrop would see their own old file. The server replaces these files by rename: a new inode.
Used from the worker's thread pool, several scans at once: hence the lock.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Hashable
from typing import Any

Identity = tuple[int, int, int, int, int]


def identity(st: os.stat_result) -> Identity:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


class ParsedFiles:
    """Parsed values by (file identity, what else the parse depended on); the oldest go first
    once ``max_files`` files or ``max_weight`` (the caller's unit: messages; some 300 bytes
    each, so about 30 MB at most) are held."""

    def __init__(self, max_files: int = 4096, max_weight: int = 100_000):
        self.max_files = max_files
        self.max_weight = max_weight
        self._items: dict[Hashable, tuple[Any, int]] = {}
        self._weight = 0
        self._lock = threading.Lock()
        self.hits = 0  # for tests and profiles

    def get(self, key: Hashable) -> Any:
        with self._lock:
            found = self._items.get(key)
            self.hits += found is not None
        return None if found is None else found[0]

    def put(self, key: Hashable, value: Any, weight: int = 1) -> None:
        if weight > self.max_weight:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._weight -= old[1]
            while self._items and (len(self._items) >= self.max_files
                                   or self._weight + weight > self.max_weight):
                self._weight -= self._items.pop(next(iter(self._items)))[1]
            self._items[key] = (value, weight)
            self._weight += weight

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._weight = 0
