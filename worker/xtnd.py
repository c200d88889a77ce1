"""IUPOP3's XTND commands (CLIENT, LOGLEVEL, STATS, SHUTDOWN) and the authorization they need.

``Session.pop_XTND`` hands the rest of the line to ``handle``; each sub-command is an
``xtnd_NAME`` function, checked against the authorization table the worker's context holds.
``AuthReloader`` owns that table: startup, the supervisor's RELOAD frame (SIGHUP) and a change of
the file on disk (watchdog) all call the same ``reload``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import gevent
from watchdog.events import FileSystemEventHandler
from watchdog.observers import Observer

from shared import logsetup, statsreport, xtndauth
from shared.handoff import Kind
from shared.logsetup import THREAD, log

if TYPE_CHECKING:
    from worker.context import ServerContext
    from worker.pop3 import Session

# Replies, by name (the LOGLEVEL one is the IUPOP3 1.8 README's transcript).
CLIENT_OK = "+OK"
LEVEL_CHANGED = "+OK logging level changed to {level}"
SHUTDOWN_OK = "+OK shutting down: no new sessions, exit once every session has ended"
NOT_ALLOWED = '-ERR XTND {command} not allowed for "{user}"'
UNKNOWN = "-ERR unknown XTND command"
BAD_ARGUMENTS = "-ERR wrong arguments for XTND {command}"
BAD_LEVEL = f"-ERR unknown logging level, use {logsetup.LEVEL_CHOICES}"
NO_SUPERVISOR = "-ERR [SYS/TEMP] the server cannot take that command now"

DEBOUNCE_SECONDS = 0.3  # an editor's save is a burst of events; reload once it is quiet


# -- the commands -----------------------------------------------------------------------------
def handle(session: "Session", rest: bytes) -> None:
    """Run ``XTND <command> [argument]`` for a logged-in session."""
    name, _, argument = rest.decode("utf-8", "replace").strip().partition(" ")
    command = name.upper()
    function = _COMMANDS.get(command)
    if function is None:
        session.log.log(THREAD, "unknown XTND command %r", name[:40])
        session.reply(UNKNOWN)
        return
    user = session.account_name
    if command.lower() in xtndauth.PRIVILEGED and not session.ctx.xtnd_auth.allows(command, user):
        session.log.info('XTND %s refused: "%s" is not authorized', command, user)
        session.reply(NOT_ALLOWED.format(command=command, user=user))
        return
    function(session, argument.strip())


def xtnd_CLIENT(session: "Session", argument: str) -> None:
    if not argument:
        session.reply(BAD_ARGUMENTS.format(command="CLIENT"))
        return
    session.log.log(THREAD, "client says: %s", logsetup.escaped(argument[:200]))
    session.reply(CLIENT_OK)


def xtnd_LOGLEVEL(session: "Session", argument: str) -> None:
    level = argument.upper()
    if level not in logsetup.LEVEL_NAMES:
        session.reply(BAD_LEVEL if argument else BAD_ARGUMENTS.format(command="LOGLEVEL"))
        return
    index = logsetup.LEVEL_NAMES.index(level)
    session.log.info('XTND LOGLEVEL %s by "%s"', level, session.account_name)
    # The supervisor sets its own level, the shared header word, and tells every worker;
    # this worker switches now as well, so the reply is already true when the client reads it.
    if not session.ctx.tell_supervisor(Kind.SET_LOGLEVEL, index):
        session.reply(NO_SUPERVISOR)
        return
    apply_level(index)
    session.reply(LEVEL_CHANGED.format(level=level.lower()))


def xtnd_STATS(session: "Session", argument: str) -> None:
    if argument:
        session.reply(BAD_ARGUMENTS.format(command="STATS"))
        return
    ctx = session.ctx
    figures = statsreport.collect(ctx.stats, ctx.version, logsetup.level_name())
    # One write: no line of the report can start with "." (names and numbers only).
    session.reply("\r\n".join([statsreport.HEADER, *statsreport.render(figures), "."]))


def xtnd_SHUTDOWN(session: "Session", argument: str) -> None:
    if argument:
        session.reply(BAD_ARGUMENTS.format(command="SHUTDOWN"))
        return
    session.log.info('XTND SHUTDOWN by "%s"', session.account_name)
    if not session.ctx.tell_supervisor(Kind.SHUTDOWN, 0):
        session.reply(NO_SUPERVISOR)
        return
    session.reply(SHUTDOWN_OK)


_COMMANDS: dict[str, Callable[["Session", str], None]] = {
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
class AuthReloader:
    """Loads the ``-xtnd`` file into the context; a file that fails keeps the previous table."""

    def __init__(self, ctx: "ServerContext", path: str):
        self.ctx = ctx
        self.path = path
        self.observer = None
        self._due = 0.0
        self._waiter: gevent.Greenlet | None = None

    def reload(self, why: str) -> bool:
        try:
            table = xtndauth.load(self.path)
        except xtndauth.XtndAuthError as exc:
            log.error("%s; keeping the previous XTND authorization", exc)
            return False
        self.ctx.xtnd_auth = table  # one assignment: a session sees the old or the new table
        log.info("XTND authorization loaded (%s): %s", why, table.describe())
        return True

    def watch(self) -> None:
        """Reload when the file changes; watch its directory, editors save by rename."""
        if not self.path:
            return
        hub = gevent.get_hub()
        handler = _FileEvents(os.path.basename(self.path),
                              lambda: hub.loop.run_callback_threadsafe(self._changed))
        self.observer = Observer()
        self.observer.daemon = True
        self.observer.schedule(handler, os.path.dirname(self.path) or ".", recursive=False)
        self.observer.start()

    def _changed(self) -> None:
        # In the event loop now (run_callback_threadsafe); restart the quiet period.
        self._due = time.monotonic() + DEBOUNCE_SECONDS
        if self._waiter is None:
            self._waiter = gevent.spawn(self._reload_when_quiet)

    def _reload_when_quiet(self) -> None:
        try:
            while (left := self._due - time.monotonic()) > 0:
                gevent.sleep(left)
            self.reload("file changed")
        finally:
            self._waiter = None

    def stop(self) -> None:
        if self.observer is not None:
            self.observer.stop()
            self.observer = None


class _FileEvents(FileSystemEventHandler):
    """Runs on watchdog's thread: only filters and pokes the event loop, never reloads here."""

    IGNORED = frozenset({"opened", "closed_no_write"})  # our own reads are not changes

    def __init__(self, name: str, poke: Callable[[], None]):
        super().__init__()
        self.name = name
        self.poke = poke

    def on_any_event(self, event) -> None:
        if event.is_directory or event.event_type in self.IGNORED:
            return
        paths = (event.src_path, getattr(event, "dest_path", "") or "")
        if any(os.path.basename(os.fsdecode(p)) == self.name for p in paths if p):
            self.poke()
