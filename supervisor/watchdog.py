"""Reading the workers' heartbeats: which worker may get sessions, which one is hung.

gunicorn's ``murder_workers`` compares each worker's last heartbeat with the timeout; here the
heartbeat is a word in the worker's statistics slot (shared/stats.py). A worker writes its
event-loop heartbeat every tick and a thread-pool heartbeat whenever a probe it queues in the
pool runs, so a pool whose threads are all stuck while work waits goes stale too. The rules
are pure functions of the figures (unit-tested without processes); ``HeartbeatWatch`` is the part
of the supervisor's loop that applies them.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

from shared.logsetup import log
from shared.stats import SUPERVISOR_SLOT, TICK_SECONDS, Counter
from supervisor.workers import (KILL_MARGIN_SECONDS, STARTUP_TIMEOUT_SECONDS, WorkerProcess,
                                WorkerState)

MISSED_BEATS = 2  # no new sessions once this many ticks are missed


@dataclass(frozen=True)
class Beats:
    """A worker's two heartbeats, monotonic milliseconds (0 = not written yet)."""

    loop_ms: int
    pool_ms: int


def age_ms(beat_ms: int, since_ms: int, now_ms: int) -> int:
    """How long ago ``beat_ms`` was, counting from ``since_ms`` when it is older (not written
    yet, or written by the slot's previous process)."""
    return now_ms - max(beat_ms, since_ms)


def is_fresh(beats: Beats, since_ms: int, now_ms: int) -> bool:
    """False after MISSED_BEATS missed ticks: hand this worker no new session."""
    limit = (MISSED_BEATS + 1) * TICK_SECONDS * 1000
    return age_ms(beats.loop_ms, since_ms, now_ms) <= limit


def hung_reason(beats: Beats, since_ms: int, now_ms: int, timeout_s: int) -> str | None:
    """Why the worker counts as hung (kill and replace it), or None while it is alive."""
    loop_age = age_ms(beats.loop_ms, since_ms, now_ms)
    if loop_age > timeout_s * 1000:
        return f"no heartbeat for {loop_age / 1000:.1f}s"
    pool_age = age_ms(beats.pool_ms, since_ms, now_ms)
    if pool_age > timeout_s * 1000:
        return f"its thread pool has not moved for {pool_age / 1000:.1f}s"
    return None


def _ms(monotonic_seconds: float) -> int:
    return int(monotonic_seconds * 1000)


class HeartbeatWatch:
    """The supervisor's watchdog turn (gunicorn's ``murder_workers``); mixed into Supervisor,
    whose workers, stats, settings, spare slots and books it uses."""

    def fresh(self, worker: WorkerProcess) -> bool:
        if worker.state is WorkerState.STARTING:
            return True  # no heartbeat yet: the startup timeout watches it
        return is_fresh(self.beats(worker), _ms(worker.started), _ms(time.monotonic()))

    def beats(self, worker: WorkerProcess) -> Beats:
        return Beats(self.stats.get(worker.slot, Counter.HEARTBEAT),
                     self.stats.get(worker.slot, Counter.POOL_BEAT))

    def watch_workers(self) -> None:
        """Stop routing to a worker that missed two heartbeats; SIGKILL one past
        -worker-timeout (event loop or thread pool) and replace it."""
        now = time.monotonic()
        for worker in self.workers:
            if worker.state is WorkerState.STARTING:
                if now - worker.started > STARTUP_TIMEOUT_SECONDS:
                    self.kill_hung(worker, f"not ready after {STARTUP_TIMEOUT_SECONDS:.0f}s")
            elif worker.state in (WorkerState.RUNNING, WorkerState.DRAINING):
                self.note_freshness(worker)
                reason = hung_reason(self.beats(worker), _ms(worker.started), _ms(now),
                                              self.settings.worker_timeout)
                if reason:
                    self.kill_hung(worker, reason)
            elif worker.state is WorkerState.HUNG and now - worker.killed_at > KILL_MARGIN_SECONDS:
                self.give_up_on(worker)

    def note_freshness(self, worker: WorkerProcess) -> None:
        fresh = self.fresh(worker)
        if worker.stale == (not fresh):
            return  # unchanged
        worker.stale = not fresh
        if worker.stale:
            log.error("worker %d (pid %d) missed %d heartbeats: no new sessions go to it",
                      worker.slot, worker.pid, MISSED_BEATS)
        else:
            log.info("worker %d (pid %d) beats again: it takes sessions", worker.slot,
                     worker.pid)

    def kill_hung(self, worker: WorkerProcess, reason: str) -> None:
        log.error("worker %d (pid %d) is hung: %s; killing it (SIGKILL)", worker.slot,
                  worker.pid, reason)
        try:
            os.kill(worker.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        worker.killed_at = time.monotonic()
        worker.change_state(WorkerState.HUNG)  # STARTING/RUNNING/DRAINING -> HUNG
        self.stats.add(SUPERVISOR_SLOT, Counter.HUNG_KILLED)

    def give_up_on(self, worker: WorkerProcess) -> None:
        """A process that outlives SIGKILL (uninterruptible sleep): its slot stays marked dead
        (it may still write it), its replacement gets a slot of its own."""
        if not self.spare_slots:
            worker.killed_at = time.monotonic()  # ask again later; nothing else is safe
            log.error("worker %d (pid %d) survives SIGKILL and no spare slot is left",
                      worker.slot, worker.pid)
            return
        old_slot, pid = worker.slot, worker.pid
        lost = self.settle_books(worker, slot_has_no_writer=False)
        self.undead[pid] = old_slot
        self.stats.add(SUPERVISOR_SLOT, Counter.DEAD_SLOTS)
        worker.slot = self.spare_slots.pop(0)
        worker.pid = 0
        worker.change_state(WorkerState.EXITED)  # HUNG -> EXITED: replaced at once
        log.error("worker %d (pid %d) survived SIGKILL for %.0fs: slot %d stays marked dead, "
                  "%d sessions lost; its replacement is worker %d", old_slot, pid,
                  KILL_MARGIN_SECONDS, old_slot, lost, worker.slot)
        self.update_title()

    def undead_reaped(self, pid: int) -> None:
        slot = self.undead.pop(pid)
        self.stats.set(slot, Counter.CURRENT, 0)  # its writer is gone at last
        self.stats.clear_users(slot)
        self.stats.add(SUPERVISOR_SLOT, Counter.DEAD_SLOTS, -1)
        self.spare_slots.append(slot)
        log.error("the dead worker of slot %d (pid %d) has exited; the slot is free", slot, pid)
        self.update_title()
