"""The mbox format of a Unix mail spool: records, mboxrd quoting, UIDLs (for worker.mbox).

A record is a ``From `` line, the message with every ``>*From `` line given one more ``>``
(mboxrd), a newline if the message lacks one, and a blank line. A ``From `` line separates
only at the start of the file or after a blank line, so an unquoted "From " inside a paragraph
(from a careless writer) stays text. Reading removes one ``>``; Content-Length (mboxcl) is
ignored, as Python's mailbox and mutt ignore it.

UIDL: a valid ``X-UIDL:`` header (qpopper's), else ``M`` and 40 hex digits of SHA-256 over the
``From `` line, the header block without the headers MUAs rewrite (Status, X-Status,
X-Keywords, X-UID, X-IMAP*, Content-Length, Lines, X-Mozilla-*), and the body, with ``>``
quoting and CRLF normalised. Limits: a MUA that edits other headers or the body changes the
UIDL; exact duplicates (or a repeated X-UIDL) get ``-2``, ``-3``... in file order, so deleting
the first of two identical messages renames the second; a message quoted differently by two
writers (``From`` vs ``>From``) hashes the same.
"""

from __future__ import annotations

import hashlib
import re
import time
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from worker.storebase import SPOOL_CHUNK, UIDL_PATTERN

BLOCK = SPOOL_CHUNK            # the parser reads this much at a time, cut at a line end
HEADER_MAX = 256 * 1024        # a header block without a blank line in sight ends here
_BLANK = (b"\n", b"\r\n")
_QUOTED = re.compile(rb">*From ")
_QUOTED_LINES = re.compile(rb"(?m)^>+From ")
_QUOTE_RUN = re.compile(rb"(?m)^>+(?=From )")
_TO_QUOTE = re.compile(rb"(?m)^(?=>*From )")
_UNQUOTE = re.compile(rb"(?m)^>(?=>*From )")
_UIDL_OK = re.compile(UIDL_PATTERN.encode("ascii"))
_XUIDL = re.compile(rb"(?im)^x-uidl[ \t]*:[ \t]*(\S+)[ \t\r]*$")
# Headers (with their folded lines) that MUAs and IMAP servers rewrite in a spool they
# manage: left out of the UIDL digest.
_STATE_LINES = re.compile(
    rb"(?im)^(?:status|x-status|x-keywords|x-uid|x-uidl|x-imap|x-imapbase|content-length|lines"
    rb"|x-mozilla-status|x-mozilla-status2|x-mozilla-keys)[ \t]*:[^\n]*(?:\n[ \t][^\n]*)*\n?")
_INTERNAL = b"FOLDER INTERNAL DATA"  # UW IMAP's pseudo message at the top of a managed mbox
_IMAP = re.compile(rb"(?im)^x-imap(?:base)?[ \t]*:")


def from_line(sender: str = "MAILER-DAEMON", when: float | None = None) -> bytes:
    """A separator line as delivery agents write it: ``From sender ctime``."""
    return f"From {sender} {time.asctime(time.localtime(when))}\n".encode()


def quote(message: bytes) -> bytes:
    """mboxrd quoting: every line matching ``>*From `` gets one more ``>``."""
    return _TO_QUOTE.sub(b">", message)


def unquote(line: bytes) -> bytes:
    """One stored line as the message had it (one ``>`` less on a quoted From line)."""
    return line[1:] if line[:1] == b">" and _QUOTED.match(line, 1) else line


def unquote_text(text: bytes) -> bytes:
    """Whole stored lines (``text`` starts at a line start) as the message had them."""
    return _UNQUOTE.sub(b"", text) if b"From " in text else text


def format_record(message: bytes, sender: str = "MAILER-DAEMON",
                  when: float | None = None) -> bytes:
    """One message as an mbox record: separator, quoted text, final newline, blank line."""
    text = quote(message)
    if text and not text.endswith(b"\n"):
        text += b"\n"
    return from_line(sender, when) + text + b"\n"


@dataclass(slots=True)
class Record:
    """Where one record lies in the spool and what identifies it."""

    start: int            # offset of its From line (of the file, for text before any)
    body: int             # offset of the message text, just past the From line
    end: int              # offset past the text, before the separating blank line
    tail: int = 0         # length of that blank line (0 when the file ends without one)
    size: int = 0         # POP3 size: unquoted, every line end CRLF
    crc: int = 0          # crc32 of [start, end): notices a spool rewritten meanwhile
    digest: str = ""
    xuidl: str = ""
    foreign: bool = False  # NUL bytes: IUPOP3's MAIL/FOREIGN
    internal: bool = False
    blank: bool = True     # nothing but white space


class _Builder:
    """Accumulates one record: the header block whole (at most HEADER_MAX), the body in bulk.

    Every result depends only on the record's bytes, never on where read blocks fall.
    """

    def __init__(self, start: int, line: bytes, first: bool):
        self.rec = Record(start, start + len(line), start + len(line))
        self.rec.crc = zlib.crc32(line)
        self.hash = hashlib.sha256(line.rstrip(b"\r\n") + b"\n")
        self.first = first
        self.held: list[bytes] | None = []  # header bytes so far; None once in the body
        self.last = b"\n"

    def feed(self, data: bytes) -> None:
        """Take the next bytes of the record's text; they always end at a line end."""
        if self.held is not None:
            self.held.append(data)
            head = b"".join(self.held)
            end = _header_end(head)
            if end < 0 and len(head) <= HEADER_MAX:
                self.held = [head]
                return
            if end < 0 or end > HEADER_MAX:  # no blank line within the cap: cut at a line
                # end inside it, so the cut depends on the bytes, never on read blocks
                end = head.rfind(b"\n", 0, HEADER_MAX) + 1 or head.find(b"\n") + 1 or len(head)
            self._headers(head[:end])
            data = head[end:]
        if data:
            self._account(data)
            self.hash.update(_normal(data))

    def _headers(self, head: bytes) -> None:
        self.held = None
        self._account(head)
        self.hash.update(_normal(_STATE_LINES.sub(b"", head)))
        found = _XUIDL.search(head)
        if found and _UIDL_OK.fullmatch(found[1]):
            self.rec.xuidl = found[1].decode("ascii")
        if self.first and _INTERNAL in head and _IMAP.search(head):
            self.rec.internal = True

    def _account(self, data: bytes) -> None:
        rec = self.rec
        rec.end += len(data)
        rec.crc = zlib.crc32(data, rec.crc)
        quoted = len(_QUOTED_LINES.findall(data)) if b"From " in data else 0
        rec.size += len(data) + data.count(b"\n") - data.count(b"\r\n") - quoted
        if b"\0" in data:
            rec.foreign = True
        if rec.blank and data.strip():
            rec.blank = False
        self.last = data[-1:] or self.last

    def finish(self, tail: int) -> Record:
        if self.held:
            self._headers(b"".join(self.held))
        if self.last != b"\n":
            self.rec.size += 2  # the CRLF the DotStuffer adds to an unended last line
        self.rec.tail = tail
        self.rec.digest = self.hash.hexdigest()[:40]
        return self.rec


def _header_end(data: bytes) -> int:
    """Offset just past the blank line that ends the headers, or -1 if ``data`` has none."""
    for blank in _BLANK:
        if data.startswith(blank):
            return len(blank)
    ends = [i + len(mark) for mark in (b"\n\n", b"\n\r\n") if (i := data.find(mark)) >= 0]
    return min(ends) if ends else -1


def _normal(data: bytes) -> bytes:
    """Text as the UIDL digest sees it: no From quoting, LF line ends."""
    if b"From " in data:
        data = _QUOTE_RUN.sub(b"", data)
    return data.replace(b"\r\n", b"\n") if b"\r" in data else data


def _separators(data: bytes) -> Iterator[tuple[int, int]]:
    """(offset of a From line, length of the blank line before it) for each separator in
    ``data`` after its first line; ``data`` starts at a line start."""
    i = data.find(b"\nFrom ")
    while i >= 0:  # ends: each turn searches further on
        start = data.rfind(b"\n", 0, i) + 1  # the line before the From line is data[start:i+1]
        if data[start:i] in (b"", b"\r"):
            yield i + 1, i + 1 - start
        i = data.find(b"\nFrom ", i + 1)


def _blocks(fh: BinaryIO) -> Iterator[bytes]:
    """The file from its start in blocks of whole lines (the last may lack its line end)."""
    fh.seek(0)
    parts: list[bytes] = []  # a line longer than a block gathers here, joined once
    while block := fh.read(BLOCK):  # ends at the end of the file
        cut = block.rfind(b"\n") + 1
        if not cut:
            parts.append(block)
            continue
        parts.append(block[:cut])
        yield b"".join(parts)
        parts = [block[cut:]] if cut < len(block) else []
    if parts:
        yield b"".join(parts)


def parse(fh: BinaryIO) -> Iterator[Record]:
    """The records of an mbox file from its start, lazily (a caller may stop early).

    A blank line is held back until the next line shows whether it separates records.
    """
    builder = _Builder(0, b"", first=True)  # text before the first From line, if any
    offset = 0       # file offset of data[0]
    pending = b""    # a blank line that ended the previous block
    for data in _blocks(fh):
        pos = 0
        if data.startswith(b"From ") and (offset == 0 or pending):
            seps: Iterable[tuple[int, int]] = [(0, len(pending))]
        else:
            seps = []
            if pending:
                builder.feed(pending)
        pending = b""
        for at, blank in (*seps, *_separators(data)):
            if at - blank > pos:
                builder.feed(data[pos:at - blank])
            record = builder.finish(blank)
            if record.end > record.start:
                yield record
            line_end = data.find(b"\n", at) + 1 or len(data)
            builder = _Builder(offset + at, data[at:line_end], first=offset + at == 0)
            pos = line_end
        last = data.rfind(b"\n", pos, len(data) - 1) + 1 or pos
        if data[last:] in _BLANK:
            data, pending = data[:last], data[last:]
        if len(data) > pos:
            builder.feed(data[pos:])
        offset += len(data) + len(pending)
    record = builder.finish(len(pending))
    if record.end > record.start or record.tail:
        yield record


def visible(records: Iterable[Record]) -> Iterator[tuple[Record, str]]:
    """The records a POP3 client sees, each with its UIDL (unique within the spool)."""
    used: set[str] = set()
    for record in records:
        if record.internal or (record.start == record.body and record.blank):
            continue
        uid = record.xuidl if record.xuidl and record.xuidl not in used else "M" + record.digest
        base, n = uid, 1
        while uid in used:  # ends: each turn tries a new suffix, at most len(used) are taken
            n += 1
            uid = f"{base}-{n}"
        used.add(uid)
        yield record, uid
