"""Paths a user controls, opened so that nobody can redirect them (issue 10, STYLE.md 16).

``O_NOFOLLOW`` guards only the last component of a path, so the stores open a trusted
directory once (the administrator's prefix or the home from the users file), walk down one
component at a time with ``O_DIRECTORY|O_NOFOLLOW``, and then work relative to directory
descriptors. Files are opened ``O_NOFOLLOW|O_NONBLOCK`` (a FIFO cannot block the open) and
checked with ``fstat``: only regular files of the maildrop's owner are used. Runs in the pool.
"""

from __future__ import annotations

import errno
import os
import stat

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
MODE = 0o700  # directories the server creates in a maildrop


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


def open_dir(parent: int, name: str, create: bool = False, owner: int | None = None) -> int:
    """The directory ``name`` in ``parent``, never through a symlink; made if ``create``.

    A directory made by root for an account is given to the account's uid.
    """
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
        os.mkdir(name, MODE, dir_fd=parent)
    except FileExistsError:
        pass  # made meanwhile by another session or a delivery agent
    fd = open_dir(parent, name)
    if owner is not None and os.geteuid() == 0 and os.fstat(fd).st_uid != owner:
        os.fchown(fd, owner, -1)
    return fd


def walk(trusted: str, below: tuple[str, ...], owner: int | None, create: bool) -> int:
    """A descriptor of ``trusted/below...``: ``trusted`` is opened as the administrator wrote it
    (or as the users file gives the home), each component below without following symlinks.

    One exception, for the common ``~/Maildir -> /elsewhere/Maildir``: a symlinked component is
    followed when the link and the directory it leads to both belong to the account (``owner``,
    or when that is unknown the owner of the directory holding the link).
    """
    if create and not os.path.isdir(trusted):
        os.makedirs(trusted, mode=MODE, exist_ok=True)  # the administrator's part: by path
    fd = os.open(trusted, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for name in below:
            try:
                step = open_dir(fd, name, create=create, owner=owner)
            except UnsafeEntry:
                step = _owned_link(fd, name, owner)
            os.close(fd)
            fd = step
    except BaseException:
        os.close(fd)
        raise
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


def ensure_file(parent: int, name: str) -> None:
    """An empty marker file (Maildir++ ``maildirfolder``): made if missing, never opened
    through a symlink or written to when it exists."""
    try:
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        try:
            os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                             | os.O_CLOEXEC, 0o600, dir_fd=parent))
        except FileExistsError:
            pass
        return
    if not stat.S_ISREG(st.st_mode):
        raise UnsafeEntry(errno.ELOOP, "is a symlink or not a regular file", name)
