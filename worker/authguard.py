"""Brute-force defence, shared by every worker: a penalty per client address (IPv6: per
prefix) and per user name, paid *before* a password is checked, and one check at a time per
user across all workers.

Compared with Dovecot's ``auth_failure_delay`` + anvil penalty: while an address or a user has
recent failures, every login from it or for it waits ``penalty(n) = auth_delay * 2**(n-1)``
(at most ``auth_delay_max``, n the larger failure count) before the check, and the answer,
right or wrong, comes only after it; hanging up early gains nothing. Each check of a user
reserves that user's next slot ``penalty`` later (the tables' NEXT word), so parallel
connections or workers do not multiply guesses. An attempt counts as a failure of the user
when it is admitted and is taken back if the password was right, so a check cut short by a dead
worker still counts. For the address, checks in flight are counted apart (PENDING) and are
presumed failures only once the address has a confirmed failure: many users behind one clean
address (a NAT, a proxy, a load test) log in at once unhindered, while a penalised address's
parallel attempts still count before they are answered. A penalised address whose attempt would have to queue behind another check of
the user is deferred instead (it waits its penalty, then ``-ERR [SYS/TEMP]``, nothing checked),
so a guesser cannot fill a user's queue ahead of the user's own login, and its checks hold
only a provisional slot that a clean address's login takes over when it would otherwise wait
past ``auth_delay_max`` (the guesser is then answered as deferred). No attempt ever waits
longer than ``auth_delay_max``: one that would is deferred (a queue of first
attempts from fresh addresses pushed a user's logins hours out). An address with
``auth_block`` recent failures is refused outright. A key that finds no entry in a full
table is held back like the worst, but never blocked, counted or queued on the shared
overflow entry (its sum used to block every newcomer). ``-trusted-networks`` addresses skip
the address penalty and block, never the per-user one.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass

from shared.keytable import CHANGED, FAILURES, NEXT, PENDING, Keyer, KeyTable
from shared.netaddr import Networks
from shared.stats import Counter, StatsArea, Table

LOCK_TRIES = 500          # x LOCK_RETRY_SECONDS: a holder that hangs this long fails closed
LOCK_RETRY_SECONDS = 0.002


class Outcome(enum.Enum):
    CHECK = "check"          # wait, then check the password
    DEFERRED = "deferred"    # wait, then -ERR [SYS/TEMP] without checking
    BLOCKED = "blocked"      # refused at once: too many failures from the address
    MALFORMED = "malformed"  # no user to check (a broken SASL response): wait, then -ERR


@dataclass
class Admission:
    outcome: Outcome
    wait: float = 0.0                 # seconds before the check or the answer
    user_key: int | None = None
    address_key: int | None = None
    reserved_next: int = 0            # the user's NEXT this admission wrote


class AuthGuard:
    def __init__(self, settings, area: StatsArea, slot: int, keys: Keyer,
                 sleep: Callable[[float], object] = time.sleep,
                 clock: Callable[[], float] = time.monotonic):
        self.settings = settings
        self.area = area
        self.slot = slot
        self.keys = keys
        self.sleep = sleep
        self.clock = clock
        self.trusted = Networks(settings.trusted_networks)
        self.addresses: KeyTable = area.table(Table.ADDRESS_FAILURES)
        self.users: KeyTable = area.table(Table.USER_FAILURES)

    def penalty_ms(self, failures: int) -> int:
        base = self.settings.auth_delay
        if not failures or not base:
            return 0
        return min(self.settings.auth_delay_max, base * 2 ** min(failures - 1, 16)) * 1000

    def _worst_ms(self) -> int:
        """A key that found no entry (a full bucket) is penalised like the worst."""
        return self.settings.auth_delay_max * 1000 if self.settings.auth_delay else 0

    def admit(self, address: str, user: str | None, *, exempt: bool = True) -> Admission:
        """Decide what a login attempt for ``user`` from ``address`` does, and record it.
        ``exempt=False``: no -trusted-networks exemption (a client behind a PROXY header
        that could not name it, counted under the balancer's address)."""
        if not self._lock():  # the lock is stuck (a holder stopped): fail closed
            return Admission(Outcome.DEFERRED, self._worst_ms() / 1000)
        try:  # no yield in here: greenlets of this worker do not interleave
            admission = self._admit_locked(address, user, exempt)
        finally:
            self.area.unlock_tables()
        if admission.outcome is Outcome.BLOCKED:
            self.area.add(self.slot, Counter.ADDRESS_BLOCKED)
        return admission

    def _lock(self) -> bool:
        """Take the tables' lock without blocking the event loop; False if it stays held."""
        for _ in range(LOCK_TRIES):
            if self.area.lock_tables(blocking=False):
                return True
            self.sleep(LOCK_RETRY_SECONDS)  # another worker holds it for microseconds
        return False

    def _now_since(self) -> tuple[int, int]:
        now = int(self.clock() * 1000)  # milliseconds: whole seconds would round windows off
        return now, now - self.settings.auth_window * 1000

    def _address_penalty(self, address: str, now: int, since: int,
                         exempt: bool = True) -> tuple[int | None, int, int, int]:
        """(address entry or None if exempt, its failures, its penalty in ms, its key)."""
        if not address or (exempt and self.trusted.contains(address)):
            return None, 0, 0, 0
        table = self.addresses
        key = self.keys.address(address)  # a keyed digest: made once per admission
        at = table.entry(key, now, since)
        if table.is_overflow(at):
            # Shared by every address that found no entry: never blocked or counted on (its
            # sum would block every newcomer), only held back like the worst.
            return None, 0, self._worst_ms(), key
        failures = table.get(at, FAILURES)
        if failures:  # a penalised address's checks in flight are presumed failures
            failures += table.get(at, PENDING)
        return at, failures, self.penalty_ms(failures), key

    def _admit_locked(self, address: str, user: str | None, exempt: bool = True) -> Admission:
        now, since = self._now_since()
        address_at, address_failures, address_penalty, address_key = self._address_penalty(
            address, now, since, exempt)
        block = self.settings.auth_block
        if address_at is not None and block and address_failures >= block:
            return Admission(Outcome.BLOCKED)
        if user is None:
            self._count(self.addresses, address_at, now)
            return Admission(Outcome.MALFORMED, address_penalty / 1000)
        users = self.users
        user_key = self.keys.user(user)
        user_at: int | None = users.entry(user_key, now, since)
        if users.is_overflow(user_at):
            # No queue on the shared entry either: the worst penalty, and no reservation.
            user_at, user_failures, user_penalty = None, 0, self._worst_ms()
        else:
            user_failures = users.get(user_at, FAILURES)
            user_penalty = self.penalty_ms(user_failures)
        own = max(address_penalty, user_penalty)
        start, firm = self._start(user_at, now, own, user_penalty, bool(address_penalty))
        # A penalised address never queues; nobody waits longer than -auth-delay-max (a queue
        # of first attempts from fresh addresses pushed a user's logins hours out).
        if (address_penalty and start > now + own) or start - now > self._worst_ms():
            self._count(self.addresses, address_at, now)
            return Admission(Outcome.DEFERRED, own / 1000)
        self._count(users, user_at, now)
        if address_at is not None:
            self.addresses.set(address_at, PENDING, self.addresses.get(address_at, PENDING) + 1)
            self.addresses.set(address_at, CHANGED, now)
        reserved = 0
        if user_at is not None:
            # A clean address reserves the next slot firmly (even); a penalised one only
            # provisionally (odd, holding its own start), so a clean login may take it over.
            reserved = ((start + self.penalty_ms(user_failures + 1)) & ~1 if firm
                        else start | 1)
            users.set(user_at, NEXT, reserved)
        return Admission(Outcome.CHECK, (start - now) / 1000,
                         user_key if user_at is not None else None,
                         address_key if address_at is not None else None, reserved)

    def _start(self, user_at: int | None, now: int, own: int, interval: int,
               penalised: bool) -> tuple[int, bool]:
        """When this check may start, and whether its reservation is firm. After a firm
        reservation the next check waits for NEXT; after a provisional one (a penalised
        address's, NEXT holding its start) for that start plus the user's interval, unless a
        clean address would then wait past -auth-delay-max: it takes the slot instead and the
        penalised check is revoked (``confirm``), so guessers cannot keep the user out."""
        earliest = now + own
        if user_at is None:
            return earliest, not penalised
        next_at = self.users.get(user_at, NEXT)
        if not next_at & 1:
            return max(earliest, next_at), not penalised
        after = max(earliest, (next_at & ~1) + interval)
        if penalised or after - now <= self._worst_ms():
            return after, not penalised
        return max(earliest, next_at & ~1), True

    def confirm(self, admission: Admission) -> bool:
        """After its wait: may this check go ahead? False when a clean address took over the
        provisional slot of a penalised one (the caller answers as deferred, unchecked)."""
        if admission.outcome is not Outcome.CHECK or not admission.reserved_next & 1:
            return True
        if not self._lock():
            return False  # fail closed
        try:
            at = self.users.find(admission.user_key) if admission.user_key else None
            return at is not None and self.users.get(at, NEXT) == admission.reserved_next
        finally:
            self.area.unlock_tables()

    @staticmethod
    def _count(table: KeyTable, at: int | None, now: int) -> None:
        if at is not None:
            table.set(at, FAILURES, table.get(at, FAILURES) + 1)
            table.set(at, CHANGED, now)

    def succeeded(self, admission: Admission) -> None:
        """The password was right: take back the user's presumed failure and the address's
        check in flight."""
        if not self._lock():
            return  # the failure stays counted: fail closed
        try:
            now, _ = self._now_since()
            at = self.users.find(admission.user_key) if admission.user_key else None
            if at is not None:
                self.users.set(at, FAILURES, self.users.get(at, FAILURES) - 1)
                if self.users.get(at, NEXT) == admission.reserved_next:
                    self.users.set(at, NEXT, now & ~1)  # nobody queued behind: go now
            self._settle_address(admission, failed=False, now=now)
        finally:
            self.area.unlock_tables()

    def failed(self, admission: Admission) -> None:
        """The check failed or was revoked (or never ended): the address's check in flight
        becomes a confirmed failure (the user's was counted at admission)."""
        if admission.outcome is not Outcome.CHECK or not self._lock():
            return
        try:
            self._settle_address(admission, failed=True, now=self._now_since()[0])
        finally:
            self.area.unlock_tables()

    def _settle_address(self, admission: Admission, failed: bool, now: int) -> None:
        at = self.addresses.find(admission.address_key) if admission.address_key else None
        if at is None:
            return
        self.addresses.set(at, PENDING, self.addresses.get(at, PENDING) - 1)
        if failed:
            self.addresses.set(at, FAILURES, self.addresses.get(at, FAILURES) + 1)
            self.addresses.set(at, CHANGED, now)
