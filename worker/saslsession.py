"""The steps of a SASL AUTH exchange (RFC 5034: PLAIN and LOGIN) inside a POP3 session.

``Session`` (worker/pop3.py) mixes this in: ``pop_AUTH`` starts an exchange, each step here
reads one client response, and a good one ends in the session's ``_login``. Kept apart so the
session module stays one screenful of verbs; it knows nothing of sockets either.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from shared.users import user_name
from worker import replies as R
from worker import sasl


class SaslExchange:
    """Mixed into Session: uses its ``ctx``, ``address``, ``reply``, ``_write``, ``_login``,
    ``_sasl_failed``, ``cleartext_allowed``, ``auth_refused`` and ``continuation``."""

    ctx: Any
    address: str
    auth_refused: bool
    continuation: Callable[[bytes], None] | None

    def _mechanisms(self) -> tuple[str, ...]:
        return sasl.MECHANISMS if self.cleartext_allowed() else ()

    def _challenge(self, text: str, step: Callable[[bytes], None]) -> None:
        """Send a base64 challenge ("+ " alone for none) and wait for the client's answer."""
        self.auth_refused = False
        self.continuation = step
        self._write(f"+ {text}\r\n".encode())

    def _auth_plain(self, response: bytes) -> None:
        if response.strip() == sasl.CANCEL:
            self.reply(R.SASL_CANCELLED)
            return
        decoded = sasl.decode_b64(response)
        credentials = sasl.plain_credentials(decoded) if decoded is not None else None
        user = user_name(credentials[0]) if credentials is not None else None
        if user is None:
            self._sasl_failed(None)
            return
        password = credentials[1]
        self._login(user, lambda: self.ctx.accounts.authenticate(user, password, self.address),
                    R.SASL_FAILED)

    def _auth_login_user(self, response: bytes) -> None:
        if response.strip() == sasl.CANCEL:
            self.reply(R.SASL_CANCELLED)
            return
        decoded = sasl.decode_b64(response)
        try:
            user = user_name(decoded.decode("utf-8")) if decoded is not None else None
        except UnicodeDecodeError:
            user = None
        if user is None:
            self._sasl_failed(None)
            return
        self._challenge(sasl.LOGIN_PASSWORD_PROMPT,
                        lambda line: self._auth_login_password(user, line))

    def _auth_login_password(self, user: str, response: bytes) -> None:
        if response.strip() == sasl.CANCEL:
            self.reply(R.SASL_CANCELLED)
            return
        password = sasl.decode_b64(response)
        if password is None:
            self._sasl_failed(user)
            return
        self._login(user, lambda: self.ctx.accounts.authenticate(user, password, self.address),
                    R.SASL_FAILED)
