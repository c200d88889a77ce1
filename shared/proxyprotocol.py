"""The PROXY protocol (HAProxy's proxy-protocol.txt, versions 1 and 2) as a sans-IO parser.

``header_length`` says how much of a connection's first bytes is the header (the supervisor
reads exactly that much, never a byte of the POP3 or TLS stream behind it:
supervisor/proxyintake.py); ``parse`` turns those bytes into a ``ProxyHeader`` (the worker parses the same bytes again from
the hand-off frame). Both raise ``ProxyError`` for anything the specification does not allow.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field, replace

V1_PREFIX = b"PROXY "
V1_MAX = 107             # the longest v1 line, CRLF included (proxy-protocol.txt 2.1)
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED = 16            # signature, version/command, family/transport, length
V2_MAX_PAYLOAD = 2048    # ours: HAProxy's addresses and TLVs (SSL, authority) fit in far less
MAX_HEADER = V2_FIXED + V2_MAX_PAYLOAD

CMD_LOCAL, CMD_PROXY = 0x0, 0x1
AF_UNSPEC, AF_INET, AF_INET6, AF_UNIX = 0x0, 0x1, 0x2, 0x3
TRANSPORT_UNSPEC, TRANSPORT_STREAM = 0x0, 0x1
_ADDRESS_BYTES = {AF_UNSPEC: 0, AF_INET: 12, AF_INET6: 36, AF_UNIX: 216}

PP2_TYPE_ALPN = 0x01
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_SSL = 0x20
PP2_SUBTYPE_SSL_VERSION = 0x21
PP2_CLIENT_SSL = 0x01


class ProxyError(ValueError):
    """Not a header the specification allows (or one larger than we accept)."""


@dataclass(frozen=True)
class ProxyHeader:
    version: int                 # 1 or 2
    local: bool                  # v2 LOCAL (health checks): the proxy itself, a direct connection
    source: tuple[str, int] | None = None       # the client's address and port
    destination: tuple[str, int] | None = None  # the address the client connected to
    tls: bool = False            # v2 PP2_TYPE_SSL with PP2_CLIENT_SSL: the client used TLS
    tls_version: str = ""
    authority: str = ""          # v2 PP2_TYPE_AUTHORITY (the SNI name the client sent)
    alpn: str = ""
    raw: bytes = field(default=b"", repr=False)  # the header's bytes, as parsed
    # v1 UNKNOWN, v2 PROXY for AF_UNSPEC or AF_UNIX: a real client the proxy cannot name. Not
    # the proxy itself: counted under the TCP peer's address but given none of its trust.
    unknown_source: bool = False

    def describe(self) -> str:
        """For the log: ``PROXY v2 client 192.0.2.7:5555, TLS TLSv1.3, authority x``."""
        if self.local:
            return f"PROXY v{self.version} LOCAL"
        if self.unknown_source:
            return f"PROXY v{self.version} client unknown"
        host, port = self.source or ("?", 0)
        parts = [f"PROXY v{self.version} client {_hostport(host, port)}"]
        if self.tls:
            parts.append(f"TLS {self.tls_version}".rstrip())
        if self.authority:
            parts.append(f"authority {self.authority}")
        return ", ".join(parts)


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def header_length(data: bytes) -> int | None:
    """The header's length if ``data`` (a connection's first bytes) holds all of it, None if
    more bytes are needed (then all of ``data`` is header so far); ProxyError if it cannot be
    one. Never looks past the header, so a TLS ClientHello right behind it stays unread."""
    if not data:
        return None
    if data[0] == V1_PREFIX[0]:
        if not V1_PREFIX.startswith(data[:len(V1_PREFIX)]):
            raise ProxyError("not a PROXY header")
        end = data.find(b"\n", 0, V1_MAX)
        if end < 0:
            if len(data) >= V1_MAX:
                raise ProxyError("v1 header longer than 107 bytes")
            return None
        return end + 1
    if data[0] == V2_SIGNATURE[0]:
        if not V2_SIGNATURE.startswith(data[:len(V2_SIGNATURE)]):
            raise ProxyError("not a PROXY header")
        if len(data) < V2_FIXED:
            return None
        if data[12] >> 4 != 2:
            raise ProxyError(f"unknown PROXY version {data[12] >> 4}")
        length = struct.unpack_from("!H", data, 14)[0]
        if length > V2_MAX_PAYLOAD:
            raise ProxyError(f"v2 header of {length} bytes is larger than {V2_MAX_PAYLOAD}")
        total = V2_FIXED + length
        return total if len(data) >= total else None
    raise ProxyError("not a PROXY header")


def parse(data: bytes) -> ProxyHeader:
    """The header in ``data``, which must be exactly one whole header."""
    if header_length(data) != len(data):
        raise ProxyError("incomplete PROXY header")
    header = _parse_v1(data) if data.startswith(V1_PREFIX) else _parse_v2(data)
    return replace(header, raw=bytes(data))


# -- version 1: "PROXY TCP4 192.0.2.1 198.51.100.2 56324 110\r\n" ----------------------------
def _parse_v1(data: bytes) -> ProxyHeader:
    if not data.endswith(b"\r\n"):
        raise ProxyError("v1 header does not end in CRLF")
    words = data[:-2].split(b" ")
    if len(words) >= 2 and words[1] == b"UNKNOWN":
        return ProxyHeader(1, local=False, unknown_source=True)  # the rest is to be ignored
    if len(words) != 6 or words[1] not in (b"TCP4", b"TCP6"):
        raise ProxyError("malformed v1 header")
    version = 4 if words[1] == b"TCP4" else 6
    source = _v1_address(words[2], version), _v1_port(words[4])
    destination = _v1_address(words[3], version), _v1_port(words[5])
    return ProxyHeader(1, local=False, source=source, destination=destination)


def _v1_address(word: bytes, version: int) -> str:
    try:
        address = ipaddress.ip_address(word.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise ProxyError("bad v1 address") from None
    if address.version != version:
        raise ProxyError("v1 address of the wrong family")
    return str(address)


def _v1_port(word: bytes) -> int:
    # Decimal 0..65535 without sign or leading zero (proxy-protocol.txt 2.1).
    if not word.isdigit() or (len(word) > 1 and word[:1] == b"0") or len(word) > 5:
        raise ProxyError("bad v1 port")
    port = int(word)
    if port > 65535:
        raise ProxyError("bad v1 port")
    return port


# -- version 2: binary ------------------------------------------------------------------------
def _parse_v2(data: bytes) -> ProxyHeader:
    command = data[12] & 0x0F
    family, transport = data[13] >> 4, data[13] & 0x0F
    if command not in (CMD_LOCAL, CMD_PROXY):
        raise ProxyError(f"unknown v2 command {command}")
    if family not in _ADDRESS_BYTES or transport > 2:
        raise ProxyError("unknown v2 address family or transport")
    body = data[V2_FIXED:]
    size = _ADDRESS_BYTES[family]
    if len(body) < size:
        raise ProxyError("v2 header shorter than its addresses")
    tlvs = _tlvs(body[size:])
    if command == CMD_LOCAL:  # health checks: the proxy speaks for itself
        return ProxyHeader(2, local=True, **tlvs)
    if family in (AF_UNSPEC, AF_UNIX):  # a client it cannot name (unix-socket frontends)
        return ProxyHeader(2, local=False, unknown_source=True, **tlvs)
    if transport != TRANSPORT_STREAM:
        raise ProxyError("v2 PROXY for a transport that is not a stream")
    if family == AF_INET:
        src, dst, sport, dport = struct.unpack_from("!4s4sHH", body)
    else:
        src, dst, sport, dport = struct.unpack_from("!16s16sHH", body)
    source = str(ipaddress.ip_address(src)), sport
    destination = str(ipaddress.ip_address(dst)), dport
    return ProxyHeader(2, local=False, source=source, destination=destination, **tlvs)


def _tlvs(raw: bytes) -> dict:
    """The TLVs we use (SSL, authority, ALPN); others are skipped, a cut one is an error."""
    found: dict = {}
    for kind, value in _walk(raw):
        if kind == PP2_TYPE_AUTHORITY:
            found["authority"] = _text(value)
        elif kind == PP2_TYPE_ALPN:
            found["alpn"] = _text(value)
        elif kind == PP2_TYPE_SSL:
            if len(value) < 5:
                raise ProxyError("v2 SSL TLV shorter than 5 bytes")
            found["tls"] = bool(value[0] & PP2_CLIENT_SSL)
            for sub, subvalue in _walk(value[5:]):
                if sub == PP2_SUBTYPE_SSL_VERSION:
                    found["tls_version"] = _text(subvalue)
    return found


def _walk(raw: bytes):
    offset = 0
    while offset < len(raw):
        if len(raw) - offset < 3:
            raise ProxyError("v2 TLV cut short")
        kind, length = raw[offset], struct.unpack_from("!H", raw, offset + 1)[0]
        value = raw[offset + 3: offset + 3 + length]
        if len(value) != length:
            raise ProxyError("v2 TLV longer than the header")
        yield kind, value
        offset += 3 + length


def _text(value: bytes) -> str:
    """A TLV's text for the log: printable ASCII only, at most 255 characters."""
    return "".join(c if 32 < ord(c) < 127 else "?" for c in value.decode("latin-1"))[:255]


def v2_header(source: tuple[str, int] | None, destination: tuple[str, int] | None = None,
              tlvs: bytes = b"") -> bytes:
    """A v2 header (PROXY, or LOCAL when ``source`` is None): for tests and tools."""
    if source is None:
        return V2_SIGNATURE + bytes([0x20, 0x00]) + struct.pack("!H", len(tlvs)) + tlvs
    destination = destination or (("::1" if ":" in source[0] else "127.0.0.1"), 110)
    src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
    family = AF_INET if src.version == 4 else AF_INET6
    body = src.packed + dst.packed + struct.pack("!HH", source[1], destination[1]) + tlvs
    return (V2_SIGNATURE + bytes([0x21, family << 4 | TRANSPORT_STREAM])
            + struct.pack("!H", len(body)) + body)


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value
