"""Server statistics in shared memory: one slot of counters per process, one writer per slot.

The supervisor creates the area (a memfd, so exec'd workers can map it from an inherited
descriptor) before it spawns anyone; worker k writes only slot k (POOL_BEAT from the threads
of its pool whenever a task ends: aligned stores, so their race is harmless), the supervisor
only slot 0 and the slot of a worker it has reaped. Anyone may read and sum. Layout, 8-byte words::

    word 0..7              header: MAGIC, VERSION, NSLOTS, START_TIME, LOGLEVEL, spare...
    word 8 + s*32 + c      counter c of slot s (s = 0 supervisor, 1..N workers, N+1..2N spare
                           slots for replacements of a process that survived SIGKILL)
    after the slots        USERS_PER_SLOT names of 32 bytes per worker slot (Current Users)
    after the names        one shared.keytable of each ``Table`` kind, shared by every
                           worker, written under ``lock_tables`` (worker/authguard.py)

Aligned 8-byte stores are single instructions on the platforms we run on, so a reader never sees
a torn counter; a sum read while sessions run may be a moment stale, never wrong for long.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import re
from enum import IntEnum

from shared.keytable import ENTRY_WORDS, SECRET_BYTES, KeyTable

MAGIC = 0x33504F5055  # "UPOP3"
VERSION = 2
HEADER_WORDS = 8
SLOT_WORDS = 32
NAME_BYTES = 32
USERS_PER_SLOT = 16384
SUPERVISOR_SLOT = 0  # slot 0 is the supervisor's; workers have 1..N, N+1..2N are spares
TICK_SECONDS = 1.0  # a worker writes its heartbeat this often; the supervisor's watchdog reads it


class Header(IntEnum):
    MAGIC = 0
    VERSION = 1
    NSLOTS = 2
    START_TIME = 3
    LOGLEVEL = 4  # index into shared.logsetup.LEVEL_NAMES
    KEY_SECRET = 5  # words 5 and 6: the secret of shared.keytable.Keyer, drawn by create()


class Table(IntEnum):
    """The key tables (shared/keytable.py), one of each for all workers."""

    ADDRESS_FAILURES = 0  # failed logins per client address (IPv6: per prefix)
    USER_FAILURES = 1     # failed logins per user name, and when the next check may start


TABLE_CAPACITY = 4096


class Counter(IntEnum):
    """Counters of one slot; the comments name the XTND STATS line each feeds."""

    PID = 0
    HEARTBEAT = 1        # monotonic milliseconds of the worker's last event-loop tick
    CURRENT = 2          # Current Threads: sessions open now
    TOTAL = 3            # Total Threads
    RECEIVED = 4         # connections received from the supervisor (handoff bookkeeping)
    NORMAL = 5           # Normal Disconnects
    ABNORMAL = 6         # Abnormal Disconnects
    TIMEOUTS = 7         # Client Timeouts
    BLOCKED = 8          # Blocked Socket Count
    RETR_MESSAGES = 9    # Retrieved Messages
    RETR_OCTETS = 10     # Retrieved Octets
    RETR_MIN = 11        # Minimum Octets (0 = none yet)
    RETR_MAX = 12        # Maximum Octets
    AUTH_FAILURES = 13   # Auth Failures
    REFUSED = 14         # Too Many Threads (supervisor slot)
    MAX_CONCURRENT = 15  # Max Threads (supervisor slot: it sees every handoff)
    CPU_EXITED_US = 16   # CPU microseconds of reaped workers (supervisor slot)
    ADDRESS_REFUSED = 17  # connections refused for -max-per-address (supervisor slot)
    ADDRESS_BLOCKED = 18  # logins refused for -auth-block
    POOL_BEAT = 19       # monotonic milliseconds when a task of the worker's pool last ended
    CAPACITY = 20        # sessions the worker's descriptor limit can hold (0 = not known yet)
    TRUNCATED = 21       # connections lost because the kernel dropped their descriptor (CTRUNC)
    FATAL_SLOTS = 22     # supervisor slot: worker slots in the FATAL state now
    DEAD_SLOTS = 23      # supervisor slot: slots held by a process that survived SIGKILL
    HUNG_KILLED = 24     # supervisor slot: workers the watchdog killed
    PROXY_REFUSED = 25   # supervisor slot: connections closed for a missing or bad PROXY header
    TAKEOVERS = 26       # idle sessions ended so a new login could take their maildrop's lock
    LOGIN_DELAYED = 27   # good logins refused with [LOGIN-DELAY] (RFC 2449)


_USED_ENTRY = re.compile(rb"[^\0]")  # a Current Users entry whose first byte is set
_EMPTY_SLOT = bytes(USERS_PER_SLOT * NAME_BYTES)  # the Current Users of a slot nobody uses

_MIN_COUNTERS = {Counter.RETR_MIN}
_MAX_COUNTERS = {Counter.RETR_MAX, Counter.MAX_CONCURRENT, Counter.HEARTBEAT, Counter.PID,
                 Counter.POOL_BEAT}


def area_size(nslots: int) -> int:
    words = HEADER_WORDS + nslots * SLOT_WORDS
    return (words * 8 + nslots * USERS_PER_SLOT * NAME_BYTES
            + len(Table) * TABLE_CAPACITY * ENTRY_WORDS * 8)


class StatsArea:
    """A mapped statistics area; ``create`` in the supervisor, ``attach`` in a worker."""

    def __init__(self, fd: int, size: int):
        self.fd = fd
        self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.words = memoryview(self._map)[: (size // 8) * 8].cast("Q")
        self.nslots = self.words[Header.NSLOTS] or 0

    @classmethod
    def create(cls, nslots: int, start_time: int) -> "StatsArea":
        fd = os.memfd_create("iupop3-stats", os.MFD_CLOEXEC)
        size = area_size(nslots)
        os.ftruncate(fd, size)
        area = cls(fd, size)
        area.words[Header.MAGIC] = MAGIC
        area.words[Header.VERSION] = VERSION
        area.words[Header.NSLOTS] = nslots
        area.words[Header.START_TIME] = start_time
        secret = os.urandom(SECRET_BYTES)  # keys the tables: bucket places nobody can choose
        area.words[Header.KEY_SECRET] = int.from_bytes(secret[:8], "little")
        area.words[Header.KEY_SECRET + 1] = int.from_bytes(secret[8:], "little")
        area.nslots = nslots
        return area

    @classmethod
    def attach(cls, fd: int) -> "StatsArea":
        area = cls(fd, os.fstat(fd).st_size)
        if area.words[Header.MAGIC] != MAGIC or area.words[Header.VERSION] != VERSION:
            raise ValueError("not an iupop3 statistics area")
        return area

    def index(self, slot: int, counter: int) -> int:
        return HEADER_WORDS + slot * SLOT_WORDS + counter

    def get(self, slot: int, counter: Counter) -> int:
        return self.words[self.index(slot, counter)]

    def set(self, slot: int, counter: Counter, value: int) -> None:
        self.words[self.index(slot, counter)] = value

    def add(self, slot: int, counter: Counter, amount: int = 1) -> None:
        # One writer per slot: read-modify-write needs no lock.
        i = self.index(slot, counter)
        self.words[i] += amount

    def totals(self) -> dict[Counter, int]:
        """Every counter over all slots: sums, except minimum and maximum figures."""
        out: dict[Counter, int] = {}
        for counter in Counter:
            values = [self.get(s, counter) for s in range(self.nslots)]
            if counter in _MIN_COUNTERS:
                nonzero = [v for v in values if v]
                out[counter] = min(nonzero) if nonzero else 0
            elif counter in _MAX_COUNTERS:
                out[counter] = max(values)
            else:
                out[counter] = sum(values)
        return out

    # Header words shared by all processes.
    def get_header(self, word: Header) -> int:
        return self.words[word]

    def set_header(self, word: Header, value: int) -> None:
        self.words[word] = value

    # Current Users: a fixed table of names per worker slot, written by that worker only.
    def _name_offset(self, slot: int, entry: int) -> int:
        base = (HEADER_WORDS + self.nslots * SLOT_WORDS) * 8
        return base + (slot * USERS_PER_SLOT + entry) * NAME_BYTES

    def set_user(self, slot: int, entry: int, name: str) -> None:
        """Write (or clear, with "") a user name; entries past the table are not shown."""
        if entry >= USERS_PER_SLOT:
            return
        raw = name.encode("utf-8", "replace")[: NAME_BYTES - 1]
        off = self._name_offset(slot, entry)
        self._map[off: off + NAME_BYTES] = raw.ljust(NAME_BYTES, b"\0")

    def clear_users(self, slot: int) -> None:
        off = self._name_offset(slot, 0)
        self._map[off: off + USERS_PER_SLOT * NAME_BYTES] = bytes(USERS_PER_SLOT * NAME_BYTES)

    def users(self) -> list[str]:
        """Names of the users with a session now, over all workers.

        XTND STATS calls this on a worker's event loop, over every slot (spares included):
        17 x 16384 entries with 8 workers. Every step of the scan runs in C (a copy of the
        slot, a comparison with an empty one, an extended slice of the entries' first bytes,
        a regex for the used ones), so the Python work is per user logged in, not per entry
        (a per-entry loop took 270 ms a call with 8 workers).
        """
        names: list[str] = []
        for slot in range(self.nslots):
            off = self._name_offset(slot, 0)
            block = self._map[off: off + len(_EMPTY_SLOT)]
            if block == _EMPTY_SLOT:
                continue
            for used in _USED_ENTRY.finditer(block[::NAME_BYTES]):
                start = used.start() * NAME_BYTES
                raw = block[start: start + NAME_BYTES]
                names.append(raw.rstrip(b"\0").decode("utf-8", "replace"))
        return names

    def key_secret(self) -> bytes:
        return b"".join(self.words[Header.KEY_SECRET + i].to_bytes(8, "little") for i in (0, 1))

    # Key tables: failed logins per address and per user, shared by every worker.
    def table(self, which: Table) -> KeyTable:
        base = (HEADER_WORDS + self.nslots * SLOT_WORDS) + (
            self.nslots * USERS_PER_SLOT * NAME_BYTES) // 8
        size = TABLE_CAPACITY * ENTRY_WORDS
        start = base + which * size
        return KeyTable(self.words[start: start + size], TABLE_CAPACITY,
                        in_flight=which == Table.ADDRESS_FAILURES)

    def lock_tables(self, blocking: bool) -> bool:
        """Take the tables' lock (a POSIX record lock on the area's first byte: one holder
        process at a time, released if it dies); False if ``blocking`` is off and it is held."""
        flags = fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB)
        try:
            fcntl.lockf(self.fd, flags, 1, 0)
        except (BlockingIOError, PermissionError):
            return False
        return True

    def unlock_tables(self) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, 0)

    def close(self) -> None:
        self.words.release()
        self._map.close()
