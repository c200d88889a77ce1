"""The maildrop a session works on: the interface every store implements, and the factory.

One rule says where store work runs, because a worker serves all its sessions on one event loop:

    **On the thread pool (``ctx.offload``)**: everything that walks, lists, opens, locks,
    reads a spool or renames: ``lock_and_scan`` at login (with the ledger's read and maybe
    its write), ``open_message`` for RETR and TOP, ``update`` at QUIT (``commit``: wastebasket
    moves, the mbox rewrite and its fsync; then the ledger's write; a QUIT that has nothing
    to apply skips it, which ``has_update`` decides in memory). These touch
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

import time
from typing import Any, BinaryIO, Protocol

from shared import maillocation
from shared.users import Account
from worker.ledger import Ledger
from worker.maildir import Maildir
from worker.mbox import Mbox
from worker.retention import Policy
from worker.storebase import (FOREIGN_FOLDER, PLAIN, READ_CHUNK, SPOOL_CHUNK, UIDL_OK,
                              WASTEBASKET, LockHolder, LockKey, MaildropBusy, MaildropError,
                              Message, Opener, PlainSizing, Sizing, session_flock)

__all__ = ["FOREIGN_FOLDER", "PLAIN", "READ_CHUNK", "SPOOL_CHUNK", "UIDL_OK", "WASTEBASKET",
           "LockHolder", "LockKey", "LoginTooSoon",
           "Maildrop", "MaildropBusy", "MaildropError", "Message", "Opener",
           "PlainSizing", "Sizing", "has_update", "lock_and_scan", "open_maildrop",
           "session_flock", "update"]


WRITE_AT_LOGIN = 64  # newly measured messages worth a ledger write before UPDATE


class LoginTooSoon(Exception):
    """RFC 2449 LOGIN-DELAY: the user's last login was less than the delay ago."""

    def __init__(self, seconds: int):
        super().__init__(seconds)
        self.seconds = seconds


class Maildrop(Protocol):
    """One user's maildrop for the length of a session (Maildir and Mbox implement it).

    Nothing before ``commit`` changes the messages, so a dropped connection or a killed
    worker changes nothing; ``commit`` runs only in the UPDATE state. ``stamp`` is written into
    the session lock when it is taken; ``lock_key`` names the held lock file (worker.takeover).
    ``ledger`` is read by ``lock`` (worker.ledger); ``save_ledger`` writes it when it learned
    something.
    """

    stamp: bytes
    lock_key: LockKey | None
    ledger: Ledger

    def save_ledger(self) -> bool:
        """Write the ledger if it changed; False (logged) when the disk refused; pool."""

    def lock(self) -> None:
        """Take the session lock (MaildropBusy, MaildropError); pool."""

    def unlock(self) -> None:
        """Release it without applying anything; loop (closes descriptors only)."""

    def close_directory(self) -> None:
        """Close the maildrop's directory after the login's scan; later commands walk to it
        again and refuse one swapped meanwhile (a session holds only its lock file); loop."""

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
    # The account's ids: the users file's fields, NSS's for system accounts; None: the
    # Maildir's own (worker.maildir, issue 12).
    # A home is made by useradd -m or pam_mkhomedir, never by us: an account with a uid (system,
    # or a users file entry that has one) whose home is missing is refused.
    uid, gid = _number(account.uid), _number(account.gid)
    if location.kind == "mbox":
        return Mbox((fixed, below), settings.wastebasket, settings.purge_reclaim, sizing, uid,
                    settings.mbox_ledger_dir)
    return Maildir((fixed, below), settings.wastebasket, settings.purge_reclaim, sizing, uid, gid,
                   settings.uidl_format, home=location.template.startswith("~") and uid is not None)


def _number(field: str) -> int | None:
    return int(field) if field.isascii() and field.isdigit() else None


def lock_and_scan(maildrop: Maildrop, maxmsg: int, policy: Policy = Policy(),
                  took_over: bool = False) -> list[Message]:
    """Lock, check LOGIN-DELAY, scan, note the login (one pool round trip at login); the
    lock never outlives a failure. A login that takes over a session of the same user
    continues that poll: LOGIN-DELAY does not refuse it.

    The ledger is written here when it was rebuilt, when the scan measured many new messages
    (a session that then drops loses nothing costly), or when LOGIN-DELAY needs this login's
    time; otherwise at UPDATE, if anything changed: most sessions write it once or never.
    """
    now = int(time.time())
    maildrop.lock()
    try:
        wait = 0 if took_over else policy.too_soon(maildrop.ledger, now)
        if wait:
            raise LoginTooSoon(wait)
        messages = maildrop.scan(maxmsg)
        ledger = maildrop.ledger
        if not maxmsg or len(messages) < maxmsg:  # the whole maildrop was seen
            ledger.keep_only({m.base for m in messages})
        ledger.last_login = now
        if ledger.measured >= WRITE_AT_LOGIN or ledger.fresh or policy.login_delay:
            ledger.dirty = True
            maildrop.save_ledger()
            ledger.measured, ledger.fresh = 0, False
    except BaseException:
        maildrop.unlock()
        raise
    maildrop.close_directory()
    return messages


def update(maildrop: Maildrop, deleted: list[Message], retrieved: list[Message],
           messages: list[Message], policy: Policy) -> tuple[int, int]:
    """UPDATE (pool): note first retrievals, add what EXPIRE removes to the deletions,
    commit, and write the ledger once. Returns (foreign kept, expired)."""
    now = int(time.time())
    ledger = maildrop.ledger
    for message in retrieved:
        ledger.retrieved(message.base, message.uid, now)
    chosen = {m.index for m in deleted}
    live = [m for m in messages if m.index not in chosen]
    expired = policy.expired(live, ledger, now)
    removed = sorted(deleted + expired, key=lambda m: m.index)
    kept = maildrop.commit(removed)
    ledger.forget(m.base for m in removed)
    maildrop.save_ledger()
    return kept, len(expired)


def has_update(maildrop: Maildrop, deleted: list[Message], retrieved: list[Message],
               messages: list[Message], policy: Policy) -> bool:
    """Whether ``update`` would change anything: a deletion, a first retrieval, a message
    EXPIRE removes, or a ledger that learned something. In memory, on the event loop: the
    usual QUIT of a poll that found nothing new is then answered without a pool round trip
    (a third of a storm login's pool work)."""
    if deleted or retrieved or maildrop.ledger.dirty:
        return True
    return bool(policy.expired(messages, maildrop.ledger, int(time.time())))
