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
