"""A Maildir as a POP3 maildrop: scan, size, read, lock, and commit deletions.

The session opens one ``Maildrop`` after a good login and calls ``commit`` only in the UPDATE
state; everything before that is read-only, so a dropped connection or a killed worker changes
nothing on disk. Deleted mail goes to the wastebasket folder (Maildir++ ``.Trash``) unless
``purge`` is set, like VMS MAIL's WASTEBASKET and IUPOP3's ``-purge_reclaim``. A foreign message
(see worker.rewrite) is never removed: "deleting" it moves it to the ``.MAIL`` folder.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Hashable

from worker.storebase import (FOREIGN_FOLDER, PLAIN, UIDL_OK, WASTEBASKET, MaildropError,
                              Message, Sizing, fault_stop_point, session_flock)

LOCK_NAME = ".iupop3.lock"

Listing = tuple[frozenset[str], frozenset[str]]   # the names in new/ and cur/
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


def uid_for(base: str) -> str:
    """The UIDL of a message: its Maildir unique name, or a digest of it when unfit.

    A unique name never changes while the message lives in this Maildir (moving new/ -> cur/
    and flag changes only touch the part after ':'), so the UIDL is stable forever.
    """
    if UIDL_OK.fullmatch(base):
        return base
    return "H" + hashlib.sha256(base.encode("utf-8", "surrogateescape")).hexdigest()[:40]


def ensure_maildir(path: str) -> None:
    for sub in ("cur", "new", "tmp"):
        os.makedirs(os.path.join(path, sub), mode=0o700, exist_ok=True)


class Maildir:
    """One user's Maildir, locked for the lifetime of a POP3 session (a worker.store.Maildrop)."""

    def __init__(self, where: str | tuple[str, tuple[str, ...]], wastebasket: str = WASTEBASKET,
                 purge: bool = False, sizing: Sizing = PLAIN, owner: int | None = None):
        if isinstance(where, str):
            where = (where, ())
        self.path = os.path.join(where[0], *where[1])
        self.sizing = sizing
        self.owner = owner
        self.wastebasket = wastebasket
        self.purge = purge
        self._lock_fd: int | None = None

    def lock(self) -> None:
        """Take the session lock; flock is per open file, so it holds across workers and
        between two sessions of one worker, and dies with the process that holds it."""
        lock_path = os.path.join(self.path, LOCK_NAME)
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
        try:
            try:
                fd = os.open(lock_path, flags, 0o600)
            except FileNotFoundError:  # a user's first login: make the Maildir
                ensure_maildir(self.path)
                fd = os.open(lock_path, flags, 0o600)
        except OSError as exc:
            raise MaildropError(f"cannot open maildrop {self.path}: {exc.strerror}") from None
        self._lock_fd = session_flock(fd, self.path)

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the only descriptor releases the flock
            self._lock_fd = None

    def scan(self, maxmsg: int = 0) -> list[Message]:
        """The messages of the maildrop, oldest first, at most ``maxmsg`` (0 = all)."""
        listing = self._listing()
        entries = SCANS.get(self.path, listing, self.sizing)
        if entries is None:
            entries = self._measure_all(listing)
            SCANS.put(self.path, listing, self.sizing, entries)
        if maxmsg:
            entries = entries[:maxmsg]
        return [Message(index, uid, size, path, base, foreign)
                for index, (uid, size, path, base, foreign) in enumerate(entries)]

    def _listing(self) -> tuple[frozenset[str], frozenset[str]]:
        """The names in new/ and cur/ (a missing folder is empty)."""
        found = []
        for sub in ("new", "cur"):
            try:
                found.append(frozenset(os.listdir(os.path.join(self.path, sub))))
            except FileNotFoundError:
                found.append(frozenset())
        return found[0], found[1]

    def _measure_all(self, listing: Listing) -> list[Entry]:
        """(uid, size, path, base, foreign) of every message, oldest first."""
        found: list[tuple[int, str, str, str]] = []
        for sub, names in zip(("new", "cur"), listing):
            folder = os.path.join(self.path, sub)
            for name in names:
                if name.startswith("."):
                    continue
                base = name.split(":", 1)[0]
                found.append((_delivery_time(folder, name), base, sub, name))
        found.sort()
        entries = []
        for when, base, sub, name in found:
            path = os.path.join(self.path, sub, name)
            try:
                size, foreign = self._measure(path, base)
            except FileNotFoundError:
                try:  # moved new/ -> cur/ (or flagged) by another program since the listing
                    path = self._find(base)
                    size, foreign = self._measure(path, base)
                except FileNotFoundError:
                    continue  # removed since the listing
            entries.append((uid_for(base), size, path, base, foreign))
        return entries

    def _measure(self, path: str, base: str) -> tuple[int, bool]:
        st = os.stat(path)
        key: Hashable = ("maildir", base, st.st_ino, st.st_size, st.st_mtime_ns)
        return self.sizing.size_of(key, lambda: open(path, "rb"))

    def open_message(self, message: Message):
        """A binary file of the stored message; it may have moved new/ -> cur/ meanwhile."""
        try:
            return open(message.path, "rb")
        except FileNotFoundError:
            message.path = self._find(message.base)
            return open(message.path, "rb")

    def commit(self, deleted: list[Message]) -> int:
        """Apply the session's deletions (UPDATE state only); returns how many of them were
        foreign and so moved to ``FOREIGN_FOLDER`` instead (IUPOP3 "lies about having
        deleted them"), whatever ``purge`` says."""
        if not deleted:
            return 0
        trash = None if self.purge else self._folder(self.wastebasket)
        kept = 0
        for done, message in enumerate(deleted):
            fault_stop_point(done)
            target = self._folder(FOREIGN_FOLDER) if message.foreign else trash
            try:
                self._remove(message, target)
            except FileNotFoundError:
                continue  # already gone: another client deleted it, which is what we wanted
            kept += message.foreign
        if self.purge:
            self.empty_wastebasket()
        return kept

    def _folder(self, name: str) -> str:
        """A Maildir++ folder of this maildrop, created if missing."""
        folder = os.path.join(self.path, name)
        ensure_maildir(folder)
        marker = os.path.join(folder, "maildirfolder")
        if not os.path.exists(marker):
            open(marker, "a").close()
        return folder

    def _remove(self, message: Message, trash: str | None) -> None:
        path = message.path
        if not os.path.exists(path):
            path = self._find(message.base)
        if trash is None:
            os.unlink(path)
            return
        name = os.path.basename(path)
        if ":2," not in name:
            name += ":2,"
        # rename() is atomic: the message is in exactly one folder at every moment.
        os.rename(path, os.path.join(trash, "cur", name))

    def empty_wastebasket(self) -> None:
        if self.wastebasket.strip("/") == FOREIGN_FOLDER:
            return  # foreign messages are never removed
        trash = os.path.join(self.path, self.wastebasket)
        for sub in ("cur", "new"):
            folder = os.path.join(trash, sub)
            try:
                names = os.listdir(folder)
            except FileNotFoundError:
                continue
            for name in names:
                try:
                    os.unlink(os.path.join(folder, name))
                except FileNotFoundError:
                    pass

    def _find(self, base: str) -> str:
        for sub in ("cur", "new"):
            folder = os.path.join(self.path, sub)
            try:
                for name in os.listdir(folder):
                    if name == base or name.startswith(base + ":"):
                        return os.path.join(folder, name)
            except FileNotFoundError:
                continue
        raise FileNotFoundError(base)


def _delivery_time(folder: str, name: str) -> int:
    """Maildir names start with the delivery time; other names fall back to the file's mtime."""
    head = name.split(".", 1)[0]
    if head.isascii() and head.isdigit():  # "²".isdigit() is true, int("²") fails
        return int(head)
    try:
        return int(os.stat(os.path.join(folder, name)).st_mtime)
    except FileNotFoundError:
        return 0
