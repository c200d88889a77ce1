"""The supervisor's log file: opening it, and the midnight rotation every process follows.

Mixed into the Supervisor (as ``HeartbeatWatch`` is), whose settings, handler and broadcast it
uses; moved out of arbiter.py to keep that module to its loop (issue 14 needed the room).
"""

from __future__ import annotations

import os

from shared import logsetup
from shared.handoff import Kind
from shared.logsetup import log
from supervisor import daemon
from supervisor.rotation import MidnightRotation


class LogFiles:
    """Opening and rotating the log file; ``self.rotation`` is None without -logfile."""

    def open_log(self) -> None:
        try:
            self.handler = logsetup.configure("supervisor", self.settings.loglevel,
                                              self.settings.logfile, self.settings.log_flush,
                                              owners=self._log_owners())
        except OSError as exc:
            raise daemon.DaemonError(
                f"cannot open the log file {self.settings.logfile}: {exc.strerror}") from None
        if self.settings.logfile:
            self.rotation = MidnightRotation(self.settings.logfile)
            left = self.rotation.left_from_before()
            if left is not None:
                self.rotate_log(left)  # a file of an earlier day (stopped overnight)

    def _log_owners(self) -> tuple[int, ...]:
        """Who may own an existing log file: this process, and the -user it becomes."""
        if self.settings.user and os.geteuid() == 0:
            return (0, daemon.identity_for(self.settings.user, self.settings.group).uid)
        return (os.geteuid(),)

    def rotate_log(self, day=None) -> None:
        """Midnight: the current file gets the day's name, every process continues in a new one."""
        assert self.rotation is not None and self.handler is not None
        log.info("a new day: the log continues in a new %s", self.rotation.path)
        self.handler.flush()
        try:
            old = self.rotation.rotate(day)
        except OSError as exc:
            log.error("cannot rotate the log file %s: %s; writing on in it",
                      self.rotation.path, exc.strerror or exc)
            return
        try:
            self.handler.reopen()
        except OSError as exc:  # a file planted meanwhile: keep writing the renamed one
            log.error("cannot open the new log file %s: %s", self.rotation.path,
                      exc.strerror or exc)
            return
        self.broadcast(Kind.REOPEN_LOG)
        log.info("new log file; the lines before are in %s", old)
