"""Account sources (issue 12): ``-users`` specs, /etc/shadow parsing and the SYSUAF-flag verdicts
on synthetic lines, then real system accounts made with useradd, checked through ``shadow:`` and
``pam:``. The real-account tests run as root when CI is set or --system-accounts is given; they
delete every user and group they make, even when a test fails.
"""

from __future__ import annotations

import os
import pwd
import grp
import subprocess
import sys
from pathlib import Path

import pytest

from shared import accountsource as A
from shared import accountspec, pamauth, passwords, shadowfile
from shared import settings as S
from shared.shadowfile import ShadowEntry, parse_shadow_line, shadow_refusal
from shared.users import Account, parse_users
from systemaccounts import PREFIX, Site, exists as _exists, run as _run, system_site
from systemaccounts import why_not_system_accounts as _why_not_system_accounts

ROOT = Path(__file__).resolve().parent.parent
DAY = 20_000  # a fixed "today" for the sans-IO verdicts
HASH = "$6$saltsalt$" + "x" * 86


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


# -- real system accounts ---------------------------------------------------------------------------
PAM_EXAMPLE = (ROOT / "etc" / "pam.d" / "iupop3").read_text()


@pytest.fixture(scope="module")
def site(request):
    """Real users for every SYSUAF-flag counterpart, a group "pop" for -allow-groups, and the
    example PAM service installed under a name of the tests' own."""
    reason = _why_not_system_accounts(request.config)
    if reason:
        pytest.skip(reason)
    with system_site() as made:
        made.add_group(made.group)
        member = ("-s", "/bin/bash", "-G", made.group)
        made.add_user("sha", *member, method="SHA512")
        made.add_user("yes", *member)  # Debian's chpasswd default: yescrypt
        made.add_user("lock", *member)
        _run("usermod", "-L", made.users["lock"])
        made.add_user("exp", *member)
        _run("chage", "-E", "0", made.users["exp"])
        made.add_user("chg", *member)
        _run("chage", "-d", "0", made.users["chg"])
        made.add_user("nol", "-s", "/usr/sbin/nologin", "-G", made.group)
        made.add_user("out", "-s", "/bin/bash")
        made.add_user("empty", *member)
        _run("passwd", "-d", made.users["empty"])
        made.install(Path("/etc/pam.d") / f"{PREFIX}{made.suffix}", PAM_EXAMPLE)
        yield made


def _source(site: Site, users: str, **overrides):
    values = {"users": users, "allow_groups": (site.group,)} | overrides
    return A.open_source(S.Settings(**values))


def _shadow_hash(name: str) -> str:
    return shadowfile.find_entry(shadowfile.read_shadow(), name).password


def test_the_site_is_what_the_tests_think(site):
    """chpasswd -c SHA512 wrote $6$, the default yescrypt $y$, usermod -L a "!" in front."""
    assert _shadow_hash(site.users["sha"]).startswith("$6$")
    assert _shadow_hash(site.users["yes"]).startswith("$y$")
    assert _shadow_hash(site.users["lock"]).startswith("!$y$")
    assert pwd.getpwnam(site.users["yes"]).pw_uid >= 1000


SHADOW_REASONS = {"lock": "locked", "exp": "account expired", "chg": "must be changed",
                  "nol": "no-login shell", "out": "not in -allow-groups"}


@pytest.mark.parametrize("users", ["shadow:", "pam:"])
def test_system_account_verdicts(site, users):
    """SHA512-CRYPT and yescrypt users log in; each closed account is refused with the right
    password, and every refusal is a Verdict without an account, as a wrong password is.
    pam: applies the shadow checks itself before asking PAM (pam_unix would fail a locked
    hash without hashing: a timing tell)."""
    spec = users if users == "shadow:" else f"pam:{PREFIX}{site.suffix}"
    source = _source(site, spec)
    for role in ("sha", "yes"):
        verdict = source.authenticate(site.users[role], site.passwords[role].encode(), "127.0.0.1")
        assert verdict.accepted, (role, verdict)
        assert verdict.account.home == f"/home/{site.users[role]}"
        assert int(verdict.account.uid) == pwd.getpwnam(site.users[role]).pw_uid
        wrong = source.authenticate(site.users[role], b"not the password", "127.0.0.1")
        assert wrong.account is None and not wrong.fault
    for role, words in SHADOW_REASONS.items():
        verdict = source.authenticate(site.users[role], site.passwords[role].encode(),
                                      "127.0.0.1")
        assert verdict.account is None and words in verdict.reason, (role, verdict)
    unknown = source.authenticate(f"{PREFIX}{site.suffix}none", b"x", "127.0.0.1")
    assert unknown == A.Verdict(None, "unknown user")


def test_pam_example_service_stacks(site):
    """etc/pam.d/iupop3 itself: pam_unix without nullok refuses an empty password, and its
    account stack refuses an expired account and a password that must be changed."""
    service = f"{PREFIX}{site.suffix}"

    def pam(role: str, password: str | None = None) -> str | None:
        secret = site.passwords[role] if password is None else password
        return pamauth.check(service, site.users[role], secret.encode(), "127.0.0.1")

    assert pam("yes") is None
    assert pam("lock").startswith("PAM authentication")
    assert pam("empty", "").startswith("PAM authentication")
    assert pam("exp") == "PAM account: User account has expired"
    assert pam("chg").startswith("PAM account: Authentication token is no longer valid")
    shadow = _source(site, "shadow:").authenticate(site.users["empty"], b"", "127.0.0.1")
    assert shadow.account is None and "no usable password" in shadow.reason


@pytest.mark.parametrize("users", ["shadow:", "pam:"])
def test_min_uid_and_deny_users_on_real_accounts(site, users):
    """-min-uid above the users' uids and -deny-users close accounts with a right password."""
    spec = users if users == "shadow:" else f"pam:{PREFIX}{site.suffix}"
    name, password = site.users["yes"], site.passwords["yes"].encode()
    uid = pwd.getpwnam(name).pw_uid
    high = _source(site, spec, min_uid=uid + 1).authenticate(name, password, "127.0.0.1")
    assert high.account is None and "below -min-uid" in high.reason
    denied = _source(site, spec, deny_users=(name,)).authenticate(name, password, "127.0.0.1")
    assert denied.account is None and "-deny-users" in denied.reason


def test_new_user_logs_in_without_reload(site):
    """Accounts are looked up at each login: a user added after the source opened logs in."""
    source = _source(site, "shadow:", allow_groups=())
    with system_site() as later:
        name = later.add_user("new", "-s", "/bin/bash")
        assert source.authenticate(name, later.passwords["new"].encode(), "::1").accepted


def test_unknown_users_cost_what_the_site_hashes_cost(site):
    """The dummy an unknown user is checked against has the method and cost of most hashes."""
    source = _source(site, "shadow:")
    assert A._cost_key(source.dummy) == A._cost_key(_shadow_hash(site.users["yes"]))


def test_pam_sees_the_client_address(site, tmp_path):
    """PAM_RHOST carries the client's address: pam_access refuses 127.0.0.2, admits 127.0.0.1."""
    access = site.install(tmp_path / "access.conf", "-:ALL:127.0.0.2\n+:ALL:ALL\n")
    service = f"{PREFIX}{site.suffix}acc"
    site.install(Path("/etc/pam.d") / service,
                 PAM_EXAMPLE + f"account required pam_access.so accessfile={access}\n")
    source = _source(site, f"pam:{service}")
    name, password = site.users["yes"], site.passwords["yes"].encode()
    assert source.authenticate(name, password, "127.0.0.1").accepted
    refused = source.authenticate(name, password, "127.0.0.2")
    assert refused.account is None and "PAM account" in refused.reason


def test_missing_pam_service_refused_at_start(site):
    """pam:SERVICE without a service file stops the start (PAM would fall back to "other")."""
    settings = S.Settings(users=f"pam:{PREFIX}{site.suffix}missing")
    assert "no PAM service file" in A.startup_problem(settings)
    assert A.startup_problem(S.Settings(users="shadow:", allow_groups=(site.group,))) is None
    problem = A.startup_problem(S.Settings(users="shadow:", allow_groups=(site.group + "x",)))
    assert problem == f"-allow-groups {site.group}x: no such group"


def test_cleanup_runs_even_when_a_test_fails(request):
    """The users a failing test made are deleted all the same, home and group included."""
    reason = _why_not_system_accounts(request.config)
    if reason:
        pytest.skip(reason)
    with pytest.raises(RuntimeError), system_site() as doomed:
        doomed.add_group(doomed.group)
        name = doomed.add_user("doom", "-G", doomed.group)
        assert _exists(name) and os.path.isdir(f"/home/{name}")
        raise RuntimeError("a test fails halfway")
    assert not _exists(name) and not _exists(doomed.group, grp.getgrnam)
    assert not os.path.exists(f"/home/{name}")


def test_no_test_user_is_left_behind(request):
    """No user named with the tests' prefix is on the system but this run's own (the site's
    teardown then checks that those are gone too)."""
    reason = _why_not_system_accounts(request.config)
    if reason:
        pytest.skip(reason)
    request.getfixturevalue("site")  # the module's site exists; this test only reads
    left = [p.pw_name for p in pwd.getpwall() if p.pw_name.startswith(PREFIX)]
    site_users = set(request.getfixturevalue("site").users.values())
    assert set(left) <= site_users, f"left by earlier runs: {sorted(set(left) - site_users)}"
