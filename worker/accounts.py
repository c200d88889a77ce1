"""The accounts part of a worker's context: the users table, its reload, and the password and
APOP checks against it.

Sessions call ``authenticate`` / ``authenticate_apop``; worker/reloading.py calls ``reload``
(SIGHUP, a change of the file). Every failure looks the same to the caller, in its answer and
in its time: a failed check is padded to the slowest (scheme, cost) in the file, measured at
each load, so an account with a costlier hash than the unknown-user dummy is not told apart.
"""

from __future__ import annotations

import collections
import functools
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

from shared import passwords
from shared.logsetup import log
from shared.users import Account, UsersFileError, load_users
from worker import sasl


MAX_COST_CLASSES = 16  # the most common (scheme, cost) pairs measured at load; rarer: unpadded


def _direct(function: Callable[..., Any], *args: Any) -> Any:
    return function(*args)


@functools.lru_cache(maxsize=4096)
def _cost(stored: str) -> passwords.Cost | None:
    return passwords.cost_of(stored)


def check_times(stored_hashes: Iterable[str]) -> dict[passwords.Cost, float]:
    """Seconds each (scheme, cost) class of the given hashes takes to check a wrong password
    (a dummy of the class, so no real hash is tried); blocking work."""
    classes: collections.Counter[passwords.Cost] = collections.Counter()
    example: dict[passwords.Cost, str] = {}
    for stored in stored_hashes:
        cost = passwords.cost_of(stored)
        if cost is not None and not passwords.is_cheap(stored):
            classes[cost] += 1
            example.setdefault(cost, stored)
    times = {}
    for cost, _ in classes.most_common(MAX_COST_CLASSES):
        dummy = passwords.dummy_like(example[cost])
        started = time.perf_counter()
        passwords.verify(dummy, b"not the password")
        times[cost] = time.perf_counter() - started
    return times


class Accounts:
    def __init__(self, path: str, users: dict[str, Account],
                 offload: Callable[..., Any] = _direct, hostname: str = "localhost",
                 sleep: Callable[[float], Any] = time.sleep):
        self.path = path
        # Password hashing can take milliseconds: the worker runs it off the event loop.
        self._offload = offload
        self._sleep = sleep
        self.hostname = hostname
        self._apop_serial = 0
        self.users: dict[str, Account] = {}
        # Seconds a check of each (scheme, cost) class takes: measured at load, then a moving
        # average of the checks made (thread-pool queueing and the machine's load included).
        self._times: dict[passwords.Cost, float] = {}
        self._install(users)

    def _install(self, users: dict[str, Account]) -> None:
        hashes = [a.password for a in users.values()] + [getattr(users, "dummy", passwords.DUMMY)]
        times = self._offload(check_times, hashes)
        # One assignment each: a session sees the old table or the new one.
        self.users, self._times = users, times

    @property
    def slowest(self) -> float:
        """Seconds a failed check is padded to: the slowest class in use."""
        return max(self._times.values(), default=0.0)

    def paths(self) -> tuple[str, ...]:
        return (self.path,) if self.path else ()

    def reload(self, why: str) -> bool:
        """Re-read the users file; one that fails to load keeps the accounts in use now."""
        try:
            users = load_users(self.path)
        except UsersFileError as exc:
            log.error("%s; keeping the previous users", exc)
            return False
        self._install(users)
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
        started = time.perf_counter()
        if passwords.is_cheap(stored):
            good = passwords.verify(stored, password)
        else:  # crypt, bcrypt, argon2: milliseconds, in a thread that releases the GIL
            good = self._offload(passwords.verify, stored, password)
        elapsed = time.perf_counter() - started
        cost = _cost(stored)
        if cost in self._times:
            self._times[cost] = 0.8 * self._times[cost] + 0.2 * elapsed
        if not good or account is None or not account.accessible:
            left = self.slowest - elapsed  # a failure lasts as long as the slowest class's check
            if left > 0:
                self._sleep(left)
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
