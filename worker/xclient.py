"""XCLIENT: a trusted POP3 proxy (Dovecot's pop3-login, sora) names the real client.

``XCLIENT ADDR=192.0.2.7 PORT=5555 SESSION=abc TTL=4`` before login, from a peer in
``-trusted-networks`` with ``-xclient`` on (the connection decides, worker/connection.py). The
address then serves the log and the failed-login guard; whether cleartext logins are allowed is
judged again for it, and only ``CLIENT-TRANSPORT=TLS`` counts as TLS. Unknown attributes are
ignored, as Dovecot's backends do; ``-max-per-address`` was counted at hand-off, for the proxy.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.logsetup import THREAD
from shared.netaddr import is_loopback, parse_address

OK = "+OK"
BAD = "-ERR invalid XCLIENT arguments"
_PRINTABLE = frozenset(range(33, 127))


@dataclass(frozen=True)
class ClientInfo:
    address: str = ""
    port: int = 0
    session: str = ""
    ttl: int | None = None
    tls: bool = False


def parse(rest: bytes) -> ClientInfo:
    """The attributes of one XCLIENT line; ValueError for a malformed one."""
    fields: dict[str, str] = {}
    for word in rest.split():
        if not set(word) <= _PRINTABLE:
            raise ValueError("unprintable XCLIENT attribute")
        key, sep, value = word.decode("ascii").partition("=")
        if not sep or not key:
            raise ValueError(f"XCLIENT attribute without a value: {key}")
        fields[key.upper()] = value
    address = fields.get("ADDR", "")
    if address and parse_address(address) is None:
        raise ValueError("XCLIENT ADDR is not an IP address")
    port, ttl = fields.get("PORT", "0"), fields.get("TTL")
    if not port.isdigit() or int(port) > 65535 or (ttl is not None and not ttl.isdigit()):
        raise ValueError("XCLIENT PORT or TTL is not a number")
    return ClientInfo(str(parse_address(address) or ""), int(port), fields.get("SESSION", "")[:64],
                      int(ttl) if ttl is not None else None,
                      fields.get("CLIENT-TRANSPORT", "").upper() == "TLS")


def apply(session, rest: bytes) -> None:
    """Answer an XCLIENT line: the session takes on the client it names."""
    try:
        info = parse(rest)
    except ValueError as exc:
        session.log.log(THREAD, "XCLIENT refused: %s", exc)
        session.reply(BAD)
        return
    if info.address:
        proxy = session.peer
        session.address = info.address
        session.peer = (f"[{info.address}]:{info.port}" if ":" in info.address
                        else f"{info.address}:{info.port}")
        session.local = is_loopback(info.address)  # a proxy on this host makes no one local
        session.log.log(THREAD, "XCLIENT from %s: client %s%s%s", proxy, session.peer,
                        f", session {info.session}" if info.session else "",
                        ", TLS" if info.tls else "")
    session.secure = session.secure or info.tls
    session.reply(OK)
