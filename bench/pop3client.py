"""A strict, blocking POP3 client for the benchmark (stdlib sockets; gevent-patched in loadgen).

Every reply is checked: status lines start with +OK, a RETR's octets equal LIST's, and the
message, dot-unstuffed, equals the stored one (headers modulo lines the server adds).
A failed check raises ``Pop3Error`` with a short kind, which the caller counts.
"""

from __future__ import annotations

import socket

from bench.mailgen import make_message, seed_of

_ADDED_HEADERS = (b"x-pop3-", b"x-vms-from:")  # iupop3 adds these on RETR
_RECV = 256 * 1024


class Pop3Error(Exception):
    """A failed exchange; ``kind`` is the counter it goes into (connect, closed, -ERR...)."""

    def __init__(self, kind: str, detail: str = ""):
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind
        self.detail = detail


IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)  # Linux 4.2+


def connect_from(source: str, host: str, port: int, timeout: float) -> socket.socket:
    """Connect from SOURCE (IPv4 loopback). IP_BIND_ADDRESS_NO_PORT leaves the port to
    connect(), which only needs the whole 4-tuple to be unique (and may reuse TIME_WAIT
    ports on loopback), instead of bind() reserving it against every socket on SOURCE."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        try:
            sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        except OSError:
            pass  # an older kernel: bind() picks the port, still per source address
        sock.bind((source, 0))
        sock.settimeout(timeout)
        sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


class Client:
    def __init__(self, host: str, port: int, timeout: float = 30.0, source: str | None = None):
        """SOURCE: the loopback address to connect from (bind before connect), so that many
        sessions to one port are not limited to one address's ephemeral ports."""
        try:
            self.sock = (connect_from(source, host, port, timeout) if source
                         else socket.create_connection((host, port), timeout=timeout))
        except socket.timeout:
            raise Pop3Error("connect timeout") from None
        except OSError as exc:
            # the reason is part of the kind: "Cannot assign requested address" (ports used
            # up) or "Too many open files" must show in the counts, not hide in one example
            raise Pop3Error(f"connect: {exc.strerror or type(exc).__name__}", str(exc)) from None
        self.buf = bytearray()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    # -- reading ----------------------------------------------------------------------------
    def _recv(self) -> None:
        try:
            data = self.sock.recv(_RECV)
        except socket.timeout:
            raise Pop3Error("timeout") from None
        except OSError as exc:
            raise Pop3Error("reset", exc.strerror or str(exc)) from None
        if not data:
            raise Pop3Error("closed by server")
        self.buf += data

    def line(self) -> bytes:
        start = 0
        while True:
            end = self.buf.find(b"\r\n", start)
            if end >= 0:
                line = bytes(self.buf[:end])
                del self.buf[:end + 2]
                return line
            start = max(0, len(self.buf) - 1)
            self._recv()

    def multiline(self) -> bytes:
        """The body of a multi-line reply, still dot-stuffed, with its last CRLF."""
        start = 0
        while True:
            if self.buf.startswith(b".\r\n"):
                del self.buf[:3]
                return b""
            end = self.buf.find(b"\r\n.\r\n", start)
            if end >= 0:
                body = bytes(self.buf[:end + 2])
                del self.buf[:end + 5]
                return body
            start = max(0, len(self.buf) - 4)
            self._recv()

    # -- commands ---------------------------------------------------------------------------
    def send(self, command: bytes) -> None:
        try:
            self.sock.sendall(command + b"\r\n")
        except socket.timeout:
            raise Pop3Error("timeout") from None
        except OSError as exc:
            raise Pop3Error("reset", exc.strerror or str(exc)) from None

    def status(self, what: str) -> bytes:
        reply = self.line()
        if not reply.startswith(b"+OK"):
            raise Pop3Error(f"-ERR to {what}", reply[:80].decode("ascii", "replace"))
        return reply

    def command(self, command: bytes, what: str) -> bytes:
        self.send(command)
        return self.status(what)

    def greeting(self) -> bytes:
        return self.status("greeting")

    def login(self, user: str, password: str) -> None:
        # USER and PASS in one write would be pipelining; send them one at a time like clients do.
        self.command(b"USER " + user.encode(), "USER")
        self.command(b"PASS " + password.encode(), "PASS")

    def stat(self) -> tuple[int, int]:
        parts = self.command(b"STAT", "STAT").split()
        try:
            return int(parts[1]), int(parts[2])
        except (IndexError, ValueError):
            raise Pop3Error("bad STAT reply", repr(parts)) from None

    def listing(self, verb: bytes) -> dict[int, bytes]:
        self.command(verb, verb.decode())
        result: dict[int, bytes] = {}
        for row in self.multiline().split(b"\r\n")[:-1]:
            number, _, value = row.partition(b" ")
            if not number.isdigit() or not value:
                raise Pop3Error(f"bad {verb.decode()} row", repr(row[:80]))
            result[int(number)] = value
        return result

    def list_sizes(self) -> dict[int, int]:
        try:
            return {n: int(v) for n, v in self.listing(b"LIST").items()}
        except ValueError:
            raise Pop3Error("bad LIST size") from None

    def retr(self, number: int, listed_size: int) -> int:
        """RETR and check the message; returns the message's seed."""
        reply = self.command(b"RETR %d" % number, "RETR")
        parts = reply.split()
        if len(parts) >= 3 and parts[2] == b"octets" and parts[1].isdigit():
            if int(parts[1]) != listed_size:
                raise Pop3Error("RETR octets != LIST", f"{parts[1]!r} vs {listed_size}")
        return check_message(self.multiline(), listed_size)

    def dele(self, number: int) -> None:
        self.command(b"DELE %d" % number, "DELE")

    def noop(self) -> None:
        self.command(b"NOOP", "NOOP")

    def quit(self) -> None:
        self.command(b"QUIT", "QUIT")
        self.close()


def unstuff(body: bytes) -> bytes:
    """RFC 1939 section 3: remove the extra '.' the server put before lines starting with '.'."""
    if body.startswith(b".."):
        body = body[1:]
    return body.replace(b"\r\n..", b"\r\n.")


def check_message(stuffed: bytes, listed_size: int) -> int:
    """The message's seed; raises unless the wire body is the stored message (modulo
    server-added headers)."""
    data = unstuff(stuffed)
    if len(data) != listed_size:
        raise Pop3Error("size != LIST", f"{len(data)} vs {listed_size}")
    stored_form = data.replace(b"\r\n", b"\n")
    head, sep, body = stored_form.partition(b"\n\n")
    kept: list[bytes] = []
    dropping = False
    for line in head.split(b"\n"):
        if line[:1] in (b" ", b"\t"):
            if not dropping:
                kept.append(line)
            continue
        dropping = line.lower().startswith(_ADDED_HEADERS)
        if not dropping:
            kept.append(line)
    headers = b"\n".join(kept)
    found = seed_of(headers)
    if found is None:
        raise Pop3Error("content", "no X-Bench-Seed header")
    if headers + sep + body != make_message(*found):
        raise Pop3Error("content", f"message {found[0]} differs from the stored one")
    return found[0]
