"""One client connection in a worker: read lines, feed the session, write its replies.

Owns the abuse limits of the read loop (line length, idle timeout, login deadline; the others
live in worker/limits.py and are shared with the session) and the session's
end-of-life bookkeeping: exactly one of Normal/Abnormal Disconnects or Client Timeouts per
connection, the socket closed in one ``finally``.
"""

from __future__ import annotations

import socket
import ssl
import time

import gevent
import gevent.event
from gevent import GreenletExit, Timeout

from shared.logsetup import THREAD
from shared.netaddr import is_loopback
from shared.proxyprotocol import ProxyHeader
from shared.stats import Counter
from worker import replies as R
from worker.context import ServerContext
from worker.limits import ConnectionLimits
from worker.parking import PARK_AFTER, Parked, Parking
from worker.pop3 import ConnectionLost, Session, State
from worker.store import LockKey

_READ_SIZE = 4096


class LoginTimeout(TimeoutError):
    """No successful login within -login-timeout of the connect."""


class TakenOver(Exception):
    """A new login of this maildrop ended this idle session (worker.takeoverdesk)."""


def peer_name(sock: socket.socket) -> str:
    return peer_of(sock)[0]


def peer_of(sock: socket.socket) -> tuple[str, str]:
    """(the peer as "host:port" for logs, its IP address or ""), from one getpeername."""
    try:
        address = sock.getpeername()
    except OSError:
        return "unknown", ""
    if isinstance(address, tuple):
        host, port = address[0], address[1]
        return (f"[{host}]:{port}" if ":" in host else f"{host}:{port}"), host
    return str(address) or "local", ""


class Connection:
    def __init__(self, sock: socket.socket, ctx: ServerContext, session_id: str,
                 implicit_tls: bool = False, proxied: ProxyHeader | None = None):
        self.sock = sock
        try:  # RFC 2449 pipelining: with Nagle each reply after the first of a batch waited
            # for the client's delayed ACK, 40 ms a batch; our writes are whole replies anyway.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass  # not TCP
        self.ctx = ctx
        self.session_id = session_id
        self.implicit_tls = implicit_tls
        # The TCP peer (a balancer, when a PROXY header came): the only address that decides
        # trust (XCLIENT). self.address is the client's, for logs, limits and penalties.
        self.peer, self.tcp_peer_address = peer_of(sock)
        self.address = self.tcp_peer_address
        self.proxied = proxied  # the PROXY header the supervisor read (supervisor/proxyintake.py)
        # A client the proxy could not name (v1 UNKNOWN, v2 AF_UNSPEC/AF_UNIX): counted under
        # the balancer's address, but given none of its trust and never taken as local.
        self.unknown_source = proxied is not None and proxied.unknown_source
        if proxied is not None and proxied.source is not None and not proxied.local:
            self.address, port = proxied.source  # the client's: logs, limits, cleartext policy
            self.peer = (f"[{self.address}]:{port}" if ":" in self.address
                         else f"{self.address}:{port}")
        self.local = is_loopback(self.address) and not self.unknown_source
        self.limits = ConnectionLimits.from_settings(ctx.settings)
        # A balancer that terminated TLS says so (PP2_TYPE_SSL): the password did not travel bare.
        self.session = self._new_session(secure=proxied is not None and proxied.tls)
        # Lock takeover (worker.takeoverdesk): idle = waiting in recv since idle_since.
        self.reading = False
        self.idle_since = time.monotonic()
        self.released = gevent.event.Event()  # the session's maildrop lock is dropped
        self.greenlet: gevent.Greenlet | None = None
        # Where an idle logged-in session waits without a greenlet (worker.parking); None:
        # never parks (the sans-IO tests). ``deadline``: the idle deadline, kept while parked.
        self.parking: Parking | None = None
        self.deadline = 0.0
        self.address_key = 0  # the supervisor's key of the client address (worker/main.py)
        self.encrypted = False

    def _new_session(self, secure: bool) -> Session:
        session = Session(self.ctx, self.write, self.peer, self.session_id, secure=secure,
                          tls_available=self.ctx.tls.context is not None, local=self.local,
                          address=self.address, limits=self.limits)
        session.unknown_source = self.unknown_source
        session.xclient_trusted = self._xclient_trusted()
        return session

    def _xclient_trusted(self) -> bool:
        """Issue 14 item 2: only a trusted TCP peer speaking for itself (no PROXY header, or
        v2 LOCAL) may send XCLIENT. Behind a PROXY header the speaker is the named client,
        whatever its address: trusting it would let a client in -trusted-networks rewrite
        its own address and transport."""
        if not self.ctx.settings.xclient:
            return False
        if self.proxied is not None and not self.proxied.local:
            return False
        return self.ctx.guard.trusted.contains(self.tcp_peer_address)

    def _start_tls(self) -> None:
        """Wrap the socket in TLS (the handshake runs under the session's timeout)."""
        context = self.ctx.tls.context
        # The whole handshake is bounded, not each read: a trickled ClientHello is a slowloris.
        with Timeout(self.ctx.settings.timeout, TimeoutError("TLS handshake too slow")):
            self.sock = context.wrap_socket(self.sock, server_side=True)
        self.encrypted = True  # never parks: gevent's SSLSocket is no ssl.SSLSocket
        old = self.session
        self.session = self._new_session(secure=True)
        self.session.failures = old.failures  # STLS must not reset the login-attempt budget
        self.session.apop_timestamp = old.apop_timestamp  # the one the greeting announced
        for name in ("peer", "address", "local", "unknown_source"):  # as XCLIENT set them
            setattr(self.session, name, getattr(old, name))
        self.session.log.log(THREAD, "TLS started: %s %s", self.sock.version(),
                             self.sock.cipher()[0])

    def write(self, data: bytes) -> None:
        if not data:
            return
        try:
            sent = self.sock.send(data)
            if sent < len(data):
                # The client does not read as fast as we write: IUPOP3's "Blocked Socket Count".
                self.ctx.stats.count(Counter.BLOCKED)
                self.sock.sendall(memoryview(data)[sent:])
        except TimeoutError:
            raise
        except OSError as exc:
            raise ConnectionLost(exc.strerror or str(exc)) from None

    def serve(self) -> bool:
        """Serve the connection; True when the session parked (it goes on in ``resume``)."""
        ctx = self.ctx
        ctx.stats.count(Counter.CURRENT)
        # RECEIVED only after CURRENT: the supervisor reads RECEIVED, then CURRENT, so on the
        # other core it may count this session twice for an instant but never miss it
        # (the other order let a burst exceed -maxclients by one: tests/test_attack.py).
        ctx.stats.count(Counter.RECEIVED)
        ctx.stats.count(Counter.TOTAL)
        ctx.takeover.register(self.session_id, self)
        self.deadline = time.monotonic() + ctx.settings.timeout
        return self._run(self._begin)

    def resume(self, error: BaseException | None = None) -> bool:
        """Go on after parking (worker.parking): read the next line, or end with ``error``
        (TakenOver, GreenletExit for a shutdown). True when it parked again."""
        def step() -> None:
            if error is not None:
                raise error
            self._read_loop()
        return self._run(step)

    def _begin(self) -> None:
        self.sock.settimeout(self.ctx.settings.timeout)
        if self.proxied is not None and self.session.log.isEnabledFor(THREAD):
            self.session.log.log(THREAD, "%s from %s", self.proxied.describe(),
                                 peer_name(self.sock))
        if self.implicit_tls:
            self._start_tls()
        self.session.start()
        self._read_loop()

    def _run(self, step) -> bool:
        ctx = self.ctx
        outcome = Counter.ABNORMAL
        parked = False
        self.greenlet = gevent.getcurrent()
        try:
            step()
            if self.session.closing:
                outcome = Counter.NORMAL
        except Parked:
            parked = True
        except LoginTimeout:
            outcome = Counter.TIMEOUTS
            self.session.log.log(THREAD, "no login within %ds of connect",
                                 ctx.settings.login_timeout)
            self._try_send(R.LOGIN_TIMEOUT.format(seconds=ctx.settings.login_timeout))
        except TimeoutError:
            outcome = Counter.TIMEOUTS
            self.session.log.log(THREAD, "timeout after %ds of silence", ctx.settings.timeout)
            self._try_send(R.TIMEOUT.format(seconds=ctx.settings.timeout))
        except TakenOver as exc:
            self.session.release()  # first: the new login is waiting for this lock
            self.released.set()
            ctx.stats.count(Counter.TAKEOVERS)  # here, once: the session that was ended
            self.session.log.log(THREAD, "session taken over by a new login (%s); nothing"
                                 " applied", exc)
            self._try_send(R.TAKEN_OVER)
        except GreenletExit:
            self._closed_by_shutdown()
        except ssl.SSLError as exc:
            self.session.log.log(THREAD, "TLS failed: %s", exc.reason or exc)
        except (ConnectionLost, OSError) as exc:
            self.session.log.log(THREAD, "connection lost: %s", exc)
        except Exception:
            self.session.log.exception("unexpected error in session")
        finally:
            if not parked:
                self._end(outcome)
        return parked

    def _end(self, outcome: Counter) -> None:
        ctx, session = self.ctx, self.session
        session.release()  # after QUIT a no-op; otherwise drops the lock, applies nothing
        self.released.set()
        ctx.takeover.unregister(self.session_id)
        if self.limits.log_repeats.suppressed:
            session.log.log(THREAD, "%d repeated log lines were not written",
                            self.limits.log_repeats.suppressed)
        ctx.stats.count(outcome)
        ctx.stats.count(Counter.CURRENT, -1)
        self.sock.close()  # the worker tells the supervisor (worker/main.py Worker.serve)

    def _closed_by_shutdown(self) -> None:
        """Killed past -grace. In UPDATE only once the pool finished the commit (a kill cannot
        stop it: worker/main.py in_threadpool), so then it did apply."""
        applied = self.session.state is State.UPDATE
        self.session.log.log(THREAD, "session closed by shutdown; %s",
                             "its update ran" if applied else "nothing applied")
        self._try_send(R.SHUTTING_DOWN)

    def _read_loop(self) -> None:
        session = self.session
        buffer = b""
        discarding = False
        # RFC 1939 section 3: a *command* resets the autologout timer, so a client trickling
        # bytes that never end a line (slowloris) is cut at -timeout like a silent one.
        timeout = self.ctx.settings.timeout
        deadline = self.deadline
        while not session.closing:
            wait = self._wait(deadline)
            # Nothing buffered and nothing to read now: park (worker.parking) rather than wait.
            park = wait > PARK_AFTER and not buffer and not discarding and self._parkable()
            self.sock.settimeout(0.0 if park else wait)
            self.reading = True
            try:
                data = self.sock.recv(_READ_SIZE)
            except BlockingIOError:
                if not park:
                    raise
                self._park(deadline)
            except TimeoutError:
                continue  # the next _wait raises for the deadline that passed
            finally:
                self.reading = False
                self.sock.settimeout(timeout)  # replies get the whole timeout to go out
            if not data:
                return
            buffer += data
            while not session.closing:
                end = buffer.find(b"\n")
                if end < 0:
                    if len(buffer) > session.max_line:
                        if not discarding:
                            session.line_too_long()
                        discarding = True
                        buffer = b""
                    break
                line, buffer = buffer[:end], buffer[end + 1:]
                if discarding:
                    discarding = False  # the end of the over-long line: already answered
                    continue
                if line.endswith(b"\r"):
                    line = line[:-1]
                if len(line) + 2 > session.max_line:
                    session.line_too_long()
                    continue
                session.handle_line(line)
                self.idle_since = time.monotonic()
                deadline = self.deadline = self.idle_since + timeout
                if session.start_tls:
                    buffer = b""  # pipelined after STLS: thrown away (RFC 2595, CVE-2011-0411)
                    self._start_tls()
                    session = self.session

    def _parkable(self) -> bool:
        """Idle and logged in, with nothing buffered anywhere: TLS keeps its greenlet (its
        socket may hold decrypted bytes no watcher sees)."""
        session = self.session
        return (self.parking is not None and session.state is State.TRANSACTION
                and session.continuation is None and not self.encrypted)

    def _park(self, deadline: float) -> None:
        """End this greenlet; the session waits in worker.parking for its next bytes."""
        assert self.parking is not None
        self.deadline = deadline
        self.greenlet = None  # ends with this raise; a dead greenlet still holds its frames
        self.parking.park(self, self.sock.fileno(), deadline)
        self.session.log.debug("idle: parked without a greenlet")
        raise Parked

    def _wait(self, idle_deadline: float) -> float:
        """Seconds the next read may wait: to the idle deadline or, before a successful login,
        the login deadline if sooner (each line resets the first, never the second)."""
        idle_left = idle_deadline - time.monotonic()
        login_left = self.limits.login.left()
        if login_left is not None and login_left < idle_left:
            if login_left <= 0:
                raise LoginTimeout("no login in time")
            return login_left
        if idle_left <= 0:
            raise TimeoutError("no complete command line")
        return idle_left

    # -- lock takeover (worker.takeoverdesk calls these in the hub) ---------------------------
    def takeover_refusal(self, key: LockKey, idle_needed: float) -> str | None:
        """Why this session may not be ended for a login that found lock ``key`` held (the
        answer for that login); None when it holds that lock, in TRANSACTION, and has waited
        for a command line at least ``idle_needed`` seconds."""
        session = self.session
        maildrop = session.maildrop
        if maildrop is None or maildrop.lock_key != key:
            return "UNKNOWN"
        if session.state is not State.TRANSACTION:
            return "UPDATE"
        waiting = self.reading or (self.parking is not None and self in self.parking)
        idle = time.monotonic() - self.idle_since if waiting else 0.0
        return None if idle >= idle_needed else f"ACTIVE {idle:.1f}"

    def end_for_takeover(self, by: str) -> float:
        """Raise TakenOver in the session's greenlet, parked in recv (checked by the caller);
        the greenlet drops the lock before it returns here. Returns the idle seconds."""
        idle = time.monotonic() - self.idle_since
        if self.parking is not None and self in self.parking:
            self.parking.wake(self, TakenOver(f"by {by}"))  # the new greenlet releases it
            return idle
        assert self.greenlet is not None
        self.greenlet.throw(TakenOver(f"by {by}"))
        return idle

    def _try_send(self, line: str) -> None:
        try:
            self.sock.settimeout(1)
            self.sock.sendall(line.encode() + b"\r\n")
        except OSError:
            pass
