"""The ``-users`` setting: which account source serves logins, and whether it can run as configured.

Written like ``-mail``: ``passwd-file:PATH`` (a bare path means the same), ``shadow:`` or
``pam:SERVICE``. shared/settings.py validates the value with ``canonical``; the supervisor's
start-up calls ``privilege_problem`` (through shared/accountsource.py's ``startup_problem``)
before anything forks. Light on purpose: the settings module imports it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

PASSWD_FILE, SHADOW, PAM = "passwd-file", "shadow", "pam"
SYSTEM_KINDS = frozenset({SHADOW, PAM})
DEFAULT_PAM_SERVICE = "iupop3"
FORMS = "passwd-file:PATH (or a bare path), shadow: or pam:SERVICE"


@dataclass(frozen=True)
class UsersSpec:
    """A parsed ``-users`` value: ``kind`` and its argument (a path, a PAM service or "")."""

    kind: str
    argument: str = ""

    @property
    def system(self) -> bool:
        """Accounts of the system (NSS), which need root in the workers."""
        return self.kind in SYSTEM_KINDS

    def __str__(self) -> str:
        return self.argument if self.kind == PASSWD_FILE else f"{self.kind}:{self.argument}"


def _prefix(value: str) -> tuple[str, str] | None:
    """("word", rest) when ``value`` starts with a source word and a colon, before any "/"."""
    word, colon, rest = value.partition(":")
    if not colon or "/" in word or not word or not word.replace("-", "").isalnum():
        return None
    return word.lower(), rest


def parse_users_spec(value: str) -> UsersSpec:
    """The source a ``-users`` value names; ValueError (one line, naming the forms) if none.

    A bare path is a passwd-file. A word and a colon in front ("ldap:", "shadow:x") is read as
    a source and refused when unknown, so a typo cannot turn into a file name; a file whose
    name has a colon is written ``passwd-file:users:old`` or ``./users:old``.
    """
    if not value:
        raise ValueError(f"wants a users source: {FORMS}")
    found = _prefix(value)
    if found is None:
        return UsersSpec(PASSWD_FILE, os.path.abspath(os.path.expanduser(value)))
    kind, rest = found
    if kind == PASSWD_FILE:
        if not rest:
            raise ValueError("passwd-file: needs a path (passwd-file:/etc/iupop3/users)")
        return UsersSpec(PASSWD_FILE, os.path.abspath(os.path.expanduser(rest)))
    if kind == SHADOW:
        if rest:
            raise ValueError(f"shadow: takes no argument, not {rest!r} (it reads /etc/shadow)")
        return UsersSpec(SHADOW)
    if kind == PAM:
        service = rest or DEFAULT_PAM_SERVICE
        if not all(c.isalnum() or c in "._-" for c in service) or service.startswith("."):
            raise ValueError(f"pam: service {service!r} is not a name from /etc/pam.d")
        return UsersSpec(PAM, service)
    raise ValueError(f"unknown users source {kind + ':'!r}: use {FORMS}")


def canonical(value: str) -> str:
    """The value settings keep: an absolute path for a passwd-file (as before), else
    ``shadow:`` or ``pam:SERVICE``; ValueError as ``parse_users_spec``."""
    return str(parse_users_spec(value))


def privilege_problem(settings: Any) -> str | None:
    """Why these settings' users source cannot work under the privilege model, or None.

    System accounts need root in the workers: reading /etc/shadow, pam_unix asking about
    another user (its unix_chkpwd helper refuses a non-root caller), files owned by each user.
    ``-user`` drops root for good before the workers start, so the two are refused together.
    """
    spec = parse_users_spec(settings.users)
    if spec.system and settings.user:
        return (f"-users {spec} needs the workers to keep root (to check system passwords); "
                f"it cannot run with -user {settings.user}")
    return None
