"""PROXY protocol headers, read by the supervisor before it hands a connection to a worker.

Read here, not in the worker, so ``-max-per-address`` keeps being counted in one place (the
supervisor, at hand-off) but against the client's real address, and a connection it refuses
never reaches a worker. The reads never block the loop: ``MSG_PEEK | MSG_DONTWAIT``, exactly
the header's bytes taken (shared/proxyprotocol.py), at most ``MAX_PENDING`` connections waiting,
each for ``HEADER_SECONDS``. The raw header rides along in the CONNECTION frame. Every read
error refuses the connection, never the supervisor; refusals reach the log at most once a
second per reason, with a count (``RefusalLog``).
"""

from __future__ import annotations

import re
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
REFUSAL_LOG_SECONDS = 1.0  # at most one line per reason this often; the rest are counted
_FLAGS = socket.MSG_DONTWAIT
_NUMBERS = re.compile(r"\d+")


class RefusalLog:
    """Refusals in the log without a line per connection: anyone who reaches a port that
    expects a header can cause one refusal per SYN. The first of a reason
    is logged at once; more within ``interval`` are counted and summed up in one line when it
    ends (``flush``, called by the supervisor's loop). A reason is the text with its numbers
    taken out, so a peer cannot invent new reasons by varying a length."""

    def __init__(self, interval: float = REFUSAL_LOG_SECONDS, clock=time.monotonic):
        self.interval = interval
        self.clock = clock
        self.quiet_until: dict[str, float] = {}         # reason -> end of its quiet second
        self.held: dict[str, tuple[int, str, str]] = {}  # reason -> (count, last peer, last why)

    def refused(self, peer: str, why: str) -> None:
        reason = _NUMBERS.sub("N", why)
        now = self.clock()
        if reason not in self.held and now >= self.quiet_until.get(reason, 0.0):
            self.quiet_until[reason] = now + self.interval
            log.info("PROXY header refused from %s: %s; connection closed", peer, why)
            return
        count = self.held.get(reason, (0, "", ""))[0]
        self.held[reason] = (count + 1, peer, why)

    def flush(self) -> None:
        """Sum up the reasons whose quiet second is over; forget the ones gone quiet."""
        now = self.clock()
        for reason, (count, peer, why) in list(self.held.items()):
            if now >= self.quiet_until[reason]:
                del self.held[reason]
                self.quiet_until[reason] = now + self.interval
                log.info("PROXY header refused %d more times within %gs (the last from %s): "
                         "%s; connections closed", count, self.interval, peer, why)
        for reason in [r for r, end in self.quiet_until.items()
                       if end <= now and r not in self.held]:
            del self.quiet_until[reason]

    def next_due(self) -> float | None:
        """When ``flush`` has a line to write (monotonic), None if nothing is held."""
        return min((self.quiet_until[r] for r in self.held), default=None)


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
        self.refusals = RefusalLog()

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
        if not self.consume(pending, upto - len(pending.received)):
            return True
        pending.received = seen[:upto]
        if header is None:
            return False
        try:
            self.hand_off(conn, pending.kind, header)
        finally:
            conn.close()
        return True

    def consume(self, pending: Pending, count: int) -> bool:
        """Take ``count`` peeked bytes off the socket; False when the connection was refused
        instead (the kernel returns what a peek showed, but an error here must cost one
        connection, never the supervisor)."""
        try:
            taken = pending.conn.recv(count, _FLAGS) if count else b""
        except OSError as exc:
            return not self.refuse(pending, exc.strerror or str(exc))
        if len(taken) != count:
            return not self.refuse(pending, "header bytes gone between peek and read")
        return True

    def refuse(self, pending: Pending, why: str) -> bool:
        self.count_refusal()
        self.refusals.refused(pending.peer, why)
        pending.conn.close()
        return True

    def expire(self) -> None:
        """Close the connections whose header did not come in time; sum up held refusals."""
        now = time.monotonic()
        for pending in [p for p in self.pending.values() if p.deadline <= now]:
            self._forget(pending)
            self.refuse(pending, f"no complete header within {HEADER_SECONDS:.0f}s")
        self.refusals.flush()

    def time_left(self, longest: float) -> float:
        """How long the loop may sleep before a deadline here passes."""
        deadlines = [p.deadline for p in self.pending.values()]
        due = self.refusals.next_due()
        if due is not None:
            deadlines.append(due)
        if not deadlines:
            return longest
        return max(0.0, min(longest, min(deadlines) - time.monotonic()))

    def _forget(self, pending: Pending) -> None:
        if self.pending.pop(pending.fd, None) is not None:
            self.selector.unregister(pending.fd)  # epoll forgets a closed descriptor anyway


def _peer(conn: socket.socket) -> str:
    try:
        return conn.getpeername()[0]
    except (OSError, IndexError):
        return ""


def address_key(conn: socket.socket, proxied: ProxyHeader | None,
                keys: keytable.Keyer) -> int:
    """The -max-per-address key of a client: the keyed digest workers also send in CLOSED
    (IPv6 counted per -ipv6-prefix network, IPv4-mapped as IPv4; shared/keytable.Keyer). A
    PROXY header's client address when it has one, else the TCP peer's."""
    if proxied is not None and proxied.source is not None and not proxied.local:
        address = proxied.source[0]
    else:
        address = _peer(conn)
    return keys.address(address)
