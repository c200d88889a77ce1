"""Per-connection abuse limits that outlive a session object (STLS starts a new one).

The connection makes one ``ConnectionLimits`` and hands it to each of its sessions: the login
deadline (read by the connection's read loop), the bad-command budget and the repeated-line
filter of the log (used by the session). Sans-IO: time comes from a clock function.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


class LoginDeadline:
    """Seconds from connect until a successful login (``-login-timeout``).

    Time inside ``paused()`` does not count: a failed-login penalty is the server's doing, so
    waiting it out must not cost an honest client its deadline (issue 10). ``left()`` is None
    once the login succeeded.
    """

    __slots__ = ("seconds", "_clock", "_deadline", "_met", "_paused_at")

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic):
        self.seconds = seconds
        self._clock = clock
        self._deadline = clock() + seconds
        self._paused_at: float | None = None
        self._met = False

    def left(self) -> float | None:
        if self._met:
            return None
        now = self._paused_at if self._paused_at is not None else self._clock()
        return self._deadline - now

    def met(self) -> None:
        """The client logged in: no deadline any more."""
        self._met = True

    @contextmanager
    def paused(self) -> Iterator[None]:
        """The deadline stands still inside (nested pauses count once)."""
        if self._paused_at is not None:
            yield
            return
        self._paused_at = self._clock()
        try:
            yield
        finally:
            self._deadline += self._clock() - self._paused_at
            self._paused_at = None


@dataclass(slots=True)
class BadCommandBudget:
    """Unknown commands, commands in the wrong state and over-long lines a connection may send
    (``-max-bad-commands``); the one after the last is answered with -ERR and the close."""

    limit: int
    spent: int = 0

    def spend(self) -> bool:
        """Count one bad command; True when it is over the budget."""
        self.spent += 1
        return self.spent > self.limit


@dataclass(slots=True)
class RepeatFilter:
    """Lets the same log text through ``repeats`` times per connection, then counts it.

    A client that repeats a command (CAPA every few seconds, NOOP in a loop, the same unknown
    verb) cannot fill the log with it; the connection logs the count when it ends. At most
    ``max_texts`` distinct texts are remembered, so the filter's memory is bounded too.
    """

    repeats: int = 3
    max_texts: int = 256
    suppressed: int = 0
    _seen: dict[str, int] = field(default_factory=dict)

    def admit(self, text: str) -> bool:
        count = self._seen.get(text, 0)
        if count >= self.repeats:
            self.suppressed += 1
            return False
        if count or len(self._seen) < self.max_texts:
            self._seen[text] = count + 1
        return True


@dataclass(slots=True)
class ConnectionLimits:
    login: LoginDeadline
    bad_commands: BadCommandBudget
    log_repeats: RepeatFilter = field(default_factory=RepeatFilter)

    @classmethod
    def from_settings(cls, settings) -> "ConnectionLimits":
        return cls(LoginDeadline(settings.login_timeout),
                   BadCommandBudget(settings.max_bad_commands))
