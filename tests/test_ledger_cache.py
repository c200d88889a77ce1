"""A warm worker does not re-read the ledger or the import table it parsed before, and never
serves an old one after the user changed the file (issue 15): worker.filecache."""

from __future__ import annotations

import os
import time

from conftest import USERS, write_message
from processes import wait_until
from worker import ledger, migration

LEDGER = ".iupop3.ledger"
NOW = int(time.time()) - 3600  # load() checks times against the clock


def _rewrite_in_place(path, text: str) -> None:
    """Rewrite ``path`` in place (same inode) until its ctime has moved on: a write within the
    clock's tick leaves the identity as it was, which the cache cannot tell (documented)."""
    before = os.stat(path).st_ctime_ns

    def rewritten() -> bool:
        with open(path, "r+") as fh:
            fh.write(text)
            fh.truncate()
        return os.stat(path).st_ctime_ns != before

    assert wait_until(rewritten, timeout=5)


def _load(folder: int, sizing: str = "abc") -> ledger.Ledger:
    return ledger.load(folder, LEDGER, (os.getuid(),), sizing, "test")


def _book() -> ledger.Ledger:
    book = ledger.Ledger("abc", last_login=NOW - 5)
    for i in range(50):
        book.learn(f"17000000{i:02d}.M{i}.h", f"u{i}", 100 + i, 90 + i, i == 7, 1000 + i)
    book.retrieved("1700000003.M3.h", "u3", NOW - 60)
    return book


def test_warm_load_equals_a_cold_parse_and_sessions_do_not_share_changes(tmp_path):
    """The second load comes from the cache, equals what parsing the file gives, and what one
    session changes in its ledger is not seen by the next one."""
    (tmp_path / LEDGER).write_bytes(_book().text())
    folder = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        first = _load(folder)
        hits = ledger.PARSED.hits
        first.learn("1799999999.M9.h", "new", 5, 4, False, 77)
        first.retrieved("1700000001.M1.h", "u1", NOW)
        first.known("1700000002.M2.h", 92, "changed", 5)
        first.keep_only({"1700000004.M4.h"})
        first.last_login = NOW
        second = _load(folder)
        assert ledger.PARSED.hits == hits + 1
        expected = ledger.parse((tmp_path / LEDGER).read_bytes(), "abc", NOW)
        assert second == expected and second.entries is not first.entries
        assert _load(folder, "other") == ledger.parse((tmp_path / LEDGER).read_bytes(),
                                                      "other", NOW)
    finally:
        os.close(folder)


def test_a_ledger_rewritten_in_place_is_read_again(tmp_path):
    """The user rewrites the ledger in place, to the same size: the next load reads the new
    file (its ctime moved), never the parse of the old one."""
    text = _book().text().decode()
    (tmp_path / LEDGER).write_text(text)
    folder = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert _load(folder).entries["1700000001.M1.h"].size == 101
        _load(folder)
        changed = text.replace("m 1700000001.M1.h u1 101 ", "m 1700000001.M1.h u1 555 ")
        assert len(changed) == len(text)
        _rewrite_in_place(tmp_path / LEDGER, changed)
        assert _load(folder).entries["1700000001.M1.h"].size == 555
        _rewrite_in_place(tmp_path / LEDGER, changed.replace("login", "l0gin"))
        assert _load(folder).fresh  # corrupt now: rebuilt, whatever was cached
    finally:
        os.close(folder)


def test_import_table_is_cached_and_read_again_when_changed(tmp_path):
    """The import table: the same dict while the file is unchanged, the new UIDLs once the
    user rewrote it in place."""
    path = tmp_path / migration.TABLE_NAME
    path.write_text(f"{migration.TABLE_HEADER} dovecot-uidlist\n1700000001.M1.h aaaa\n")
    folder = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        first = migration.load_table(folder, os.getuid())
        assert first == {"1700000001.M1.h": "aaaa"}
        assert migration.load_table(folder, os.getuid()) is first
        _rewrite_in_place(path, path.read_text().replace("aaaa", "bbbb"))
        assert migration.load_table(folder, os.getuid()) == {"1700000001.M1.h": "bbbb"}
    finally:
        os.close(folder)


def test_warm_worker_sees_a_ledger_the_user_rewrote(start_server):
    """Against the real server (one worker, its caches warm): LOGIN-DELAY refuses a second
    login; the user rewrites the ledger's login time in place to two hours ago (same size);
    the next login is let in, so the worker read the new file, not its cached parse."""
    server = start_server("-login-delay", "3600", "-auth-delay", "0", "-workers", "1")
    box = server.maildir("alice")
    write_message(box, "1700000010.M10.test", b"Subject: x\n\nbody\n")
    server.login().quit()
    raw = server.raw()
    raw.line()
    raw.command("USER alice")
    assert raw.command(f"PASS {USERS['alice']}").startswith(b"-ERR [LOGIN-DELAY]")
    raw.close()
    text = (box / LEDGER).read_text()
    login = text.split("\n")[2]
    earlier = f"login {int(login.split()[1]) - 7200}"
    assert len(earlier) == len(login)
    _rewrite_in_place(box / LEDGER, text.replace(login, earlier))
    client = server.login()
    assert client.stat()[0] >= 1
    client.quit()
