"""Coverage-guided fuzzing of the PROXY protocol parser (shared.proxyprotocol), fed as the
supervisor feeds it: the bytes seen so far, in arbitrary pieces.

Run by ``make fuzz`` (atheris). A crash is an exception other than ProxyError, a length that
reaches past the bytes given or changes with how they were cut, or a header that does not parse
to the same result twice.
"""

from __future__ import annotations

import os
import sys

import atheris

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

with atheris.instrument_imports():
    from shared import proxyprotocol


def length_in_pieces(data: bytes, step: int) -> int | None:
    """What the supervisor would settle on, reading ``step`` bytes at a time."""
    for end in range(step, len(data) + step, step):
        length = proxyprotocol.header_length(data[:end])
        if length is not None:
            return length
    return None


def TestOneInput(data: bytes) -> None:
    step = 1 + (data[-1] % 16 if data else 0)
    try:
        length = proxyprotocol.header_length(data)
    except proxyprotocol.ProxyError:
        return
    if length is None:
        return
    if length > len(data):
        raise AssertionError("header length past the bytes seen")
    if length_in_pieces(data, step) != length:
        raise AssertionError("the length depends on how the bytes arrived")
    try:
        header = proxyprotocol.parse(data[:length])
    except proxyprotocol.ProxyError:
        return
    if proxyprotocol.parse(header.raw) != header:
        raise AssertionError("parsing is not repeatable")


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
