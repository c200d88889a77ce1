"""The maildrop a session works on: the interface every store implements, and the factory.

One rule says where store work runs, because a worker serves all its sessions on one event loop:

    **On the thread pool (``ctx.offload``)**: everything that walks, lists, opens, locks,
    reads a spool or renames: ``lock_and_scan`` at login, ``open_message`` for RETR and TOP,
    ``commit`` at QUIT (wastebasket moves, the mbox rewrite and its fsync). These touch
    directories and whole files, and one slow disk, a stuck NFS server or a 200 MiB spool
    would otherwise freeze every session of the worker.
    **On the event loop**: only what cannot block for long: closing descriptors (``unlock``)
    and reading, one ``READ_CHUNK`` at a time, the regular file or in-memory copy that
    ``open_message`` returned (a FIFO or device is refused before it gets that far).

worker.pop3 follows this rule; worker.maildir and worker.mbox may assume it (their blocking
calls are plain, not gevent-aware). Everything but this module and the stores imports store
names from here.
"""

from __future__ import annotations

from typing import Any, BinaryIO, Protocol

from shared import maillocation
from shared.users import Account
from worker.maildir import Maildir
from worker.mbox import Mbox
from worker.storebase import (FOREIGN_FOLDER, PLAIN, READ_CHUNK, SPOOL_CHUNK, UIDL_OK,
                              WASTEBASKET, LockHolder, LockKey, MaildropBusy, MaildropError,
                              Message, Opener, PlainSizing, Sizing, session_flock)

__all__ = ["FOREIGN_FOLDER", "PLAIN", "READ_CHUNK", "SPOOL_CHUNK", "UIDL_OK", "WASTEBASKET",
           "LockHolder", "LockKey",
           "Maildrop", "MaildropBusy", "MaildropError", "Message", "Opener",
           "PlainSizing", "Sizing", "lock_and_scan", "open_maildrop", "session_flock"]


class Maildrop(Protocol):
    """One user's maildrop for the length of a session (Maildir and Mbox implement it).

    Nothing before ``commit`` changes the disk, so a dropped connection or a killed worker
    changes nothing; ``commit`` runs only in the UPDATE state. ``stamp`` is written into the
    session lock when it is taken; ``lock_key`` names the held lock file (worker.takeover).
    """

    stamp: bytes
    lock_key: LockKey | None

    def lock(self) -> None:
        """Take the session lock (MaildropBusy, MaildropError); pool."""

    def unlock(self) -> None:
        """Release it without applying anything; loop (closes descriptors only)."""

    def scan(self, maxmsg: int = 0) -> list[Message]:
        """The messages, oldest first, at most ``maxmsg`` (0 = all); pool."""

    def open_message(self, message: Message) -> BinaryIO:
        """The stored message, ready to read on the loop; pool (FileNotFoundError if gone)."""

    def commit(self, deleted: list[Message]) -> int:
        """Apply the deletions; returns how many were foreign and kept in FOREIGN_FOLDER; pool."""


def open_maildrop(settings: Any, account: Account, sizing: Sizing) -> Maildrop:
    """The account's maildrop as ``-mail`` says (checked at start by shared.settings)."""
    location = maillocation.parse(settings.mail)
    try:
        fixed, below = location.split_for(account.name, account.home)
    except ValueError as exc:
        raise MaildropError(str(exc)) from None
    if location.kind == "mbox":
        path = "/".join((fixed.rstrip("/"), *below))
        return Mbox(path, settings.wastebasket, settings.purge_reclaim, sizing)
    # The account's ids: the users file's fields, NSS's for system accounts; None: the
    # Maildir's own (worker.maildir, issue 12).
    # A home is made by useradd -m or pam_mkhomedir, never by us: an account with a uid (system,
    # or a users file entry that has one) whose home is missing is refused (review 2 item 10).
    uid = _number(account.uid)
    return Maildir((fixed, below), settings.wastebasket, settings.purge_reclaim, sizing,
                   uid, _number(account.gid),
                   home=location.template.startswith("~") and uid is not None)


def _number(field: str) -> int | None:
    return int(field) if field.isascii() and field.isdigit() else None


def lock_and_scan(maildrop: Maildrop, maxmsg: int) -> list[Message]:
    """Lock, then scan (one pool round trip at login); the lock never outlives a failure."""
    maildrop.lock()
    try:
        return maildrop.scan(maxmsg)
    except BaseException:
        maildrop.unlock()
        raise
