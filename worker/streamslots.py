"""A bound on the message files a worker has open at once (RETR and TOP), so the descriptor
budget holds: a session keeps two descriptors between commands (its socket and its lock
file) and a third only while it streams a message, and at most ``STREAMS_AT_ONCE`` sessions
of a worker stream at once; the rest wait for a slot (shared/descriptors.py counts them in
the spare). worker/pop3.py takes a slot before it opens a message.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, BinaryIO, Protocol


class Semaphore(Protocol):
    def acquire(self) -> Any: ...

    def release(self) -> Any: ...


class OpenMessage:
    """A stored message's file that gives its slot back when closed (once)."""

    __slots__ = ("_fh", "_slots")

    def __init__(self, fh: BinaryIO, slots: Semaphore):
        self._fh = fh
        self._slots: Semaphore | None = slots

    def read(self, size: int = -1) -> bytes:
        return self._fh.read(size)

    def __getattr__(self, name: str) -> Any:  # readinto, fileno, seek ... of the file
        return getattr(self._fh, name)

    def close(self) -> None:
        slots, self._slots = self._slots, None
        try:
            self._fh.close()
        finally:
            if slots is not None:
                slots.release()

    def __enter__(self) -> OpenMessage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def counted(slots: Semaphore, open_file: Callable[[], BinaryIO | None]) -> OpenMessage | None:
    """``open_file()`` in a slot: waits for one, gives it back when the file is closed or was
    not opened (None, an exception)."""
    slots.acquire()
    try:
        fh = open_file()
    except BaseException:
        slots.release()
        raise
    if fh is None:
        slots.release()
        return None
    return OpenMessage(fh, slots)
