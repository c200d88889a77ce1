"""/etc/shadow: one entry read by name, and what its dates and password field say about the account.

The parsing and the verdict are pure functions of a line and a day, so tests feed them synthetic
lines; ``read_shadow`` is the only I/O (a bounded read of a file opened without following a
symlink). shared/accountsource.py calls both. Python's ``spwd`` is deprecated (gone in 3.13), and
its ``getspnam`` uses a static buffer that threads share: we read the file ourselves.
"""

from __future__ import annotations

import os
import stat
import time
from dataclasses import dataclass

SHADOW_PATH = "/etc/shadow"
MAX_SHADOW_BYTES = 64 << 20  # a 100,000-account shadow is about 10 MB
_READ_CHUNK = 1 << 20
_UNSET = -1  # an empty numeric field: shadow(5)'s "feature disabled"


class ShadowError(OSError):
    """The shadow file cannot be read safely; the message says why, for the log."""


@dataclass(frozen=True)
class ShadowEntry:
    """One line of shadow(5); day numbers count from 1970-01-01, -1 where the field is empty."""

    name: str
    password: str  # crypt(3) hash, possibly prefixed by "!" (locked), or "*", "!", ""
    last_change: int = _UNSET
    min_days: int = _UNSET
    max_days: int = _UNSET
    warn_days: int = _UNSET
    inactive_days: int = _UNSET
    expire_day: int = _UNSET

    @property
    def usable_hash(self) -> str:
        """The crypt(3) hash to check a password against ("" if there is none).

        ``usermod -L`` puts "!" in front of the hash: checking the hash behind it costs what
        checking an open account costs, so a locked account's refusal takes as long.
        """
        candidate = self.password.lstrip("!")
        return candidate if candidate.startswith("$") or len(candidate) == 13 else ""


class ShadowLineError(ValueError):
    """A shadow line that cannot be read: its account is refused (fail closed)."""


def _day(text: str, field_name: str) -> int:
    if text == "":
        return _UNSET
    if not text.isascii() or not text.isdigit() or len(text) > 9:
        raise ShadowLineError(f"field {field_name} is {text!r}, not a day number")
    return int(text)


def parse_shadow_line(line: str) -> ShadowEntry:
    """One ``name:password:lastchg:min:max:warn:inactive:expire:reserved`` line."""
    fields = line.rstrip("\r\n").split(":")
    if len(fields) != 9:
        raise ShadowLineError(f"{len(fields)} fields instead of 9")
    name, password, *days, _reserved = fields
    names = ("lastchg", "min", "max", "warn", "inactive", "expire")
    numbers = [_day(text, field_name) for text, field_name in zip(days, names)]
    return ShadowEntry(name, password, *numbers)


def today() -> int:
    """Today's day number as shadow(5) and pam_unix count it: UTC days since the epoch."""
    return int(time.time() // 86400)


def shadow_refusal(entry: ShadowEntry, day: int) -> str | None:
    """Why the account may not log in on ``day`` by its shadow entry, or None.

    The order and arithmetic follow pam_unix's check_shadow_expiry (Linux-PAM passverify.c),
    so ``shadow:`` and ``pam:`` agree on every account. POP3 cannot change a password, so a
    password that must be changed (PAM_NEW_AUTHTOK_REQD) is a refusal, as PWD_EXPIRED was.
    """
    if entry.password.startswith("!"):
        return "locked (password starts with '!')"
    if not entry.usable_hash:
        return f"no usable password ({entry.password[:1] or 'empty'})"
    if entry.expire_day != _UNSET and day >= entry.expire_day:
        return f"account expired on day {entry.expire_day}"
    if entry.last_change == 0:
        return "password must be changed (last change 0)"
    if entry.last_change == _UNSET or day < entry.last_change:
        return None  # aging off, or a change dated in the future: pam_unix lets it pass
    age = day - entry.last_change
    if entry.max_days != _UNSET and entry.inactive_days != _UNSET \
            and age > entry.max_days + entry.inactive_days:
        return (f"password expired past the inactive period "
                f"({age} days old, max {entry.max_days} + inactive {entry.inactive_days})")
    if entry.max_days != _UNSET and age > entry.max_days:
        return f"password expired ({age} days old, max {entry.max_days})"
    return None


def valid_name(name: str) -> bool:
    """Whether ``name`` can be looked up in the file at all: no separator, no NIS marker."""
    return bool(name) and name.isprintable() and ":" not in name and name[0] not in "+-"


def find_entry(data: bytes, name: str) -> ShadowEntry | None:
    """The first entry for ``name`` in the file's bytes (as getspnam), or None.

    Raises ShadowLineError when the line exists but cannot be read.
    """
    if not valid_name(name):
        return None
    key = name.encode("utf-8") + b":"
    if data.startswith(key):
        start = 0
    else:
        start = data.find(b"\n" + key) + 1
        if start == 0:
            return None
    end = data.find(b"\n", start)
    line = data[start:] if end < 0 else data[start:end]
    try:
        return parse_shadow_line(line.decode("utf-8"))
    except UnicodeDecodeError:
        raise ShadowLineError("not UTF-8") from None


def entries(data: bytes) -> list[ShadowEntry]:
    """Every readable entry (for choosing a dummy hash); unreadable lines are skipped."""
    found = []
    for raw in data.split(b"\n"):
        if not raw or raw[:1] in (b"+", b"-", b"#"):
            continue
        try:
            found.append(parse_shadow_line(raw.decode("utf-8")))
        except (ShadowLineError, UnicodeDecodeError):
            continue
    return found


def read_shadow(path: str = SHADOW_PATH, limit: int = MAX_SHADOW_BYTES) -> bytes:
    """The file's bytes, opened without following a symlink, at most ``limit`` of them.

    Blocking: the worker calls it from its thread pool. A symlink, a non-regular file or one
    larger than ``limit`` is a ShadowError rather than something read partly.
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise ShadowError(f"cannot open {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ShadowError(f"{path} is not a regular file")
        if info.st_size > limit:
            raise ShadowError(f"{path} is larger than {limit} bytes")
        chunks: list[bytes] = []
        size = 0
        while chunk := os.read(fd, _READ_CHUNK):
            size += len(chunk)
            if size > limit:  # grew while we read it
                raise ShadowError(f"{path} is larger than {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as exc:
        if isinstance(exc, ShadowError):
            raise
        raise ShadowError(f"cannot read {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
