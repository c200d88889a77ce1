"""Logging for every process: the four IUPOP3 levels, one line format, the log file.

ERROR (errors only), INFO (also startup, shutdown, level changes and failed logins), THREAD
(the default: also client address, user name, the client's half of the conversation,
X-POP3-IDs) and DEBUG (also the server's replies and per-frame details). Each line carries
time, level, process role and session id, so one session can be followed with grep across
workers. A log file is written through a buffer that reaches the disk within
``flush_seconds`` (ERROR lines, and lines logged with ``extra=FLUSH`` such as failed logins
for fail2ban, at once), as IUPOP3 1.8 flushed every 3 minutes. The supervisor rotates it
(supervisor/rotation.py).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import sys
import time
from collections.abc import Mapping

THREAD = 15
logging.addLevelName(THREAD, "THREAD")
# The four levels, least verbose first. Processes pass a level as its index in this tuple
# (the stats header word, handoff frames), so the order is part of that format.
LEVEL_NAMES = ("ERROR", "INFO", "THREAD", "DEBUG")
LEVELS = dict(zip(LEVEL_NAMES, (logging.ERROR, logging.INFO, THREAD, logging.DEBUG)))
LEVEL_CHOICES = ", ".join(LEVEL_NAMES[:-1]) + " or " + LEVEL_NAMES[-1]  # for help and -ERR text
FLUSH_SECONDS = 180  # IUPOP3 1.8 flushed its log every 3 minutes; the -log_flush default
BUFFER_BYTES = 64 * 1024
MASK = "********"
FLUSH = {"flush": True}  # extra= of a line that must reach the disk at once (failed logins)

# Test hook, not a feature: seconds added to the wall clock that stamps log lines and decides
# when the day ends, so a test can watch a midnight rotation without waiting for midnight.
CLOCK_OFFSET_ENV = "IUPOP3_TEST_CLOCK_OFFSET"
_CLOCK_OFFSET = float(os.environ.get(CLOCK_OFFSET_ENV) or 0)

log = logging.getLogger("iupop3")


def clock() -> float:
    """The wall clock of the log: ``time.time()`` (shifted only by the test hook)."""
    return time.time() + _CLOCK_OFFSET


# Verbs whose arguments carry secrets, and how many leading words of the arguments stay visible
# (APOP keeps the user name, AUTH the mechanism; RFC 1939 section 7, RFC 5034 section 4).
_SECRET_VERBS = {"PASS": 0, "APOP": 1, "AUTH": 1}


def masked_line(line: bytes | str, sasl_response: bool = False, limit: int = 100) -> str:
    """The text a log may show for one client command line: never a password.

    The verb is the first whitespace-separated word, whatever the separator (``PASS\tx``,
    `` PASS x``): a line the server would refuse as an unknown command may still hold a
    password. ``sasl_response`` marks a line that answers an AUTH challenge: all of it is secret.
    """
    if sasl_response:
        return MASK
    text = line.decode("utf-8", "backslashreplace") if isinstance(line, bytes) else line
    words = text.split()
    keep = _SECRET_VERBS.get(words[0].upper()) if words else None
    if keep is not None:
        shown = words[:keep + 1]
        if len(words) > keep + 1:
            shown.append(MASK)
        text = " ".join(shown)
    return escaped(text[:limit].rstrip())


def escaped(text: str) -> str:
    """Client text fit for a log line (CWE-117): NUL, CR and escape sequences shown as
    ``\x00``, ``\r``, ``\x1b``, so they can neither forge nor hide lines."""
    return text if text.isprintable() else "".join(
        c if c.isprintable() else ascii(c)[1:-1] for c in text)


class LineFormatter(logging.Formatter):
    """``2026-11-26 11:04:22.123 THREAD worker-1 w1.7 USER alice``; tracebacks keep the prefix."""

    def __init__(self, role: str):
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        created = record.created + _CLOCK_OFFSET
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(created))
        prefix = (f"{stamp}.{int(created * 1000) % 1000:03d} {record.levelname:<6} "
                  f"{self.role} {getattr(record, 'session', '-')}")
        text = _message(record)
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        # Every physical line gets the prefix, so grep by session id finds the traceback too.
        return "\n".join(f"{prefix} {line}" for line in text.splitlines() or [""])


def _message(record: logging.LogRecord) -> str:
    """``record.getMessage()`` with every argument escaped: Maildir file names, exception texts
    and client words can hold a newline or an escape sequence (CWE-117); the template is ours.
    Numbers stay numbers for ``%d``."""
    args = record.args
    if not args:
        return str(record.msg)
    if isinstance(args, Mapping):
        return str(record.msg) % {key: _safe(value) for key, value in args.items()}
    return str(record.msg) % tuple(_safe(value) for value in args)


def _safe(value: object) -> object:
    return value if isinstance(value, (int, float)) else escaped(str(value))


class LogFileHandler(logging.Handler):
    """Appends whole lines to a file opened O_APPEND, readable while written.

    Each process keeps its own buffer and writes it with one ``write`` of whole lines, so lines
    of several processes never interleave inside a line. Reopened after rotation.
    """

    def __init__(self, path: str, flush_seconds: float = FLUSH_SECONDS,
                 owners: tuple[int, ...] | None = None):
        super().__init__()
        self.path = path
        self.owners = owners
        self.flush_seconds = flush_seconds
        self.fd = -1
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self.last_flush = time.monotonic()
        self.dropped_lines = 0  # lines a failed write lost (disk full), reported once
        self.write_error: str | None = None  # the failure being reported, until a write works
        self.reopen()

    def reopen(self) -> None:
        """Write what is pending to the old file, then continue in a file opened anew."""
        fd = open_log_file(self.path, self.owners)
        try:
            with self.lock:
                self.flush()
                old, self.fd = self.fd, fd
        except BaseException:
            os.close(fd)
            raise
        if old >= 0:
            os.close(old)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = (self.format(record) + "\n").encode("utf-8", "backslashreplace")
            if self.pending_bytes + len(data) > BUFFER_BYTES:
                self.flush()
            self.pending.append(data)
            self.pending_bytes += len(data)
            if (record.levelno >= logging.ERROR or getattr(record, "flush", False)
                    or not self.flush_seconds):
                self.flush()
            else:
                self.flush_if_due()
        except Exception:
            self.handleError(record)

    def flush_if_due(self) -> None:
        """Called from the loops at least every second: the flush interval is kept when idle."""
        if self.pending and time.monotonic() - self.last_flush >= self.flush_seconds:
            with self.lock:
                self.flush()

    def flush(self) -> None:
        """Write the buffer; never raises. A write that fails (a full disk: ENOSPC, EIO) loses
        only the lines it could not write: they are counted, the failure is told once on
        stderr, and the next flush tries again. The loops that call this (the supervisor's, a
        worker's ticker) must never die of their log."""
        self.last_flush = time.monotonic()
        if not self.pending or self.fd < 0:
            return
        data = memoryview(b"".join(self.pending))
        self.pending.clear()
        self.pending_bytes = 0
        try:
            while data:
                data = data[os.write(self.fd, data):]
        except OSError as exc:
            self._write_failed(exc, bytes(data).count(b"\n") or 1)
            return
        if self.write_error is not None:
            self._write_recovered()

    def _write_failed(self, exc: OSError, lines: int) -> None:
        self.dropped_lines += lines
        if self.write_error is None:
            self.write_error = exc.strerror or str(exc)
            _tell_stderr(f"iupop3 {self._role()}: cannot write the log file {self.path}: "
                         f"{self.write_error}; lines are dropped (and counted) until a write "
                         "succeeds")

    def _role(self) -> str:
        return getattr(self.formatter, "role", "-")

    def _write_recovered(self) -> None:
        """The first write after a failure: say in the log itself what was lost."""
        note = (f"log file writable again: {self.dropped_lines} lines were dropped "
                f"({self.write_error})")
        self.write_error = None
        _tell_stderr(f"iupop3 {self._role()}: {note}")
        record = log.makeRecord(log.name, logging.ERROR, __file__, 0, note, (), None)
        self.pending.append((self.format(record) + "\n").encode("utf-8", "backslashreplace"))
        self.pending_bytes += len(self.pending[-1])
        self.flush()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1
            super().close()


def _tell_stderr(text: str) -> None:
    """One line on stderr (the journal or the terminal), when the log file cannot take it."""
    try:
        os.write(2, (text + "\n").encode("utf-8", "backslashreplace"))
    except OSError:
        pass


def open_nofollow(path: str, flags: int, mode: int) -> int:
    """``os.open`` that refuses a symlink in the last component with a plain message."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, "is a symbolic link; refusing to follow it") from None
        raise


def open_log_file(path: str, owners: tuple[int, ...] | None = None) -> int:
    """Open (or create) a log file so nobody can redirect it (issue 10): never through a
    symlink (O_NOFOLLOW), and only a regular file with one link owned by one of ``owners``
    (default: this process), so a planted hard link to another file is refused too. Root
    opens the log in a directory the service user may write."""
    fd = open_nofollow(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK, 0o640)
    try:
        info = os.fstat(fd)
        allowed = owners if owners is not None else (os.geteuid(),)
        problem = ("is not a regular file" if not stat.S_ISREG(info.st_mode)
                   else f"has {info.st_nlink} links" if info.st_nlink != 1
                   else f"belongs to uid {info.st_uid}" if info.st_uid not in allowed
                   else None)
        if problem:
            raise OSError(errno.EPERM, f"{problem}; refusing to write to it")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


class StdoutHandler(logging.StreamHandler):
    """Standard output, a line at a time (it is often a pipe or a journal)."""

    def __init__(self):
        super().__init__(sys.stdout)

    def flush_if_due(self) -> None:
        pass

    def reopen(self) -> None:
        pass


def configure(role: str, level: str, logfile: str = "",
              flush_seconds: float = FLUSH_SECONDS,
              owners: tuple[int, ...] | None = None) -> logging.Handler:
    """Set up the iupop3 logger of this process; returns its handler. ``owners``: who may own
    an existing log file (open_log_file)."""
    handler: logging.Handler = (LogFileHandler(logfile, flush_seconds, owners) if logfile
                                else StdoutHandler())
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


class SessionLog(logging.LoggerAdapter):
    """Stamps the session id on each line, keeping a caller's own ``extra`` (such as FLUSH):
    before Python 3.13 the stock adapter replaces it."""

    def process(self, msg, kwargs):
        kwargs["extra"] = {**(kwargs.get("extra") or {}), **self.extra}
        return msg, kwargs


def session_logger(session_id: str) -> logging.LoggerAdapter:
    return SessionLog(log, {"session": session_id})
