"""The login storm's fast paths against the plain ones: a QUIT with nothing to apply skips the
pool's update (store.has_update), and the session's per-command log work is skipped at levels
that would not write it. Behaviour only; performance is measured by bench/, never here."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import sample, write_message
from shared.users import EXPIRE_NEVER
from worker import store
from worker.maildir import Maildir
from worker.mbox import Mbox
from worker.retention import Policy


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes (the session lock's stamp left out)."""
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = Path(folder, name)
            out[str(path.relative_to(root))] = b"" if "lock" in name else path.read_bytes()
    return out


def _maildir(tmp_path: Path, count: int) -> Path:
    box = tmp_path / "box"
    for n in range(1, count + 1):
        write_message(box, f"17000000{n:02d}.M{n}.h", sample(n))
    return box


def _session(make, policy: Policy, deleted: int, retrieved: int):
    """One login: lock and scan, then the messages chosen for deletion and retrieval."""
    drop = make()
    messages = store.lock_and_scan(drop, 0, policy)
    return drop, messages, messages[:deleted], messages[deleted:deleted + retrieved]


# (messages, sessions before the checked one (EXPIRE NEVER): (deleted, retrieved), the checked
# session's (deleted, retrieved), its expire days): whether the checked QUIT has work.
CASES = {
    "nothing new, nothing done": (3, [(0, 0)], (0, 0), EXPIRE_NEVER, False),
    "first login ever (ledger written at login)": (3, [], (0, 0), EXPIRE_NEVER, False),
    "a deletion": (3, [(0, 0)], (1, 0), EXPIRE_NEVER, True),
    "a first retrieval": (3, [(0, 0)], (0, 1), EXPIRE_NEVER, True),
    "retrievals seen before, now EXPIRE 0": (3, [(0, 2)], (0, 0), 0, True),
    "retrievals seen before, EXPIRE 30": (3, [(0, 2)], (0, 0), 30, False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_quit_skips_the_update_exactly_when_it_would_change_nothing(tmp_path, case):
    """Differential: store.has_update is False only where store.update leaves every file of
    the Maildir as it was, and True where update changes one (deletion, retrieval, expiry)."""
    count, before, (deleted, retrieved), days, expected = CASES[case]
    box = _maildir(tmp_path, count)
    policy = Policy(expire_days=days)
    for dele, retr in before:
        drop, messages, gone, seen = _session(lambda: Maildir(str(box)), Policy(), dele, retr)
        store.update(drop, gone, seen, messages, Policy())
        drop.unlock()
    drop, messages, gone, seen = _session(lambda: Maildir(str(box)), policy, deleted, retrieved)
    needed = store.has_update(drop, gone, seen, messages, policy)
    was = _tree(box)
    store.update(drop, gone, seen, messages, policy)
    drop.unlock()
    assert needed is expected
    assert (_tree(box) != was) is expected


def test_quit_after_a_scan_that_measured_new_messages_still_writes_the_ledger(tmp_path):
    """Messages delivered since the last ledger write are measured at login but written only at
    UPDATE (below store.WRITE_AT_LOGIN): that QUIT is not skipped, and the ledger learns them."""
    box = _maildir(tmp_path, 2)
    drop, messages, _, _ = _session(lambda: Maildir(str(box)), Policy(), 0, 0)
    store.update(drop, [], [], messages, Policy())
    drop.unlock()
    write_message(box, "1700000099.M99.h", sample(99))
    drop, messages, _, _ = _session(lambda: Maildir(str(box)), Policy(), 0, 0)
    assert store.has_update(drop, [], [], messages, Policy())
    was = _tree(box)
    store.update(drop, [], [], messages, Policy())
    drop.unlock()
    assert _tree(box) != was


def test_mbox_quit_with_nothing_to_apply_is_skipped_and_changes_nothing(tmp_path):
    """The same rule for an mbox spool: a second poll that did nothing has no update, and
    running the update anyway changes no file."""
    from worker.mboxformat import format_record

    spool = tmp_path / "alice"
    spool.write_bytes(b"".join(format_record(b"Subject: %d\n\nbody %d\n" % (n, n))
                               for n in (1, 2)))
    for _ in range(2):
        drop, messages, _, _ = _session(lambda: Mbox(str(spool)), Policy(), 0, 0)
        needed = store.has_update(drop, [], [], messages, Policy())
        was = _tree(tmp_path)
        store.update(drop, [], [], messages, Policy())
        drop.unlock()
        unchanged = _tree(tmp_path) == was
        assert unchanged or needed
    assert not needed and unchanged


# -- the auth guard and the connection's peer ------------------------------------------------
def test_guard_admission_carries_the_keys_the_keyer_makes():
    """The admission's user and address keys (made once per admission) are the Keyer's
    digests, so succeeded/failed settle the entries admit counted."""
    from test_authguard import _guard

    guard, _, _ = _guard()
    admission = guard.admit("192.0.2.7", "alice")
    assert admission.user_key == guard.keys.user("alice")
    assert admission.address_key == guard.keys.address("192.0.2.7")
    guard.failed(admission)
    again = guard.admit("192.0.2.7", "alice")
    assert again.wait > 0  # the failure landed on the entries admit found


def test_peer_of_names_ip_peers_and_others_from_one_lookup():
    """worker.connection.peer_of: "host:port" and the address for TCP (IPv6 bracketed),
    "local" and no address for a Unix socket, "unknown" once the peer is gone."""
    import socket

    from worker.connection import peer_of

    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        with socket.create_server((host, 0), family=family) as server:
            client = socket.create_connection(server.getsockname()[:2])
            accepted, _ = server.accept()
            port = client.getsockname()[1]
            text = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
            assert peer_of(accepted) == (text, host)
            client.close()
            accepted.close()
    left, right = socket.socketpair()
    assert peer_of(left) == ("local", "")
    left.close()
    right.close()
    assert peer_of(left) == ("unknown", "")


def test_a_command_line_is_masked_and_counted_only_where_it_is_written(tmp_path):
    """At ERROR the session neither masks nor counts command lines for the repeat filter;
    at THREAD each is logged (PASS masked) and the fourth repeat is suppressed."""
    import logging

    from shared import settings as settings_mod
    from shared.logsetup import THREAD
    from shared.stats import StatsArea
    from shared.users import parse_users
    from worker.context import build_context
    from worker.pop3 import Session

    ctx = build_context(settings_mod.Settings(users="unused", mail=f"maildir:{tmp_path}/%u",
                                              hostname="t.example"),
                        StatsArea.create(2, 0), 1, parse_users("alice:{PLAIN}pw::::::\n"))
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("iupop3")
    logger.addHandler(handler)
    level = logger.level
    try:
        session = Session(ctx, lambda data: None, "127.0.0.1:4000", "t1")
        logger.setLevel(logging.ERROR)
        for _ in range(5):
            session.handle_line(b"NOOP")
        assert records == [] and session.limits.log_repeats.suppressed == 0
        logger.setLevel(THREAD)
        session.handle_line(b"PASS secret words")
        for _ in range(4):
            session.handle_line(b"NOOP")
        assert records.count("NOOP") == 3 and session.limits.log_repeats.suppressed == 1
        assert not any("secret" in line for line in records)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
