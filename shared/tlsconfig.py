"""The server's TLS context: TLS 1.2 and newer, from the -tls-cert and -tls-key files.

Built with the standard library's ``ssl``; the supervisor builds one at startup only to fail
fast on a bad certificate, each worker builds its own and rebuilds it on reload (a context
that fails to load keeps the old one, so sessions are never dropped by a bad file).
"""

from __future__ import annotations

import ssl


class TlsConfigError(ValueError):
    """Certificate or key unusable; the message is one line for the user."""


def server_context(cert: str, key: str = "", factory: type = ssl.SSLContext) -> ssl.SSLContext:
    """A server context; workers pass gevent's SSLContext class as ``factory``."""
    context = factory(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    try:
        context.load_cert_chain(cert, key or None)
    except FileNotFoundError as exc:
        # load_cert_chain's FileNotFoundError names no file: say which of the two it may be.
        missing = exc.filename or " or ".join(filter(None, (cert, key)))
        raise TlsConfigError(f"TLS: cannot read {missing}") from None
    except (ssl.SSLError, OSError) as exc:
        raise TlsConfigError(f"TLS: cannot load certificate {cert}: {exc}") from None
    return context
