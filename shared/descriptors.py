"""The descriptor budget: how many sessions a process's RLIMIT_NOFILE can hold.

The supervisor raises its soft limit to the hard one at start (workers inherit it) and warns when
-maxclients cannot be served; each worker publishes its own capacity in shared memory, and the
supervisor never hands a worker more sessions than that (supervisor/arbiter.py).
"""

from __future__ import annotations

import os
import resource

# A session holds its socket and its maildrop lock, and briefly a message file or a directory.
FDS_PER_SESSION = 4
# What a worker keeps for itself beyond its sessions: channel, statistics, log, inotify, the
# thread pool's transient opens, a users-file reload.
WORKER_SPARE_FDS = 32
# What a freshly started worker has open before any session (measured: about 20).
WORKER_BASE_FDS = 24
SOFT_LIMIT_CAP = 1 << 20  # with an unlimited hard limit, do not ask for more than this


def raise_soft_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns (before, after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = SOFT_LIMIT_CAP if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            return soft, soft
        return soft, target
    return soft, soft


def soft_limit() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return SOFT_LIMIT_CAP if soft == resource.RLIM_INFINITY else soft


def hard_limit() -> int:
    """The limit the soft one is raised to at start."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return SOFT_LIMIT_CAP if hard == resource.RLIM_INFINITY else hard


def open_count() -> int:
    """Descriptors open in this process now (from /proc/self/fd, less the one listing it)."""
    return len(os.listdir("/proc/self/fd")) - 1


def session_capacity(limit: int, open_now: int = WORKER_BASE_FDS) -> int:
    """Sessions a worker with ``open_now`` descriptors open can add under ``limit``."""
    return max(0, (limit - open_now - WORKER_SPARE_FDS) // FDS_PER_SESSION)


def maxclients_problem(maxclients: int, nworkers: int, limit: int) -> str | None:
    """Why -maxclients cannot be served with this descriptor limit, or None."""
    per_worker = session_capacity(limit)
    if per_worker * nworkers >= maxclients:
        return None
    return (f"-maxclients {maxclients} cannot be served: the descriptor limit {limit} holds "
            f"about {per_worker} sessions per worker, {per_worker * nworkers} with {nworkers} "
            "workers; the excess is refused")
