"""The descriptor budget: how many sessions a process's RLIMIT_NOFILE can hold.

The supervisor raises its soft limit to the hard one at start (workers inherit it) and warns when
-maxclients cannot be served; each worker publishes its own capacity in shared memory, and the
supervisor never hands a worker more sessions than that (supervisor/arbiter.py).
"""

from __future__ import annotations

import os
import resource

# Between commands a logged-in session holds its socket and its maildrop's lock file, nothing
# else: the maildrop's directory is walked again for each command that needs it
# (worker/maildir.py, worker/mbox.py), and a message file is open only while it streams.
FDS_PER_SESSION = 2
# At most this many of a worker's sessions stream a message file at once (RETR, TOP: one
# descriptor each); the others wait for a slot (worker/streamslots.py).
STREAMS_AT_ONCE = 1024
# The worker's thread pool, and what one of its tasks may hold open at once: a commit holds
# the Maildir, new/ and cur/, the wastebasket and .MAIL folders with their three sub folders
# each, and maildirsize; a login the walk's two steps, a sub folder, the lock, ledger and
# import files; an mbox commit the directory, spool, dot-lock temp, new spool and journal.
POOL_THREADS = 10
FDS_PER_POOL_TASK = 16
# What a worker keeps beyond its sessions: the streams and pool tasks above; its channel,
# statistics, log, inotify, takeover desk and its requests, a users-file reload.
WORKER_MISC_FDS = 64
# Message files RETR/TOP opened ahead of the client's next request, all sessions of a worker
# together (worker/openahead.py); none under a small limit.
OPEN_AHEAD_FILES = 512
WORKER_SPARE_FDS = (STREAMS_AT_ONCE + OPEN_AHEAD_FILES + POOL_THREADS * FDS_PER_POOL_TASK
                    + WORKER_MISC_FDS)
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


def spare_fds(limit: int) -> int:
    """What a worker keeps beyond its sessions under ``limit``: ``WORKER_SPARE_FDS``, or a
    quarter of a small limit (below about 5,000 the worst case of every stream slot and pool
    thread busy at once is not reserved: a burst may then meet EMFILE, answered -ERR)."""
    return min(WORKER_SPARE_FDS, limit // 4)


def open_ahead_files(limit: int) -> int:
    """Files a worker may hold opened ahead under ``limit``: none when the spare is cut."""
    return OPEN_AHEAD_FILES if spare_fds(limit) == WORKER_SPARE_FDS else 0


def stream_slots(limit: int) -> int:
    """Message files a worker may have open at once under ``limit`` (worker/streamslots.py)."""
    room = (spare_fds(limit) - open_ahead_files(limit) - POOL_THREADS * FDS_PER_POOL_TASK
            - WORKER_MISC_FDS)
    return max(1, min(STREAMS_AT_ONCE, room))


def session_capacity(limit: int, open_now: int = WORKER_BASE_FDS) -> int:
    """Sessions a worker with ``open_now`` descriptors open can add under ``limit``."""
    return max(0, (limit - open_now - spare_fds(limit)) // FDS_PER_SESSION)


def maxclients_problem(maxclients: int, nworkers: int, limit: int) -> str | None:
    """Why -maxclients cannot be served with this descriptor limit, or None."""
    per_worker = session_capacity(limit)
    if per_worker * nworkers >= maxclients:
        return None
    return (f"-maxclients {maxclients} cannot be served: the descriptor limit {limit} holds "
            f"about {per_worker} sessions per worker, {per_worker * nworkers} with {nworkers} "
            "workers; the excess is refused")
