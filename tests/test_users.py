"""shared/users.py: the Dovecot passwd-file format, SYSUAF-like account flags and expiry in the
extra field, errors that name the file and line, and the dummy hash for unknown names.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from shared import passwords
from shared.users import Account, Users, UsersFileError, load_users, parse_users

TODAY = datetime.date.today()


def one(line: str) -> Account:
    (account,) = parse_users(line + "\n", "users").values()
    return account


def test_all_fields_are_read():
    """Every passwd-file field lands in the Account; extra may hold colons (Dovecot does too)."""
    a = one("Alice:{PLAIN}pw:1000:100:Alice A.:/home/alice:/bin/sh:userdb_mail=maildir:~/M x=1")
    assert (a.name, a.password, a.uid, a.gid, a.gecos, a.home, a.shell) == (
        "alice", "{PLAIN}pw", "1000", "100", "Alice A.", "/home/alice", "/bin/sh")
    assert a.extra == ("userdb_mail=maildir:~/M", "x=1")
    assert a.flags == frozenset() and a.expires is None and a.accessible


def test_short_lines_and_comments():
    """user:password alone is enough; comments and blank lines are skipped."""
    table = parse_users("# users\n\n   \nbob:{PLAIN}b\n  # indented comment\ncarol:{PLAIN}c::\n")
    assert sorted(table) == ["bob", "carol"]
    assert table["carol"].home == ""


@pytest.mark.parametrize("word", ["disuser", "DISMAIL", "pwd_expired", "Pwd2_Expired", "nologin"])
def test_each_flag_makes_the_account_inaccessible(word):
    """DISUSER, DISMAIL, PWD_EXPIRED, PWD2_EXPIRED and Dovecot's nologin each lock the account."""
    a = one(f"dan:{{PLAIN}}d::::::quota=1 {word}")
    assert a.flags == {word.lower()} and not a.accessible
    assert a.extra == ("quota=1", word)


def test_unrelated_extra_words_leave_the_account_open():
    """Words that are not flags (other Dovecot fields, typos of nothing) are kept and harmless."""
    a = one("eve:{PLAIN}e::::::userdb_quota_rule=*:storage=1G reason=x disusers")
    assert a.accessible and a.flags == frozenset()


def test_expiry_date_is_the_first_day_refused():
    """expire=YYYY-MM-DD: open the day before, closed on that day and after."""
    a = one("fay:{PLAIN}f::::::expire=2030-06-15")
    assert a.expires == datetime.date(2030, 6, 15)
    assert a.accessible_on(datetime.date(2030, 6, 14))
    assert not a.accessible_on(datetime.date(2030, 6, 15))
    assert not a.accessible_on(datetime.date(2031, 1, 1))


def test_accessible_uses_todays_date():
    """``accessible`` compares the expiry with today's local date."""
    tomorrow = TODAY + datetime.timedelta(days=1)
    assert one(f"gus:{{PLAIN}}g::::::expire={tomorrow.isoformat()}").accessible
    assert not one(f"gus:{{PLAIN}}g::::::EXPIRE={TODAY.isoformat()}").accessible


def test_flag_wins_over_a_future_expiry():
    """A flag locks the account even before its expiry date."""
    assert not one("hal:{PLAIN}h::::::expire=2999-01-01 disuser").accessible_on(TODAY)


@pytest.mark.parametrize("line,message", [
    ("nocolon", "expected user:password"),
    (":{PLAIN}x", "expected user:password"),
    ("  :{PLAIN}x", "expected user:password"),
    ("two words:{PLAIN}x", "contains a space"),
    ("ctl\x07:{PLAIN}x", "control character"),
    ("ivy:{SHA512-CRPYT}$6$x$y", "unknown password scheme {SHA512-CRPYT}"),
    ("ivy:{CRYPT.HEX}abcd", "unknown password scheme"),
    ("ivy:{PLAIN}x::::::expire=2030-13-01", "not a date"),
    ("ivy:{PLAIN}x::::::expire=20300101", "not a date"),
    ("ivy:{PLAIN}x::::::expire=", "not a date"),
    ("ivy:{PLAIN}x::::::expire=2030-01-01 expire=2031-01-01", "given twice"),
    ("jos\u00e9:{PLAIN}x", "user name 'jos\u00e9' cannot log in"),  # USER never matches it
    ("a%b:{PLAIN}x", "user name 'a%b' cannot log in"),
    (".hidden:{PLAIN}x", "cannot log in"),
    ("\u212aelvin:{PLAIN}x", "cannot log in"),  # a Kelvin sign folds to "k": refused at login
    ("x" * 65 + ":{PLAIN}x", "at most 64"),
])
def test_malformed_line_names_file_and_line(line, message):
    """A bad line raises UsersFileError with the file name, line number and what is wrong."""
    with pytest.raises(UsersFileError) as caught:
        parse_users(f"# header\nok:{{PLAIN}}fine\n\n{line}\n", "/etc/iupop3/users")
    assert str(caught.value).startswith("/etc/iupop3/users line 4: ")
    assert message in str(caught.value)


def test_duplicate_user_in_any_case_is_an_error():
    """A name may appear once; names are compared in lower case."""
    with pytest.raises(UsersFileError, match=r"users line 2: user 'jo' appears twice"):
        parse_users("jo:{PLAIN}a\nJO:{PLAIN}b\n", "users")


def test_empty_password_field_loads_and_never_verifies():
    """An empty password is allowed in the file (as in Dovecot) but opens nothing."""
    a = one("kim::::::")
    assert a.password == "" and not passwords.verify(a.password, b"")


def test_password_fields_from_hash_password_read_back():
    """A line built from hash_password parses back to a password that verifies, even with ':'."""
    for scheme in ("PLAIN", "SHA512-CRYPT", "SSHA512"):
        field = passwords.hash_password("a:b c", scheme)
        a = one(f"lee:{field}:1:1::/home/lee::dismail")
        assert passwords.verify(a.password, b"a:b c") and a.flags == {"dismail"}


def test_load_users_reads_a_file(tmp_path):
    """load_users reads UTF-8 from disk and reports the real path in errors."""
    path = tmp_path / "users"
    path.write_text("mo:{PLAIN}pässword::::::\n", encoding="utf-8")
    assert passwords.verify(load_users(str(path))["mo"].password, "pässword".encode())
    path.write_text("mo:{PLAIN}x\nbad\n")
    with pytest.raises(UsersFileError, match=f"{path} line 2"):
        load_users(str(path))


def test_load_users_unreadable_or_not_utf8(tmp_path):
    """A missing file or one that is not UTF-8 is a UsersFileError naming the file."""
    with pytest.raises(UsersFileError, match="cannot read users file"):
        load_users(str(tmp_path / "missing"))
    path = tmp_path / "latin1"
    path.write_bytes(b"n\xe9:{PLAIN}x\n")
    with pytest.raises(UsersFileError, match="not UTF-8"):
        load_users(str(path))


def test_table_carries_a_dummy_like_most_accounts():
    """The parsed table's dummy has the (scheme, cost) of most of its accounts."""
    blf = [passwords.hash_password(f"p{n}", "BLF-CRYPT", 4) for n in range(3)]
    text = "".join(f"u{n}:{h}\n" for n, h in enumerate(blf)) + "z:{PLAIN}z\n"
    table = parse_users(text)
    assert isinstance(table, Users) and isinstance(table, dict)
    assert passwords.cost_of(table.dummy) == ("BLF-CRYPT", 4)
    assert not passwords.verify(table.dummy, b"p0")


def test_empty_table_uses_the_default_dummy():
    """No accounts at all: unknown names are checked against passwords.DUMMY."""
    assert parse_users("# nobody yet\n").dummy == passwords.DUMMY


def test_server_refuses_to_start_with_a_name_no_login_can_match(tmp_path):
    """The real supervisor: a users file naming `josé` stops the start with exit 2 and one
    line naming the file and line, as any other bad line (it used to load and never log in)."""
    users = tmp_path / "users"
    users.write_text("alice:{PLAIN}x\njos\u00e9:{PLAIN}y\n", encoding="utf-8")
    out = subprocess.run([sys.executable, "-m", "supervisor", "-users", str(users), "-port", "0",
                          "-listen", "127.0.0.1", "-mail", f"maildir:{tmp_path}/%u"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 2, out
    assert f"{users} line 2: user name 'jos\u00e9' cannot log in" in out.stderr
    assert out.stderr.strip().count("\n") == 0
