"""The accounts part of a worker's context: the users table, its reload, and the password and
APOP checks against it.

Sessions call ``authenticate`` / ``authenticate_apop``; worker/reloading.py calls ``reload``
(startup, SIGHUP, a change of the file). Every failure looks the same to the caller.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from shared import passwords
from shared.logsetup import log
from shared.users import Account, UsersFileError, load_users
from worker import sasl


def _direct(function: Callable[..., Any], *args: Any) -> Any:
    return function(*args)


class Accounts:
    def __init__(self, path: str, users: dict[str, Account],
                 offload: Callable[..., Any] = _direct, hostname: str = "localhost"):
        self.path = path
        self.users = users  # swapped whole by reload: a session sees the old table or the new
        # Password hashing can take milliseconds: the worker runs it off the event loop.
        self._offload = offload
        self.hostname = hostname
        self._apop_serial = 0

    def paths(self) -> tuple[str, ...]:
        return (self.path,) if self.path else ()

    def reload(self, why: str) -> bool:
        """Re-read the users file; one that fails to load keeps the accounts in use now."""
        try:
            users = load_users(self.path)
        except UsersFileError as exc:
            log.error("%s; keeping the previous users", exc)
            return False
        self.users = users
        log.info("users file reloaded: %d accounts (%s)", len(users), why)
        return True

    @property
    def dummy(self) -> str:
        """The hash an unknown name is checked against (shared/users.py ``Users.dummy``)."""
        return getattr(self.users, "dummy", passwords.DUMMY)

    def authenticate(self, user: str, password: bytes) -> Account | None:
        """The account if the password is right and the account accessible, else None.

        Unknown users are checked against a dummy hash of the same cost, and every failure
        looks the same to the caller: nothing tells which users exist.
        """
        account = self.users.get(user)
        stored = account.password if account else self.dummy
        if passwords.is_cheap(stored):
            good = passwords.verify(stored, password)
        else:  # crypt, bcrypt, argon2: milliseconds, in a thread that releases the GIL
            good = self._offload(passwords.verify, stored, password)
        if not good or account is None or not account.accessible:
            return None
        return account

    def apop_timestamp(self) -> str:
        """A greeting timestamp unique to this session (RFC 1939 section 7)."""
        self._apop_serial += 1
        return f"<{os.getpid()}.{self._apop_serial}.{int(time.time())}@{self.hostname}>"

    def authenticate_apop(self, user: str, timestamp: str, digest: str) -> Account | None:
        """APOP needs the password itself: only {PLAIN} accounts can use it."""
        account = self.users.get(user)
        secret = passwords.plain_secret(account.password) if account is not None else None
        good = sasl.apop_digest_ok(timestamp, secret if secret is not None else b"\0" * 16, digest)
        if not good or secret is None or account is None or not account.accessible:
            return None
        return account
