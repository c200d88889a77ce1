"""Paths a user controls, opened so that nobody can redirect them (issue 10, STYLE.md 16).

``O_NOFOLLOW`` guards only the last component of a path, so the stores open a trusted
directory once (the administrator's prefix or the home from the users file), walk down one
component at a time with ``O_DIRECTORY|O_NOFOLLOW``, and then work relative to directory
descriptors. Files are opened ``O_NOFOLLOW|O_NONBLOCK`` (a FIFO cannot block the open) and
checked with ``fstat``: only regular files of the maildrop's owner are used. Runs in the pool.

What the server makes in a maildrop belongs to the account (issue 12): ``make_dir``,
``create_file``, ``open_or_create`` and ``ensure_file`` create relative to a directory
descriptor and give the new entry to an ``Owner`` with ``fchown``/``fchmod`` on the descriptor
they made, never by path. Every store file (wastebasket, lock, ledger ...) is made through them.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
MODE = 0o700  # directories the server creates in a maildrop


@dataclass(frozen=True)
class Owner:
    """Whom the entries the server makes in a maildrop belong to: the account's uid and gid
    and the maildrop's mode (directories get ``mode``, files ``mode`` without execute bits,
    as Dovecot does). Only a root process gives entries away; one running as -user makes
    them its own, as the one mail user of virtual accounts."""

    uid: int
    gid: int
    mode: int = MODE

    @property
    def file_mode(self) -> int:
        return self.mode & 0o666

    @classmethod
    def of(cls, st: os.stat_result, uid: int | None = None, gid: int | None = None,
           mode: int | None = None) -> Owner:
        """The owner, group and mode of ``st`` (a directory's or a spool's), where the
        account does not say (``uid``, ``gid``, ``mode`` given win)."""
        return cls(st.st_uid if uid is None else uid, st.st_gid if gid is None else gid,
                   stat.S_IMODE(st.st_mode) if mode is None else mode)


def give(fd: int, owner: Owner | None, mode: int) -> None:
    """Give the entry behind ``fd``, which this process just made, to ``owner`` with ``mode``:
    by descriptor, so a name swapped meanwhile changes nothing."""
    if owner is None:
        return
    st = os.fstat(fd)
    # The mode first, while the entry is still ours: no CAP_FOWNER needed. A chown keeps a
    # directory's setgid bit, and a file's mode never has one (Owner.file_mode).
    if stat.S_IMODE(st.st_mode) != mode:
        os.fchmod(fd, mode)
    if os.geteuid() == 0 and (st.st_uid, st.st_gid) != (owner.uid, owner.gid):
        os.fchown(fd, owner.uid, owner.gid)


class UnsafeEntry(OSError):
    """A symlink, a non-regular file or another owner's file where the store expects its own."""


def refusal(st: os.stat_result, owner: int | None) -> str | None:
    """Why an entry (from lstat or fstat) may not be served, moved or deleted; None if it may.

    Checking the owner stops what a directory descriptor cannot: a hard link to a file of
    root or of another user (fs.protected_hardlinks is a second line, not the first).
    """
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if owner is not None and st.st_uid != owner:
        return f"owned by uid {st.st_uid}, not by the maildrop's owner {owner}"
    return None


def open_dir(parent: int, name: str, create: bool = False, owner: Owner | None = None) -> int:
    """The directory ``name`` in ``parent``, never through a symlink; made if ``create``
    (then given to ``owner``; one that exists is left as it is)."""
    try:
        return os.open(name, DIR_FLAGS, dir_fd=parent)
    except FileNotFoundError:
        if not create:
            raise
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafeEntry(exc.errno, "is a symlink or not a directory", name) from None
        raise
    try:
        return make_dir(parent, name, owner)
    except FileExistsError:
        return open_dir(parent, name)  # made meanwhile by another session or a delivery agent


def make_dir(parent: int, name: str, owner: Owner | None) -> int:
    """A descriptor of the new directory ``name`` in ``parent``, given to ``owner`` with its
    mode; FileExistsError if the name exists (somebody else's: never taken over)."""
    os.mkdir(name, owner.mode if owner is not None else MODE, dir_fd=parent)
    try:
        fd = os.open(name, DIR_FLAGS, dir_fd=parent)
    except OSError as exc:  # swapped for a symlink between mkdir and open
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafeEntry(exc.errno, "is a symlink or not a directory", name) from None
        raise
    try:
        if os.fstat(fd).st_uid == os.geteuid():  # still the one made here, not a swapped-in one
            give(fd, owner, owner.mode if owner is not None else MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def create_file(parent: int, name: str, owner: Owner | None, flags: int = os.O_WRONLY) -> int:
    """A descriptor of the new regular file ``name`` in ``parent``, given to ``owner`` with its
    file mode; FileExistsError if the name exists (a symlink included: O_EXCL never follows)."""
    fd = os.open(name, flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_NONBLOCK
                 | os.O_CLOEXEC, owner.file_mode if owner is not None else 0o600, dir_fd=parent)
    try:
        give(fd, owner, owner.file_mode if owner is not None else 0o600)
    except BaseException:
        os.close(fd)
        os.unlink(name, dir_fd=parent)  # never leave it with the wrong owner
        raise
    return fd


def open_or_create(parent: int, name: str, owner: Owner | None, flags: int = os.O_RDWR) -> int:
    """``name`` in ``parent`` opened with ``flags``, never through a symlink; made and given to
    ``owner`` when missing. An existing file keeps its owner (the caller checks it)."""
    for _ in range(3):  # made and removed by others in between: try again, a few times
        try:
            return create_file(parent, name, owner, flags)
        except FileExistsError:
            pass
        try:
            return os.open(name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                           dir_fd=parent)
        except FileNotFoundError:
            continue
    raise FileNotFoundError(errno.ENOENT, "created and removed by others meanwhile", name)


def walk(trusted: str, below: tuple[str, ...], owner: int | None, create: bool,
         group: int | None = None, make_trusted: bool = True) -> int:
    """A descriptor of ``trusted/below...``: ``trusted`` is opened as the administrator wrote it
    (or as the users file gives the home), each component below without following symlinks.

    One exception, for the common ``~/Maildir -> /elsewhere/Maildir``: a symlinked component is
    followed when the link and the directory it leads to both belong to the account (``owner``,
    or when that is unknown the owner of the directory holding the link). A component made
    here (a Maildir at first login) gets ``owner`` and ``group``, where unknown those of the
    directory it is made in, and mode ``MODE``. ``trusted`` itself is made (by path, as the
    server's user) only with ``make_trusted``: never an account's home, which made here would
    belong to root and lock its user out; FileNotFoundError then.
    """
    if create and make_trusted and not os.path.isdir(trusted):
        os.makedirs(trusted, mode=MODE, exist_ok=True)  # the administrator's part: by path
    fd = os.open(trusted, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for name in below:
            try:
                made = Owner.of(os.fstat(fd), owner, group, MODE) if create else None
                step = open_dir(fd, name, create=create, owner=made)
            except UnsafeEntry:
                step = _owned_link(fd, name, owner)
            os.close(fd)
            fd = step
    except BaseException:
        os.close(fd)
        raise
    return fd


def reopen(trusted: str, below: tuple[str, ...], owner: int | None,
           key: tuple[int, int]) -> int:
    """The directory a session locked at login, walked again for one command (a session does
    not hold its maildrop's descriptor between commands: a descriptor each was the limit of
    a worker's sessions). It must be that same directory, (st_dev, st_ino) ``key``: one its
    user swapped in since, by rename or symlink, is UnsafeEntry and nothing in it is used."""
    try:
        fd = walk(trusted, below, owner, create=False)
    except FileNotFoundError:
        raise UnsafeEntry(errno.ESTALE, "is gone since login (moved or removed)",
                          os.path.join(trusted, *below)) from None
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != key:
        os.close(fd)
        raise UnsafeEntry(errno.ESTALE, "is not the directory locked at login (replaced"
                          " since)", os.path.join(trusted, *below))
    return fd


def _owned_link(parent: int, name: str, owner: int | None) -> int:
    link = os.stat(name, dir_fd=parent, follow_symlinks=False)
    if not stat.S_ISLNK(link.st_mode):
        raise UnsafeEntry(errno.ENOTDIR, "is not a directory", name)
    account = owner if owner is not None else os.fstat(parent).st_uid
    target = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=parent)
    if link.st_uid != account or os.fstat(target).st_uid != account:
        os.close(target)
        raise UnsafeEntry(errno.ELOOP, "is a symlink, and it or its target is not the"
                          f" account's (uid {account})", name)
    return target


def open_regular(parent: int, name: str, owner: int | None,
                 expect: os.stat_result | None = None) -> int:
    """A read descriptor of the regular file ``name`` of ``owner``; UnsafeEntry otherwise.

    ``expect`` (an lstat from the listing) must still be the same file: a name swapped for
    something else in between is refused too.
    """
    try:
        fd = os.open(name, FILE_FLAGS, dir_fd=parent)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeEntry(exc.errno, "is a symlink", name) from None
        raise
    st = os.fstat(fd)
    problem = refusal(st, owner)
    if problem is None and expect is not None and (st.st_dev, st.st_ino) != (expect.st_dev,
                                                                              expect.st_ino):
        problem = "replaced since it was listed"
    if problem is not None:
        os.close(fd)
        raise UnsafeEntry(errno.EPERM, problem, name)
    return fd


def ensure_file(parent: int, name: str, owner: Owner | None = None) -> None:
    """An empty marker file (Maildir++ ``maildirfolder``): made for ``owner`` if missing,
    never opened through a symlink or written to when it exists."""
    try:
        os.close(create_file(parent, name, owner))
        return
    except FileExistsError:
        pass
    st = os.stat(name, dir_fd=parent, follow_symlinks=False)
    if not stat.S_ISREG(st.st_mode):
        raise UnsafeEntry(errno.ELOOP, "is a symlink or not a regular file", name)
