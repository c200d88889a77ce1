"""The bytes of a multi-line reply: CRLF line ends and dot-stuffing, chunk by chunk.

RFC 1939 section 3: every line ends in CRLF, a line that starts with "." gets one more, and the
reply ends with CRLF.CRLF. The stuffer keeps "at start of line" and a trailing CR across chunks,
so a message is streamed in fixed-size pieces without a per-line Python loop.

``DotStuffer`` is the C twin from worker/_wirestuff.c when it was built at install (an optional
extension, pyproject.toml's ext-modules), else ``PyDotStuffer``, the reference: same bytes for
any input and chunking (tests/test_wire.py). ``IUPOP3_PURE_WIRE=1`` in the environment forces
the Python one.
"""

from __future__ import annotations

import os

TERMINATOR = b".\r\n"
PURE_WIRE_ENV = "IUPOP3_PURE_WIRE"


class PyDotStuffer:
    """Feed raw message chunks, get wire chunks; ``finish`` ends the reply (the reference)."""

    __slots__ = ("at_line_start", "carry_cr")

    def __init__(self) -> None:
        self.at_line_start = True
        self.carry_cr = False

    def feed(self, chunk: bytes) -> bytes:
        if self.carry_cr:
            chunk = b"\r" + chunk
            self.carry_cr = False
        if chunk.endswith(b"\r"):
            # Its LF may start the next chunk: decide CR vs CRLF then.
            chunk = chunk[:-1]
            self.carry_cr = True
        if not chunk:
            return b""
        # Bare LF -> CRLF exactly once; a CRLF stays one CRLF, a bare CR stays as it is.
        # Each pass copies the chunk, so the CRLF pass runs only when a CR is there at all
        # (a one-byte search is memchr, ~25 GB/s; a two-byte one ~0.7): a typical LF-only
        # message costs one search for "\n." and one copy.
        if b"\r" in chunk:
            chunk = chunk.replace(b"\r\n", b"\n")
        data = chunk.replace(b"\n", b"\r\n")
        if b"\n." in data:
            data = data.replace(b"\r\n.", b"\r\n..")
        if self.at_line_start and data[:1] == b".":
            data = b"." + data
        self.at_line_start = data[-1:] == b"\n"
        return data

    def finish(self) -> bytes:
        """The rest of the reply: a held CR, a CRLF if the last line had none, and ".CRLF"."""
        tail = b""
        if self.carry_cr:
            tail = b"\r"
            self.carry_cr = False
            self.at_line_start = False
        if not self.at_line_start:
            tail += b"\r\n"
        self.at_line_start = True
        return tail + TERMINATOR


def _accelerated() -> type | None:
    """The C stuffer, or None when it was not built (no compiler or headers) or is refused."""
    if os.environ.get(PURE_WIRE_ENV, "") not in ("", "0"):
        return None
    try:
        from worker._wirestuff import DotStuffer as CDotStuffer
    except ImportError:
        return None
    return CDotStuffer


C_DOT_STUFFER = _accelerated()
DotStuffer = C_DOT_STUFFER or PyDotStuffer
IMPLEMENTATION = "C" if C_DOT_STUFFER is not None else "Python"


def stuff_whole(data: bytes) -> bytes:
    """A complete multi-line reply body for ``data`` (used by tests and short replies)."""
    stuffer = DotStuffer()
    return stuffer.feed(data) + stuffer.finish()
