"""What a client downloads: IUPOP3 1.8's From: patching, X-POP3 lines and foreign messages.

At login the stores ask ``Rewriter.size_of`` (the worker.store ``Sizing``) for each message's
size, cached per worker, so LIST and STAT stay exact without re-reading; the store opens the
file (never this module: it has no path it could follow). RETR and TOP take their bytes from
``render``. Only the header block is parsed; the body passes through in ``READ_CHUNK`` pieces
for the DotStuffer.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO, Protocol

from worker.store import FOREIGN_FOLDER, READ_CHUNK, Opener


class _Identity(Protocol):
    """What the rules are read from: the worker's context (worker/context.py)."""

    settings: Any
    hostname: str
    version: str


CHUNK = READ_CHUNK
HEADER_LIMIT = 1024 * 1024    # a longer header block is cut at its last whole line
CACHE_ENTRIES = 50_000        # about 500 bytes each: 25 MB at most per worker

# RFC 5322 section 2.2: a field name is printable ASCII but ':'; obs-optional allows WSP first.
_FIELD = re.compile(rb"[!-9;-~]+[ \t]*:")
_FROM_FIELD = re.compile(rb"^from[ \t]*:(?P<value>[^\n]*(?:\n[ \t][^\n]*)*)(?P<eol>\n?)",
                         re.IGNORECASE | re.MULTILINE)
_FOLD = re.compile(r"\r?\n(?=[ \t])")

# VMS MAIL From: values (IUPOP3 1.8 README, "Patching of the VMS Mail From: lines"), each with
# the optional quoted personal name VMS MAIL puts after the address.
_VMS_NAME = r"[A-Za-z0-9$_-]+"
_PERSONAL = r'(?:[ \t]+"(?P<personal>[^"]*)")?'
_RULE_QUOTED = re.compile(rf'(?:{_VMS_NAME}(?:%|::))+"(?P<address>[^"]*)"{_PERSONAL}')
_RULE_DECNET = re.compile(rf"(?:{_VMS_NAME}::)*(?P<node>{_VMS_NAME})::(?P<user>{_VMS_NAME})"
                          + _PERSONAL)
_RULE_LOCAL = re.compile(rf"(?P<user>{_VMS_NAME}){_PERSONAL}")

NOTICE = (
    "This message cannot be downloaded with POP3: it is not a text mail message\r\n"
    "(it holds binary data, or has no mail headers), so only its headers are shown.\r\n"
    "It has not been deleted. Once you delete it here, the server keeps it in your\r\n"
    f'mail folder "{FOREIGN_FOLDER[1:]}" (Maildir folder {FOREIGN_FOLDER}). Please fetch it '
    "by other means,\r\nsuch as an IMAP client, or ask your postmaster.\r\n"
).encode("ascii")


# -- the From: rules --------------------------------------------------------------------------
def vms_address(value: str, local_host: str) -> tuple[str, str] | None:
    """(Internet address, personal name) for a VMS MAIL From: value; None when it is not one.

    The README's rules, in its order: FOO%"x" or NODE::"x" gives x unchanged; NODE::USER gives
    user@node (of a DECnet path A::B::USER, the last node); a bare USER gives user@localhost.
    Anything else (an Internet address, a display name with <...>) is not VMS syntax.
    """
    if match := _RULE_QUOTED.fullmatch(value):
        address = match["address"].strip()
        if not address:
            return None
    elif match := _RULE_DECNET.fullmatch(value):
        address = f"{match['user']}@{match['node']}".lower()
    elif match := _RULE_LOCAL.fullmatch(value):
        address = f"{match['user']}@{local_host}".lower()
    else:
        return None
    return address, match["personal"] or ""


def patch_from(value: str, local_host: str, personal_name: bool = False) -> str | None:
    """The new From: value for a VMS one, or None to leave the line alone.

    With PERSONAL_NAME the sender's name is kept as ``"name" <address>``; a quoted address
    that already carries its own ``<...>`` is used as it is.
    """
    found = vms_address(value, local_host)
    if found is None:
        return None
    address, personal = found
    if personal_name and personal.strip() and "<" not in address:
        quoted = personal.strip().replace("\\", "\\\\").replace('"', '\\"')
        return f'"{quoted}" <{address}>'
    return address


# -- the header block -------------------------------------------------------------------------
def header_end(data: bytes, start: int, eof: bool) -> tuple[int, bool]:
    """(offset past the header lines seen so far, whether the header block is complete).

    A header line is a field (``Name:``) or, after the first line, a continuation (leading
    WSP); a leading mbox ``From `` line is tolerated. The first other line (normally the blank
    separator) ends the block. A line is judged only once whole, so ``start`` resumes a scan.
    """
    pos, size = start, len(data)
    while pos < size:
        newline = data.find(b"\n", pos)
        if newline < 0 and not eof:
            return pos, False
        if pos == 0:
            is_header = _FIELD.match(data) is not None or data.startswith(b"From ")
        else:
            is_header = data[pos] in b" \t" or _FIELD.match(data, pos) is not None
        if not is_header:
            return pos, True
        pos = size if newline < 0 else newline + 1
    return pos, eof


def read_head(fh: BinaryIO) -> tuple[bytes, bytes]:
    """(the header block, the bytes read after it); ``fh`` continues where ``rest`` ends."""
    data = b""
    end, done = 0, False
    while not done and len(data) < HEADER_LIMIT:
        more = fh.read(CHUNK)
        data += more
        end, done = header_end(data, end, not more)
    return data[:end], data[end:]


def crlf(data: bytes) -> bytes:
    """Every LF as CRLF exactly once, as the DotStuffer sends it (a bare CR stays)."""
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def _ended(data: bytes) -> bytes:
    """A last line without LF gets the CRLF the DotStuffer would add."""
    return data + b"\r\n" if data and not data.endswith(b"\n") else data


def _unfold(value: bytes) -> str:
    return _FOLD.sub("", value.decode("latin-1")).strip(" \t\r\n")


# -- the X-POP3-ID ----------------------------------------------------------------------------
_ids = {"pid": os.getpid(), "counter": 0}
ID_WIDTH = len("1993-05-12.11:39:23.167.") + 3 + 7 + 8


def _after_fork() -> None:
    _ids["pid"], _ids["counter"] = os.getpid(), 0


os.register_at_fork(after_in_child=_after_fork)


def new_id(slot: int, now: float | None = None) -> str:
    """``YYYY-MM-DD.HH:MM:SS.mmm.<slot:3><pid:7><counter:8>``, always ``ID_WIDTH`` long.

    Two workers never share a (slot, pid) and a pid names one process at a time, so with the
    millisecond in front the ID is unique across workers and restarts (short of the clock
    going back over a recycled pid). Local time, like the log, so an admin can grep for it.
    """
    _ids["counter"] = _ids["counter"] % 99_999_999 + 1
    when_ms = int((time.time() if now is None else now) * 1000)
    seconds, millis = divmod(when_ms, 1000)
    stamp = time.strftime("%Y-%m-%d.%H:%M:%S", time.localtime(seconds))
    return f"{stamp}.{millis:03d}.{slot % 1000:03d}{_ids['pid'] % 10**7:07d}{_ids['counter']:08d}"


# -- sizes, cached ----------------------------------------------------------------------------
# The store's identity of the stored bytes: ("maildir", unique name, st_ino, st_size,
# st_mtime_ns) or ("mbox", UIDL, CRC-32, stored length); the first word keeps them apart.
CacheKey = Hashable


class SizeCache(Protocol):
    """Served (size, foreign) by file identity. A persistent per-maildrop cache can implement
    this too (load at lock, save at unlock); it must be dropped when ``Rules`` change."""

    def get(self, key: CacheKey) -> tuple[int, bool] | None: ...

    def put(self, key: CacheKey, value: tuple[int, bool]) -> None: ...


class MemoryCache:
    """An in-process LRU: a second session in this worker re-reads nothing.

    Maildir files are never rewritten in place (only renamed, which keeps inode, size and
    mtime), so the unique name with inode, size and mtime_ns identifies the content; an mbox
    record is identified by its UIDL, CRC and length.
    """

    def __init__(self, limit: int = CACHE_ENTRIES):
        self.limit = limit
        self._entries: OrderedDict[CacheKey, tuple[int, bool]] = OrderedDict()
        # Scans run in the worker's thread pool, several at once: the LRU moves need a lock.
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: CacheKey) -> tuple[int, bool] | None:
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
            return value

    def put(self, key: CacheKey, value: tuple[int, bool]) -> None:
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            if len(self._entries) > self.limit:
                self._entries.popitem(last=False)


# -- the rewriter -----------------------------------------------------------------------------
def _printable(text: str) -> str:
    """No CR/LF or spaces in a header value that must keep a fixed length."""
    return "".join(c for c in text if c.isprintable() and not c.isspace()) or "localhost"


@dataclass(frozen=True, slots=True)
class Rules:
    """Everything the served bytes depend on besides the message and the X-POP3-ID."""

    host: str
    version: str
    personal_name: bool = False
    ignore_mail11_headers: bool = False

    @classmethod
    def from_context(cls, ctx: _Identity) -> "Rules":
        settings = ctx.settings
        return cls(_printable(ctx.hostname), ctx.version, bool(settings.personal_name),
                   bool(settings.ignore_mail11_headers))


class Rewriter:
    """The served form of messages under one set of ``Rules``, with its size cache."""

    def __init__(self, rules: Rules, cache: SizeCache | None = None):
        self.rules = rules
        self.cache: SizeCache = cache if cache is not None else MemoryCache()
        self.files_read = 0  # cache misses, for tests and XTND STATS
        self._count_lock = threading.Lock()  # a scan measures several files at once (maildir)
        host = rules.host.encode("utf-8")
        self._x_prefix = (b"X-POP3-Server: " + host + b" IUPOP3 V" + rules.version.encode()
                          + b"\r\nX-POP3-ID: ")
        self.x_length = len(self._x_prefix) + ID_WIDTH + 2

    def x_lines(self, xid: str) -> bytes:
        """The X-POP3-Server and X-POP3-ID lines; always ``x_length`` octets."""
        line = self._x_prefix + xid.encode("ascii") + b"\r\n"
        if len(line) != self.x_length:
            raise ValueError(f"X-POP3-ID {xid!r} is not {ID_WIDTH} characters")
        return line

    def served_header(self, header: bytes) -> bytes:
        """The header block as sent, before the X-POP3 lines: CRLF line ends, a VMS From:
        patched with the original kept in X-VMS-From:, the last line ended."""
        vms_line = b""
        match = None if self.rules.ignore_mail11_headers else _FROM_FIELD.search(header)
        if match is not None:
            value = match["value"]
            new = patch_from(_unfold(value), self.rules.host, self.rules.personal_name)
            if new is not None:
                header = (header[:match.start()] + b"From: " + new.encode("latin-1") + b"\n"
                          + header[match.end():])
                vms_line = _ended(crlf(b"X-VMS-From:" + value + match["eol"]))
        return _ended(crlf(header)) + vms_line

    def _foreign_head(self, header: bytes) -> bytes:
        # Headers that hold NUL cannot travel as text either: then none are sent.
        return self.served_header(b"" if b"\0" in header else header)

    # -- sizes ----------------------------------------------------------------------------
    def size_of(self, key: CacheKey, open_stored: Opener) -> tuple[int, bool]:
        """The worker.store ``Sizing`` the stores call: from the cache, else read once."""
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        with open_stored() as fh:
            value = self.examine(fh)
        with self._count_lock:
            self.files_read += 1
        self.cache.put(key, value)
        return value

    def examine(self, fh: BinaryIO) -> tuple[int, bool]:
        header, rest = read_head(fh)
        foreign = not header or b"\0" in header
        length = lf = crlfs = 0
        prev_cr = False
        last = 10
        for chunk in _chunks(rest, fh):
            if foreign or b"\0" in chunk:
                foreign = True
                break  # its body is never sent: no need to read on
            length += len(chunk)
            lf += chunk.count(b"\n")
            if b"\r" in chunk:  # memchr first: counting a two-byte needle is ~20x slower
                crlfs += chunk.count(b"\r\n")
            crlfs += prev_cr and chunk[0] == 10
            prev_cr = chunk[-1] == 13
            last = chunk[-1]
        if foreign:
            return len(self._foreign_head(header)) + self.x_length + 2 + len(NOTICE), True
        body = length + lf - crlfs + (2 if last != 10 else 0)  # the stuffer ends a last line
        return len(self.served_header(header)) + self.x_length + body, False

    # -- bytes ----------------------------------------------------------------------------
    def render(self, fh: BinaryIO, foreign: bool, xid: str,
               body_lines: int | None = None) -> Iterator[bytes]:
        """The message as served (before dot-stuffing): RETR, or TOP with ``body_lines``.

        A foreign message is its headers and the NOTICE, whatever the file holds after them.
        """
        header, rest = read_head(fh)
        if foreign:
            yield self._foreign_head(header) + self.x_lines(xid) + b"\r\n"
            body: Iterable[bytes] = (NOTICE,)
        else:
            yield self.served_header(header) + self.x_lines(xid)
            body = _chunks(rest, fh)
        if body_lines is None:
            yield from body
        else:
            yield from _first_lines(body, body_lines, separator=not foreign)


def _chunks(first: bytes, fh: BinaryIO) -> Iterator[bytes]:
    if first:
        yield first
    while chunk := fh.read(CHUNK):
        yield chunk


def _first_lines(chunks: Iterable[bytes], count: int, separator: bool) -> Iterator[bytes]:
    """The blank separator line (if ``separator`` and present) and ``count`` more lines.

    Whole chunks are passed while they hold fewer line ends than wanted, so the Python-level
    work is per chunk except in the chunk where the count runs out.
    """
    for chunk in chunks:
        if separator:
            separator = False
            if chunk.startswith((b"\n", b"\r\n")):
                cut = chunk.index(b"\n") + 1
                yield chunk[:cut]
                chunk = chunk[cut:]
        if count <= 0:
            return
        if not chunk:
            continue
        lines = chunk.count(b"\n")
        if lines < count:
            count -= lines
            yield chunk
            continue
        pos = -1
        for _ in range(count):
            pos = chunk.index(b"\n", pos + 1)
        yield chunk[:pos + 1]
        return
