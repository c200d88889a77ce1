"""The supervisor link of a worker: frames sent up the channel (XTND LOGLEVEL and SHUTDOWN,
a session's end for -max-per-address, DRAINING). Built in worker/main.py around the channel;
``DETACHED`` stands in where there is no supervisor (sans-IO tests, fuzzing)."""

from __future__ import annotations

import socket
from collections.abc import Callable

from shared import handoff
from shared.handoff import Kind
from shared.logsetup import log


class SupervisorLink:
    def __init__(self, channel: socket.socket | None):
        self.channel = channel
        # Told why when the channel broke on a send (EPIPE, ECONNRESET): the worker drains
        # the same way as when its receive loop reads the end (issue 11 item 6).
        self.on_broken: Callable[[str], None] | None = None

    def tell(self, kind: Kind, argument: int = 0, address: int = 0) -> bool:
        """Send a frame to the supervisor; False if it cannot go (the caller says so)."""
        if self.channel is None:
            return False
        try:
            handoff.send_frame(self.channel, kind, argument, address=address)
        except OSError as exc:
            log.error("cannot tell the supervisor %s: %s", kind.name, exc)
            if not isinstance(exc, BlockingIOError) and self.on_broken is not None:
                self.on_broken(f"channel error: {exc.strerror or exc}")
            return False
        return True


DETACHED = SupervisorLink(None)
