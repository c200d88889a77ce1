"""A classic Unix mail spool (``-mail mbox:/var/mail/%u``) as a POP3 maildrop.

Implements worker.store's ``Maildrop`` (lock, scan, open_message, commit, empty_wastebasket)
with the errors and ``Message`` of worker.storebase; the format and UIDLs are in
worker.mboxformat. Commit copies kept records byte for byte: other writers' dialects survive.

Locks: for the whole session an flock on ``.USER.iupop3.lock`` beside the spool keeps other
POP3 sessions out (per open file, so it also holds between sessions of one worker, and dies
with the process); it needs only the directory write access dot-locking needs anyway. The
spool is locked only while it is read or rewritten, as delivery agents lock it: ``USER.lock``
linked from a temp file holding our pid and host name, as liblockfile makes it (stale when
untouched for five minutes, or at once when it names this host and a dead pid), then fcntl
(lockf) on the spool. Both are
tried without blocking and retried with backoff until ``lock_wait``, then TimeoutError (an
OSError: the Session answers [SYS/TEMP]). The scan keeps each message's offsets and CRC, so mail
delivered during a session is never shown in it; RETR re-locks, copies the bytes, checks the
CRC and, if another program rewrote the spool meanwhile, finds the message again by UIDL.

Rewrite: under both locks, the kept records and everything to the end of the file (mail
delivered since the scan included) go to ``.USER.iupop3.new`` in the same directory, which is
fsync'd, given the spool's owner, group and mode, and renamed over the spool; then the
directory is fsync'd. A crash leaves the old spool or the new one, never a mix; in-place
compaction cannot promise that without a journal every local MUA would have to honour. The
cost: an agent that fcntl-locks *before* taking the dot-lock and does not check the inode after
locking could append to the replaced file. Postfix, procmail, exim and dovecot-lda take the
dot-lock first in their default mbox setups (exim also re-checks the inode), and we hold it
from before the read to after the rename. Deleted messages are appended to the wastebasket
first: a crash leaves a copy in both, never in neither.

Beside ``/var/mail/jones``: ``jones.Trash`` (``jones`` + the ``wastebasket`` setting as a
suffix) gets deleted mail unless ``purge``; ``jones.MAIL`` gets deleted foreign messages, which
are never dropped (IUPOP3 moved them to the VMS MAIL folder); ``jones.lock`` is the dot-lock.
"""

from __future__ import annotations

import errno
import fcntl
import io
import itertools
import os
import socket
import stat
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import BinaryIO

from shared.logsetup import escaped, log
from worker import ledger as ledgers
from worker.storebase import (FOREIGN_FOLDER, PLAIN, SPOOL_CHUNK, WASTEBASKET, MaildropError,
                              Message, Sizing, session_flock)
from worker.mboxformat import Record, from_line, parse, unquote, unquote_text, visible

STALE_SECONDS = 300         # liblockfile and Debian policy: an untouched dot-lock this old is dead
TOUCH_SECONDS = 60          # a long rewrite keeps its dot-lock fresh, like lockfile_touch()
LOCK_WAIT_SECONDS = 20.0
# This host in dot-locks: a lock naming it and a dead pid is taken over at once. Only the
# characters a file name and a one-word lock line can hold.
HOST = "".join(c for c in socket.gethostname() if c.isascii() and (c.isalnum() or c in ".-_"))[
    :64] or "localhost"
_TEMP_SERIAL = itertools.count()  # unique temp names among the threads of one process
FOREIGN_SUFFIX = FOREIGN_FOLDER
_CHUNK = SPOOL_CHUNK       # copy and RETR read size


# -- locks -----------------------------------------------------------------------------------
def _sleep(seconds: float) -> None:
    # Mbox work runs in the worker's thread pool (worker.store): a real sleep stalls no session.
    time.sleep(seconds)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class DotLock:
    """``FILE.lock`` made the liblockfile way: a uniquely named temp file holding our pid and
    host name is ``link()``ed to the lock name, then removed. The lock appears whole or not at
    all (a writer killed at any moment never leaves an empty one), and link() is atomic on NFS
    too, where O_EXCL was not always."""

    def __init__(self, path: str):
        self.path = path
        self._inode: int | None = None
        self._touched = 0.0

    def acquire(self, deadline: float) -> None:
        delay = 0.01
        while True:  # ends: every turn without the lock checks the deadline
            if self._link():
                self._touched = time.monotonic()
                return
            if self._break_if_stale() and time.monotonic() < deadline:
                continue
            if time.monotonic() >= deadline:
                raise TimeoutError(errno.ETIMEDOUT, "mail spool is locked", self.path)
            _sleep(delay)
            delay = min(delay * 2, 0.5)

    def _link(self) -> bool:
        """One attempt: True if the lock is ours now, False if someone else holds it."""
        temp = os.path.join(os.path.dirname(self.path),
                            f".lk{os.getpid()}.{next(_TEMP_SERIAL)}.{HOST}")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o644)
        try:
            try:
                _write_all(fd, f"{os.getpid()} {HOST}\n".encode())  # ENOSPC: no lock at all
            finally:
                os.close(fd)
            try:
                os.link(temp, self.path)
            except FileExistsError:
                return False
            except OSError:
                # liblockfile: over NFS link() may report an error for a link it made.
                if os.lstat(temp).st_nlink != 2:
                    raise
            self._inode = os.lstat(temp).st_ino
            return True
        finally:
            _unlink_quietly(temp)

    def _break_if_stale(self) -> bool:
        """Remove the lock if its holder is gone; True if the caller should retry at once."""
        try:
            st, content = _read_lock(self.path)
        except FileNotFoundError:
            return True
        pid, host = _lock_owner(content)
        # Only a pid of this host can be checked; another host's lock, or an empty one (other
        # delivery agents create, then write), waits for its age like liblockfile's.
        dead = pid > 0 and host in ("", HOST) and not _alive(pid)
        if not dead and time.time() - st.st_mtime < STALE_SECONDS:
            return False
        # Remove only the lock we judged. Between this lstat and unlink another breaker could
        # still slip in a fresh lock: liblockfile and procmail share that window.
        try:
            if os.lstat(self.path).st_ino == st.st_ino:
                os.unlink(self.path)
                log.info("removed stale lock %s (pid %s)", escaped(self.path), pid or "unknown")
        except FileNotFoundError:
            pass
        return True

    def touch(self) -> None:
        """Keep a lock held through a long copy from looking stale to others."""
        now = time.monotonic()
        if self._inode is not None and now - self._touched >= TOUCH_SECONDS:
            os.utime(self.path)
            self._touched = now

    def release(self) -> None:
        if self._inode is None:
            return
        try:
            if os.lstat(self.path).st_ino == self._inode:  # not a lock someone took after ours
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        self._inode = None


LOCK_READ_MAX = 128  # a dot-lock holds a pid (and a host name): more is not a lock of ours


def _read_lock(path: str) -> tuple[os.stat_result, bytes]:
    """(lstat, first bytes) of a dot-lock, never through a symlink nor blocking on a FIFO;
    anything but a regular file reads as empty (so it is judged by its age)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        return os.lstat(path), b""
    try:
        st = os.fstat(fd)
        return st, os.read(fd, LOCK_READ_MAX) if stat.S_ISREG(st.st_mode) else b""
    finally:
        os.close(fd)


def _lock_owner(content: bytes) -> tuple[int, str]:
    """(pid, host) from a lock's first line: ours write "PID HOST", liblockfile "PID"; pid 0
    when there is none. At most 10 ASCII digits: a planted lock cannot make int() work on
    megabytes."""
    words = content.split(b"\n", 1)[0].split()
    word = words[0] if words else b""
    if not word or len(word) > 10 or not (word.isascii() and word.isdigit()):
        return 0, ""
    host = words[1].decode("ascii", "replace") if len(words) > 1 else ""
    return int(word), host


def _fcntl_lock(fd: int, exclusive: bool, deadline: float, path: str) -> None:
    mode = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
    delay = 0.01
    while True:  # ends: every failed turn checks the deadline
        try:
            fcntl.lockf(fd, mode)  # F_SETLK: the lock delivery agents take
            return
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EAGAIN):
                raise
        if time.monotonic() >= deadline:
            raise TimeoutError(errno.ETIMEDOUT, "mail spool is locked (fcntl)", path)
        _sleep(delay)
        delay = min(delay * 2, 0.5)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


# -- the maildrop ----------------------------------------------------------------------------
class Mbox:
    """One user's mbox spool, locked against other POP3 sessions for a session's lifetime."""

    def __init__(self, path: str, wastebasket: str = WASTEBASKET, purge: bool = False,
                 sizing: Sizing = PLAIN, ledger_dir: str = ""):
        self.path = os.path.abspath(path)
        self.sizing = sizing
        self.directory, self.name = os.path.split(self.path)
        self.wastebasket = wastebasket
        self.purge = purge
        self.lock_wait = LOCK_WAIT_SECONDS
        # Called with "appended", "copying" (each chunk), "written", "renamed" during commit;
        # the crash tests stop a child process there.
        self.hook: Callable[[str], None] = lambda stage: None
        self._session_fd: int | None = None
        self._records: dict[int, Record] = {}
        self._prefix: tuple[int, int] | None = None  # (length, crc32) of the scanned part
        # Last login and first retrievals (by UIDL) beside the spool; sizes are not kept:
        # the spool is read at every login anyway (worker.ledger).
        self.ledger = ledgers.Ledger(fresh=True)
        self.ledger_dir = ledger_dir

    @property
    def trash_path(self) -> str:
        return f"{self.path}.{self.wastebasket.lstrip('.')}"

    @property
    def foreign_path(self) -> str:
        return self.path + FOREIGN_SUFFIX

    @property
    def session_lock_path(self) -> str:
        return os.path.join(self.directory, f".{self.name}.iupop3.lock")

    @property
    def new_path(self) -> str:
        return os.path.join(self.directory, f".{self.name}.iupop3.new")

    # -- session lock ------------------------------------------------------------------------
    def lock(self) -> None:
        """Take the session lock; it dies with the process, so a killed worker frees it."""
        if "/" in self.wastebasket or not self.wastebasket.strip("."):
            raise MaildropError(f"wastebasket {self.wastebasket!r} is not a file name suffix")
        try:
            fd = os.open(self.session_lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW
                         | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise MaildropError(f"cannot open maildrop {self.path}: {exc.strerror}") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise MaildropError(f"maildrop {self.path}: its session lock is not a regular file")
        self._session_fd = session_flock(fd, self.path)
        _unlink_quietly(self.new_path)  # left by a commit that crashed: the spool is whole
        self.ledger = ledgers.load_for_spool(self.path, self.ledger_dir, "")

    def save_ledger(self) -> bool:
        return ledgers.save_for_spool(self.path, self.ledger_dir, self.ledger)

    def unlock(self) -> None:
        if self._session_fd is not None:
            os.close(self._session_fd)
            self._session_fd = None

    # -- spool locks -------------------------------------------------------------------------
    @contextmanager
    def _locked(self, path: str, write: bool,
                owner: os.stat_result | None = None) -> Iterator[tuple[int | None, DotLock]]:
        """Dot-lock, open and fcntl-lock ``path``; yields its fd (None if missing) and dot-lock.

        With ``owner`` a missing file is created with that file's owner, group and mode.
        """
        deadline = time.monotonic() + self.lock_wait
        dot = DotLock(path + ".lock")
        dot.acquire(deadline)
        try:
            fd = self._open(path, write, owner)
            if fd is None:
                yield None, dot
                return
            try:
                _fcntl_lock(fd, write, deadline, path)
                yield fd, dot
            finally:
                # Closing drops the fcntl lock. Never close another fd of this file while
                # holding it: POSIX drops a process's fcntl locks on any close of the file.
                os.close(fd)
        finally:
            dot.release()

    def _open(self, path: str, write: bool, owner: os.stat_result | None) -> int | None:
        """The spool or a sibling, never through a symlink nor blocking on a FIFO; a sibling
        (``owner`` given) must be the spool owner's, with one link, like the spool written."""
        flags = ((os.O_RDWR if write else os.O_RDONLY) | os.O_NOFOLLOW | os.O_NONBLOCK
                 | os.O_CLOEXEC)
        try:
            fd = os.open(path, flags)
            st = os.fstat(fd)
            if write and (st.st_nlink != 1 or owner is not None and st.st_uid != owner.st_uid):
                os.close(fd)
                raise OSError(errno.EPERM, "a hard link or another owner's file", path)
        except FileNotFoundError:
            if owner is None:
                return None
            fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                if os.geteuid() == 0:
                    os.fchown(fd, owner.st_uid, owner.st_gid)
                os.fchmod(fd, stat.S_IMODE(owner.st_mode))
            except OSError as exc:
                log.info("cannot give %s the spool's owner: %s", path, exc.strerror)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OSError(errno.EINVAL, "not a regular file", path)
        return fd

    # -- reading ---------------------------------------------------------------------------
    def scan(self, maxmsg: int = 0) -> list[Message]:
        """The messages in the spool now, oldest first, at most ``maxmsg`` (0 = all).

        Sizes (and the verdict on foreign messages) are the ``sizing`` object's: with the
        worker's Rewriter those of the served form, with PLAIN those of the stored form.
        """
        messages: list[Message] = []
        self._records = {}
        with self._locked(self.path, write=False) as (fd, _):
            if fd is None:
                return messages  # no spool file: an empty maildrop, as for every MDA
            with open(fd, "rb", closefd=False) as fh:
                found = list(itertools.islice(visible(parse(fh)), maxmsg or None))
                last = found[-1][0] if found else None
                self._prefix = _prefix_crc(fh, last.end + last.tail if last else 0)
                for record, uid in found:  # after the parse: measuring moves the file offset
                    size, foreign = self._measured(fh, record, uid)
                    self._records[len(messages)] = record
                    messages.append(Message(index=len(messages), uid=uid, size=size,
                                            path=self.path, base=uid, foreign=foreign))
        return messages

    def _measured(self, fh: BinaryIO, record: Record, uid: str) -> tuple[int, bool]:
        """(served size, foreign?) of a record, keyed by UIDL, CRC and stored length."""
        if self.sizing is PLAIN:
            return record.size, record.foreign  # the parser counted it already

        @contextmanager
        def stored() -> Iterator[BinaryIO]:
            stream = _copy_out(fh, record)
            if stream is None:  # cannot happen under the lock the scan holds
                raise OSError(errno.EIO, "spool changed while locked", uid)
            with stream:
                stream.seek(0)
                yield stream

        return self.sizing.size_of(("mbox", uid, record.crc, record.end - record.start), stored)

    def open_message(self, message: Message) -> BinaryIO:
        """The stored message (unquoted, without its From line), read under the spool locks."""
        record = self._records[message.index]
        with self._locked(self.path, write=False) as (fd, _):
            if fd is None:
                raise FileNotFoundError(errno.ENOENT, "mail spool is gone", self.path)
            with open(fd, "rb", closefd=False) as fh:
                out = _copy_out(fh, record)
                if out is None:  # rewritten by another program since the scan: find it again
                    found = next((r for r, uid in visible(parse(fh)) if uid == message.uid),
                                 None)
                    out = _copy_out(fh, found) if found is not None else None
                    if out is None:
                        raise FileNotFoundError(errno.ENOENT, "message no longer in spool",
                                                message.uid)
                    self._records[message.index] = found
        out.seek(0)
        return out

    # -- update ------------------------------------------------------------------------------
    def commit(self, deleted: list[Message]) -> int:
        """Apply the session's deletions (UPDATE state only); returns how many of them were
        foreign and so moved to ``USER.MAIL`` instead, whatever ``purge`` says."""
        if not deleted:
            return 0
        wanted = {m.uid: m for m in deleted}
        with self._locked(self.path, write=True) as (fd, dot):
            if fd is None:
                return 0  # the spool is gone: so are the messages
            spool = os.fstat(fd)
            with open(fd, "rb", closefd=False) as fh:
                drops = self._find_drops(fh, wanted)
                if not drops:
                    return 0
                foreign = [r for r, uid in drops if r.foreign or wanted[uid].foreign]
                if foreign:
                    self._append(self.foreign_path, fh, foreign, spool, dot)
                moved = {id(r) for r in foreign}
                trash = [r for r, _ in drops if id(r) not in moved]
                if trash and not self.purge:
                    self._append(self.trash_path, fh, trash, spool, dot)
                self.hook("appended")
                self._rewrite(fh, spool, [r for r, _ in drops], dot)
        if self.purge:
            self.empty_wastebasket()
        return len(foreign)

    def _find_drops(self, fh: BinaryIO, wanted: dict[str, Message]) -> list[tuple[Record, str]]:
        """The records of the deleted messages in the spool as it is now (under the lock).

        If the bytes up to the last scanned message are unchanged (appends only), the scan's
        offsets hold; otherwise another program rewrote the spool and it is parsed again.
        """
        if self._prefix and _prefix_crc(fh, self._prefix[0]) == self._prefix:
            found = [(self._records[m.index], uid) for uid, m in wanted.items()]
            return sorted(found, key=lambda pair: pair[0].start)
        drops = []
        for record, uid in visible(parse(fh)):
            if uid in wanted:
                drops.append((record, uid))
                if len(drops) == len(wanted):
                    break  # the rest is copied as it is
        return drops

    def _append(self, path: str, source: BinaryIO, records: list[Record],
                spool: os.stat_result, outer: DotLock) -> None:
        """Append records to a sibling mbox under its own locks; undo a partial append."""
        with self._locked(path, write=True, owner=spool) as (fd, _):
            assert fd is not None
            end = os.lseek(fd, 0, os.SEEK_END)
            last = os.pread(fd, 2, max(end - 2, 0))
            if end == 0 or last.endswith(b"\n\n") or last == b"\n":
                lead = b""  # empty, or already ends with the blank line a record needs
            else:
                lead = b"\n" if last.endswith(b"\n") else b"\n\n"
            try:
                _write_all(fd, lead)
                for record in records:
                    head = b"" if record.start != record.body else from_line()
                    _write_all(fd, head)
                    _copy_range(source, fd, record.start, record.end, outer.touch)
                    if record.end > record.body:
                        source.seek(record.end - 1)
                        if source.read(1) != b"\n":
                            _write_all(fd, b"\n")
                    _write_all(fd, b"\n")
                os.fsync(fd)
            except BaseException:
                os.ftruncate(fd, end)
                raise

    def _rewrite(self, source: BinaryIO, spool: os.stat_result, drops: list[Record],
                 dot: DotLock) -> None:
        """Copy all but ``drops`` to a new file and rename it over the spool."""
        # A fresh file (O_EXCL), never one found there: a planted symlink or hard link under
        # this name would otherwise be truncated and filled with the user's mail.
        _unlink_quietly(self.new_path)
        new = os.open(self.new_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                      | os.O_CLOEXEC, 0o600)
        try:
            pos = 0
            for record in sorted(drops, key=lambda r: r.start):
                _copy_range(source, new, pos, record.start, dot.touch, self.hook)
                pos = record.end + record.tail
            _copy_range(source, new, pos, None, dot.touch, self.hook)
            mine = os.fstat(new)
            if (mine.st_uid, mine.st_gid) != (spool.st_uid, spool.st_gid):
                os.fchown(new, spool.st_uid, spool.st_gid)  # EPERM: refuse rather than steal
            os.fchmod(new, stat.S_IMODE(spool.st_mode))
            os.fsync(new)
        except BaseException:
            os.close(new)
            _unlink_quietly(self.new_path)
            raise
        os.close(new)
        self.hook("written")
        os.rename(self.new_path, self.path)  # the one atomic step: old spool or new, no mix
        directory = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        self.hook("renamed")

    def empty_wastebasket(self) -> None:
        """Truncate the wastebasket mbox (``purge``); a missing one is already empty."""
        if self.trash_path == self.foreign_path or not os.path.exists(self.trash_path):
            return  # foreign messages are never removed
        with self._locked(self.trash_path, write=True) as (fd, _):
            if fd is not None:
                os.ftruncate(fd, 0)
                os.fsync(fd)


def _copy_out(fh: BinaryIO, record: Record) -> BinaryIO | None:
    """The record's message, unquoted, in memory or a temporary file (past ``_CHUNK``);
    None if its bytes are no longer those the scan saw."""
    fh.seek(record.start)
    length = record.end - record.start
    if length <= _CHUNK:
        raw = fh.read(length)
        if len(raw) != length or zlib.crc32(raw) != record.crc:
            return None
        return io.BytesIO(unquote_text(raw[record.body - record.start:]))
    out = tempfile.SpooledTemporaryFile(max_size=_CHUNK)
    crc = zlib.crc32(fh.read(record.body - record.start))
    remaining = record.end - record.body
    at_line_start = True
    while remaining > 0:  # ends: each turn consumes bytes or returns
        piece = fh.readline(min(remaining, _CHUNK))
        if not piece:
            out.close()
            return None
        remaining -= len(piece)
        crc = zlib.crc32(piece, crc)
        out.write(unquote(piece) if at_line_start else piece)
        at_line_start = piece.endswith(b"\n")
    if crc != record.crc:
        out.close()
        return None
    return out


def _prefix_crc(fh: BinaryIO, length: int) -> tuple[int, int] | None:
    """(length, crc32) of the spool's first ``length`` bytes; None if it is shorter."""
    fh.seek(0)
    crc = 0
    left = length
    while left > 0:  # ends: each turn reads bytes or returns
        data = fh.read(min(left, _CHUNK))
        if not data:
            return None
        crc = zlib.crc32(data, crc)
        left -= len(data)
    return length, crc


def _copy_range(source: BinaryIO, fd: int, start: int, stop: int | None,
                touch: Callable[[], None], hook: Callable[[str], None] | None = None) -> None:
    """Copy bytes [start, stop) of ``source`` (to its end if stop is None) to ``fd``.

    In the kernel (copy_file_range): no copy through Python, and one GIL release per chunk
    instead of two, so the worker's event loop waits less while a pool thread copies a spool.
    """
    src = source.fileno()
    pos = start
    while stop is None or pos < stop:  # ends: each turn copies bytes or meets the end
        want = _CHUNK if stop is None else min(stop - pos, _CHUNK)
        if hook is not None:
            hook("copying")
        try:
            done = os.copy_file_range(src, fd, want, pos)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            data = os.pread(src, want, pos)  # a file system without it: through memory
            _write_all(fd, data)
            done = len(data)
        if not done:
            return
        pos += done
        touch()


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
