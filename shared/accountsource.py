"""Where accounts come from: a passwd-file, the system's users with /etc/shadow, or PAM.

Each source answers one blocking call, ``authenticate(name, password, rhost)``, with a Verdict:
the Account when the login may proceed, else the reason for the log. The worker runs it in its
thread pool (NSS, /etc/shadow, hashing and PAM all block) and answers every refusal with the same
``-ERR``; every refusal also costs what a wrong password costs. Sources are immutable: a reload
builds a new one (``reloaded``) and the caller swaps it in. The supervisor calls
``startup_problem`` before anything forks.
"""

from __future__ import annotations

import ctypes
import grp
import os
import pwd
import secrets
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from shared import passwords, pamauth, shadowfile
from shared.accountspec import PAM, PASSWD_FILE, SHADOW, UsersSpec, parse_users_spec
from shared.accountspec import privilege_problem
from shared.users import Account, Users, UsersFileError, load_users


class AccountSourceError(ValueError):
    """A source that cannot serve logins; the message is one line for the user."""


@dataclass(frozen=True)
class Verdict:
    """What a login attempt comes to. ``reason`` is for the log only, never for the wire."""

    account: Account | None  # set exactly when the login is accepted
    reason: str = ""
    fault: bool = False  # the server could not decide (unreadable /etc/shadow ...): log an ERROR

    @property
    def accepted(self) -> bool:
        return self.account is not None


@dataclass(frozen=True)
class Policy:
    """The settings that close system accounts, as SYSUAF's DISUSER and DISMAIL did."""

    min_uid: int = 1000
    nologin_shells: frozenset[str] = frozenset(
        {"/usr/sbin/nologin", "/sbin/nologin", "/bin/false", "/usr/bin/false"})
    deny_users: frozenset[str] = frozenset()
    allow_groups: tuple[str, ...] = ()

    @classmethod
    def from_settings(cls, settings: Any) -> Policy:
        return cls(settings.min_uid, frozenset(settings.nologin_shells),
                   frozenset(n.lower() for n in settings.deny_users), tuple(settings.allow_groups))


def policy_refusal(account: Account, policy: Policy, user_gids: Collection[int],
                   allowed_gids: Collection[int]) -> str | None:
    """Why the settings close this system account, or None. Pure: the caller looks up groups.

    ``user_gids`` are the account's groups (primary and supplementary); ``allowed_gids`` those
    of ``-allow-groups`` that exist.
    """
    if account.name.lower() in policy.deny_users:
        return "listed in -deny-users"
    if not account.uid.isdigit() or int(account.uid) < policy.min_uid:
        return f"uid {account.uid} is below -min-uid {policy.min_uid}"
    if account.shell in policy.nologin_shells:
        return f"no-login shell {account.shell}"
    if policy.allow_groups and not set(user_gids) & set(allowed_gids):
        return f"not in -allow-groups ({' '.join(policy.allow_groups)})"
    return None


# -- NSS (blocking: a site's NSS may ask LDAP or sssd) -------------------------------------------
def nss_account(name: str) -> Account | None:
    """The system account ``name`` from pwd.getpwnam, looked up at each login (a new useradd
    needs no reload); no password in it: that stays in /etc/shadow or behind PAM."""
    if not shadowfile.valid_name(name) or "/" in name:
        return None
    try:
        entry = pwd.getpwnam(name)
    except (KeyError, ValueError):
        return None
    if entry.pw_name != name:  # a case-insensitive NSS backend: keep names exact
        return None
    return Account(name, "", str(entry.pw_uid), str(entry.pw_gid), entry.pw_gecos,
                   entry.pw_dir, entry.pw_shell)


def group_ids(account: Account) -> list[int]:
    """The account's primary and supplementary group ids."""
    try:
        return os.getgrouplist(account.name, int(account.gid))
    except (OSError, ValueError):
        return [int(account.gid)] if account.gid.isdigit() else []


def existing_group_ids(names: Collection[str]) -> set[int]:
    """The ids of the named groups that exist now (looked up at each login, like accounts)."""
    found = set()
    for name in names:
        try:
            found.add(grp.getgrnam(name).gr_gid)
        except KeyError:
            continue
    return found


# -- dummies: what an unknown or closed account is checked against -------------------------------
def _cost_key(hashed: str) -> str:
    """A crypt(3) hash without its salt and digest: "$y$j9T", "$6$rounds=10000", "$6"."""
    parts = hashed.split("$")
    return "$".join(parts[:-1] if hashed.startswith("$2") else parts[:-2])


def site_dummy(hashes: Collection[str]) -> str:
    """A hash nobody knows the password of, with the method and cost most accounts use.

    libxcrypt reads the method, cost and salt from a whole hash given as the setting, so
    hashing a random secret with a real hash as setting gives that cost exactly.
    """
    usable = [h for h in hashes if h.startswith("$") and len(h.split("$")) >= 4]
    if passwords.LIBXCRYPT is None:
        return passwords.split_scheme(passwords.DUMMY)[1]
    setting = default_setting()
    if usable:
        key, _ = Counter(map(_cost_key, usable)).most_common(1)[0]
        setting = next(h for h in usable if _cost_key(h) == key)
    secret = secrets.token_urlsafe(24).encode("ascii")
    made = passwords.LIBXCRYPT.crypt(secret, setting.encode("ascii")) if setting else None
    return made.decode("ascii") if made else passwords.split_scheme(passwords.DUMMY)[1]


def default_setting(prefix: str | None = None) -> str:
    """A setting with fresh salt for ``prefix`` ("$y$") or libxcrypt's default method (yescrypt
    on Debian); "" if unavailable."""
    try:
        gensalt = ctypes.CDLL("libcrypt.so.1").crypt_gensalt_rn
    except (OSError, AttributeError):
        return ""
    gensalt.argtypes = [ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p, ctypes.c_int,
                        ctypes.c_char_p, ctypes.c_int]
    gensalt.restype = ctypes.c_char_p
    out = ctypes.create_string_buffer(256)
    made = gensalt(prefix.encode("ascii") if prefix else None, 0, None, 0, out, len(out))
    return made.decode("ascii") if made else ""


def _shadow_hashes(path: str) -> list[str]:
    try:
        data = shadowfile.read_shadow(path)
    except shadowfile.ShadowError:
        return []
    return [e.usable_hash for e in shadowfile.entries(data) if e.usable_hash]


def _shadow_dummy(path: str) -> str:
    return site_dummy(_shadow_hashes(path))


def cost_examples(hashes: Collection[str], limit: int) -> list[str]:
    """One dummy per method+cost among ``hashes``, the ``limit`` most common: what a worker
    times to pad refusals (worker/accounts.py), never a real account's hash."""
    usable = [h for h in hashes if h.startswith("$") and len(h.split("$")) >= 4]
    keys = Counter(map(_cost_key, usable)).most_common(limit)
    return [site_dummy([h for h in usable if _cost_key(h) == key]) for key, _ in keys]


# -- the sources ---------------------------------------------------------------------------------
_UNKNOWN = Verdict(None, "unknown user")


class PasswdFileSource:
    """Today's users file (shared/users.py): accounts and their flags live in the file."""

    def __init__(self, spec: UsersSpec, users: Users, policy: Policy):
        self.spec, self.users, self.policy = spec, users, policy

    @classmethod
    def open(cls, spec: UsersSpec, policy: Policy) -> PasswdFileSource:
        return cls(spec, load_users(spec.argument), policy)  # UsersFileError names the line

    def reloaded(self) -> PasswdFileSource:
        """The file read anew; UsersFileError keeps the caller on this one."""
        return self.open(self.spec, self.policy)

    def lookup(self, name: str) -> Account | None:
        return self.users.get(name)

    def needs_thread(self, name: str) -> bool:
        """Whether checking ``name``'s password is worth a thread hop (not PLAIN or digests)."""
        account = self.users.get(name)
        return not passwords.is_cheap(account.password if account else self.users.dummy)

    def authenticate(self, name: str, password: bytes, rhost: str = "") -> Verdict:
        account = self.users.get(name)
        good = passwords.verify(account.password if account else self.users.dummy, password)
        if account is None:
            return _UNKNOWN
        if not good:
            return Verdict(None, "wrong password")
        if name in self.policy.deny_users:
            return Verdict(None, "listed in -deny-users")
        if not account.accessible:
            closed = sorted(account.flags) or [f"expire={account.expires}"]
            return Verdict(None, f"closed in the users file ({' '.join(closed)})")
        return Verdict(account)


class SystemSource:
    """The system's accounts through NSS, closed by the settings (``Policy``) and by their
    shadow entry; subclasses check the password."""

    def __init__(self, spec: UsersSpec, policy: Policy, dummy: str,
                 shadow_path: str = shadowfile.SHADOW_PATH):
        self.spec, self.policy, self.dummy, self.shadow_path = spec, policy, dummy, shadow_path

    def reloaded(self) -> SystemSource:
        """A fresh dummy (the site's common hash may have changed); accounts need no reload."""
        return type(self)(self.spec, self.policy, _shadow_dummy(self.shadow_path),
                          self.shadow_path)

    # How many hash checks one login costs (worker/accounts.py pads refusals to that).
    CHECKS_PER_LOGIN = 1

    def lookup(self, name: str) -> Account | None:
        return nss_account(name)

    def cost_examples(self, limit: int) -> list[str]:
        """Dummies of the site's hash classes (blocking: reads /etc/shadow)."""
        return cost_examples(_shadow_hashes(self.shadow_path), limit)

    def needs_thread(self, name: str) -> bool:
        return True

    def closed(self, account: Account) -> str | None:
        """Why the settings close ``account`` (the groups are looked up now), or None."""
        allowed = existing_group_ids(self.policy.allow_groups) if self.policy.allow_groups else ()
        return policy_refusal(account, self.policy, group_ids(account), allowed)

    def shadow_entry(self, name: str) -> tuple[shadowfile.ShadowEntry | None, Verdict]:
        """(the entry, a refusal to use if there is none). Blocking: reads the file."""
        try:
            entry = shadowfile.find_entry(shadowfile.read_shadow(self.shadow_path), name)
        except shadowfile.ShadowLineError as exc:
            return None, Verdict(None, f"unreadable entry in {self.shadow_path}: {exc}", True)
        except shadowfile.ShadowError as exc:
            return None, Verdict(None, str(exc), True)
        return entry, Verdict(None, f"no entry in {self.shadow_path}")


class ShadowSource(SystemSource):
    """``shadow:``: passwords and password ageing from /etc/shadow, checked with libxcrypt."""

    def authenticate(self, name: str, password: bytes, rhost: str = "",
                     day: int | None = None) -> Verdict:
        account = self.lookup(name)
        entry, missing = self.shadow_entry(name) if account else (None, _UNKNOWN)
        # A locked entry's hash (behind its "!") is checked too: it costs what the open one does.
        stored = entry.usable_hash if entry is not None and entry.usable_hash else self.dummy
        good = passwords.verify_crypt(stored, password) and stored is not self.dummy
        if account is None or entry is None:
            return missing
        refusal = self.closed(account) or shadowfile.shadow_refusal(
            entry, shadowfile.today() if day is None else day)
        if not good:  # no hash to be right against: the entry's own reason says more
            return Verdict(None, "wrong password" if stored is not self.dummy else str(refusal))
        return Verdict(None, refusal) if refusal else Verdict(account)


class PamSource(SystemSource):
    """``pam:SERVICE``: the password and PAM's account checks through the service's stacks,
    for accounts that the settings and (for accounts it holds) /etc/shadow leave open."""

    # strace of one pam_authenticate on Debian 12 (Linux-PAM 1.5.2) shows pam_unix computing
    # the hash twice (two 16 MiB yescrypt regions), and it took 2.1-2.4 times one libxcrypt
    # check for $6$ and $y$ alike: a refusal that does not ask PAM checks as many times.
    PAM_HASHES = 2
    CHECKS_PER_LOGIN = PAM_HASHES

    @property
    def service(self) -> str:
        return self.spec.argument

    def authenticate(self, name: str, password: bytes, rhost: str = "",
                     day: int | None = None) -> Verdict:
        account = self.lookup(name)
        if account is None:
            self._stand_in(self.dummy, password)
            return _UNKNOWN
        entry, _ = self.shadow_entry(name)  # NSS users outside /etc/shadow: PAM's word stands
        closed = self.closed(account) or (entry is not None and shadowfile.shadow_refusal(
            entry, shadowfile.today() if day is None else day))
        if closed:
            # pam_unix fails a locked ("!") hash in a millisecond, without hashing, and a
            # faillock module would count a closed account's tries: PAM is not asked. The
            # account's own hash (or the site's dummy) is checked instead, at the same cost.
            stored = entry.usable_hash if entry is not None and entry.usable_hash else self.dummy
            self._stand_in(stored, password)
            return Verdict(None, closed)
        problem = pamauth.check(self.service, name, password, rhost)
        return Verdict(None, problem) if problem else Verdict(account)

    def _stand_in(self, stored: str, password: bytes) -> None:
        """Spend what asking PAM would have cost, learning nothing."""
        for _ in range(self.PAM_HASHES):
            passwords.verify_crypt(stored, password)


AccountSource = PasswdFileSource | ShadowSource | PamSource


# -- start-up ------------------------------------------------------------------------------------
def open_source(settings: Any, shadow_path: str = shadowfile.SHADOW_PATH) -> AccountSource:
    """The source ``settings.users`` names, ready to serve; AccountSourceError (one line) if
    it cannot. Blocking (it reads the users file or /etc/shadow once)."""
    spec = parse_users_spec(settings.users)
    policy = Policy.from_settings(settings)
    if spec.kind == PASSWD_FILE:
        try:
            return PasswdFileSource.open(spec, policy)
        except UsersFileError as exc:
            raise AccountSourceError(str(exc)) from None
    missing = [g for g in policy.allow_groups if not existing_group_ids([g])]
    if missing:
        raise AccountSourceError(f"-allow-groups {' '.join(missing)}: no such group")
    if spec.kind == SHADOW:
        if passwords.LIBXCRYPT is None:
            raise AccountSourceError("-users shadow: needs libxcrypt (libcrypt.so.1) for the "
                                     "hashes in /etc/shadow")
        try:
            shadowfile.read_shadow(shadow_path)
        except shadowfile.ShadowError as exc:
            raise AccountSourceError(f"-users shadow: {exc}") from None
        return ShadowSource(spec, policy, _shadow_dummy(shadow_path), shadow_path)
    assert spec.kind == PAM
    try:
        pamauth.binding()
    except pamauth.PamUnavailable as exc:
        raise AccountSourceError(str(exc)) from None
    if pamauth.service_file(spec.argument) is None:
        raise AccountSourceError(
            f"-users {spec}: no PAM service file {spec.argument} in "
            f"{' or '.join(pamauth.PAM_DIRECTORIES)} (etc/pam.d/iupop3 is an example)")
    return PamSource(spec, policy, _shadow_dummy(shadow_path), shadow_path)


def startup_problem(settings: Any) -> str | None:
    """Why the server cannot serve these settings' accounts, or None: the privilege model
    first (system accounts with -user), then the source itself. For the supervisor's start."""
    problem = privilege_problem(settings)
    if problem:
        return problem
    try:
        open_source(settings)
    except AccountSourceError as exc:
        return str(exc)
    return None
