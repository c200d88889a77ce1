"""Logging for every process: the four IUPOP3 levels and one line format.

ERROR, INFO, THREAD (the default: client address, user, the client's half of the conversation,
X-POP3-IDs) and DEBUG. Each line carries time, level, process role and session id, so one session
can be followed with grep across workers. A log file is written through a buffer that reaches the
disk within ``FLUSH_SECONDS`` (ERROR lines at once), as IUPOP3 1.8 flushed every 3 minutes.
"""

from __future__ import annotations

import logging
import os
import sys
import time

THREAD = 15
logging.addLevelName(THREAD, "THREAD")
LEVELS = {"ERROR": logging.ERROR, "INFO": logging.INFO, "THREAD": THREAD, "DEBUG": logging.DEBUG}
LEVEL_NAMES = tuple(LEVELS)  # index order matches shared.settings.LOG_LEVELS
FLUSH_SECONDS = 180

log = logging.getLogger("iupop3")


class LineFormatter(logging.Formatter):
    def __init__(self, role: str):
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        t = time.localtime(record.created)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", t) + f".{int(record.msecs):03d}"
        session = getattr(record, "session", "-")
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return f"{stamp} {record.levelname:<6} {self.role} {session} {text}"


class LogFileHandler(logging.Handler):
    """Appends to a file opened O_APPEND, readable while written; reopened after rotation."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        self.stream = None
        self.last_flush = time.monotonic()
        self.reopen()

    def reopen(self) -> None:
        old = self.stream
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        self.stream = os.fdopen(fd, "a", buffering=64 * 1024, encoding="utf-8",
                                errors="backslashreplace")
        if old is not None:
            old.close()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.stream.write(self.format(record) + "\n")
            if record.levelno >= logging.ERROR:
                self.flush()
            else:
                self.flush_if_due()
        except Exception:
            self.handleError(record)

    def flush_if_due(self) -> None:
        if time.monotonic() - self.last_flush >= FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        if self.stream is not None:
            self.stream.flush()
        self.last_flush = time.monotonic()

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None
        super().close()


class StdoutHandler(logging.StreamHandler):
    """Standard output, a line at a time (it is often a pipe or a journal)."""

    def __init__(self):
        super().__init__(sys.stdout)

    def flush_if_due(self) -> None:
        pass

    def reopen(self) -> None:
        pass


def configure(role: str, level: str, logfile: str = "") -> logging.Handler:
    """Set up the iupop3 logger of this process; returns its handler."""
    handler: logging.Handler = LogFileHandler(logfile) if logfile else StdoutHandler()
    handler.setFormatter(LineFormatter(role))
    for old in list(log.handlers):
        log.removeHandler(old)
        old.close()
    log.addHandler(handler)
    log.propagate = False
    set_level(level)
    return handler


def set_level(level: str) -> None:
    log.setLevel(LEVELS[level.upper()])


def level_name() -> str:
    return logging.getLevelName(log.getEffectiveLevel())


def session_logger(session_id: str) -> logging.LoggerAdapter:
    return logging.LoggerAdapter(log, {"session": session_id})
