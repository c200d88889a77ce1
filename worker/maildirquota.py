"""Maildir++ quota: the ``maildirsize`` file, updated when the server removes mail for good.

Delivery agents and IMAP servers that enforce Maildir++ quotas add a line per change to
``maildirsize``; a POP3 server that unlinks messages without doing so leaves the account
"full" until the file is recalculated. Only an existing file is updated (no file: no quota),
only the account's regular file, never through a symlink, with one appended line. Moving a
message to the wastebasket changes nothing: Maildir++ counts every folder. Runs in the pool.
"""

from __future__ import annotations

import os
import re
import stat

FILE_NAME = "maildirsize"
_SIZE_IN_NAME = re.compile(r",S=([0-9]{1,15})(?=[,:]|$)")


def counted_size(name: str, st: os.stat_result) -> int:
    """The size Maildir++ counts: ``,S=`` in the name when the deliverer put it there."""
    found = _SIZE_IN_NAME.search(name.split(":", 1)[0])
    return int(found.group(1)) if found else st.st_size


def record_removed(root: int, sizes: list[int], owner: int | None) -> None:
    """Append ``-bytes -count`` for messages removed from the Maildir ``root``."""
    if not sizes:
        return
    try:
        fd = os.open(FILE_NAME, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK
                     | os.O_CLOEXEC, dir_fd=root)
    except OSError:
        return  # none (no quota here), a symlink, or not writable: nothing to keep current
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and (owner is None or st.st_uid == owner):
            os.write(fd, f"{-sum(sizes)} {-len(sizes)}\n".encode("ascii"))  # one O_APPEND write
    except OSError:
        pass  # a full disk: the next recalculation by the deliverer corrects the file
    finally:
        os.close(fd)
