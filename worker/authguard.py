"""Brute-force defence: failed logins counted per address and per user across all workers.

Each worker records its failures in its own shared-memory tables; the guard sums every
worker's tables, so an attacker gains nothing by spreading over connections or workers. A
failed login waits ``auth_delay * 2**(n-1)`` seconds (at most ``auth_delay_max``) before its
reply, n being the larger of the address's and the user's recent failures; the wait is a gevent
sleep, so other sessions go on. An address with ``auth_block`` recent failures is refused
outright until its failures are ``auth_window`` seconds old. Unknown and known users are
treated alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from shared import keytable
from shared.stats import Counter, StatsArea, Table


class AuthGuard:
    def __init__(self, settings, stats: StatsArea, slot: int,
                 clock: Callable[[], float] = time.time):
        self.settings = settings
        self.stats = stats
        self.slot = slot
        self.clock = clock
        self.address_tables = stats.tables(Table.ADDRESS_FAILURES)
        self.user_tables = stats.tables(Table.USER_FAILURES)
        self.own_address = stats.table(slot, Table.ADDRESS_FAILURES)
        self.own_user = stats.table(slot, Table.USER_FAILURES)

    def _now(self) -> int:
        return int(self.clock() * 1000)  # milliseconds: whole seconds would round windows off

    def _since(self) -> int:
        return self._now() - self.settings.auth_window * 1000

    def blocked(self, address: str) -> bool:
        """Whether logins from ``address`` are refused for now."""
        limit = self.settings.auth_block
        if not limit or not address:
            return False
        failures = keytable.total(self.address_tables, keytable.digest(address), self._since())
        if failures >= limit:
            self.stats.add(self.slot, Counter.ADDRESS_BLOCKED)
            return True
        return False

    def failed(self, address: str, user: str) -> float:
        """Record a failed login; return the seconds to wait before answering it."""
        now, since = self._now(), self._since()
        key_address = keytable.digest(address)
        key_user = keytable.digest(user)
        # The entries' timestamps move with every failure: the window runs from the last one.
        self.own_address.add(key_address, 1, now, since)
        self.own_user.add(key_user, 1, now, since)
        recent = max(keytable.total(self.address_tables, key_address, since),
                     keytable.total(self.user_tables, key_user, since))
        base = self.settings.auth_delay
        if not base:
            return 0.0
        return float(min(self.settings.auth_delay_max, base * 2 ** min(recent - 1, 16)))
