"""The TLS part of a worker's context: the server's SSL context and its reload.

Connections read ``context`` when they start TLS; worker/reloading.py calls ``reload``
(SIGHUP, a change of the certificate or key file). A file that fails keeps the old context.
"""

from __future__ import annotations

from typing import Any

from shared.logsetup import log
from shared.tlsconfig import TlsConfigError, server_context


class TlsService:
    def __init__(self, cert: str, key: str = ""):
        self.cert = cert
        self.key = key
        self.context: Any = None  # gevent.ssl.SSLContext once loaded; None = no TLS
        if cert:
            self.reload("startup")

    def paths(self) -> tuple[str, ...]:
        return tuple(p for p in (self.cert, self.key) if p)

    def reload(self, why: str) -> bool:
        """(Re)load the certificate; a file that fails keeps the context sessions use now."""
        if not self.cert:
            return False
        import gevent.ssl  # only workers that serve TLS need it

        try:
            context = server_context(self.cert, self.key, factory=gevent.ssl.SSLContext)
        except TlsConfigError as exc:
            log.error("%s; keeping the previous certificate", exc)
            return False
        self.context = context  # one assignment: a handshake uses the old context or the new
        if why != "startup":
            log.info("TLS certificate reloaded (%s)", why)
        return True
