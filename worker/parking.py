"""Idle logged-in sessions without a greenlet: parked on a read watcher until their next line.

A greenlet costs about 8 KiB however shallow its stack (measured: its Python data stack
chunk's first page and the C stack gevent copies to the heap at each switch), more than the
rest of an idle session together. So a session in TRANSACTION that has waited in its read for
``PARK_AFTER`` seconds (checked every ``SWEEP_SECONDS``) has ``Parked`` thrown into that read:
its greenlet ends (worker.connection) and it waits here as an io watcher on its socket; its next
bytes, its idle deadline, a takeover or a shutdown start a new greenlet in the worker's session
group that goes on where the old one stopped (worker/main.py ``Worker.resume``). A session busy
with a download never parks between its commands: parking at once after every reply cost a
greenlet and a watcher per command (RETR: 1.5 ms more CPU per MB). Runs on the event loop only.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import gevent

PARK_AFTER = 1.0      # seconds a session waits in its read before it is parked
SWEEP_SECONDS = 1.0   # how often waits and idle deadlines are checked (late by <= 1 s)
READ = 1              # libev/libuv EV_READ


class Parked(Exception):
    """Raised out of a session's read loop: it is parked, its greenlet ends, nothing closes."""


class Parking:
    """This worker's parked sessions: connection -> (read watcher, idle deadline)."""

    def __init__(self, resume: Callable[[Any, BaseException | None], Any]):
        self.resume = resume  # starts a greenlet that continues a connection (or ends it)
        self.parked: dict[Any, tuple[Any, float]] = {}
        # Parkable connections blocked in their read now: connection -> (greenlet, since).
        self.waiting: dict[Any, tuple[Any, float]] = {}
        self.sweeper: gevent.Greenlet | None = None

    def wait_begins(self, connection: Any, greenlet: Any, now: float) -> None:
        """``connection``'s greenlet is about to block in its read (and could park)."""
        self.waiting[connection] = (greenlet, now)
        self._sweep_soon()

    def wait_ends(self, connection: Any) -> None:
        self.waiting.pop(connection, None)

    def _sweep_soon(self) -> None:
        if self.sweeper is None or self.sweeper.dead:
            self.sweeper = gevent.spawn(self._sweep)

    def _throw(self, connection: Any) -> None:
        """On the hub: still blocked in the same read? Then end that read with ``Parked`` (no
        switch between the check and the throw, so it can land nowhere else)."""
        entry = self.waiting.pop(connection, None)
        if entry is not None and not entry[0].dead:
            entry[0].throw(Parked)

    def __len__(self) -> int:
        return len(self.parked)

    def __contains__(self, connection: Any) -> bool:
        return connection in self.parked

    def park(self, connection: Any, fd: int, deadline: float) -> None:
        watcher = gevent.get_hub().loop.io(fd, READ)
        self.parked[connection] = (watcher, deadline)
        watcher.start(self.wake, connection)
        self._sweep_soon()

    def wake(self, connection: Any, error: BaseException | None = None) -> Any:
        """Continue ``connection`` in a new greenlet (returned), raising ``error`` there if
        given; None if it was not parked."""
        entry = self.parked.pop(connection, None)
        if entry is None:
            return None
        watcher = entry[0]
        watcher.stop()
        watcher.close()
        return self.resume(connection, error)

    def wake_all(self, error: BaseException) -> list[Any]:
        """End every parked session with ``error`` (a shutdown); their new greenlets."""
        return [self.wake(connection, error) for connection in list(self.parked)]

    def _sweep(self) -> None:
        """Park sessions that waited ``PARK_AFTER`` in their read; wake parked ones past their
        idle deadline (their read loop then times them out)."""
        loop = gevent.get_hub().loop
        while self.parked or self.waiting:
            gevent.sleep(SWEEP_SECONDS)
            now = time.monotonic()
            for connection in [c for c, (_, deadline) in self.parked.items() if deadline <= now]:
                self.wake(connection)
            for connection in [c for c, (_, since) in self.waiting.items()
                               if now - since >= PARK_AFTER]:
                loop.run_callback(self._throw, connection)
