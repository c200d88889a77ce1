"""Coverage-guided fuzzing of the mbox parser (worker.mboxformat.parse and visible, the entry
points worker.mbox scans a spool with), on the input as a spool file and as one message.

Run by ``make fuzz`` (atheris). A crash is an exception, records that overlap or leave the
file, a parse that depends on the read-block size, duplicate UIDLs, or a message that does not
come back from the record written for it.
"""

from __future__ import annotations

import io
import os
import sys

import atheris

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

with atheris.instrument_imports():
    from worker import mboxformat


def layout(data: bytes, block: int) -> list[tuple[int, ...]]:
    mboxformat.BLOCK, saved = block, mboxformat.BLOCK
    try:
        return [(r.start, r.body, r.end, r.tail, r.size, r.crc)
                for r in mboxformat.parse(io.BytesIO(data))]
    finally:
        mboxformat.BLOCK = saved


def TestOneInput(data: bytes) -> None:
    records = list(mboxformat.parse(io.BytesIO(data)))
    pos = 0
    for record in records:
        if not pos <= record.start <= record.body <= record.end <= len(data):
            raise AssertionError(f"record out of order or bounds: {record}")
        pos = record.end + record.tail
    if pos > len(data):
        raise AssertionError("records run past the end of the file")
    uids = [uid for _, uid in mboxformat.visible(records)]
    if len(uids) != len(set(uids)):
        raise AssertionError(f"duplicate UIDLs {uids}")
    if layout(data, 64) != layout(data, mboxformat.BLOCK):
        raise AssertionError("the parse depends on the read-block size")
    # One message written as a record reads back as itself (with a final newline added).
    spool = mboxformat.format_record(data, "fuzz@example.org", 1_790_000_000)
    found = list(mboxformat.visible(mboxformat.parse(io.BytesIO(spool))))
    if data.strip() or len(found):
        if len(found) != 1:
            raise AssertionError(f"one message gave {len(found)} records")
        record = found[0][0]
        text = mboxformat.unquote_text(spool[record.body:record.end])
        ended = data + b"\n" if data and not data.endswith(b"\n") else data
        if text != ended:
            raise AssertionError("message changed by a write and a read")


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
