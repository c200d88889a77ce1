"""RFC 2449 LOGIN-DELAY and EXPIRE: the policy of one account, and what it decides.

The times they need (last login, first retrieval) are in the maildrop's ledger
(worker.ledger), so they hold across workers and restarts. The session (worker.pop3) asks
``Policy.for_account`` after a good password, ``too_soon`` under the maildrop lock, and
``expired`` at UPDATE; CAPA's lines come from ``capa_lines``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from shared.users import EXPIRE_NEVER, Account
from worker.ledger import Ledger
from worker.storebase import Message

DAY = 86400


def server_expire(settings: Any) -> int:
    """-expire as days, EXPIRE_NEVER for NEVER."""
    return EXPIRE_NEVER if settings.expire == "NEVER" else int(settings.expire)


@dataclass(frozen=True)
class Policy:
    login_delay: int = 0            # seconds; 0 = off
    expire_days: int = EXPIRE_NEVER

    @classmethod
    def for_account(cls, settings: Any, account: Account) -> "Policy":
        """The users file's login_delay= / expire_days= where given, else the server's."""
        delay = account.login_delay if account.login_delay is not None else settings.login_delay
        days = account.expire_days if account.expire_days is not None else server_expire(settings)
        return cls(delay, days)

    def too_soon(self, ledger: Ledger, now: int) -> int:
        """Seconds still to wait before this login is allowed; 0 when it is."""
        last = ledger.last_login
        if not self.login_delay or last is None or now < last:
            return 0  # a clock set back never locks a user out
        return max(0, last + self.login_delay - now)

    def expired(self, messages: Iterable[Message], ledger: Ledger, now: int) -> list[Message]:
        """Messages first retrieved at least ``expire_days`` ago (0: in this session)."""
        if self.expire_days == EXPIRE_NEVER:
            return []
        limit = self.expire_days * DAY
        found = []
        for message in messages:
            first = ledger.first_retrieved(message.base)
            if first is not None and now - first >= limit:
                found.append(message)
        return found


def _announced(value: int, never: bool = False) -> str:
    return "NEVER" if never and value == EXPIRE_NEVER else str(value)


_OVERRIDES: dict[int, tuple[bool, bool]] = {}  # by users table: a reload makes a new one


def _overrides(users: dict[str, Account]) -> tuple[bool, bool]:
    """Whether any account has its own login_delay= / expire_days= (once per users table)."""
    key = id(users)
    if key not in _OVERRIDES:
        _OVERRIDES.clear()  # only the table in use is asked about
        _OVERRIDES[key] = (any(a.login_delay is not None for a in users.values()),
                           any(a.expire_days is not None for a in users.values()))
    return _OVERRIDES[key]


def capa_lines(settings: Any, users: dict[str, Account], account: Account | None) -> list[str]:
    """RFC 2449 sections 6.5 and 6.7: after login the user's own values; before it the
    server's, followed by USER when some account in the users file has its own."""
    if account is not None:
        policy = Policy.for_account(settings, account)
        lines = [f"LOGIN-DELAY {policy.login_delay}"] if policy.login_delay else []
        if policy.expire_days != EXPIRE_NEVER or settings.expire != "NEVER":
            lines.append(f"EXPIRE {_announced(policy.expire_days, True)}")
        return lines
    delay_varies, expire_varies = _overrides(users)
    lines = []
    if settings.login_delay or delay_varies:
        lines.append(f"LOGIN-DELAY {settings.login_delay}" + (" USER" if delay_varies else ""))
    if settings.expire != "NEVER" or expire_varies:
        lines.append(f"EXPIRE {settings.expire}" + (" USER" if expire_varies else ""))
    return lines
