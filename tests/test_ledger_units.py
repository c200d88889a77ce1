"""Sans-IO tests of the maildrop ledger's format, the UIDL import parsers, -uidl-format, the
users file's login_delay= / expire_days=, and the LOGIN-DELAY / EXPIRE decisions (issue 13)."""

from __future__ import annotations

import os
import time

import pytest

from shared import uidlformat
from shared.settings import SettingsError, resolve
from shared.users import EXPIRE_NEVER, UsersFileError, parse_line
from worker import ledger, migration, retention
from worker.storebase import Message

NOW = 1_800_000_000


def sample_ledger() -> ledger.Ledger:
    book = ledger.Ledger("abc", last_login=NOW - 5)
    book.learn("1700000001.M1.h", "1700000001.M1.h", 120, 117, False)
    book.learn("1700000002.M2.h", "000000026b0f1ae5", 300, 290, True)
    book.retrieved("1700000002.M2.h", "000000026b0f1ae5", NOW - 60)
    return book


def parse_args(argv: list[str]):
    return resolve(["-users", "/dev/null", *argv])[0]


def test_ledger_round_trip():
    """What the server writes it reads back: sizes, foreign flag, first retrieval, last login."""
    book = sample_ledger()
    again = ledger.parse(book.text(), "abc", NOW)
    assert again.last_login == NOW - 5
    assert again.known("1700000001.M1.h", 117, "1700000001.M1.h") == (120, False)
    assert again.known("1700000002.M2.h", 290, "000000026b0f1ae5") == (300, True)
    assert again.first_retrieved("1700000002.M2.h") == NOW - 60
    assert not again.dirty


def test_ledger_sizes_are_dropped_when_the_served_form_changes():
    """Another sizing fingerprint (settings that change the served bytes): sizes are measured
    again, UIDLs and retrieval times kept."""
    again = ledger.parse(sample_ledger().text(), "other", NOW)
    assert again.known("1700000001.M1.h", 117, "1700000001.M1.h") is None
    assert again.first_retrieved("1700000002.M2.h") == NOW - 60
    assert again.dirty


def test_ledger_entry_of_a_changed_file_is_not_used():
    """A stored size other than the one measured: the message is measured again."""
    assert sample_ledger().known("1700000001.M1.h", 118, "1700000001.M1.h") is None


@pytest.mark.parametrize("mutate", [
    lambda t: t.replace(ledger.HEADER.encode(), b"iupop3-ledger 9"),
    lambda t: t[:-1],                                        # no final newline
    lambda t: t + b"m a b 1 1 0 -\nm a b 1 1 0 -\n",         # one name twice
    lambda t: t + b"m ../../etc/passwd x 1 1 0 -\n".replace(b"x", b"u i"),  # space in UIDL
    lambda t: t + b"m name uid 99999999999999999999 1 0 -\n",  # absurd size
    lambda t: t + b"m name uid 1 1 2 -\n",                   # flag not 0/1
    lambda t: t + f"m name uid 1 1 0 {NOW + 10 * 86400}\n".encode(),  # retrieved in the future
    lambda t: t + "m n\u00e9 uid 1 1 0 -\n".encode(),          # not ASCII
    lambda t: t.replace(b"login ", b"login x"),
], ids=["version", "unterminated", "duplicate", "space", "huge", "flag", "future", "utf8",
        "login"])
def test_ledger_refuses_what_it_would_not_write(mutate):
    """A ledger the user edited into something this server does not write is corrupt as a
    whole (the caller rebuilds it from the files)."""
    with pytest.raises(ledger.LedgerCorrupt):
        ledger.parse(mutate(sample_ledger().text()), "abc", NOW)


def test_uidl_format_default_is_dovecots():
    """%08Xu%08Xv gives lower-case hex, zero-padded: what Dovecot 2.3 sends."""
    assert uidlformat.expand(uidlformat.DEFAULT, 1, 0x6B0F1AE5, "x") == "000000016b0f1ae5"
    assert uidlformat.expand("%u.%v-%f%%", 7, 9, "1700.M1.h") == "7.9-1700.M1.h%"
    assert uidlformat.expand("%Uf", 1, 1, "abc") == "ABC"


def test_uidl_format_setting_refuses_unknown_variables():
    """-uidl-format with %m (needs every message's headers) is a one-line setting error."""
    with pytest.raises(SettingsError, match="uidl-format"):
        parse_args(["-uidl-format", "%m"])
    assert parse_args(["-uidl-format", "%08Xv%08Xu"]).uidl_format == "%08Xv%08Xu"


def test_dovecot_uidlist_version_3_with_saved_pop3_uidl():
    """dovecot-uidlist v3: uid order, uid and uidvalidity formatted, a P field wins, flags in
    the stored name ignored."""
    data = (b"3 V1800000000 N4 Gd1e2\n"
            b"2 P0123abcd :1700000061.M2P1Q1.h:2,S\n"
            b"1 W1904 :1700000060.M1P1Q1.h\n"
            b"junk line\n"
            b"3 :1700000062.M3P1Q1.h\n")
    table = migration.parse_dovecot(data, uidlformat.DEFAULT)
    assert list(table.items()) == [("1700000060.M1P1Q1.h", "000000016b49d200"),
                                   ("1700000061.M2P1Q1.h", "0123abcd"),
                                   ("1700000062.M3P1Q1.h", "000000036b49d200")]


def test_dovecot_uidlist_version_1():
    """The old v1 format: header "1 uidvalidity nextuid", lines "uid name"."""
    table = migration.parse_dovecot(b"1 1000 3\n1 1700.M1.h\n2 1701.M2.h:2,\n",
                                    uidlformat.DEFAULT)
    assert table == {"1700.M1.h": "00000001000003e8", "1701.M2.h": "00000002000003e8"}


def test_courier_sizelist():
    """courierpop3dsizelist /2 and /3: UIDL UID<n>-<uidv>, arrival order, odd lines skipped."""
    data = (b"/3 4 1700000\n1700000061.M2.h:2,S 100 2:1700000:0\n"
            b"1700000060.M1.h 50 1:1700000:0\nbroken\n")
    assert list(migration.parse_courier(data).items()) == [
        ("1700000060.M1.h", "UID1-1700000"), ("1700000061.M2.h", "UID2-1700000")]
    assert migration.parse_courier(b"/2 2 0\n1700.M1.h 50 1:0\n") == {"1700.M1.h": "UID1"}
    assert migration.parse_courier(b"/9 2 0\n1700.M1.h 50 1:0\n") == {}


def test_users_file_policy_fields():
    """login_delay=N and expire_days=N|never in the extra field; bad values name the line."""
    account = parse_line("u:{PLAIN}x:::::: login_delay=900 expire_days=never", "f line 1")
    assert (account.login_delay, account.expire_days) == (900, EXPIRE_NEVER)
    assert parse_line("u:{PLAIN}x", "f line 1").login_delay is None
    with pytest.raises(UsersFileError, match="f line 2.*login_delay"):
        parse_line("u:{PLAIN}x:::::: login_delay=soon", "f line 2")
    with pytest.raises(UsersFileError, match="expire_days"):
        parse_line("u:{PLAIN}x:::::: expire_days=-1", "f line 3")


def test_login_delay_decision():
    """Refused for the rest of the delay after the last login; a clock set back never locks out."""
    policy = retention.Policy(login_delay=600)
    book = ledger.Ledger(last_login=NOW - 100)
    assert policy.too_soon(book, NOW) == 500
    assert policy.too_soon(book, NOW + 500) == 0
    assert policy.too_soon(book, NOW - 1000) == 0
    assert retention.Policy().too_soon(book, NOW) == 0


def test_expire_decision():
    """EXPIRE n: messages first retrieved n days ago or more; never-retrieved ones stay."""
    book = ledger.Ledger()
    messages = [Message(i, f"u{i}", 10, "p", f"b{i}") for i in range(3)]
    book.retrieved("b0", "u0", NOW - 2 * 86400)
    book.retrieved("b1", "u1", NOW - 3600)
    assert retention.Policy(expire_days=1).expired(messages, book, NOW) == messages[:1]
    assert retention.Policy(expire_days=0).expired(messages, book, NOW) == messages[:2]
    assert retention.Policy().expired(messages, book, NOW) == []


def test_capa_lines_before_and_after_login():
    """RFC 2449 6.5/6.7: USER before login when an account has its own value; the user's own
    value after login."""
    settings = parse_args(["-login-delay", "300", "-expire", "30"])
    plain = parse_line("a:{PLAIN}x", "f line 1")
    own = parse_line("b:{PLAIN}x:::::: login_delay=0 expire_days=0", "f line 2")
    users = {"a": plain, "b": own}
    assert retention.capa_lines(settings, users, None) == ["LOGIN-DELAY 300 USER",
                                                           "EXPIRE 30 USER"]
    assert retention.capa_lines(settings, {"a": plain}, None) == ["LOGIN-DELAY 300", "EXPIRE 30"]
    assert retention.capa_lines(settings, users, own) == ["EXPIRE 0"]
    assert retention.capa_lines(settings, users, plain) == ["LOGIN-DELAY 300", "EXPIRE 30"]
    assert retention.capa_lines(parse_args([]), {"a": plain}, None) == []


def test_ledger_time_is_plausible():
    """The sample NOW is in the past of this machine's clock (future times are refused)."""
    assert NOW < time.time() + 86400 * 365 * 10


def test_names_the_format_cannot_hold_are_not_kept():
    """A Maildir name with a space or non-ASCII is measured each time, never written into the
    ledger (where it would make the whole file unreadable)."""
    book = ledger.Ledger("abc")
    book.learn("1700.M1.h with space", "H0123", 10, 9, False)
    book.learn("1700.M2.h\udcff", "H0124", 10, 9, False)
    book.retrieved("1700.M3 x", "u", NOW)
    assert book.entries == {}
    assert ledger.parse(book.text(), "abc", NOW).entries == {}


def test_mbox_ledger_without_sizing_reads_back_clean():
    """An mbox ledger (no sizing fingerprint) reads back unchanged: no write at every UPDATE."""
    book = ledger.Ledger("")
    book.retrieved("uidl-1", "uidl-1", NOW)
    again = ledger.parse(book.text(), "", NOW)
    assert not again.dirty and again.first_retrieved("uidl-1") == NOW


def test_lock_and_scan_refuses_too_soon_unless_taking_over(tmp_path):
    """store.lock_and_scan on a real Maildir: a second login within the delay raises
    LoginTooSoon with the lock released; a takeover of the same user's session is let in."""
    from conftest import sample, write_message
    from worker import store
    from worker.maildir import Maildir

    write_message(tmp_path / "box", "1700000001.M1.h", sample(1))
    policy = retention.Policy(login_delay=3600)
    first = Maildir(str(tmp_path / "box"))
    assert len(store.lock_and_scan(first, 0, policy)) == 1
    first.unlock()
    second = Maildir(str(tmp_path / "box"))
    with pytest.raises(store.LoginTooSoon) as refused:
        store.lock_and_scan(second, 0, policy)
    assert 3590 < refused.value.seconds <= 3600
    third = Maildir(str(tmp_path / "box"))  # the lock was released: this one gets it
    assert len(store.lock_and_scan(third, 0, policy, took_over=True)) == 1
    third.unlock()


def test_mbox_ledger_follows_the_walked_directory_not_a_swapped_path(tmp_path):
    """The mbox ledger beside the spool is written in the directory the session walked: a
    spool directory renamed and replaced by a symlink after login sends no write elsewhere."""
    from worker.mbox import Mbox

    home, elsewhere = tmp_path / "home", tmp_path / "elsewhere"
    (home / "mail").mkdir(parents=True)
    elsewhere.mkdir()
    (home / "mail" / "inbox").write_bytes(b"")
    box = Mbox((str(home), ("mail", "inbox")), owner=os.getuid())
    box.lock()
    try:
        (home / "mail").rename(home / "walked")
        (home / "mail").symlink_to(elsewhere)
        box.ledger.last_login, box.ledger.dirty = int(time.time()), True
        assert box.save_ledger()
    finally:
        box.unlock()
    assert list(elsewhere.iterdir()) == []
    assert (home / "walked" / ".inbox.iupop3.ledger").is_file()
