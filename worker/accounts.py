"""The accounts part of a worker's context: the account source (shared/accountsource.py), its
reload, and the timing of every check, for USER/PASS, SASL and APOP.

Sessions call ``authenticate`` / ``authenticate_apop`` and get a Verdict (the account, or the
reason for the log); worker/reloading.py calls ``reload`` (SIGHUP, a change of the users
file). Every failure looks the same to the caller, in its answer and in its time: a refusal is
padded to the slowest hash class the source holds (the passwd-file's (scheme, cost) pairs,
or the classes in /etc/shadow for system accounts), measured at each load.
"""

from __future__ import annotations

import collections
import functools
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

from shared import passwords
from shared.accountsource import AccountSource, AccountSourceError, PasswdFileSource, Verdict
from shared.logsetup import log
from shared.users import UsersFileError
from worker import sasl


MAX_COST_CLASSES = 16  # the most common (scheme, cost) pairs measured at load; rarer: unpadded
_APOP_ONLY_PASSWD_FILE = Verdict(None, "APOP needs a {PLAIN} password from a passwd-file")


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


def source_check_times(source: AccountSource) -> dict[Any, float]:
    """The classes to pad refusals to, for any source; blocking work (hashing, /etc/shadow)."""
    if isinstance(source, PasswdFileSource):
        users = source.users
        return check_times([a.password for a in users.values()] + [users.dummy])
    times: dict[Any, float] = {}
    for dummy in source.cost_examples(MAX_COST_CLASSES):
        started = time.perf_counter()
        for _ in range(source.CHECKS_PER_LOGIN):
            passwords.verify_crypt(dummy, b"not the password")
        times[dummy.rpartition("$")[0]] = time.perf_counter() - started
    return times


class Accounts:
    def __init__(self, source: AccountSource, offload: Callable[..., Any] = _direct,
                 hostname: str = "localhost", sleep: Callable[[float], Any] = time.sleep):
        # Password hashing, NSS and PAM can take milliseconds: the worker runs them off the
        # event loop.
        self._offload = offload
        self._sleep = sleep
        self.hostname = hostname
        self._apop_serial = 0
        self.source: AccountSource = source
        # Seconds a check of each hash class takes: measured at load; for a passwd-file then a
        # moving average of the checks made (thread-pool queueing and the machine's load included).
        self._times: dict[Any, float] = {}
        self._baseline = 0.0  # the slowest class's time as measured at load
        self._install(source)

    def _install(self, source: AccountSource) -> None:
        times = self._offload(source_check_times, source)
        # One assignment each: a session sees the old source or the new one.
        self.source, self._times = source, times
        self._baseline = max(times.values(), default=0.0)

    @property
    def slowest(self) -> float:
        """Seconds a failed check is padded to: the slowest class in use."""
        return max(self._times.values(), default=0.0)

    @property
    def users(self) -> dict:
        """The passwd-file's table (empty for system sources: they are looked up per login)."""
        return self.source.users if isinstance(self.source, PasswdFileSource) else {}

    def paths(self) -> tuple[str, ...]:
        """Files to watch: the passwd-file; system sources have none (looked up per login)."""
        if isinstance(self.source, PasswdFileSource):
            return (self.source.spec.argument,)
        return ()

    def reload(self, why: str) -> bool:
        """A new source (the users file re-read; for system accounts a fresh dummy and the
        site's hash classes); one that fails to load keeps the source in use now."""
        try:
            source = self._offload(self.source.reloaded)
        except (UsersFileError, AccountSourceError) as exc:
            log.error("%s; keeping the previous users", exc)
            return False
        self._install(source)
        if isinstance(source, PasswdFileSource):
            log.info("users file reloaded: %d accounts (%s)", len(source.users), why)
        else:
            log.info("users source %s reloaded (%s)", source.spec, why)
        return True

    def authenticate(self, user: str, password: bytes, rhost: str = "") -> Verdict:
        """The source's verdict on ``user`` and ``password`` from ``rhost``.

        Unknown users are checked against a dummy hash of the same cost, and every refusal
        lasts as long as the slowest class's check: nothing tells which users exist.
        """
        source = self.source
        started = time.perf_counter()
        if source.needs_thread(user):  # crypt, bcrypt, argon2, NSS, PAM: off the loop
            verdict = self._offload(source.authenticate, user, password, rhost)
        else:  # {PLAIN} and digests: microseconds
            verdict = source.authenticate(user, password, rhost)
        elapsed = time.perf_counter() - started
        self._observe(source, user, elapsed)
        if not verdict.accepted:
            left = self.slowest - elapsed  # a failure lasts as long as the slowest class's check
            if left > 0:
                self._sleep(left)
        return verdict

    def _observe(self, source: AccountSource, user: str, elapsed: float) -> None:
        """Fold a check's duration into its class's time (thread-pool queueing and the
        machine's load included), so the padding follows what checks cost now."""
        if isinstance(source, PasswdFileSource):
            account = source.lookup(user)
            cost = _cost(account.password if account else source.users.dummy)
        elif self._times:
            # A system source does not say which class a check was: a check that took at least
            # half the slowest class's time measured at load is taken as one of it (PAM's own
            # overhead, which that measure of bare hashes misses, included); cheaper ones are
            # padded. Against the load-time measure, not the average: after one slow check
            # (a stuck NSS server) the ordinary ones still count and bring the average back.
            cost = max(self._times, key=self._times.__getitem__)
            if elapsed < self._baseline / 2:
                return
        else:
            return
        if cost in self._times:
            self._times[cost] = 0.8 * self._times[cost] + 0.2 * elapsed

    def apop_timestamp(self) -> str:
        """A greeting timestamp unique to this session (RFC 1939 section 7)."""
        self._apop_serial += 1
        return f"<{os.getpid()}.{self._apop_serial}.{int(time.time())}@{self.hostname}>"

    def authenticate_apop(self, user: str, timestamp: str, digest: str) -> Verdict:
        """APOP needs the password itself: only {PLAIN} accounts of a passwd-file can use it;
        everyone else is refused like a wrong digest."""
        source = self.source
        account = source.lookup(user) if isinstance(source, PasswdFileSource) else None
        secret = passwords.plain_secret(account.password) if account is not None else None
        good = sasl.apop_digest_ok(timestamp, secret if secret is not None else b"\0" * 16, digest)
        if not isinstance(source, PasswdFileSource):
            return _APOP_ONLY_PASSWD_FILE
        if account is None:
            return Verdict(None, "unknown user")
        if not good or secret is None:
            return Verdict(None, "wrong APOP digest" if secret is not None
                           else "APOP needs a {PLAIN} password")
        if user in source.policy.deny_users:
            return Verdict(None, "listed in -deny-users")
        if not account.accessible:
            return Verdict(None, "closed in the users file")
        return Verdict(account)
