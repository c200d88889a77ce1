"""Account sources (issue 12): ``-users`` specs, /etc/shadow parsing and the SYSUAF-flag verdicts
on synthetic lines, then real system accounts made with useradd, checked through ``shadow:`` and
``pam:``. The real-account tests run as root when CI is set or --system-accounts is given; they
delete every user and group they make, even when a test fails.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import grp
import secrets
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from shared import accountsource as A
from shared import accountspec, passwords, shadowfile
from shared import settings as S
from shared.shadowfile import ShadowEntry, parse_shadow_line, shadow_refusal
from shared.users import Account, parse_users

ROOT = Path(__file__).resolve().parent.parent
DAY = 20_000  # a fixed "today" for the sans-IO verdicts
HASH = "$6$saltsalt$" + "x" * 86
PREFIX = "iupt"  # every user and group these tests make starts with it


def entry(password: str = HASH, lastchg: str = str(DAY - 10), mx: str = "99999",
          inactive: str = "", expire: str = "") -> ShadowEntry:
    return parse_shadow_line(f"jones:{password}:{lastchg}:0:{mx}:7:{inactive}:{expire}:")


# -- -users specs ----------------------------------------------------------------------------------
@pytest.mark.parametrize("value, expected", [
    ("/etc/iupop3/users", "/etc/iupop3/users"),
    ("passwd-file:/etc/iupop3/users", "/etc/iupop3/users"),
    ("PASSWD-FILE:/etc/iupop3/users", "/etc/iupop3/users"),
    ("shadow:", "shadow:"),
    ("pam:", "pam:iupop3"),
    ("pam:dovecot", "pam:dovecot"),
    ("./users:old", os.path.abspath("users:old")),
])
def test_users_spec_forms(value, expected):
    """-users takes passwd-file:PATH, a bare path (the same), shadow: and pam:SERVICE."""
    assert accountspec.canonical(value) == expected


@pytest.mark.parametrize("value, message", [
    ("ldap:x", "unknown users source 'ldap:'"),
    ("shadows:", "unknown users source 'shadows:'"),
    ("shadow:/etc/shadow", "shadow: takes no argument"),
    ("pam:../../tmp/evil", "is not a name from /etc/pam.d"),
    ("passwd-file:", "passwd-file: needs a path"),
])
def test_bad_users_specs(value, message):
    """A typo in -users is an error naming the forms, never a file name that fails later."""
    with pytest.raises(S.SettingsError, match="-users") as caught:
        S.resolve(["-users", value])
    assert message in str(caught.value)


def test_bad_users_spec_is_one_line_and_exit_2():
    """The server refuses an unknown source with one line on stderr and exit 2."""
    out = subprocess.run([sys.executable, "-m", "supervisor", "-users", "ldap:dc=example"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "unknown users source 'ldap:'" in out.stderr


def test_system_accounts_with_user_refused():
    """The privilege model: shadow: and pam: need root in the workers, so -user is refused."""
    for source in ("shadow:", "pam:"):
        settings, _ = S.resolve(["-users", source, "-user", "nobody"])
        problem = A.startup_problem(settings)
        assert problem and "cannot run with -user nobody" in problem and "\n" not in problem
    settings, _ = S.resolve(["-users", "/etc/iupop3/users", "-user", "nobody"])
    assert accountspec.privilege_problem(settings) is None


def test_new_settings_round_trip():
    """The account settings come from the command line and survive the trip to the workers."""
    settings, _ = S.resolve(["-users", "shadow:", "-min-uid", "500", "-allow-groups", "pop",
                             "-deny-users", "guest", "-deny-users", "games",
                             "-nologin-shells", "/bin/false"])
    again = S.from_json(S.to_json(settings))
    assert again == settings
    assert (again.min_uid, again.allow_groups, again.deny_users, again.nologin_shells) == (
        500, ("pop",), ("guest", "games"), ("/bin/false",))


# -- shadow lines and their verdicts (sans-IO) -----------------------------------------------------
def test_parse_shadow_line():
    """A shadow(5) line gives its fields; empty numbers are -1 (the feature is off)."""
    parsed = parse_shadow_line(f"jones:{HASH}:19000:0:99999:7:::\n")
    assert parsed == ShadowEntry("jones", HASH, 19000, 0, 99999, 7, -1, -1)


@pytest.mark.parametrize("line", ["jones:x:1:2:3", "jones:x:abc:0:99999:7:::",
                                  "jones:x:1:0:99999:7:::-1:", "jones:x:１:0:9:7:::"])
def test_malformed_shadow_lines(line):
    """A line that cannot be read is an error (its account is refused), never a guess."""
    with pytest.raises(shadowfile.ShadowLineError):
        parse_shadow_line(line)


@pytest.mark.parametrize("shadow, words", [
    (entry(), None),
    (entry(password="!" + HASH), "locked"),
    (entry(password="!"), "locked"),
    (entry(password="*"), "no usable password"),
    (entry(password=""), "no usable password"),
    (entry(expire=str(DAY)), "account expired"),
    (entry(expire="0"), "account expired"),
    (entry(expire=str(DAY + 1)), None),
    (entry(lastchg="0"), "must be changed"),
    (entry(lastchg=str(DAY - 91), mx="90"), "password expired (91 days old, max 90)"),
    (entry(lastchg=str(DAY - 91), mx="90", inactive="5"), "password expired (91"),
    (entry(lastchg=str(DAY - 96), mx="90", inactive="5"), "past the inactive period"),
    (entry(lastchg=str(DAY - 95), mx="90", inactive="5"), "password expired (95"),
    (entry(lastchg=str(DAY + 3), mx="1"), None),
    (entry(lastchg=""), None),
])
def test_shadow_verdicts(shadow, words):
    """usermod -L, chage -E, chage -d 0 and max + inactive close an account as pam_unix does."""
    reason = shadow_refusal(shadow, DAY)
    assert (reason is None) if words is None else (reason is not None and words in reason)


SHADOW_TEXT = (f"root:*:19000:0:99999:7:::\nbobby:{HASH}:19000:0:99999:7:::\n"
               f"bob:!{HASH}:19000:0:99999:7:::\nbad:x:not-a-day:0:99999:7:::\n"
               f"bob:{HASH}:19000:0:99999:7:::\n+nis::::::::\nlast:*:1:0:9:7:::").encode()


def test_find_entry():
    """Entries are found by exact name, first one wins; no prefix match, no NIS lines."""
    assert shadowfile.find_entry(SHADOW_TEXT, "root").password == "*"
    assert shadowfile.find_entry(SHADOW_TEXT, "bob").password == "!" + HASH
    assert shadowfile.find_entry(SHADOW_TEXT, "bo") is None
    assert shadowfile.find_entry(SHADOW_TEXT, "last").expire_day == -1
    for name in ("+nis", "nis", "", "a:b", "x\n"):
        assert shadowfile.find_entry(SHADOW_TEXT, name) is None
    with pytest.raises(shadowfile.ShadowLineError):
        shadowfile.find_entry(SHADOW_TEXT, "bad")
    assert [e.name for e in shadowfile.entries(SHADOW_TEXT)] == ["root", "bobby", "bob", "bob",
                                                                 "last"]


def test_read_shadow_refuses_symlink_fifo_and_oversize(tmp_path):
    """The shadow file is read whole, bounded, and never through a symlink or from a FIFO."""
    real = tmp_path / "shadow"
    real.write_bytes(SHADOW_TEXT)
    assert shadowfile.read_shadow(str(real)) == SHADOW_TEXT
    link = tmp_path / "link"
    link.symlink_to(real)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path, limit in ((link, 1 << 20), (fifo, 1 << 20), (real, 10)):
        with pytest.raises(shadowfile.ShadowError):
            shadowfile.read_shadow(str(path), limit)


def _account(name="jones", uid="1001", shell="/bin/bash") -> Account:
    return Account(name, "", uid, "1001", "", f"/home/{name}", shell)


@pytest.mark.parametrize("account, words", [
    (_account(), None),
    (_account(uid="0"), "uid 0 is below -min-uid 1000"),
    (_account(uid="999"), "below -min-uid"),
    (_account(shell="/usr/sbin/nologin"), "no-login shell"),
    (_account(name="guest"), "-deny-users"),
])
def test_policy_verdicts(account, words):
    """-min-uid, -nologin-shells and -deny-users close accounts (DISUSER's counterparts)."""
    policy = A.Policy(deny_users=frozenset({"guest"}))
    reason = A.policy_refusal(account, policy, [1001], [])
    assert (reason is None) if words is None else (reason is not None and words in reason)


def test_allow_groups_verdict():
    """-allow-groups admits members only, primary or supplementary (DISMAIL's counterpart)."""
    policy = A.Policy(allow_groups=("pop",))
    assert A.policy_refusal(_account(), policy, [1001, 4242], {4242}) is None
    assert "not in -allow-groups (pop)" in A.policy_refusal(_account(), policy, [1001], {4242})
    assert "not in -allow-groups" in A.policy_refusal(_account(), policy, [1001], set())


def test_site_dummy_costs_what_most_accounts_cost():
    """Unknown and closed accounts are checked against the method and cost most hashes use."""
    if passwords.LIBXCRYPT is None:
        pytest.skip("libxcrypt (libcrypt.so.1) is not installed")
    yescrypt = passwords.LIBXCRYPT.crypt(b"pw", A.default_setting("$y$").encode()).decode()
    sha = passwords.LIBXCRYPT.crypt(b"pw", b"$6$rounds=6000$abc").decode()
    dummy = A.site_dummy([yescrypt, sha, sha])
    assert dummy.startswith("$6$rounds=6000$") and not passwords.verify_crypt(dummy, b"pw")
    assert A.site_dummy([yescrypt, yescrypt, sha]).startswith("$y$j9T$")
    assert A.site_dummy([]).startswith("$")


def test_passwd_file_source_verdicts():
    """passwd-file keeps today's rules: flags in the extra field, plus -deny-users."""
    users = parse_users("alice:{PLAIN}pw::::::\njones:{PLAIN}pw:::::: disuser\n"
                        "guest:{PLAIN}pw::::::\n")
    source = A.PasswdFileSource(accountspec.UsersSpec("passwd-file", "/x"), users,
                                A.Policy(deny_users=frozenset({"guest"})))
    assert source.authenticate("alice", b"pw").accepted
    verdicts = {name: source.authenticate(name, password) for name, password in
                (("alice", b"no"), ("jones", b"pw"), ("guest", b"pw"), ("nobody", b"pw"))}
    assert all(v.account is None for v in verdicts.values())
    assert [v.reason for v in verdicts.values()] == [
        "wrong password", "closed in the users file (disuser)", "listed in -deny-users",
        "unknown user"]
    assert not source.needs_thread("alice")
