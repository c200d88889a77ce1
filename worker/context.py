"""What every session of a worker shares: settings, users, statistics slot, mail location.

Sessions call these methods instead of touching files or shared memory themselves, so the
protocol stays free of policy and the sans-IO tests can build a real context without sockets.
"""

from __future__ import annotations

import functools
import os
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from shared import passwords
from shared.handoff import Kind
from shared.logsetup import log
from shared.stats import Counter, Header, StatsArea
from shared.tlsconfig import TlsConfigError, server_context
from shared.users import Account, UsersFileError, load_users
from shared.version import VERSION
from shared.xtndauth import NOBODY, XtndAuth
from worker import sasl
from worker.authguard import AuthGuard
from worker import store
from worker.rewrite import Rewriter, Rules

if TYPE_CHECKING:
    from worker.pop3 import Session


def _direct(function: Callable[..., Any], *args: Any) -> Any:
    return function(*args)


class ServerContext:
    def __init__(self, settings: Any, stats: StatsArea, slot: int, users: dict[str, Account],
                 run_blocking: Callable[..., Any] = _direct,
                 sleep: Callable[[float], Any] = time.sleep):
        self.settings = settings
        self.stats = stats
        self.slot = slot
        self.users = users
        self.version = VERSION
        self.hostname = settings.hostname or socket.gethostname()
        started = stats.get_header(Header.START_TIME) or int(time.time())
        self.since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))
        # Password hashing can take milliseconds: the worker runs it off the event loop.
        self._run_blocking = run_blocking
        self.sleep = sleep  # gevent.sleep in a worker: a failed login's delay blocks no one else
        self.guard = AuthGuard(settings, stats, slot)
        self._apop_serial = 0
        self.tls_context = None
        self.reload_tls()
        self._user_entries: dict[int, int] = {}
        self._free_entries: list[int] = []
        self._next_entry = 0
        # XTND: the authorization table (swapped whole by worker.xtnd.AuthReloader) and the way
        # to send a frame to the supervisor (set by worker.main; False when it cannot be sent).
        self.xtnd_auth: XtndAuth = NOBODY
        self.tell_supervisor: Callable[[Kind, int], bool] = lambda kind, argument: False

    def reload_tls(self) -> None:
        """(Re)load the certificate; a file that fails keeps the context sessions use now."""
        if not self.settings.tls_cert:
            return
        import gevent.ssl  # only workers that serve TLS need it

        try:
            self.tls_context = server_context(self.settings.tls_cert, self.settings.tls_key,
                                              factory=gevent.ssl.SSLContext)
        except TlsConfigError as exc:
            log.error("%s; keeping the previous certificate", exc)

    def reload_users(self) -> None:
        """Re-read the users file; one that fails to load keeps the accounts in use now."""
        try:
            users = load_users(self.settings.users)
        except UsersFileError as exc:
            log.error("%s; keeping the previous users", exc)
            return
        self.users = users  # one assignment: a session sees the old table or the new one
        log.info("users file reloaded: %d accounts", len(users))

    # -- authentication ---------------------------------------------------------------------
    def authenticate(self, user: str, password: bytes) -> Account | None:
        """The account if the password is right and the account accessible, else None.

        Unknown users are checked against a dummy hash of the same cost, and every failure
        looks the same to the caller: nothing tells which users exist.
        """
        account = self.users.get(user)
        stored = account.password if account else getattr(self.users, "dummy", passwords.DUMMY)
        if passwords.is_cheap(stored):
            good = passwords.verify(stored, password)
        else:  # crypt, bcrypt, argon2: milliseconds, in a thread that releases the GIL
            good = self.offload(passwords.verify, stored, password)
        if not good or account is None or not account.accessible:
            return None
        return account

    @functools.cached_property
    def rewriter(self) -> Rewriter:
        """The served form of messages and its size cache: settings never change in a worker,
        so one Rewriter serves every session (not one per RETR)."""
        return Rewriter(Rules.from_context(self))

    def offload(self, function: Callable[..., Any], *args: Any) -> Any:
        """Run blocking work (hashing, a maildrop scan) where it stalls no other session."""
        return self._run_blocking(function, *args)

    def apop_timestamp(self) -> str:
        """A greeting timestamp unique to this session (RFC 1939 section 7)."""
        self._apop_serial += 1
        return f"<{os.getpid()}.{self._apop_serial}.{int(time.time())}@{self.hostname}>"

    def authenticate_apop(self, user: str, timestamp: str, digest: str) -> Account | None:
        """APOP needs the password itself: only {PLAIN} accounts can use it."""
        account = self.users.get(user)
        secret = passwords.plain_secret(account.password) if account is not None else None
        good = sasl.apop_digest_ok(timestamp, secret if secret is not None else b"\0" * 16, digest)
        if not good or secret is None or account is None or not account.accessible:
            return None
        return account

    def maildrop_for(self, account: Account) -> store.Maildrop:
        return store.open_maildrop(self.settings, account, self.rewriter)

    # -- statistics -------------------------------------------------------------------------
    def count(self, counter: Counter, amount: int = 1) -> None:
        self.stats.add(self.slot, counter, amount)

    def auth_failed(self) -> None:
        self.count(Counter.AUTH_FAILURES)

    def retrieved(self, octets: int) -> None:
        stats, slot = self.stats, self.slot
        stats.add(slot, Counter.RETR_MESSAGES)
        stats.add(slot, Counter.RETR_OCTETS, octets)
        low = stats.get(slot, Counter.RETR_MIN)
        if not low or octets < low:
            stats.set(slot, Counter.RETR_MIN, octets)
        if octets > stats.get(slot, Counter.RETR_MAX):
            stats.set(slot, Counter.RETR_MAX, octets)

    def user_logged_in(self, session: "Session") -> None:
        if self._free_entries:
            entry = self._free_entries.pop()
        else:
            entry, self._next_entry = self._next_entry, self._next_entry + 1
        self._user_entries[id(session)] = entry
        self.stats.set_user(self.slot, entry, session.account_name or "")

    def user_logged_out(self, session: "Session") -> None:
        entry = self._user_entries.pop(id(session), None)
        if entry is not None:
            self.stats.set_user(self.slot, entry, "")
            self._free_entries.append(entry)
