"""The C dot-stuffer (worker/_wirestuff.c) against the Python reference (worker.wire).

Differential: the same bytes and the same state for any input and any chunking; the build
check: under CI the accelerator must be loaded; and a real server sends the same RETR and TOP
bytes with IUPOP3_PURE_WIRE=1 as without.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hypothesis import given, settings, strategies as st

from tests.conftest import ROOT, RawClient, write_message
from worker import wire
from worker.storebase import READ_CHUNK
from worker.wire import PyDotStuffer

try:  # whatever IUPOP3_PURE_WIRE says: the differential tests compare the two classes
    from worker._wirestuff import DotStuffer as CStuffer
except ImportError:
    CStuffer = None
needs_c = pytest.mark.skipif(CStuffer is None, reason="worker._wirestuff not built here (no "
                             "compiler or no Python headers at install)")

# Line-end and dot heavy: the bytes the stuffer treats specially, plus one it does not.
_special = st.binary(max_size=40).map(lambda b: bytes(b"\r\n.x"[c % 4] for c in b))
_chunk = st.one_of(_special, st.binary(max_size=60), st.just(b""), st.just(b"\r"),
                   _special.map(lambda b: b + b"\r"))


def _run(cls, chunks: list[bytes]) -> tuple[list[bytes], list[tuple[bool, bool]]]:
    """Each chunk's output (then finish's) and the state after each call."""
    stuffer, outs, states = cls(), [], []
    for chunk in chunks:
        outs.append(stuffer.feed(chunk))
        states.append((stuffer.at_line_start, stuffer.carry_cr))
    outs.append(stuffer.finish())
    states.append((stuffer.at_line_start, stuffer.carry_cr))
    return outs, states


@needs_c
@settings(max_examples=2000, deadline=None)
@given(st.lists(_chunk, max_size=12))
def test_c_and_python_stuffers_agree_chunk_by_chunk(chunks):
    """Same bytes out of every feed and finish, same state after each, for any chunking."""
    assert _run(CStuffer, chunks) == _run(PyDotStuffer, chunks)


@needs_c
@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=3000), st.lists(st.integers(0, 700), max_size=10))
def test_c_and_python_stuffers_agree_on_any_cut_of_any_bytes(data, cuts):
    """Arbitrary bytes cut anywhere (empty pieces included) give the same wire bytes."""
    chunks, pos = [], 0
    for cut in cuts:
        chunks.append(data[pos:pos + cut])
        pos += cut
    chunks.append(data[pos:])
    assert _run(CStuffer, chunks)[0] == _run(PyDotStuffer, chunks)[0]


@needs_c
def test_c_stuffer_edge_cases_exact_bytes():
    """Held CR then LF, dot or nothing; a dot first line; bare CR kept; worst-case growth."""
    cases = [
        ([b"a\r", b"\n.b"], b"a\r\n..b\r\n.\r\n"),
        ([b"a\r", b".b"], b"a\r.b\r\n.\r\n"),
        ([b"a\r", b"", b""], b"a\r\r\n.\r\n"),
        ([b"\r"], b"\r\r\n.\r\n"),
        ([b".", b".", b"\n."], b"...\r\n..\r\n.\r\n"),
        ([b"\n." * 1000], b"\r\n.." * 1000 + b"\r\n.\r\n"),
        ([b"x\r\r\n\r"], b"x\r\r\n\r\r\n.\r\n"),
        ([], b".\r\n"),
    ]
    for chunks, wire_bytes in cases:
        assert b"".join(_run(CStuffer, chunks)[0]) == wire_bytes, chunks
        assert b"".join(_run(PyDotStuffer, chunks)[0]) == wire_bytes, chunks


@needs_c
def test_c_stuffer_takes_any_buffer_and_refuses_other_types():
    """bytearray and memoryview feed like bytes; a str is a TypeError, the state untouched."""
    stuffer = CStuffer()
    assert stuffer.feed(bytearray(b".a\n")) == b"..a\r\n"
    assert stuffer.feed(memoryview(b"xx.b\n")[2:]) == b"..b\r\n"
    with pytest.raises(TypeError):
        stuffer.feed(".c\n")
    assert stuffer.at_line_start and not stuffer.carry_cr


@needs_c
def test_c_stuffer_large_chunk_matches_python():
    """Several MiB in one feed (line ends of every kind) give the reference's bytes."""
    block = b"From: x\n.dot\r\nbare\rcr\n..\n\nlong " + b"y" * 5000 + b"\n"
    data = block * (5 * 1024 * 1024 // len(block)) + b"\r"
    assert _run(CStuffer, [data, data])[0] == _run(PyDotStuffer, [data, data])[0]


def test_accelerator_is_loaded_under_ci():
    """A CI build that silently fell back to the Python stuffer fails here, loudly."""
    if not os.environ.get("CI"):
        pytest.skip("CI not set: a machine without a compiler may serve with the Python stuffer")
    assert CStuffer is not None, "worker._wirestuff was not built (see pip's output)"
    if not os.environ.get(wire.PURE_WIRE_ENV):
        assert wire.IMPLEMENTATION == "C"


def _implementation(env: dict[str, str]) -> str:
    code = "from worker import wire; print(wire.IMPLEMENTATION)"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env=dict(os.environ, **env))
    return done.stdout.strip()


def test_pure_wire_environment_forces_python():
    """IUPOP3_PURE_WIRE=1 serves with the reference stuffer; 0 or unset takes C if built."""
    assert _implementation({wire.PURE_WIRE_ENV: "1"}) == "Python"
    assert _implementation({wire.PURE_WIRE_ENV: "0"}) == ("C" if CStuffer else "Python")


# -- the real server, both ways ------------------------------------------------------------
def _tricky_messages() -> list[bytes]:
    """Messages whose line ends and dots fall on the server's read boundaries."""
    head = b"From: a@example.org\nSubject: wire\n\n"
    body = b"".join(b".line %d\n..\r\n.\n\rbare\r\n" % i for i in range(40000))
    cr_at_cut = bytearray(head + body)
    cr_at_cut[READ_CHUNK - 1:READ_CHUNK + 2] = b"\r\n."   # a CRLF across the second read
    bare_cr_cut = bytearray(head + body)
    bare_cr_cut[READ_CHUNK - 1:READ_CHUNK + 1] = b"\r."   # a bare CR ends the first read
    return [head + b".\n.\n", head + b"no final newline\r", bytes(cr_at_cut),
            bytes(bare_cr_cut), head + body + b"."]


def _downloads(server, count: int) -> list[bytes]:
    """Every message's RETR and a TOP of each, raw, without the per-download X-POP3 lines."""
    client = RawClient(server.port, timeout=30)
    client.line()
    assert client.command("USER alice").startswith(b"+OK")
    assert client.command("PASS wonderland").startswith(b"+OK")
    got = []
    for n in range(1, count + 1):
        for command in (f"RETR {n}", f"TOP {n} 3"):
            assert client.command(command).startswith(b"+OK")
            got.append(b"\r\n".join(line for line in client.multiline()
                                   if not line.startswith(b"X-POP3-")))
    client.command("QUIT")
    client.close()
    return got


def test_server_sends_same_bytes_with_pure_python_wire(start_server):
    """RETR and TOP of chunk-boundary messages: the C path and IUPOP3_PURE_WIRE=1 agree."""
    messages = _tricky_messages()
    results = []
    for env in ({wire.PURE_WIRE_ENV: "1"}, {wire.PURE_WIRE_ENV: "0"}):
        server = start_server(env=env, deliver=False)
        for n, text in enumerate(messages, 1):
            write_message(server.maildir("alice"), f"{1700000000 + n}.M{n}.wire", text)
        results.append(_downloads(server, len(messages)))
    assert results[0] == results[1]
    body = messages[2].split(b"\n\n", 1)[1]
    reference = PyDotStuffer()
    stuffed = (reference.feed(body) + reference.finish())[:-len(b"\r\n.\r\n")]
    assert results[1][4].endswith(stuffed)
