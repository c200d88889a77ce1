"""What every maildrop store shares: ``Message``, the errors, the session lock, sizing, limits.

The stores (worker.maildir, worker.mbox) import this module; everything else imports
worker.store, which re-exports these names beside the ``Maildrop`` interface and the factory
(two modules so that worker.store can import the stores without an import cycle).
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import signal
import threading
from collections.abc import Callable, Hashable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import BinaryIO, Protocol

from shared.maillocation import FOREIGN_FOLDER, WASTEBASKET

__all__ = ["FOREIGN_FOLDER", "WASTEBASKET"]  # declared in shared/ for the settings default

READ_CHUNK = 256 * 1024   # one read of a stored message (RETR, sizing); one send of RETR
SPOOL_CHUNK = 1 << 20     # mbox: copy, parse and CRC blocks of the whole spool
UIDL_PATTERN = r"[\x21-\x7e]{1,70}"  # RFC 1939 section 7: 1 to 70 printable ASCII characters
UIDL_OK = re.compile(UIDL_PATTERN)

# Test-only hook (tests/test_faults.py), never set in production: the process stops itself
# (SIGSTOP) once this many messages of an UPDATE are applied, so a test can kill -9 it there.
_TEST_STOP_AFTER = int(os.environ.get("IUPOP3_TEST_STOP_UPDATE_AFTER") or 0)


def fault_stop_point(done: int) -> None:
    """Where a commit has applied ``done`` deletions: stop here if a fault test asked to."""
    if done and done == _TEST_STOP_AFTER:
        # To this thread (a pool thread, worker.store): it stops before its next step, where
        # a kill() to the process stops it only once another thread takes the signal.
        signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)


STAMP_MAX = 256  # a session lock's stamp: one short line (worker.takeover writes and reads it)
LockKey = tuple[int, int]  # (st_dev, st_ino) of a session lock file: which maildrop it locks


@dataclass(frozen=True, slots=True)
class LockHolder:
    """What a login found in a session lock that was held: the file's identity and the
    holder's stamp as read, untrusted (the maildrop's user can write the file)."""

    key: LockKey
    stamp: bytes


class MaildropBusy(Exception):
    """Another session holds this maildrop; ``holder`` says what its lock file said."""

    def __init__(self, maildrop: str, holder: LockHolder | None = None):
        super().__init__(maildrop)
        self.holder = holder


class MaildropError(Exception):
    """The maildrop cannot be opened (permissions, not a directory, a refused symlink...)."""


@dataclass(slots=True)
class Message:
    """One message as the session sees it; ``index`` is 0-based, POP3 numbers are index + 1."""

    index: int
    uid: str
    size: int       # octets with CRLF line ends, as RETR sends them (before stuffing)
    path: str       # where it was found (for logs and tests; stores never open it by path)
    base: str       # Maildir unique name (before ":2,"), stable across new/ -> cur/; mbox: UIDL
    foreign: bool = False  # cannot travel as text: served as a notice, kept on DELE


Opener = Callable[[], AbstractContextManager[BinaryIO]]


class Sizing(Protocol):
    """(octets RETR sends, foreign?) of a stored message; worker.rewrite.Rewriter is one.

    ``key`` identifies the stored bytes (the store says how: Maildir name, inode, size and
    mtime; mbox UIDL, CRC and length); ``open_stored`` is called only when the answer is not
    already known, so a cache hit reads nothing.
    """

    def size_of(self, key: Hashable, open_stored: Opener) -> tuple[int, bool]: ...


def wire_size(data: bytes) -> int:
    """Octets of ``data`` once every bare LF is sent as CRLF."""
    crlfs = data.count(b"\r\n") if b"\r" in data else 0  # memchr first: far cheaper
    return len(data) + data.count(b"\n") - crlfs


def stream_wire_size(fh: BinaryIO) -> int:
    """Wire size of a stream, read in chunks; a CR at a chunk's end is carried to the next.

    A last line without its LF counts the CRLF the DotStuffer adds to end it.
    """
    total = 0
    carry = b""
    last = b"\n"
    while chunk := fh.read(READ_CHUNK):
        last = chunk[-1:]
        chunk = carry + chunk
        carry = b""
        if chunk.endswith(b"\r"):
            carry, chunk = b"\r", chunk[:-1]
        total += wire_size(chunk)
    return total + len(carry) + (0 if last == b"\n" else 2)


class PlainSizing:
    """Sizes of the stored form, never foreign: for stores used without a Rewriter."""

    def size_of(self, key: Hashable, open_stored: Opener) -> tuple[int, bool]:
        with open_stored() as fh:
            return stream_wire_size(fh), False


PLAIN = PlainSizing()


def session_flock(fd: int, maildrop: str, stamp: bytes = b"") -> int:
    """Lock ``fd`` for a session or close it and raise MaildropBusy / MaildropError.

    flock belongs to the open file, not the process: it holds between two sessions of one
    worker as well as across workers, and the kernel drops it when its holder dies. The
    holder writes ``stamp`` (who it is, worker.takeover) into the file by descriptor, so a
    login that finds the lock held knows whom to ask; a stamp that cannot be written (a full
    disk) costs only that, never the login.
    """
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            holder = _holder(fd)
            os.close(fd)
            raise MaildropBusy(maildrop, holder) from None
        os.close(fd)
        raise MaildropError(f"cannot lock maildrop {maildrop}: {exc.strerror}") from None
    if stamp:
        try:
            # Write, then cut what an older, longer stamp left: truncating a non-empty file to
            # zero first cost 30-50 us of CPU (and up to 0.5 ms) per login on ext4.
            written = os.pwrite(fd, stamp[:STAMP_MAX], 0)
            os.ftruncate(fd, written)
        except OSError:
            pass
    return fd


def lock_key(fd: int) -> LockKey:
    """The identity of a session lock file (what a takeover request must name)."""
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _holder(fd: int) -> LockHolder | None:
    try:
        return LockHolder(lock_key(fd), os.pread(fd, STAMP_MAX, 0))
    except OSError:
        return None
