"""Password verification for the users file's schemes, through maintained libraries.

``verify`` takes Dovecot's ``{SCHEME}data`` form. Comparisons are constant-time; an unknown
user is checked against ``DUMMY`` of the same cost, so timing tells nothing.
"""

from __future__ import annotations

import hmac

from passlib.hash import sha512_crypt

DUMMY = "{SHA512-CRYPT}" + sha512_crypt.using(rounds=5000).hash("iupop3-no-such-user")


def split_scheme(stored: str) -> tuple[str, str]:
    if stored.startswith("{") and "}" in stored:
        scheme, _, data = stored[1:].partition("}")
        return scheme.upper(), data
    return "CRYPT", stored


def verify(stored: str, password: bytes) -> bool:
    scheme, data = split_scheme(stored)
    if scheme in ("PLAIN", "CLEARTEXT"):
        return hmac.compare_digest(data.encode("utf-8"), password)
    if scheme in ("SHA512-CRYPT", "CRYPT") and data.startswith("$6$"):
        try:
            return sha512_crypt.verify(password, data)
        except ValueError:
            return False
    return False
