"""The listening sockets, owned by the supervisor alone.

SO_REUSEADDR is set (IUPOP3 1.8's fix: a restart binds at once); IPv6 sockets are V6ONLY so
``0.0.0.0`` and ``::`` can both be bound on one port. Port 0 binds the first address to an
ephemeral port and the rest to the same one, so tests learn one port from the log.
"""

from __future__ import annotations

import socket

BACKLOG = 1024


class ListenError(OSError):
    """A listening address that cannot be bound; the message is one line for the user."""


def bind_all(addresses: tuple[str, ...], port: int) -> list[socket.socket]:
    sockets: list[socket.socket] = []
    try:
        for address in addresses:
            sock = _bind(address, port)
            port = sock.getsockname()[1]
            sockets.append(sock)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _bind(address: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    host = address.strip("[]")
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise ListenError(exc.errno, f"cannot listen on {address} port {port}: "
                                     f"{exc.strerror}") from None
    return sock


def describe(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    if sock.family != socket.AF_INET6:
        return f"{host}:{port}"
    # systemd binds IPv6 sockets dual-stack by default (BindIPv6Only=default).
    v6only = sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
    return f"[{host}]:{port}" + ("" if v6only else " (dual-stack)")
