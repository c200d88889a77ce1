"""A Maildir as a POP3 maildrop: scan, size, read, lock, and commit deletions.

The session opens one ``Maildrop`` after a good login and calls ``commit`` only in the UPDATE
state; everything before that is read-only, so a dropped connection or a killed worker changes
nothing on disk. Deleted mail goes to the wastebasket folder (Maildir++ ``.Trash``) unless
``purge`` is set, like VMS MAIL's WASTEBASKET and IUPOP3's ``-purge_reclaim``. A foreign message
(see worker.rewrite) is never removed: "deleting" it moves it to the ``.MAIL`` folder.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
import threading
import signal
from collections.abc import Callable
from dataclasses import dataclass

LOCK_NAME = ".iupop3.lock"
FOREIGN_FOLDER = ".MAIL"  # IUPOP3 1.8 moved MAIL/FOREIGN messages to the MAIL folder
_SIZE_FIELDS = re.compile(rb",([SW])=(\d+)")
_UIDL_OK = re.compile(r"[\x21-\x7e]{1,70}")
_CHUNK = 64 * 1024
# Test-only hook (tests/test_faults.py), never set in production: the process stops itself
# (SIGSTOP) once this many messages of an UPDATE are moved, so a test can kill -9 it mid-commit.
_TEST_STOP_AFTER = int(os.environ.get("IUPOP3_TEST_STOP_UPDATE_AFTER") or 0)


class MaildropBusy(Exception):
    """Another session holds this maildrop."""


class MaildropError(Exception):
    """The maildrop cannot be opened (permissions, not a directory...)."""


@dataclass(slots=True)
class Message:
    """One message as the session sees it; ``index`` is 0-based, POP3 numbers are index + 1."""

    index: int
    uid: str
    size: int       # octets with CRLF line ends, as RETR sends them (before stuffing)
    path: str
    base: str       # Maildir unique name (before ":2,"), stable across new/ -> cur/
    foreign: bool = False  # cannot travel as text: served as a notice, kept on DELE


# (path, unique name) -> (size as served, foreign?); worker.rewrite.Rewriter.measure is one.
Measure = Callable[[str, str], tuple[int, bool]]

# The last scan of each maildrop in this worker, by the exact names in new/ and cur/: a second
# session sees the same list without a stat or a read per message. Maildir files never change in
# place (only renames, which change the names), so the same names mean the same messages; a
# listing is exact where folder mtimes are not (one-tick granularity, NFS clocks).
_SCANS: dict[str, tuple[tuple[frozenset[str], frozenset[str]], Measure, list]] = {}
_SCANS_LOCK = threading.Lock()  # scans run in the worker's thread pool
_SCAN_CACHE_SIZE = 1024


def uid_for(base: str) -> str:
    """The UIDL of a message: its Maildir unique name, or a digest of it when unfit.

    A unique name never changes while the message lives in this Maildir (moving new/ -> cur/
    and flag changes only touch the part after ':'), so the UIDL is stable forever.
    """
    if _UIDL_OK.fullmatch(base):
        return base
    return "H" + hashlib.sha256(base.encode("utf-8", "surrogateescape")).hexdigest()[:40]


def wire_size(data: bytes) -> int:
    """Octets of ``data`` once every bare LF is sent as CRLF."""
    crlfs = data.count(b"\r\n") if b"\r" in data else 0  # memchr first: far cheaper
    return len(data) + data.count(b"\n") - crlfs


def file_wire_size(path: str) -> int:
    """Wire size of a file, read in chunks; a CR at a chunk's end is carried to the next.

    A last line without its LF counts the CRLF the DotStuffer adds to end it.
    """
    total = 0
    carry = b""
    last = b"\n"
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            last = chunk[-1:]
            chunk = carry + chunk
            carry = b""
            if chunk.endswith(b"\r"):
                carry, chunk = b"\r", chunk[:-1]
            total += wire_size(chunk)
    return total + len(carry) + (0 if last == b"\n" else 2)


def plain_measure(path: str, base: str) -> tuple[int, bool]:
    """Sizes without any rewriting (the message as stored, CRLF line ends)."""
    return _size_of(path, os.path.basename(path)), False


def ensure_maildir(path: str) -> None:
    for sub in ("cur", "new", "tmp"):
        os.makedirs(os.path.join(path, sub), mode=0o700, exist_ok=True)


def session_flock(fd: int, maildrop: str) -> int:
    """Lock ``fd`` for a session or close it and raise MaildropBusy / MaildropError.

    flock belongs to the open file, not the process: it holds between two sessions of one
    worker as well as across workers, and the kernel drops it when its holder dies.
    """
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise MaildropBusy(maildrop) from None
        raise MaildropError(f"cannot lock maildrop {maildrop}: {exc.strerror}") from None
    return fd


class Maildrop:
    """One user's Maildir, locked for the lifetime of a POP3 session."""

    def __init__(self, path: str, wastebasket: str = ".Trash", purge: bool = False):
        self.path = path
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

    def scan(self, maxmsg: int = 0, measure: Measure = plain_measure) -> list[Message]:
        """The messages of the maildrop, oldest first, at most ``maxmsg`` (0 = all)."""
        listing = self._listing()
        with _SCANS_LOCK:
            cached = _SCANS.get(self.path)
        if cached is not None and cached[0] == listing and cached[1] == measure:
            entries = cached[2]  # the same files as last time: the same sizes
        else:
            entries = self._measure_all(listing, measure)
            with _SCANS_LOCK:
                if len(_SCANS) >= _SCAN_CACHE_SIZE:
                    _SCANS.pop(next(iter(_SCANS)))
                _SCANS[self.path] = (listing, measure, entries)
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

    def _measure_all(self, listing: tuple[frozenset[str], frozenset[str]],
                     measure: Measure) -> list[tuple[str, int, str, str, bool]]:
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
                size, foreign = measure(path, base)
            except FileNotFoundError:
                try:  # moved new/ -> cur/ (or flagged) by another program since the listing
                    path = self._find(base)
                    size, foreign = measure(path, base)
                except FileNotFoundError:
                    continue  # removed since the listing
            entries.append((uid_for(base), size, path, base, foreign))
        return entries

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
            if done and done == _TEST_STOP_AFTER:
                os.kill(os.getpid(), signal.SIGSTOP)
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


def _size_of(path: str, name: str) -> int:
    """The wire size from ``,W=`` (Dovecot's CRLF size) when present, else from the file."""
    fields = dict(_SIZE_FIELDS.findall(name.encode("utf-8", "surrogateescape")))
    if b"W" in fields:
        return int(fields[b"W"])
    return file_wire_size(path)
