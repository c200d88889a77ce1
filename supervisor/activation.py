"""Where the listening sockets come from: bound here, or inherited (systemd, an upgrade).

sd_listen_fds(3): with ``LISTEN_PID`` equal to our pid, descriptors 3 .. 3+``LISTEN_FDS``-1 are
listening sockets someone else bound; ``LISTEN_FDNAMES`` may name them. systemd's socket units
and the supervisor's own upgrade (supervisor/upgrade.py) both pass sockets this way. Each one is
checked (a listening TCP socket, IPv4, IPv6 or dual-stack), made close-on-exec so no worker ever
holds a listener, and given its role: POP3, implicit TLS, metrics, or traffic behind a PROXY
header (-proxy-listen, -proxy-tls-listen), by name or else by port. A proxy endpoint the
settings name must be among them: served as plain POP3 it would take HAProxy's header for a
command and count every client under the balancer's address.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

from shared import netaddr
from supervisor import listeners

FIRST_FD = 3  # SD_LISTEN_FDS_START
ENV_NAMES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
POP3, POP3S, METRICS = "pop3", "pop3s", "metrics"  # the names LISTEN_FDNAMES may give
# -proxy-listen and -proxy-tls-listen: traffic from a balancer, behind a PROXY header.
POP3_PROXY, POP3S_PROXY = "pop3-proxy", "pop3s-proxy"


class ActivationError(listeners.ListenError):
    """An inherited descriptor we cannot serve on; the message is one line for the user."""


@dataclass
class Listening:
    """Every listening socket of the supervisor, by role."""

    plain: list[socket.socket] = field(default_factory=list)
    tls: list[socket.socket] = field(default_factory=list)
    metrics: socket.socket | None = None
    proxy_plain: list[socket.socket] = field(default_factory=list)
    proxy_tls: list[socket.socket] = field(default_factory=list)
    inherited: bool = False       # passed to us with LISTEN_FDS (systemd or an upgrade)
    held_elsewhere: bool = False  # systemd keeps its own copy: closing ours refuses nothing

    def by_name(self) -> list[tuple[str, socket.socket]]:
        """(role, socket) of each, in the order an upgrade passes them on."""
        pairs = [(POP3, s) for s in self.plain] + [(POP3S, s) for s in self.tls]
        pairs += [(POP3_PROXY, s) for s in self.proxy_plain]
        pairs += [(POP3S_PROXY, s) for s in self.proxy_tls]
        return pairs + ([(METRICS, self.metrics)] if self.metrics is not None else [])

    def close(self) -> None:
        for _, sock in self.by_name():
            sock.close()


def open_listening(settings, environ=os.environ) -> Listening:
    """The sockets given to us (LISTEN_FDS for this pid), or else the ones settings name."""
    given = inherited_sockets(environ)
    if given is not None:
        out = classify(given, settings)
    else:
        out = Listening(plain=listeners.bind_all(settings.listen, settings.port))
    try:
        if settings.tls_cert and settings.tls_port and given is None:
            # With -port 0 (tests) every listener takes a free port; each is logged.
            tls_port = settings.tls_port if settings.port else 0
            out.tls = listeners.bind_all(settings.listen, tls_port)
        if given is None:
            out.proxy_plain = _bind_endpoints(settings.proxy_listen)
            out.proxy_tls = _bind_endpoints(settings.proxy_tls_listen)
        if settings.metrics and out.metrics is None:
            # Bound here even when the POP3 sockets were given: a .socket unit need not carry it.
            host, port = netaddr.host_port(settings.metrics)
            out.metrics = listeners.bind_all((f"[{host}]" if ":" in host else host,), port)[0]
    except BaseException:
        out.close()
        raise
    return out


def _bind_endpoints(endpoints: tuple[str, ...]) -> list[socket.socket]:
    bound: list[socket.socket] = []
    try:
        for endpoint in endpoints:
            host, port = netaddr.parse_endpoint(endpoint)
            bound.extend(listeners.bind_all((host,), port))
    except BaseException:
        for sock in bound:
            sock.close()
        raise
    return bound


def inherited_sockets(environ) -> list[tuple[str, socket.socket]] | None:
    """(name, socket) for each descriptor passed to this process, or None if none was.

    The variables are removed from our environment (sd_listen_fds' unset_environment), so
    workers, which inherit it, never take the descriptors for theirs.
    """
    if not environ.get("LISTEN_FDS"):
        return None
    pid, count = environ.get("LISTEN_PID", ""), environ.get("LISTEN_FDS", "")
    names = environ.get("LISTEN_FDNAMES", "").split(":")
    for name in ENV_NAMES:
        environ.pop(name, None)
    if not pid.isdigit() or int(pid) != os.getpid():
        return None  # meant for another process (the one that exec'd us, say)
    if not count.isdigit() or int(count) < 1:
        raise ActivationError(0, f"LISTEN_FDS={count!r} is not a number of sockets")
    out = []
    for i in range(int(count)):
        name = names[i] if i < len(names) else ""
        out.append((name, adopt(FIRST_FD + i, name)))
    return out


def adopt(fd: int, name: str = "") -> socket.socket:
    """The listening TCP socket on ``fd``, close-on-exec and non-blocking; else raise."""
    what = f"inherited descriptor {fd}" + (f" ({name})" if name else "")
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise ActivationError(exc.errno, f"{what}: {exc.strerror}") from None
    problem = None
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        problem = "is not an IPv4 or IPv6 socket"
    elif sock.type != socket.SOCK_STREAM:
        problem = "is not a stream (TCP) socket"
    elif not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        problem = "is not listening"
    if problem:
        sock.detach()  # not ours to close: say what is wrong and leave it
        raise ActivationError(0, f"{what} {problem}")
    sock.set_inheritable(False)  # workers are spawned: none of them may hold a listener
    sock.setblocking(False)
    return sock


def classify(given: list[tuple[str, socket.socket]], settings) -> Listening:
    """Roles by name when LISTEN_FDNAMES gives ours (a .socket unit's FileDescriptorName);
    else by port: a -proxy-listen or -proxy-tls-listen port takes PROXY headers, the -tls-port
    is implicit TLS, the -metrics port serves metrics, and every other socket POP3."""
    out = Listening(inherited=True)
    for name, sock in given:
        role = _role(name, sock.getsockname()[1], settings)
        if role == METRICS and out.metrics is None:
            out.metrics = sock
        elif role in (POP3_PROXY, POP3S_PROXY):
            (out.proxy_plain if role == POP3_PROXY else out.proxy_tls).append(sock)
        elif role == POP3S and settings.tls_cert:
            out.tls.append(sock)
        elif role == POP3:
            out.plain.append(sock)
        else:
            out.close()
            sock.close()
            raise ActivationError(0, f"inherited socket {listeners.describe(sock)} ({role}): "
                                     "no setting serves it (-tls-cert, -metrics)")
    try:
        _check_proxy_endpoints(out, settings)
        if not out.plain and not out.tls:
            raise ActivationError(0, "no POP3 socket among the inherited ones")
    except ActivationError:
        out.close()
        raise
    return out


def _role(name: str, port: int, settings) -> str:
    if name in (POP3, POP3S, METRICS, POP3_PROXY, POP3S_PROXY):
        return name
    if port in _ports(settings.proxy_listen):
        return POP3_PROXY
    if port in _ports(settings.proxy_tls_listen):
        return POP3S_PROXY
    if settings.tls_cert and port == settings.tls_port:
        return POP3S
    if settings.metrics and port == netaddr.host_port(settings.metrics)[1]:
        return METRICS
    return POP3


def _ports(endpoints: tuple[str, ...]) -> set[int]:
    return {netaddr.parse_endpoint(endpoint)[1] for endpoint in endpoints}


def _check_proxy_endpoints(out: Listening, settings) -> None:
    """Each -proxy-listen / -proxy-tls-listen endpoint has an inherited socket on its port
    (port 0, bound by a test's first generation, is satisfied by any of that role)."""
    for flag, endpoints, socks, name in (
            ("-proxy-listen", settings.proxy_listen, out.proxy_plain, POP3_PROXY),
            ("-proxy-tls-listen", settings.proxy_tls_listen, out.proxy_tls, POP3S_PROXY)):
        ports = {sock.getsockname()[1] for sock in socks}
        for endpoint in endpoints:
            port = netaddr.parse_endpoint(endpoint)[1]
            if port not in ports and not (port == 0 and socks):
                raise ActivationError(0, f"{flag} {endpoint}: no socket for it among the "
                                         f"inherited ones (a ListenStream on port {port}, or "
                                         f"FileDescriptorName={name})")
