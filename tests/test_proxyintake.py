"""The supervisor's PROXY header intake under abuse: a read error costs one
connection, never the supervisor, and a flood of bad headers is not a flood of log lines."""

from __future__ import annotations

import logging
import re
import selectors
import socket
import time

from conftest import RawClient
from processes import wait_until
from shared import settings as settings_mod
from supervisor.proxyintake import Pending, ProxyIntake, RefusalLog

FLOOD = 200


def _intake() -> tuple[ProxyIntake, list[int]]:
    settings, _ = settings_mod.resolve(["-users", "u", "-trusted-networks", "127.0.0.1"])
    refused: list[int] = []
    intake = ProxyIntake(settings, selectors.DefaultSelector(), lambda *a: None,
                         lambda: refused.append(1))
    return intake, refused


def test_consuming_read_errors_refuse_the_connection():
    """The read that takes the peeked header off a socket refuses that connection when it
    fails (a closed descriptor) or comes back short, and raises nothing."""
    intake, refused = _intake()
    ours, theirs = socket.socketpair()
    ours.close()
    assert not intake.consume(Pending(ours, -1, 0, "127.0.0.1", 0.0), 5)
    ours, theirs = socket.socketpair()
    theirs.sendall(b"PRO")
    assert not intake.consume(Pending(ours, ours.fileno(), 0, "127.0.0.1", 0.0), 5)
    assert ours.fileno() == -1  # closed by the refusal
    assert len(refused) == 2


def test_refusals_are_summed_up_once_a_second_per_reason(caplog):
    """The first refusal of a reason is logged at once, the rest of its second are counted
    in one line (numbers in the text do not make new reasons); other reasons are apart."""
    now = [100.0]
    refusals = RefusalLog(clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="iupop3"):
        for length in range(3000, 3050):
            refusals.refused("127.0.0.1", f"v2 header of {length} bytes is larger than 2048")
        refusals.refused("127.0.0.2", "the peer is not in -trusted-networks")
        assert refusals.next_due() == 101.0
        refusals.flush()
        now[0] = 101.0
        refusals.flush()
        assert refusals.next_due() is None
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "PROXY header refused from 127.0.0.1: v2 header of 3000 bytes is larger than 2048; "
        "connection closed",
        "PROXY header refused from 127.0.0.2: the peer is not in -trusted-networks; "
        "connection closed",
        "PROXY header refused 49 more times within 1s (the last from 127.0.0.1): v2 header of "
        "3049 bytes is larger than 2048; connections closed"], lines


def _closed_unanswered(client: RawClient) -> bool:
    """Closed with no greeting (reset, too: the bytes it sent were left unread)."""
    try:
        return client.sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_a_flood_of_bad_headers_is_counted_not_logged_line_by_line(start_server):
    """200 connections that send no PROXY header are all refused and all accounted for in
    the log, in at most two lines per second of the flood, not one line each."""
    server = start_server("-proxy-protocol", "-trusted-networks", "127.0.0.1")
    started = time.monotonic()
    clients = []
    for _ in range(FLOOD):
        client = RawClient(server.port, 10)
        client.send(b"USER alice\r\n")
        clients.append(client)
    sent = time.monotonic() - started

    def accounted() -> tuple[int, int]:
        single = re.findall(r"PROXY header refused from 127\.0\.0\.1: not a PROXY header",
                            server.output)
        summed = [int(n) for n in re.findall(
            r"PROXY header refused (\d+) more times within 1s \(the last from 127\.0\.0\.1\): "
            r"not a PROXY header", server.output)]
        return len(single) + sum(summed), len(single) + len(summed)
    assert wait_until(lambda: accounted()[0] >= FLOOD, 15), accounted()
    elapsed = time.monotonic() - started
    total, lines = accounted()
    assert total == FLOOD
    assert all(_closed_unanswered(c) for c in clients)
    assert lines <= 2 + 2 * elapsed, (lines, elapsed)
    print(f"\nintake flood: {FLOOD} connections sent in {sent:.2f}s, all accounted for "
          f"after {elapsed:.2f}s in {lines} log lines")
