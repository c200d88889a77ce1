"""What a Maildir scan keeps and shares within a worker: the listing of new/ and cur/ with
readdir's inodes, the last scan of each maildrop (``SCANS``), and the threads that measure
many messages at once. worker.maildir scans with them; everything here runs in the pool.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

from worker import safefs
from worker.storebase import Sizing

Listing = tuple[frozenset[str], frozenset[str]]   # the names in new/ and cur/
Inodes = tuple[dict[str, int], dict[str, int]]   # readdir's inode of each regular file, new/ cur/
Entry = tuple[str, int, str, str, bool]           # (uid, size, path, base, foreign)


class ScanCache:
    """The last scan of each maildrop in this worker, by the exact names in new/ and cur/.

    A second session sees the same list without a stat or a read per message. Maildir files
    never change in place (only renames, which change the names), so the same names mean the
    same messages; a listing is exact where folder mtimes are not (one-tick granularity, NFS
    clocks). Scans run in the worker's thread pool, several at once: hence the lock.
    """

    def __init__(self, limit: int = 1024):
        self.limit = limit
        self._scans: dict[str, tuple[Listing, Sizing, list[Entry]]] = {}
        self._lock = threading.Lock()

    def get(self, where: str, listing: Listing, sizing: Sizing) -> list[Entry] | None:
        with self._lock:
            cached = self._scans.get(where)
        if cached is not None and cached[0] == listing and cached[1] is sizing:
            return cached[2]
        return None

    def put(self, where: str, listing: Listing, sizing: Sizing, entries: list[Entry]) -> None:
        with self._lock:
            if len(self._scans) >= self.limit:
                self._scans.pop(next(iter(self._scans)))
            self._scans[where] = (listing, sizing, entries)


SCANS = ScanCache()  # one per worker process: sessions of one worker share it
PARALLEL_FROM = 32   # messages to measure before a scan measures several at a time
MEASURERS = 8        # files measured at once (reads in flight on a cold page cache)
_pool: list[ThreadPoolExecutor] = []
_pool_lock = threading.Lock()


def measurers() -> ThreadPoolExecutor:
    """The worker's measuring threads, started at the first big scan (never in the
    supervisor, which does not import this module). Plain threads: the worker does not
    monkey-patch, and a scan already runs in a pool thread, off the event loop."""
    with _pool_lock:
        if not _pool:
            _pool.append(ThreadPoolExecutor(MEASURERS, thread_name_prefix="iupop3-measure"))
        return _pool[0]


def open_sub(root: int, sub: str) -> int | None:
    """cur/ or new/ of the Maildir, never through a symlink; None when missing."""
    try:
        return safefs.open_dir(root, sub)
    except FileNotFoundError:
        return None


def listing(root: int) -> tuple[Listing, Inodes]:
    """The names in new/ and cur/ (a missing folder is empty), and the inode of each name that
    readdir says is a regular file (its d_type: no stat; a file system that does not say is
    stat'd by ``DirEntry.is_file``)."""
    found = []
    regular: list[dict[str, int]] = []
    for sub in ("new", "cur"):
        folder = open_sub(root, sub)
        inodes: dict[str, int] = {}
        regular.append(inodes)
        if folder is None:
            found.append(frozenset())
            continue
        try:
            with os.scandir(folder) as entries:
                names = []
                for entry in entries:
                    names.append(entry.name)
                    # Here, while the iterator's descriptor is open: where readdir gives no
                    # file type, is_file() stats relative to it.
                    if entry.is_file(follow_symlinks=False):
                        inodes[entry.name] = entry.inode()
            found.append(frozenset(names))
        finally:
            os.close(folder)
    return (found[0], found[1]), (regular[0], regular[1])
