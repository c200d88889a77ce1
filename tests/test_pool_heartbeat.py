"""The thread pool's heartbeat: a long queue of legitimate pool work is not a
hang. POOL_BEAT is stamped whenever a pool task ends, so a login flood of costly hashes whose
queue waits longer than -worker-timeout keeps its worker alive; a pool where nothing ends
while work waits is still caught (tests/test_reliability.py)."""

from __future__ import annotations

import threading

from passlib.hash import sha512_crypt

from conftest import USERS, RawClient
from shared import settings as settings_mod
from shared.stats import StatsArea
from shared.users import parse_users
from worker import replies as R
from worker.context import build_context

LOGINS = 120


def test_a_queue_of_costly_logins_longer_than_the_timeout_is_not_a_hang(start_server, tmp_path):
    """One worker, -worker-timeout 2, 120 parallel logins each hashing for a tenth of a second or
    so: the last ones wait in the pool queue far longer than 2 s (a probe behind them went
    stale and the watchdog SIGKILLed the worker; the ticker, waiting in gevent's spawn for a
    free thread, even stopped the loop's heartbeat), yet every client gets its answer and the
    worker is never called hung."""
    root = tmp_path / "srv"
    root.mkdir()
    slow = sha512_crypt.using(rounds=50_000).hash("the right one")
    (root / "users").write_text(
        "".join(f"{u}:{{PLAIN}}{p}::::::\n" for u, p in USERS.items())
        + "".join(f"slow{n}:{{SHA512-CRYPT}}{slow}::::::\n" for n in range(LOGINS)))
    server = start_server("-workers", "1", "-worker-timeout", "2", "-auth-delay", "0",
                          "-auth-block", "0", "-maxclients", str(LOGINS + 10),
                          "-max-per-address", "0", root=root)
    answers: list[bytes] = []
    lock = threading.Lock()

    def login(n: int) -> None:
        client = RawClient(server.port, 120)
        try:
            client.line()
            client.command(f"USER slow{n}")
            reply = client.command("PASS wrong")
        except (OSError, EOFError) as exc:
            reply = repr(exc).encode()
        finally:
            client.close()
        with lock:
            answers.append(reply)

    threads = [threading.Thread(target=login, args=(n,)) for n in range(LOGINS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert len(answers) == LOGINS
    wrong = R.NOT_ACCESSIBLE.format(user="slow0").split("slow0")[0].encode()
    errors = [line for line in server.output.splitlines() if " ERROR " in line][:5]
    assert all(a.startswith(wrong) for a in answers), (
        [a for a in answers if not a.startswith(wrong)][:3], errors)
    assert "is hung" not in server.output
    assert server.worker_pids()[1] and "worker 1 (pid" not in server.output


def test_an_mbox_lock_wait_stays_below_the_worker_timeout(tmp_path):
    """The dot-lock wait sleeps in a pool thread: it is held to half of -worker-timeout (and at
    most the mbox module's 20 s), so ten of them cannot look like a hung pool."""
    for timeout, wait in ((4, 2.0), (10, 5.0), (100, 20.0)):
        settings = settings_mod.Settings(users="unused", mail=f"mbox:{tmp_path}/%u",
                                         worker_timeout=timeout)
        ctx = build_context(settings, StatsArea.create(2, 0), 1,
                            parse_users("alice:{PLAIN}secret::::::\n"))
        assert ctx.maildrop_for(ctx.accounts.users["alice"]).lock_wait == wait
