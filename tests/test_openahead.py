"""Open-ahead (worker/openahead.py): one pool round trip opens a run of messages for RETR/TOP.

Sans-IO sessions on a real Maildir count the pool calls and the descriptors held; a real
server shows an in-order download with DELEs leaves its worker with no extra descriptor.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shared import settings as settings_mod
from shared.stats import StatsArea
from shared.users import parse_users
from tests.conftest import RawClient, sample, write_message
from tests.processes import wait_until
from tests.test_mbox import spool_of
from worker import openahead
from worker.context import build_context
from worker.pop3 import Session
from worker.wire import stuff_whole


class CountingDrop:
    """A logged-in sans-IO Session on a Maildir of ``count`` messages, pool calls counted."""

    def __init__(self, root: Path, count: int, size: int = 200):
        self.maildir = root / "alice"
        for n in range(1, count + 1):
            write_message(self.maildir, f"{1700000000 + n}.M{n}.ahead", sample(n, f"body {n} " + "x" * size))
        self.calls: list[str] = []
        values = dict(users="unused", mail=f"maildir:{root}/%u", hostname="pop.example.org",
                      maxmsg=0)
        self.ctx = build_context(settings_mod.Settings(**values), StatsArea.create(2, 0), 1,
                                 parse_users("alice:{PLAIN}secret::::::\n"),
                                 offload=self._offload)
        self.out: list[bytes] = []
        self.session = Session(self.ctx, self.out.append, "127.0.0.1:4000", "t")
        assert self.talk("USER alice").startswith(b"+OK")
        assert self.talk("PASS secret").startswith(b"+OK")
        self.calls.clear()

    def _offload(self, function, *args):
        self.calls.append(function.__name__)
        return function(*args)

    def talk(self, line: str) -> bytes:
        self.out.clear()
        self.session.handle_line(line.encode())
        return b"".join(self.out)

    def close(self) -> None:
        self.session.release()
        os.close(self.ctx.stats.area.fd)


@pytest.fixture
def drop(tmp_path):
    made: list[CountingDrop] = []
    held = openahead.OpenAhead.held  # another module's sessions may hold some

    def make(count: int, size: int = 200) -> CountingDrop:
        made.append(CountingDrop(tmp_path, count, size))
        return made[-1]

    yield make
    for one in made:
        one.close()
    assert openahead.OpenAhead.held == held


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_in_order_download_opens_a_run_per_pool_round_trip(drop):
    """RETR 1..12 in order: one pool call per AHEAD + 1 messages, each reply whole and exact."""
    d = drop(12)
    for n in range(1, 13):
        reply = d.talk(f"RETR {n}")
        assert reply.startswith(b"+OK") and reply.endswith(f"body {n} ".encode() + b"x" * 200
                                                          + b"\r\n.\r\n")
    per_call = openahead.AHEAD + 1
    assert d.calls == ["open_run"] * -(-12 // per_call)


def test_deleted_messages_are_not_opened_ahead_and_quit_closes_the_rest(drop):
    """DELEs between RETRs are skipped by the run; QUIT closes what was opened ahead."""
    d = drop(8)
    before = _fds()
    assert d.talk("DELE 2").startswith(b"+OK")
    assert d.talk("RETR 1").startswith(b"+OK")
    assert sorted(d.session.ahead.files) == [2, 3, 4, 5]  # indexes: messages 3..6
    assert _fds() == before + 4
    assert d.talk("QUIT").startswith(b"+OK")
    assert _fds() < before  # the session's lock went with them
    assert not d.session.ahead.files


def test_out_of_order_request_closes_the_run(drop):
    """A RETR outside the run closes the files opened ahead before opening its own run."""
    d = drop(10)
    before = _fds()
    d.talk("RETR 1")
    d.talk("RETR 9")
    assert sorted(d.session.ahead.files) == [9]  # message 10, the only one after 9
    assert _fds() == before + 1
    d.talk("TOP 2 0")
    assert d.calls == ["open_run"] * 3


def test_message_gone_when_opened_ahead_still_gets_its_own_error(drop):
    """A file removed before the run reached it: the run stops there, its RETR says -ERR."""
    d = drop(5)
    gone = sorted((d.maildir / "new").iterdir())[2]
    gone.unlink()
    assert d.talk("RETR 1").startswith(b"+OK")
    assert sorted(d.session.ahead.files) == [1]  # message 2; 3 failed, so the run stopped
    assert d.talk("RETR 2").startswith(b"+OK")
    assert d.talk("RETR 3").startswith(b"-ERR")
    assert d.talk("RETR 4").startswith(b"+OK")


def test_worker_budget_and_octets_bound_the_run(drop, monkeypatch):
    """No file is opened ahead past the worker's budget or the per-session octets."""
    d = drop(10, size=1000)
    monkeypatch.setattr(openahead, "WORKER_BUDGET", openahead.OpenAhead.held + 2)
    d.talk("RETR 1")
    assert len(d.session.ahead.files) == 2
    monkeypatch.setattr(openahead, "WORKER_BUDGET", openahead.OpenAhead.held + 512)
    monkeypatch.setattr(openahead, "AHEAD_OCTETS", 2500)
    d.talk("RETR 5")
    assert len(d.session.ahead.files) == 2  # two messages of ~1,100 octets fit, not three


def test_mbox_messages_are_not_opened_ahead(tmp_path):
    """An mbox open copies the message out of the spool: only the one asked for is opened."""
    spool_dir = tmp_path / "mail"
    spool_dir.mkdir()
    (spool_dir / "alice").write_bytes(spool_of([sample(n).encode() for n in range(1, 5)]))
    values = dict(users="unused", mail=f"mbox:{spool_dir}/%u", hostname="pop.example.org",
                  maxmsg=0)
    ctx = build_context(settings_mod.Settings(**values), StatsArea.create(2, 0), 1,
                        parse_users("alice:{PLAIN}secret::::::\n"))
    out: list[bytes] = []
    session = Session(ctx, out.append, "127.0.0.1:4000", "t")
    for line in ("USER alice", "PASS secret", "RETR 1"):
        session.handle_line(line.encode())
    assert out[-1].endswith(b"Body of message 1.\r\n.\r\n")
    assert session.ahead.files == {}
    session.release()
    os.close(ctx.stats.area.fd)


def test_real_server_download_with_deletes_leaves_no_descriptor(start_server):
    """RETR/DELE of every message then QUIT: the worker holds what it held before, and the
    messages are gone; the bytes are what the stuffer makes of the stored files."""
    server = start_server(deliver=False)
    texts = [sample(n, ".dot line\n" * n) for n in range(1, 10)]
    for n, text in enumerate(texts, 1):
        write_message(server.maildir("alice"), f"{1700000000 + n}.M{n}.ahead", text)
    client = RawClient(server.port, timeout=30)
    client.line()
    worker = server.worker_pids()[server.worker_of(client.local_port)]
    before = len(os.listdir(f"/proc/{worker}/fd"))
    client.command("USER alice")
    assert client.command("PASS wonderland").startswith(b"+OK")
    for n, text in enumerate(texts, 1):
        assert client.command(f"RETR {n}").startswith(b"+OK")
        body = b"\r\n".join(client.multiline()) + b"\r\n.\r\n"
        assert body.endswith(stuff_whole(text.split("\n\n", 1)[1].encode()))
        assert client.command(f"DELE {n}").startswith(b"+OK")
    assert client.command("QUIT").startswith(b"+OK")
    client.close()
    # All it held for the session is gone, the client's socket (counted in ``before``) too.
    assert wait_until(lambda: len(os.listdir(f"/proc/{worker}/fd")) == before - 1)
    assert not list((server.maildir("alice") / "cur").iterdir())
    assert not list((server.maildir("alice") / "new").iterdir())
