"""The locks of an mbox spool (worker.mbox): the liblockfile dot-lock and fcntl.

Delivery agents lock a spool with ``USER.lock`` (a temp file holding pid and host, ``link()``ed
to the lock name) and then fcntl; worker.mbox takes both around every read and rewrite. Every
name here is resolved relative to the spool directory's descriptor, never
through a symlink. Runs in the worker's thread pool (worker.store), so it sleeps for real.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import os
import socket
import stat
import time

from shared.logsetup import escaped, log

STALE_SECONDS = 300         # liblockfile and Debian policy: an untouched dot-lock this old is dead
TOUCH_SECONDS = 60          # a long rewrite keeps its dot-lock fresh, like lockfile_touch()
# This host in dot-locks: a lock naming it and a dead pid is taken over at once. Only the
# characters a file name and a one-word lock line can hold.
HOST = "".join(c for c in socket.gethostname() if c.isascii() and (c.isalnum() or c in ".-_"))[
    :64] or "localhost"
_TEMP_SERIAL = itertools.count()  # unique temp names among the threads of one process
TEMP_TRIES = 100  # temp names tried per dot-lock attempt before giving up (planted names)


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


def _temp_name() -> str:
    """A dot-lock temp name nobody can guess in advance (pid, serial and a random part)."""
    return f".lk{os.getpid()}.{next(_TEMP_SERIAL)}.{os.urandom(4).hex()}.{HOST}"


class DotLock:
    """``FILE.lock`` made the liblockfile way: a uniquely named temp file holding our pid and
    host name is ``link()``ed to the lock name, then removed. The lock appears whole or not at
    all (a writer killed at any moment never leaves an empty one), and link() is atomic on NFS
    too, where O_EXCL was not always.

    Works by name relative to ``dir_fd`` (the spool's directory descriptor, Mbox) when given,
    else by path (tools, tests); ``label`` is the path shown in errors and log lines.
    """

    def __init__(self, path: str, dir_fd: int | None = None, label: str | None = None):
        self.path = path
        self.dir_fd = dir_fd
        self.label = label or path
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
                raise TimeoutError(errno.ETIMEDOUT, "mail spool is locked", self.label)
            _sleep(delay)
            delay = min(delay * 2, 0.5)

    def _link(self) -> bool:
        """One attempt: True if the lock is ours now, False if someone else holds it."""
        temp, fd = self._temp()
        try:
            try:
                write_all(fd, f"{os.getpid()} {HOST}\n".encode())  # ENOSPC: no lock at all
            finally:
                os.close(fd)
            try:
                os.link(temp, self.path, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd,
                        follow_symlinks=False)
            except FileExistsError:
                return False
            except OSError:
                # liblockfile: over NFS link() may report an error for a link it made.
                if self._lstat(temp).st_nlink != 2:
                    raise
            self._inode = self._lstat(temp).st_ino
            return True
        finally:
            unlink_quietly(temp, self.dir_fd)

    def _temp(self) -> tuple[str, int]:
        """A new temp file beside the lock (O_EXCL): a name someone planted, whatever it is,
        is passed over for the next one instead of failing the lock."""
        folder = os.path.dirname(self.path)
        for _ in range(TEMP_TRIES):  # ends: bounded tries
            temp = os.path.join(folder, _temp_name())
            try:
                return temp, os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                                     | os.O_CLOEXEC, 0o644, dir_fd=self.dir_fd)
            except FileExistsError:
                continue
        raise FileExistsError(errno.EEXIST, "no free temp name for the dot-lock", self.label)

    def _lstat(self, name: str) -> os.stat_result:
        return os.stat(name, dir_fd=self.dir_fd, follow_symlinks=False)

    def _break_if_stale(self) -> bool:
        """Remove the lock if its holder is gone; True if the caller should retry at once."""
        try:
            st, content = read_lock(self.path, self.dir_fd)
        except FileNotFoundError:
            return True
        pid, host = lock_owner(content)
        # Only a pid of this host can be checked; another host's lock, or an empty one (other
        # delivery agents create, then write), waits for its age like liblockfile's.
        dead = pid > 0 and host in ("", HOST) and not _alive(pid)
        if not dead and time.time() - st.st_mtime < STALE_SECONDS:
            return False
        # Remove only the lock we judged. Between this lstat and unlink another breaker could
        # still slip in a fresh lock: liblockfile and procmail share that window.
        try:
            if self._lstat(self.path).st_ino == st.st_ino:
                os.unlink(self.path, dir_fd=self.dir_fd)
                log.info("removed stale lock %s (pid %s)", escaped(self.label), pid or "unknown")
        except FileNotFoundError:
            pass
        return True

    def _ours(self) -> bool:
        """Whether the lock name still holds the file we linked (not one taken after ours,
        nor anything put in its place: a symlink may reuse a freed inode number)."""
        try:
            st = self._lstat(self.path)
        except FileNotFoundError:
            return False
        return stat.S_ISREG(st.st_mode) and st.st_ino == self._inode

    def touch(self) -> None:
        """Keep a lock held through a long copy from looking stale to others: our own lock
        file's times only, never through a symlink put in its place."""
        now = time.monotonic()
        if self._inode is not None and now - self._touched >= TOUCH_SECONDS:
            if self._ours():
                os.utime(self.path, dir_fd=self.dir_fd, follow_symlinks=False)
            self._touched = now

    def release(self) -> None:
        if self._inode is None:
            return
        if self._ours():
            unlink_quietly(self.path, self.dir_fd)
        self._inode = None


LOCK_READ_MAX = 128  # a dot-lock holds a pid (and a host name): more is not a lock of ours


def read_lock(path: str, dir_fd: int | None = None) -> tuple[os.stat_result, bytes]:
    """(lstat, first bytes) of a dot-lock, never through a symlink nor blocking on a FIFO;
    anything but a regular file reads as empty (so it is judged by its age)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        return os.stat(path, dir_fd=dir_fd, follow_symlinks=False), b""
    try:
        st = os.fstat(fd)
        return st, os.read(fd, LOCK_READ_MAX) if stat.S_ISREG(st.st_mode) else b""
    finally:
        os.close(fd)


def lock_owner(content: bytes) -> tuple[int, str]:
    """(pid, host) from a lock's first line: ours write "PID HOST", liblockfile "PID"; pid 0
    when there is none. At most 10 ASCII digits: a planted lock cannot make int() work on
    megabytes."""
    words = content.split(b"\n", 1)[0].split()
    word = words[0] if words else b""
    if not word or len(word) > 10 or not (word.isascii() and word.isdigit()):
        return 0, ""
    host = words[1].decode("ascii", "replace") if len(words) > 1 else ""
    return int(word), host


def fcntl_lock(fd: int, exclusive: bool, deadline: float, path: str) -> None:
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

def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]



def unlink_quietly(path: str, dir_fd: int | None = None) -> None:
    try:
        os.unlink(path, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
