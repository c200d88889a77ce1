"""PROXY protocol headers, read by the supervisor before it hands a connection to a worker.

Read here, not in the worker, so ``-max-per-address`` keeps being counted in one place (the
supervisor, at hand-off) but against the client's real address, and a connection it refuses
never reaches a worker. The reads never block the loop: ``MSG_PEEK | MSG_DONTWAIT``, exactly
the header's bytes taken (shared/proxyprotocol.py), at most ``MAX_PENDING`` connections waiting,
each for ``HEADER_SECONDS``. The raw header rides along in the CONNECTION frame.
"""

from __future__ import annotations

import selectors
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from shared import keytable
from shared.logsetup import log
from shared.netaddr import Networks
from shared.proxyprotocol import MAX_HEADER, ProxyError, ProxyHeader, header_length, parse
from supervisor import listeners

HEADER_SECONDS = 3.0   # the header must be complete this long after the accept
MAX_PENDING = 1024     # connections waiting for their header at once (trusted peers only)
_FLAGS = socket.MSG_DONTWAIT


@dataclass(eq=False)
class Pending:
    """A connection whose header is not complete yet (the selector's data for it)."""

    conn: socket.socket
    fd: int            # the connection's descriptor, still known once the socket is closed
    kind: int          # the listener's kind, handoff.PLAIN or IMPLICIT_TLS
    peer: str
    deadline: float
    received: bytes = b""


class ProxyIntake:
    def __init__(self, settings, selector: selectors.BaseSelector,
                 hand_off: Callable[[socket.socket, int, ProxyHeader], None],
                 count_refusal: Callable[[], None]):
        self.settings = settings
        self.selector = selector
        self.hand_off = hand_off          # the arbiter's; the caller closes the socket after
        self.count_refusal = count_refusal
        self.trusted = Networks(settings.trusted_networks)
        self.listeners: set[int] = set()  # descriptors of listeners that expect a header
        self.pending: dict[int, Pending] = {}

    def expect(self, listening) -> None:
        """Note which listeners expect a header: the -proxy-listen and -proxy-tls-listen ones
        (supervisor/activation.py binds or inherits them), and all of them with
        ``-proxy-protocol``."""
        expecting = listening.proxy_plain + listening.proxy_tls
        if self.settings.proxy_protocol:
            expecting = expecting + listening.plain + listening.tls
        self.listeners = {sock.fileno() for sock in expecting}
        if expecting:
            log.info("PROXY protocol header expected on %s from %s",
                     ", ".join(listeners.describe(s) for s in expecting),
                     " ".join(str(n) for n in self.trusted.networks) or "nobody")

    def takes(self, listener: socket.socket, conn: socket.socket, kind: int) -> bool:
        """True when ``conn`` must begin with a header: it is ours now (handed off, waiting,
        or refused and closed); False leaves it to the caller."""
        if listener.fileno() not in self.listeners:
            return False
        pending = Pending(conn, conn.fileno(), kind, _peer(conn), time.monotonic() + HEADER_SECONDS)
        if not self.trusted.contains(pending.peer):
            self.refuse(pending, "the peer is not in -trusted-networks")
        elif len(self.pending) >= MAX_PENDING:
            self.refuse(pending, f"{MAX_PENDING} connections already wait for theirs")
        elif not self.advance(pending):
            self.pending[pending.fd] = pending
            self.selector.register(conn, selectors.EVENT_READ, pending)
        return True

    def readable(self, pending: Pending) -> None:
        if self.advance(pending):
            self._forget(pending)

    def advance(self, pending: Pending) -> bool:
        """Take what has arrived of the header; True once the connection is settled (handed
        off or refused), False while more bytes are needed."""
        conn = pending.conn
        try:
            data = conn.recv(MAX_HEADER - len(pending.received), socket.MSG_PEEK | _FLAGS)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            return self.refuse(pending, exc.strerror or str(exc))
        if not data:
            return self.refuse(pending, "closed before the end of its header")
        seen = pending.received + data
        try:
            length = header_length(seen)
            header = parse(seen[:length]) if length is not None else None
        except ProxyError as exc:
            return self.refuse(pending, str(exc))
        upto = len(seen) if length is None else length
        conn.recv(upto - len(pending.received), _FLAGS)  # peeked above: they are there
        pending.received = seen[:upto]
        if header is None:
            return False
        try:
            self.hand_off(conn, pending.kind, header)
        finally:
            conn.close()
        return True

    def refuse(self, pending: Pending, why: str) -> bool:
        self.count_refusal()
        log.info("PROXY header refused from %s: %s; connection closed", pending.peer, why)
        pending.conn.close()
        return True

    def expire(self) -> None:
        """Close the connections whose header did not come in time."""
        now = time.monotonic()
        for pending in [p for p in self.pending.values() if p.deadline <= now]:
            self._forget(pending)
            self.refuse(pending, f"no complete header within {HEADER_SECONDS:.0f}s")

    def time_left(self, longest: float) -> float:
        """How long the loop may sleep before a deadline here passes."""
        if not self.pending:
            return longest
        soonest = min(p.deadline for p in self.pending.values())
        return max(0.0, min(longest, soonest - time.monotonic()))

    def _forget(self, pending: Pending) -> None:
        if self.pending.pop(pending.fd, None) is not None:
            self.selector.unregister(pending.fd)  # epoll forgets a closed descriptor anyway


def _peer(conn: socket.socket) -> str:
    try:
        return conn.getpeername()[0]
    except (OSError, IndexError):
        return ""


def address_key(conn: socket.socket, proxied: ProxyHeader | None, secret: bytes,
                ipv6_prefix: int) -> int:
    """The -max-per-address key of a client: the keyed digest workers also send in CLOSED
    (IPv6 counted per -ipv6-prefix network, IPv4-mapped as IPv4; shared/keytable.Keyer). A
    PROXY header's client address when it has one, else the TCP peer's."""
    if proxied is not None and proxied.source is not None and not proxied.local:
        address = proxied.source[0]
    else:
        address = _peer(conn)
    return keytable.Keyer(secret, ipv6_prefix).address(address)
