"""The statistics part of a worker's context: this worker's counters and its Current Users
entries in the shared-memory area (shared/stats.py), written by this process only."""

from __future__ import annotations

from collections.abc import Hashable

from shared.stats import Counter, StatsArea


class SessionStats:
    def __init__(self, area: StatsArea, slot: int):
        self.area = area
        self.slot = slot
        self._user_entries: dict[Hashable, int] = {}
        self._free_entries: list[int] = []
        self._next_entry = 0

    def count(self, counter: Counter, amount: int = 1) -> None:
        self.area.add(self.slot, counter, amount)

    def auth_failed(self) -> None:
        self.count(Counter.AUTH_FAILURES)

    def retrieved(self, octets: int) -> None:
        area, slot = self.area, self.slot
        area.add(slot, Counter.RETR_MESSAGES)
        area.add(slot, Counter.RETR_OCTETS, octets)
        low = area.get(slot, Counter.RETR_MIN)
        if not low or octets < low:
            area.set(slot, Counter.RETR_MIN, octets)
        if octets > area.get(slot, Counter.RETR_MAX):
            area.set(slot, Counter.RETR_MAX, octets)

    def user_logged_in(self, session: Hashable, name: str) -> None:
        """Show ``name`` under Current Users until ``user_logged_out(session)``."""
        if self._free_entries:
            entry = self._free_entries.pop()
        else:
            entry, self._next_entry = self._next_entry, self._next_entry + 1
        self._user_entries[session] = entry
        self.area.set_user(self.slot, entry, name)

    def user_logged_out(self, session: Hashable) -> None:
        entry = self._user_entries.pop(session, None)
        if entry is not None:
            self.area.set_user(self.slot, entry, "")
            self._free_entries.append(entry)
