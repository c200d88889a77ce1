"""A worker slot's lifecycle, as supervisord's ``states.py``/``process.py`` write it.

Every state change goes through ``WorkerProcess.change_state``, which refuses a transition from
a state not listed in ``ALLOWED_FROM`` (supervisord's ``_assertInState``): the rules below are
the only place that says which move is legal. The arbiter owns the loop; this module owns what a
slot is and how loaded it is.

    EXITED/BACKOFF/FATAL -> STARTING    spawn (FATAL: one retry every FATAL_RETRY_SECONDS)
    STARTING -> RUNNING                 the worker published its pid: it is ready
    STARTING/RUNNING -> DRAINING        told to drain, or draining on its own
    STARTING/RUNNING/DRAINING -> HUNG   the watchdog sent SIGKILL; waiting for the reap
    RUNNING/DRAINING/HUNG -> EXITED     died after it had been ready: respawned at once
    STARTING/HUNG/... -> BACKOFF        died before it was ready: retried after a delay
    ... -> FATAL                        died before ready START_RETRIES + 1 times in a row
"""

from __future__ import annotations

import collections
import socket
from dataclasses import dataclass, field
from enum import Enum

from shared.stats import Counter, StatsArea

START_RETRIES = 3             # pre-ready deaths retried with a delay before a slot goes FATAL
BACKOFF_BASE_SECONDS = 0.5    # first delay after a pre-ready death, doubled for each next one
FATAL_RETRY_SECONDS = 60.0    # a FATAL slot is tried again this often
STARTUP_TIMEOUT_SECONDS = 60.0  # a worker not ready by then is killed (a pre-ready death)
KILL_MARGIN_SECONDS = 10.0    # after SIGKILL (or -grace), how long a process may take to go


class WorkerState(Enum):
    STARTING = "starting"
    RUNNING = "running"
    DRAINING = "draining"
    HUNG = "hung"
    EXITED = "exited"
    BACKOFF = "backoff"
    FATAL = "fatal"


S = WorkerState
# A process exists in these states (it has a pid and a channel).
PROCESS_STATES = frozenset({S.STARTING, S.RUNNING, S.DRAINING, S.HUNG})
# New sessions may go to a worker in these states (if its heartbeat is fresh and it has room).
ROUTABLE_STATES = frozenset({S.STARTING, S.RUNNING})
# Sessions held in these states count against -maxclients.
LOADED_STATES = PROCESS_STATES
# Waiting to be spawned.
WAITING_STATES = frozenset({S.EXITED, S.BACKOFF, S.FATAL})

ALLOWED_FROM: dict[WorkerState, frozenset[WorkerState]] = {
    S.STARTING: WAITING_STATES,
    S.RUNNING: frozenset({S.STARTING}),
    S.DRAINING: frozenset({S.STARTING, S.RUNNING}),
    S.HUNG: frozenset({S.STARTING, S.RUNNING, S.DRAINING}),
    S.EXITED: frozenset({S.RUNNING, S.DRAINING, S.HUNG, S.BACKOFF, S.FATAL}),
    # A spawn that fails (posix_spawn raised) is a pre-ready death from a waiting state.
    S.BACKOFF: frozenset({S.STARTING, S.DRAINING, S.HUNG}) | WAITING_STATES,
    S.FATAL: frozenset({S.STARTING, S.DRAINING, S.HUNG}) | WAITING_STATES,
}


class StateError(RuntimeError):
    """A transition the rules above do not allow: a bug in the supervisor, never input."""


@dataclass
class WorkerProcess:
    """One position of the pool; ``slot`` is its statistics slot (and the number in logs)."""

    slot: int
    state: WorkerState = WorkerState.EXITED
    pid: int = 0
    channel: socket.socket | None = None
    started: float = 0.0   # monotonic time of the spawn
    sent_base: int = 0     # the slot's RECEIVED when this process started
    sent: int = 0          # connections handed to this process
    ready: bool = False    # this process reached RUNNING (a death is then no crash loop)
    pre_ready_deaths: int = 0  # in a row; reset once a process becomes ready
    respawn_at: float = 0.0
    killed_at: float = 0.0  # monotonic time of the watchdog's SIGKILL (HUNG)
    stale: bool = False     # missed MISSED_BEATS heartbeats: no new sessions (logged once)
    addresses: collections.Counter = field(default_factory=collections.Counter)
    # Control frames waiting for room in the channel (a worker busy for a moment); kept in
    # order and retried every loop turn, so a DRAIN or a REOPEN_LOG is never dropped.
    outbox: collections.deque = field(default_factory=collections.deque)

    def change_state(self, new: WorkerState) -> WorkerState:
        """Move to ``new``; returns the old state. Raises StateError on a move not allowed."""
        old = self.state
        if old not in ALLOWED_FROM[new]:
            raise StateError(f"worker {self.slot}: {old.name} -> {new.name} is not allowed")
        self.state = new
        if new is S.RUNNING:
            self.ready = True
            self.pre_ready_deaths = 0
        return old

    def after_pre_ready_death(self, now: float) -> WorkerState:
        """BACKOFF with a doubling delay, or FATAL once START_RETRIES are used up."""
        self.pre_ready_deaths += 1
        if self.pre_ready_deaths > START_RETRIES:
            self.respawn_at = now + FATAL_RETRY_SECONDS
            self.change_state(S.FATAL)
        else:
            self.respawn_at = now + BACKOFF_BASE_SECONDS * 2 ** (self.pre_ready_deaths - 1)
            self.change_state(S.BACKOFF)
        return self.state


def load(stats: StatsArea, worker: WorkerProcess) -> int:
    """Sessions open in the worker plus connections sent that it has not picked up yet.

    The one load figure: routing picks the least loaded worker by it, and -maxclients sums it
    over every worker that holds sessions (draining ones included).
    """
    if worker.state not in LOADED_STATES:
        return 0
    received = stats.get(worker.slot, Counter.RECEIVED) - worker.sent_base
    pending = max(0, worker.sent - received)
    return stats.get(worker.slot, Counter.CURRENT) + pending
