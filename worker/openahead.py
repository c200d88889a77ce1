"""Open the next few messages of a download run in the pool round trip of the one asked for.

Clients download in order (RETR 1, RETR 2 ...; TOP likewise), and one thread-pool round trip
costs more CPU than the open it carries (thread wake-ups and GIL hand-offs: 30-200 us against
about 30 us for the open, measured under load). So worker.pop3 asks the pool for message n and
the next few live ones together, and RETR n+1 finds its file already open. Opens still run only
in the pool (worker/store.py's rule); the loop only reads the files, one chunk at a time.

Maildir only (an mbox open copies the message out of the spool). Bounded: ``AHEAD`` files and
``AHEAD_OCTETS`` per session, ``WORKER_BUDGET`` held by all sessions of a worker (each is a
descriptor, and a worker holds at most 20,000), all closed when a request leaves the run or
the session ends.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable
from typing import Any, BinaryIO

from shared import descriptors
from worker.maildir import Maildir
from worker.store import Maildrop, Message

AHEAD = 4                    # messages opened past the one asked for
AHEAD_OCTETS = 1 << 20       # their stored sizes together: a run of big ones stays short
# Open-ahead files held by every session of this worker together: part of the descriptor
# budget's spare (shared/descriptors.py); worker/main.py sets it for the worker's limit.
WORKER_BUDGET = descriptors.OPEN_AHEAD_FILES


class OpenAhead:
    """The files one session opened ahead, by message index; ``held`` counts the worker's."""

    __slots__ = ("files",)
    held = 0

    def __init__(self) -> None:
        self.files: dict[int, BinaryIO] = {}

    def open(self, offload: Callable[..., Any], maildrop: Maildrop, message: Message,
             messages: list[Message], deleted: Container[int]) -> BinaryIO:
        """``message``'s file: opened ahead, or now through ``offload`` (the pool) with the
        next few live messages; raises what ``open_message`` raises for ``message`` itself."""
        fh = self.take(message.index)
        if fh is None:
            # Only a Maildir: its open is a descriptor and no bytes; an mbox open copies the
            # message out of the spool, work the client may never ask for.
            more = self.wanted(message, messages, deleted) if isinstance(maildrop, Maildir) else []
            fh, opened = offload(open_run, maildrop, message, more)
            self.keep(opened)
        return fh

    def take(self, index: int) -> BinaryIO | None:
        """The file opened ahead for message ``index``, or None; then the run is broken and
        the others are closed (a client jumping around would otherwise pin them)."""
        fh = self.files.pop(index, None)
        if fh is None:
            self.close()
        else:
            OpenAhead.held -= 1
        return fh

    def keep(self, opened: Iterable[tuple[int, BinaryIO]]) -> None:
        for index, fh in opened:
            self.files[index] = fh
            OpenAhead.held += 1

    def close(self) -> None:
        OpenAhead.held -= len(self.files)
        files, self.files = list(self.files.values()), {}
        for fh in files:
            fh.close()

    def wanted(self, message: Message, messages: list[Message],
               deleted: Container[int]) -> list[Message]:
        """The live messages after ``message`` worth opening with it (none over the budget)."""
        room = min(AHEAD, WORKER_BUDGET - OpenAhead.held)
        octets, chosen = 0, []
        for position in range(message.index + 1, len(messages)):  # no copy of a long list
            if len(chosen) >= room:
                break
            candidate = messages[position]
            if candidate.index in deleted or candidate.index in self.files:
                continue
            octets += candidate.size
            if octets > AHEAD_OCTETS:
                break
            chosen.append(candidate)
        return chosen


def open_run(maildrop: Maildrop, first: Message,
             more: list[Message]) -> tuple[BinaryIO, list[tuple[int, BinaryIO]]]:
    """Pool: ``first`` opened (its errors raised as ``open_message`` raises them), and as many
    of ``more`` as open without error; a failure there is left for that message's own RETR."""
    fh = maildrop.open_message(first)
    opened: list[tuple[int, BinaryIO]] = []
    try:
        for message in more:
            try:
                opened.append((message.index, maildrop.open_message(message)))
            except OSError:
                break
    except BaseException:
        for _, extra in opened:
            extra.close()
        fh.close()
        raise
    return fh, opened
