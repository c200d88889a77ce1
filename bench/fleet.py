"""Sizing a large idle level: source addresses, load generators, server workers, NOOP pace,
and the machine's limits that a level needs.

Pure functions of the numbers they are given (tested in bench/test_bench.py), plus small
readers of /proc. bench/idle.py calls them before it starts anything, so a level the machine
cannot hold fails at once with the reason instead of stalling half way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# A load generator holds at most this share of its descriptor limit in sessions (20,000 here:
# 12,500 sessions), leaving room for its pipes, the listener's probes and Python's own files.
LOADGEN_FD_SHARE = 0.625
# A worker is given at most this share of the sessions its descriptor budget can hold.
WORKER_CAPACITY_SHARE = 0.8
# A source address may use this share of the ephemeral range towards one server port.
PORT_SHARE = 0.85
# The NOOP rate (all sessions) the bench asks of two shared cores that also run the load
# generators: measured at 20,000 sessions (README "idle sessions"); a level that would exceed
# it NOOPs less often, and the run says so.
NOOP_RATE_BUDGET = 4000.0
FIRST_SOURCE = (127, 0, 0, 2)  # 127.0.0.1 stays the server's; the issue names .2 to .9
MIN_SOURCES = 8


@dataclass(frozen=True)
class Spread:
    """Which load generator holds which users from which source addresses."""

    processes: int
    sources: tuple[tuple[str, ...], ...]  # per process: its own addresses
    per_address: int                      # the most sessions any one address holds


def port_range(text: str) -> tuple[int, int]:
    """``/proc/sys/net/ipv4/ip_local_port_range`` ("32768\t60999") as (low, high)."""
    low, high = (int(x) for x in text.split())
    return low, high


def ports_per_address(low: int, high: int) -> int:
    """Connections one source address can have open to one server port."""
    return max(0, high - low + 1)


def loadgen_processes(sessions: int, minimum: int, fd_limit: int) -> int:
    """Enough load generators that each holds at most LOADGEN_FD_SHARE of its descriptors."""
    per_process = max(1, int(fd_limit * LOADGEN_FD_SHARE))
    return max(1, minimum, math.ceil(sessions / per_process))


def source_addresses(count: int) -> list[str]:
    """127.0.0.2, 127.0.0.3, ... (all loopback: 127.0.0.0/8 is routed to lo)."""
    first = (FIRST_SOURCE[1] << 16) | (FIRST_SOURCE[2] << 8) | FIRST_SOURCE[3]
    if first + count > 1 << 24:
        raise ValueError(f"{count} source addresses do not fit in 127.0.0.0/8")
    return [f"127.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"
            for n in range(first, first + count)]


def spread(sessions: int, processes: int, ports: int) -> Spread:
    """Give each process its own source addresses (at least MIN_SOURCES in all, and enough
    that no address needs more than PORT_SHARE of the ephemeral range)."""
    processes = max(1, processes)
    usable = max(1, int(ports * PORT_SHARE))
    needed = math.ceil(sessions / usable)
    total = max(MIN_SOURCES, processes, needed)
    total = math.ceil(total / processes) * processes  # every process gets the same number
    addresses = source_addresses(total)
    own = tuple(tuple(addresses[i::processes]) for i in range(processes))
    # users are dealt to processes round robin, and within one to its addresses round robin
    biggest_process = math.ceil(sessions / processes)
    per_address = math.ceil(biggest_process / len(own[0]))
    return Spread(processes, own, per_address)


def workers_for(sessions: int, minimum: int, capacity: int) -> int:
    """iupop3 workers for SESSIONS, each kept under WORKER_CAPACITY_SHARE of the sessions its
    descriptor budget holds (``shared.descriptors.session_capacity``)."""
    usable = int(capacity * WORKER_CAPACITY_SHARE)
    if usable < 1:
        raise ValueError(f"a worker can hold no sessions (capacity {capacity})")
    return max(1, minimum, math.ceil(sessions / usable))


def noop_interval_for(sessions: int, base: float, budget: float = NOOP_RATE_BUDGET) -> float:
    """The plan's interval, lengthened when SESSIONS NOOPing that often exceed the budget."""
    return max(base, sessions / budget) if budget > 0 else base


def hold_seconds(base: float, interval: float) -> float:
    """Long enough that every session NOOPs at least twice after the ramp."""
    return max(base, 2 * interval + 2)


@dataclass
class Limits:
    """The machine-wide figures a level depends on (None where the kernel has no such file)."""

    port_low: int = 32768
    port_high: int = 60999
    somaxconn: int | None = None
    syn_backlog: int | None = None
    file_max: int | None = None
    files_open: int | None = None
    conntrack_max: int | None = None
    conntrack_now: int | None = None
    mem_available_kib: int | None = None
    fd_limit: int = 20000
    notes: list[str] = field(default_factory=list)


def check_limits(limits: Limits, sessions: int, spread_: Spread, in_flight: int,
                 server_listen_backlog: int) -> tuple[list[str], list[str]]:
    """(problems that make the level impossible, notes worth printing)."""
    problems: list[str] = []
    notes: list[str] = []
    ports = ports_per_address(limits.port_low, limits.port_high)
    if spread_.per_address > ports:
        problems.append(f"{spread_.per_address} sessions per source address but the port range "
                        f"{limits.port_low}-{limits.port_high} gives {ports}")
    per_process = math.ceil(sessions / spread_.processes)
    if per_process >= limits.fd_limit:
        problems.append(f"{per_process} sessions per load generator but RLIMIT_NOFILE is "
                        f"{limits.fd_limit}")
    sockets = 2 * sessions  # the client's end and the server's
    if limits.file_max is not None:
        free = limits.file_max - (limits.files_open or 0)
        if sockets * 1.1 > free:
            problems.append(f"fs.file-max {limits.file_max} leaves {free} files, {sockets} needed")
    if limits.conntrack_max is not None:
        free = limits.conntrack_max - (limits.conntrack_now or 0)
        if sessions * 1.1 > free:
            problems.append(f"nf_conntrack_max {limits.conntrack_max} leaves {free} entries, "
                            f"{sessions} connections needed (packets would be dropped)")
    backlog = min(x for x in (limits.somaxconn, limits.syn_backlog, server_listen_backlog)
                  if x is not None)
    if in_flight > backlog:
        notes.append(f"{in_flight} logins in flight against a listen backlog of {backlog}: "
                     "connects may wait for SYN retries")
    notes.append(f"{spread_.processes} load generators, {len(spread_.sources[0])} source "
                 f"addresses each, at most {spread_.per_address} sessions per address "
                 f"(port range {limits.port_low}-{limits.port_high}: {ports})")
    return problems, notes


def _read_int(path: str) -> int | None:
    try:
        with open(path) as fh:
            return int(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def read_limits(fd_limit: int) -> Limits:
    """The live values from /proc (the files missing on a kernel stay None)."""
    limits = Limits(fd_limit=fd_limit)
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as fh:
            limits.port_low, limits.port_high = port_range(fh.read())
    except (OSError, ValueError):
        limits.notes.append("ip_local_port_range unreadable: assuming 32768-60999")
    limits.somaxconn = _read_int("/proc/sys/net/core/somaxconn")
    limits.syn_backlog = _read_int("/proc/sys/net/ipv4/tcp_max_syn_backlog")
    limits.file_max = _read_int("/proc/sys/fs/file-max")
    limits.files_open = _read_int("/proc/sys/fs/file-nr")
    limits.conntrack_max = _read_int("/proc/sys/net/netfilter/nf_conntrack_max")
    limits.conntrack_now = _read_int("/proc/sys/net/netfilter/nf_conntrack_count")
    limits.mem_available_kib = _meminfo("MemAvailable")
    return limits


def _meminfo(key: str) -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def mem_total_kib() -> int | None:
    return _meminfo("MemTotal")


def describe(limits: Limits) -> dict:
    """The limits as they go into the JSON."""
    return {k: v for k, v in vars(limits).items() if k != "notes"}
