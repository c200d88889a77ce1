"""Shutdown while a QUIT commit runs: at the -grace deadline a session in
UPDATE is not killed under its running commit; it finishes, answers +OK and is applied, and
"nothing applied" is logged only for sessions that were not updating."""

from __future__ import annotations

import signal

from test_mbox import read_all, sample, spool_of
from worker.mbox import DotLock


def test_commit_held_past_the_grace_deadline_finishes_and_is_applied(start_server, tmp_path):
    """An MDA holds the spool's dot-lock when the client sends QUIT, so the commit waits in
    the pool; SIGTERM with -grace 1 passes the deadline; once the lock goes, the commit ends:
    +OK to QUIT, the deletion applied, and no "nothing applied" for that session."""
    root = tmp_path / "srv"
    (root / "spool").mkdir(parents=True)
    spool = root / "spool" / "alice"
    spool.write_bytes(spool_of([sample(1), sample(2)]))
    server = start_server("-mail", f"mbox:{root}/spool/%u", "-grace", "1", root=root,
                          deliver=False)
    raw = server.raw(timeout=30)
    raw.line()
    raw.command("USER alice")
    assert raw.command("PASS wonderland").startswith(b"+OK")
    assert raw.command("DELE 1").startswith(b"+OK")
    lock = DotLock(str(spool) + ".lock")
    lock.acquire(float("inf"))  # the MDA's dot-lock: the commit must wait for it
    try:
        mark = server.mark()
        raw.send(b"QUIT\r\n")
        server.wait_for(r"QUIT", start=mark)
        server.signal(signal.SIGTERM)
        server.wait_for(r"grace period over", start=mark)
    finally:
        lock.release()
    reply = raw.line()
    assert reply.startswith(b"+OK") and reply.endswith(b"signing off."), reply
    assert server.wait_exit(30) == 0
    assert read_all(spool) == [sample(2)]
    assert "nothing applied" not in server.output
    assert "Traceback" not in server.output

