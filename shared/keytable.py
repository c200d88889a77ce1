"""Failed-login records in shared memory, one hash table per kind (addresses, users), shared by
every worker and written only under the area's lock (worker/authguard.py).

An entry is four 8-byte words: key digest (0 = empty), failures, the time (ms) they last
changed, and the time (ms) before which the key's next verification may not start. Keys are
digests keyed with a secret the supervisor draws at start (``Keyer``), so nobody can choose
names that land in one bucket. Open addressing with a short linear probe; an entry is reused
only once its failures are forgotten and its time slot is past: an entry whose penalty still
runs is never evicted. When a probe run holds no reusable entry the key shares the table's
``OVERFLOW`` entry, penalised like the worst of them (a full bucket fails closed).
"""

from __future__ import annotations

import hashlib

from shared import netaddr

ENTRY_WORDS = 4
PROBES = 16
SECRET_BYTES = 16
KEY, FAILURES, CHANGED, NEXT = range(ENTRY_WORDS)
# Address tables keep no time slot: their fourth word counts the checks in flight, which are
# presumed failures only once the address has a confirmed one (worker/authguard.py).
PENDING = NEXT


class Keyer:
    """Table keys (64-bit digests) for addresses and user names, keyed with ``secret``.

    The supervisor keys ``-max-per-address`` with it too, and a worker's CLOSED frame carries
    the same key, so both sides must use the secret and prefix of one run.
    """

    def __init__(self, secret: bytes, ipv6_prefix: int = 64):
        self.secret = secret
        self.ipv6_prefix = ipv6_prefix

    def _digest(self, text: str) -> int:
        value = int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogateescape"),
                                               key=self.secret, digest_size=8).digest(), "little")
        return value if value > 1 else value + 2  # 0 marks an empty entry, 1 the overflow

    def address(self, address: str) -> int:
        """The key of a client address: IPv6 per prefix, IPv4-mapped as IPv4."""
        return self._digest("a:" + netaddr.limit_key(address, self.ipv6_prefix))

    def user(self, name: str) -> int:
        return self._digest("u:" + name)


class KeyTable:
    """A view of one table; ``words`` is a slice of a 'Q' memoryview. Not thread-safe: the
    caller holds the lock that serialises every writer."""

    OVERFLOW = 1  # the key of the last entry, shared by keys whose probe run is full

    def __init__(self, words: memoryview, capacity: int, in_flight: bool = False):
        self.words = words
        self.in_flight = in_flight  # the fourth word counts checks in flight (PENDING)
        self.capacity = capacity
        self.buckets = capacity - 1  # the last entry is the overflow entry
        at = self.buckets * ENTRY_WORDS
        self.words[at + KEY] = self.OVERFLOW

    def _probe(self, key: int):
        start = key % self.buckets
        for i in range(min(PROBES, self.buckets)):
            yield ((start + i) % self.buckets) * ENTRY_WORDS

    def _live(self, at: int, now: int, since: int) -> bool:
        """Whether the entry at ``at`` still holds a penalty: remembered failures, a slot, or
        checks in flight."""
        w = self.words
        if self.in_flight:  # an address whose checks are in flight is still being counted
            return (w[at + FAILURES] > 0 or w[at + PENDING] > 0) and w[at + CHANGED] >= since
        return (w[at + FAILURES] > 0 and w[at + CHANGED] >= since) or w[at + NEXT] > now

    def entry(self, key: int, now: int, since: int) -> int:
        """The word offset of ``key``'s entry, claiming one if needed; the overflow entry when
        every entry of its probe run still holds a penalty."""
        w = self.words
        free = None
        for at in self._probe(key):
            if w[at + KEY] == key:
                if w[at + CHANGED] < since:
                    # Failures older than the window are forgotten; so is a slot or a count of
                    # checks in flight (a check lasts far less than a window: a dead worker's).
                    w[at + FAILURES] = w[at + NEXT] = 0
                return at
            if free is None and (w[at + KEY] == 0 or not self._live(at, now, since)):
                free = at
        if free is None:
            return self.buckets * ENTRY_WORDS
        w[free + KEY], w[free + FAILURES], w[free + CHANGED], w[free + NEXT] = key, 0, now, 0
        return free

    def is_overflow(self, at: int) -> bool:
        return at == self.buckets * ENTRY_WORDS

    def find(self, key: int) -> int | None:
        for at in self._probe(key):
            if self.words[at + KEY] == key:
                return at
        return None

    def failures(self, key: int, since: int) -> int:
        """Recent failures of ``key`` (0 if unknown or forgotten), without claiming an entry."""
        at = self.find(key)
        if at is None or self.words[at + CHANGED] < since:
            return 0
        return self.words[at + FAILURES]

    def get(self, at: int, field: int) -> int:
        return self.words[at + field]

    def set(self, at: int, field: int, value: int) -> None:
        self.words[at + field] = max(0, value)
