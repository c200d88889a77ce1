"""IUPOP3's XTND commands (CLIENT, LOGLEVEL, STATS, SHUTDOWN) and the authorization they need.

``Session.pop_XTND`` hands the rest of the line to ``handle``; each sub-command is an
``xtnd_NAME`` function, checked against ``XtndAuthorization`` (the ``-xtnd`` file, reloaded by
worker/reloading.py). What XTND needs from a session is the ``XtndSession`` protocol below.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

from shared import logsetup, statsreport, xtndauth
from shared.handoff import Kind
from shared.logsetup import THREAD, log
from shared.stats import StatsArea


class _Link(Protocol):
    def tell(self, kind: Kind, argument: int = 0) -> bool: ...


class _Stats(Protocol):
    area: StatsArea


class _Services(Protocol):
    """The parts of the worker's context XTND uses."""

    version: str
    supervisor: _Link
    stats: _Stats
    xtnd: "XtndAuthorization"


class XtndSession(Protocol):
    ctx: _Services
    account_name: str | None
    log: logging.LoggerAdapter

    def reply(self, line: str) -> None: ...

# Replies, by name (the LOGLEVEL one is the IUPOP3 1.8 README's transcript).
CLIENT_OK = "+OK"
LEVEL_CHANGED = "+OK logging level changed to {level}"
SHUTDOWN_OK = "+OK shutting down: no new sessions, exit once every session has ended"
NOT_ALLOWED = '-ERR XTND {command} not allowed for "{user}"'
UNKNOWN = "-ERR unknown XTND command"
BAD_ARGUMENTS = "-ERR wrong arguments for XTND {command}"
BAD_LEVEL = f"-ERR unknown logging level, use {logsetup.LEVEL_CHOICES}"
NO_SUPERVISOR = "-ERR [SYS/TEMP] the server cannot take that command now"


# -- the commands -----------------------------------------------------------------------------
def handle(session: "XtndSession", rest: bytes) -> None:
    """Run ``XTND <command> [argument]`` for a logged-in session."""
    name, _, argument = rest.decode("utf-8", "replace").strip().partition(" ")
    command = name.upper()
    function = _COMMANDS.get(command)
    if function is None:
        session.log.log(THREAD, "unknown XTND command %r", name[:40])
        session.reply(UNKNOWN)
        return
    user = session.account_name
    if command.lower() in xtndauth.PRIVILEGED and not session.ctx.xtnd.allows(command, user):
        session.log.info('XTND %s refused: "%s" is not authorized', command, user)
        session.reply(NOT_ALLOWED.format(command=command, user=user))
        return
    function(session, argument.strip())


def xtnd_CLIENT(session: "XtndSession", argument: str) -> None:
    if not argument:
        session.reply(BAD_ARGUMENTS.format(command="CLIENT"))
        return
    session.log.log(THREAD, "client says: %s", logsetup.escaped(argument[:200]))
    session.reply(CLIENT_OK)


def xtnd_LOGLEVEL(session: "XtndSession", argument: str) -> None:
    level = argument.upper()
    if level not in logsetup.LEVEL_NAMES:
        session.reply(BAD_LEVEL if argument else BAD_ARGUMENTS.format(command="LOGLEVEL"))
        return
    index = logsetup.LEVEL_NAMES.index(level)
    session.log.info('XTND LOGLEVEL %s by "%s"', level, session.account_name)
    # The supervisor sets its own level, the shared header word, and tells every worker;
    # this worker switches now as well, so the reply is already true when the client reads it.
    if not session.ctx.supervisor.tell(Kind.SET_LOGLEVEL, index):
        session.reply(NO_SUPERVISOR)
        return
    apply_level(index)
    session.reply(LEVEL_CHANGED.format(level=level.lower()))


def xtnd_STATS(session: "XtndSession", argument: str) -> None:
    if argument:
        session.reply(BAD_ARGUMENTS.format(command="STATS"))
        return
    ctx = session.ctx
    figures = statsreport.collect(ctx.stats.area, ctx.version, logsetup.level_name())
    # One write: no line of the report can start with "." (names and numbers only).
    session.reply("\r\n".join([statsreport.HEADER, *statsreport.render(figures), "."]))


def xtnd_SHUTDOWN(session: "XtndSession", argument: str) -> None:
    if argument:
        session.reply(BAD_ARGUMENTS.format(command="SHUTDOWN"))
        return
    session.log.info('XTND SHUTDOWN by "%s"', session.account_name)
    if not session.ctx.supervisor.tell(Kind.SHUTDOWN, 0):
        session.reply(NO_SUPERVISOR)
        return
    session.reply(SHUTDOWN_OK)


_COMMANDS: dict[str, Callable[["XtndSession", str], None]] = {
    name[5:]: function for name, function in globals().items() if name.startswith("xtnd_")
}


def apply_level(index: int) -> None:
    """Switch this process's logging level, logging the change while the chattier level holds."""
    new, old = logsetup.LEVEL_NAMES[index], logsetup.level_name()
    if new == old:
        return
    if logsetup.LEVELS[new] > logsetup.LEVELS.get(old, 0):
        log.info("logging level changed from %s to %s", old.lower(), new.lower())
        logsetup.set_level(new)
    else:
        logsetup.set_level(new)
        log.info("logging level changed from %s to %s", old.lower(), new.lower())


# -- the authorization table ----------------------------------------------------------------
class XtndAuthorization:
    """The ``-xtnd`` file as a reloadable part (worker/reloading.py); a file that fails keeps
    the previous table."""

    def __init__(self, path: str):
        self.path = path
        self.table: xtndauth.XtndAuth = xtndauth.NOBODY

    def paths(self) -> tuple[str, ...]:
        return (self.path,) if self.path else ()

    def allows(self, command: str, user: str | None) -> bool:
        return self.table.allows(command, user)

    def reload(self, why: str) -> bool:
        try:
            table = xtndauth.load(self.path)
        except xtndauth.XtndAuthError as exc:
            log.error("%s; keeping the previous XTND authorization", exc)
            return False
        self.table = table  # one assignment: a session sees the old or the new table
        log.info("XTND authorization loaded (%s): %s", why, table.describe())
        return True
