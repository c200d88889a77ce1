"""Idle logged-in sessions without a greenlet: parked on a read watcher until their next line.

A greenlet costs about 8 KiB however shallow its stack (measured: its Python data stack
chunk's first page and the C stack gevent copies to the heap at each switch), more than the
rest of an idle session together. So a session in TRANSACTION that has read nothing for
``PARK_AFTER`` seconds ends its greenlet (worker.connection raises ``Parked``) and waits here as
an io watcher on its socket; its next bytes, its idle deadline, a takeover or a shutdown
start a new greenlet in the worker's session group that goes on where the old one stopped
(worker/main.py ``Worker.resume``). Runs on the event loop only.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import gevent

PARK_AFTER = 2.0      # a session parks only when its idle deadline is further than this
SWEEP_SECONDS = 1.0   # how often idle deadlines of parked sessions are checked (late by <= 1 s)
READ = 1              # libev/libuv EV_READ


class Parked(Exception):
    """Raised out of a session's read loop: it is parked, its greenlet ends, nothing closes."""


class Parking:
    """This worker's parked sessions: connection -> (read watcher, idle deadline)."""

    def __init__(self, resume: Callable[[Any, BaseException | None], Any]):
        self.resume = resume  # starts a greenlet that continues a connection (or ends it)
        self.parked: dict[Any, tuple[Any, float]] = {}
        self.sweeper: gevent.Greenlet | None = None

    def __len__(self) -> int:
        return len(self.parked)

    def __contains__(self, connection: Any) -> bool:
        return connection in self.parked

    def park(self, connection: Any, fd: int, deadline: float) -> None:
        watcher = gevent.get_hub().loop.io(fd, READ)
        self.parked[connection] = (watcher, deadline)
        watcher.start(self.wake, connection)
        if self.sweeper is None or self.sweeper.dead:
            self.sweeper = gevent.spawn(self._sweep)

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
        """Wake sessions past their idle deadline: their read loop then times them out."""
        while self.parked:
            gevent.sleep(SWEEP_SECONDS)
            now = time.monotonic()
            for connection in [c for c, (_, deadline) in self.parked.items() if deadline <= now]:
                self.wake(connection)
