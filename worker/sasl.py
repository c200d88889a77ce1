"""SASL for POP3's AUTH command (RFC 5034): the PLAIN and LOGIN mechanisms, and APOP.

Pure functions that turn what the client sent into credentials; the session owns the
exchange. Each returns None for malformed input, which the session answers like a failed
login, so a malformed exchange tells an attacker nothing more than a wrong password.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

MECHANISMS = ("PLAIN", "LOGIN")
LOGIN_USER_PROMPT = base64.b64encode(b"Username:").decode()
LOGIN_PASSWORD_PROMPT = base64.b64encode(b"Password:").decode()
CANCEL = b"*"


def decode_b64(data: bytes) -> bytes | None:
    """Strict base64 (RFC 4648, no line breaks); "=" alone is an empty response (RFC 5034)."""
    data = data.strip()
    if data == b"=":
        return b""
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return None


def plain_credentials(response: bytes) -> tuple[str, bytes] | None:
    """RFC 4616: authzid NUL authcid NUL passwd; an authzid must name the same user."""
    parts = response.split(b"\0")
    if len(parts) != 3 or not parts[1]:
        return None
    authzid, authcid, password = parts
    try:
        user = authcid.decode("utf-8")
        if authzid and authzid.decode("utf-8").lower() != user.lower():
            return None  # no logging in as somebody else
    except UnicodeDecodeError:
        return None
    return user, password


def apop_digest_ok(timestamp: str, secret: bytes, digest: str) -> bool:
    """RFC 1939 APOP: MD5 of the greeting's timestamp and the shared secret, in hex."""
    expected = hashlib.md5(timestamp.encode("ascii") + secret).hexdigest()
    return hmac.compare_digest(expected.encode(), digest.lower().encode("ascii", "replace"))
