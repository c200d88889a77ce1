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
(lockf) on the spool (both in worker.mboxlock). Both are tried without blocking and retried
with backoff until ``lock_wait``, then TimeoutError (an OSError: the Session answers
[SYS/TEMP]). The spool's directory is walked once per session (worker.safefs, as for a
Maildir) and every name above is resolved relative to its descriptor, never by path. The scan keeps each message's offsets and CRC, so mail
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
first, under a journal (worker.mboxjournal) that the next lock uses to undo the append of a
commit killed before its rename: each message ends up in one of the two, whole, exactly once.

Beside ``/var/mail/jones``: ``jones.Trash`` (``jones`` + the ``wastebasket`` setting as a
suffix) gets deleted mail unless ``purge``; ``jones.MAIL`` gets deleted foreign messages, which
are never dropped (IUPOP3 moved them to the VMS MAIL folder); ``jones.lock`` is the dot-lock.
"""

from __future__ import annotations

import errno
import io
import itertools
import os
import stat
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import BinaryIO

from shared.logsetup import escaped, log
from worker import safefs
from worker.safefs import UnsafeEntry
from worker import ledger as ledgers
from worker.storebase import (FOREIGN_FOLDER, PLAIN, SPOOL_CHUNK, WASTEBASKET, MaildropError,
                              LockKey, Message, Sizing, session_flock)
from worker import mboxjournal
from worker.mboxformat import Record, parse, unquote, unquote_text, visible
from worker.mboxlock import DotLock, fcntl_lock
from worker.mboxlock import unlink_quietly as _unlink_quietly, write_all as _write_all

LOCK_WAIT_SECONDS = 20.0
FOREIGN_SUFFIX = FOREIGN_FOLDER
_CHUNK = SPOOL_CHUNK       # copy and RETR read size


# -- the maildrop ----------------------------------------------------------------------------
class Mbox:
    """One user's mbox spool, locked against other POP3 sessions for a session's lifetime.

    Opened from ``where`` = (trusted directory, components below it) the way worker.maildir
    is: the spool's directory is walked by worker.safefs (no symlink below the trusted part
    unless link and target are the account's), and the spool, its siblings and every lock are
    then named relative to that directory's descriptor. The spool and its siblings must be
    regular files of one link owned by ``owner`` (the users file's uid, else the spool's own).
    A plain path (tools, tests) is all trusted but its last component.
    """

    def __init__(self, where: str | tuple[str, tuple[str, ...]], wastebasket: str = WASTEBASKET,
                 purge: bool = False, sizing: Sizing = PLAIN, owner: int | None = None,
                 ledger_dir: str = ""):
        trusted, below = (where, ()) if isinstance(where, str) else where
        if below:
            self.trusted, self.below = trusted, below[:-1]
            self.path = os.path.join(trusted, *below)
        else:  # the administrator named the spool itself
            self.path = os.path.abspath(trusted)
            self.trusted, self.below = os.path.dirname(self.path), ()
        self.owner = owner
        self._dir_fd: int | None = None  # the spool's directory, from lock() to close_directory()
        self._dir_key: tuple[int, int] | None = None  # its (st_dev, st_ino), while locked
        self.sizing = sizing
        self.directory, self.name = os.path.split(self.path)
        self.wastebasket = wastebasket
        self.purge = purge
        self.lock_wait = LOCK_WAIT_SECONDS
        # Called with "appended", "copying" (each chunk), "written", "renamed" during commit;
        # the crash tests stop a child process there.
        self.hook: Callable[[str], None] = lambda stage: None
        self._session_fd: int | None = None
        self.stamp = b""                     # written into the session lock (worker.takeover)
        self.lock_key: LockKey | None = None  # the held session lock file, while held
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

    def siblings(self, directory: int) -> mboxjournal.Siblings:
        """The wastebasket and USER.MAIL, appended to under ``.USER.iupop3.journal``, all
        named relative to the spool directory's descriptor."""
        return mboxjournal.Siblings(
            self.path, os.path.join(self.directory, f".{self.name}.iupop3.journal"),
            {"wastebasket": self.trash_path, "foreign": self.foreign_path}, self._locked,
            directory)

    # -- session lock ------------------------------------------------------------------------
    def lock(self) -> None:
        """Open the spool's directory and take the session lock; it dies with the process, so
        a killed worker frees it."""
        if "/" in self.wastebasket or not self.wastebasket.strip("."):
            raise MaildropError(f"wastebasket {self.wastebasket!r} is not a file name suffix")
        directory = self._walk()
        try:
            fd = self._session_lock_fd(directory)
            st = os.fstat(fd)
            self._session_fd = session_flock(fd, self.path, self.stamp)
        except BaseException:
            os.close(directory)
            raise
        self._dir_fd = directory
        self.lock_key = (st.st_dev, st.st_ino)
        where = os.fstat(directory)
        self._dir_key = (where.st_dev, where.st_ino)
        # left by a commit that crashed: the spool is whole
        _unlink_quietly(_name(self.new_path), self._dir_fd)
        self.ledger = ledgers.load_for_spool(self.path, self.ledger_dir, "", self._dir_fd)

    def _walk(self) -> int:
        """The spool directory's descriptor (worker.safefs.walk); MaildropError if refused."""
        try:
            return safefs.walk(self.trusted, self.below, self.owner, create=False)
        except UnsafeEntry as exc:
            raise MaildropError(f"maildrop {escaped(self.path)}: {escaped(str(exc.filename))}"
                                f" {exc.strerror}; refused") from None
        except OSError as exc:
            raise MaildropError(f"cannot open maildrop {self.path}: {exc.strerror}") from None

    def _session_lock_fd(self, directory: int) -> int:
        """``.USER.iupop3.lock`` opened for the stamp: a regular file of one link (a hard link
        to another file would have it truncated), the account's or the server's own."""
        try:
            fd = os.open(_name(self.session_lock_path), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW
                         | os.O_NONBLOCK | os.O_CLOEXEC, 0o600, dir_fd=directory)
        except OSError as exc:
            raise MaildropError(f"cannot open maildrop {self.path}: {exc.strerror}") from None
        st = os.fstat(fd)
        if (not stat.S_ISREG(st.st_mode) or st.st_nlink != 1
                or st.st_uid not in (self.owner, os.geteuid()) and self.owner is not None):
            os.close(fd)
            raise MaildropError(f"maildrop {self.path}: its session lock is not a regular file"
                                " of one link of the account's; refused")
        return fd

    def close_directory(self) -> None:
        """Close the spool directory's descriptor after the login's scan: between commands a
        session holds only its lock file; each command walks to the directory again and
        checks it is the one locked (``_directory``)."""
        if self._dir_fd is not None:
            os.close(self._dir_fd)
            self._dir_fd = None

    def save_ledger(self) -> bool:
        if not self.ledger.dirty:
            return True  # nothing learned: no walk to the directory
        if self._dir_fd is not None or self._dir_key is None:
            return ledgers.save_for_spool(self.path, self.ledger_dir, self.ledger, self._dir_fd)
        try:
            with self._directory() as directory:
                return ledgers.save_for_spool(self.path, self.ledger_dir, self.ledger,
                                              directory)
        except OSError as exc:  # the directory was swapped: the ledger only, never the login
            log.warning("ledger of %s not written: %s", escaped(self.path), exc)
            return False

    def unlock(self) -> None:
        if self._session_fd is not None:
            os.close(self._session_fd)
            self._session_fd = None
            self.lock_key = None
        if self._dir_fd is not None:
            os.close(self._dir_fd)
            self._dir_fd = None
        self._dir_key = None

    @contextmanager
    def _directory(self) -> Iterator[int]:
        """The spool directory's descriptor: the login's, until ``close_directory``; then
        one walked for this call that must be the directory locked at login (else
        UnsafeEntry, an OSError: -ERR, nothing read or changed); without the session lock
        (tests and tools), one walked for this call."""
        if self._dir_fd is not None:
            yield self._dir_fd
            return
        fd = (safefs.reopen(self.trusted, self.below, self.owner, self._dir_key)
              if self._dir_key is not None else self._walk())
        try:
            yield fd
        finally:
            os.close(fd)

    # -- spool locks -------------------------------------------------------------------------
    @contextmanager
    def _locked(self, path: str, write: bool,
                owner: os.stat_result | None = None) -> Iterator[tuple[int | None, DotLock]]:
        """Dot-lock, open and fcntl-lock ``path``; yields its fd (None if missing) and dot-lock.

        With ``owner`` a missing file is created with that file's owner, group and mode.
        """
        deadline = time.monotonic() + self.lock_wait
        with self._directory() as directory:
            dot = DotLock(_name(path) + ".lock", directory, label=path + ".lock")
            dot.acquire(deadline)
            try:
                fd = self._open(directory, path, write, owner)
                if fd is None:
                    yield None, dot
                    return
                try:
                    fcntl_lock(fd, write, deadline, path)
                    yield fd, dot
                finally:
                    # Closing drops the fcntl lock. Never close another fd of this file while
                    # holding it: POSIX drops a process's fcntl locks on any close of the file.
                    os.close(fd)
            finally:
                dot.release()

    def _open(self, directory: int, path: str, write: bool,
              owner: os.stat_result | None) -> int | None:
        """The spool or a sibling in ``directory``, never through a symlink nor blocking on a
        FIFO; for reads as for writes a regular file of one link, owned by the account (the
        spool) or by the spool's owner (a sibling, ``owner`` given; made if missing)."""
        flags = ((os.O_RDWR if write else os.O_RDONLY) | os.O_NOFOLLOW | os.O_NONBLOCK
                 | os.O_CLOEXEC)
        try:
            fd = os.open(_name(path), flags, dir_fd=directory)
        except FileNotFoundError:
            if owner is None:
                return None
            # A sibling (USER.Trash, USER.MAIL) gets the spool's owner, group and mode, made
            # by descriptor (worker.safefs); a FileExistsError race is the caller's OSError.
            fd = safefs.create_file(directory, _name(path),
                                    safefs.Owner.of(owner, mode=stat.S_IMODE(owner.st_mode)
                                                    & 0o666), flags)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsafeEntry(exc.errno, "is a symlink; refused", path) from None
            raise
        st = os.fstat(fd)
        uid = owner.st_uid if owner is not None else self.owner
        problem = safefs.refusal(st, uid)
        if problem is None and st.st_nlink != 1:
            problem = f"has {st.st_nlink} links (a hard link)"
        if problem is not None:
            os.close(fd)
            raise UnsafeEntry(errno.EPERM, f"{problem}; refused", path)
        return fd

    # -- reading ---------------------------------------------------------------------------
    def scan(self, maxmsg: int = 0) -> list[Message]:
        """The messages in the spool now, oldest first, at most ``maxmsg`` (0 = all).

        Sizes (and the verdict on foreign messages) are the ``sizing`` object's: with the
        worker's Rewriter those of the served form, with PLAIN those of the stored form.
        """
        messages: list[Message] = []
        self._records = {}
        with self._locked(self.path, write=False) as (fd, dot):
            try:
                self.siblings(dot.dir_fd).settle(fd)  # what a killed commit left, before anyone reads
            except OSError as exc:  # the journal stays: nothing is lost, the next lock retries
                log.warning("maildrop %s: cannot settle an interrupted update: %s",
                            escaped(self.path), exc)
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
        foreign and so moved to ``USER.MAIL`` instead, whatever ``purge`` says.

        Journal, appends, new spool, rename, journal removed (worker.mboxjournal): a commit
        killed before its rename is undone at the next lock, one killed after it is kept.
        """
        if not deleted:
            return 0
        wanted = {m.uid: m for m in deleted}
        with self._locked(self.path, write=True) as (fd, dot):
            if fd is None:
                return 0  # the spool is gone: so are the messages
            spool = os.fstat(fd)
            siblings = self.siblings(dot.dir_fd)
            with open(fd, "rb", closefd=False) as fh:
                siblings.settle(fd)  # a killed commit's appends go before ours are made
                drops, prefix = self._find_drops(fh, wanted)
                if not drops:
                    return 0
                foreign = [r for r, uid in drops if r.foreign or wanted[uid].foreign]
                moved = {id(r) for r in foreign}
                trash = [] if self.purge else [r for r, _ in drops if id(r) not in moved]
                siblings.append({"foreign": foreign, "wastebasket": trash}, fd, spool, prefix,
                                lambda out, start, stop: _copy_range(fh, out, start, stop,
                                                                     dot.touch), self.hook)
                self.hook("appended")
                try:
                    self._rewrite(fh, spool, [r for r, _ in drops], dot)
                except BaseException:
                    siblings.settle(fd)  # the old spool stays: so must the wastebasket
                    raise
                # the one atomic step: old spool or new, no mix
                directory = siblings.directory
                os.rename(_name(self.new_path), self.name, src_dir_fd=directory,
                          dst_dir_fd=directory)
                os.fsync(directory)
                self.hook("renamed")
                mboxjournal.remove(directory, siblings.journal_name)
        if self.purge:
            self.empty_wastebasket()
        return len(foreign)

    def _find_drops(self, fh: BinaryIO, wanted: dict[str, Message]
                    ) -> tuple[list[tuple[Record, str]], tuple[int, int]]:
        """The records of the deleted messages in the spool as it is now (under the lock), and
        (length, crc32) of a prefix of the spool holding them all (for the journal).

        If the bytes up to the last scanned message are unchanged (appends only), the scan's
        offsets hold; otherwise another program rewrote the spool and it is parsed again.
        """
        if self._prefix and _prefix_crc(fh, self._prefix[0]) == self._prefix:
            found = [(self._records[m.index], uid) for uid, m in wanted.items()]
            return sorted(found, key=lambda pair: pair[0].start), self._prefix
        drops = []
        for record, uid in visible(parse(fh)):
            if uid in wanted:
                drops.append((record, uid))
                if len(drops) == len(wanted):
                    break  # the rest is copied as it is
        prefix = _prefix_crc(fh, max((r.end + r.tail for r, _ in drops), default=0))
        assert prefix is not None  # those records are in the spool, which is locked
        return drops, prefix

    def _rewrite(self, source: BinaryIO, spool: os.stat_result, drops: list[Record],
                 dot: DotLock) -> None:
        """Copy all but ``drops`` to a new file, made durable, for commit to rename in."""
        # A fresh file (O_EXCL), never one found there: a planted symlink or hard link under
        # this name would otherwise be truncated and filled with the user's mail.
        directory = dot.dir_fd  # the spool's directory, held by the caller's _locked
        _unlink_quietly(_name(self.new_path), directory)
        new = os.open(_name(self.new_path), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                      | os.O_CLOEXEC, 0o600, dir_fd=directory)
        try:
            pos = 0
            for record in sorted(drops, key=lambda r: r.start):
                _copy_range(source, new, pos, record.start, dot.touch, self.hook)
                pos = record.end + record.tail
            _copy_range(source, new, pos, None, dot.touch, self.hook)
            mine = os.fstat(new)
            # The mode while the file is still ours (a root without CAP_FOWNER may not chmod
            # the user's), then the owner; chown clears a setuid/setgid bit, so it goes back.
            os.fchmod(new, stat.S_IMODE(spool.st_mode) & 0o777)
            if (mine.st_uid, mine.st_gid) != (spool.st_uid, spool.st_gid):
                os.fchown(new, spool.st_uid, spool.st_gid)  # EPERM: refuse rather than steal
            if stat.S_IMODE(spool.st_mode) & 0o7000:
                os.fchmod(new, stat.S_IMODE(spool.st_mode))
            os.fsync(new)
        except BaseException:
            os.close(new)
            _unlink_quietly(_name(self.new_path), directory)
            raise
        os.close(new)
        self.hook("written")

    def empty_wastebasket(self) -> None:
        """Truncate the wastebasket mbox (``purge``); a missing one is already empty."""
        if self.trash_path == self.foreign_path:
            return  # foreign messages are never removed
        with self._directory() as directory:
            try:
                os.stat(_name(self.trash_path), dir_fd=directory, follow_symlinks=False)
            except FileNotFoundError:
                return  # a missing one is already empty
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


def _name(path: str) -> str:
    """A sibling's name in the spool's directory (every sibling path is built beside it)."""
    return os.path.basename(path)
