"""Frames between the supervisor and a worker over their AF_UNIX SOCK_SEQPACKET pair.

Every frame is one fixed ``struct`` header, optionally with exactly one descriptor (SCM_RIGHTS).
The same small module serves both directions and both sides: it touches only ``sendmsg`` and
``recvmsg``, so it works on a plain socket (supervisor) and a gevent socket (worker) alike.
"""

from __future__ import annotations

import array
import os
import socket
import struct
from dataclasses import dataclass
from enum import IntEnum

from shared.proxyprotocol import MAX_HEADER

HEADER = struct.Struct("!4sBBHQQ")  # magic, version, kind, payload length, argument, address key
MAGIC = b"IUP3"
VERSION = 3
# A CONNECTION frame may carry the client's PROXY header after the fixed part (the supervisor
# read it, the worker parses it: shared/proxyprotocol.py); no other frame has a payload.
MAX_PAYLOAD = MAX_HEADER
_FD_ROOM = 4  # room for surplus descriptors, which are closed, so none leaks


# The argument of a CONNECTION frame: which kind of listener accepted it.
PLAIN = 0
IMPLICIT_TLS = 1


class Kind(IntEnum):
    # supervisor -> worker
    CONNECTION = 1   # carries the accepted client socket; argument = PLAIN or IMPLICIT_TLS
    DRAIN = 2        # stop taking work, finish sessions; argument = deadline seconds, 0 = none
    LOGLEVEL = 3     # argument = index into shared.logsetup.LEVEL_NAMES
    RELOAD = 4       # re-read the XTND authorization file
    REOPEN_LOG = 5   # the log file was rotated
    # worker -> supervisor
    SHUTDOWN = 10    # an authorized XTND SHUTDOWN
    SET_LOGLEVEL = 11  # an authorized XTND LOGLEVEL; argument = level index
    CLOSED = 12      # a session ended; argument = shared.keytable.Keyer.address of its address
    DRAINING = 13    # the worker stopped taking sessions (on its own or as told)


class HandoffError(Exception):
    """A malformed frame: the channel is no longer trustworthy and is closed."""


class DescriptorDropped(HandoffError):
    """A well-formed frame whose descriptor the kernel dropped (MSG_CTRUNC: the receiver had
    no free descriptor). The channel is fine; only that one connection is lost."""

    def __init__(self, frame: "Frame"):
        super().__init__("descriptor dropped by the kernel (MSG_CTRUNC)")
        self.frame = frame


@dataclass(frozen=True)
class Frame:
    kind: Kind
    argument: int = 0
    fd: int | None = None
    # The supervisor's key for the client address (CONNECTION, and CLOSED back): the worker
    # names the same key when the session ends, even if the client reset before it could read
    # its peer's address, so the supervisor's per-address count always comes back down.
    address: int = 0
    payload: bytes = b""  # CONNECTION: the PROXY header the client's connection began with


def send_frame(sock: socket.socket, kind: Kind, argument: int = 0, fd: int | None = None,
               flags: int = 0, address: int = 0, payload: bytes = b"") -> None:
    """Send one frame; the caller still owns ``fd`` and closes it once this returns."""
    if len(payload) > MAX_PAYLOAD or (payload and kind is not Kind.CONNECTION):
        raise HandoffError(f"no room for a payload of {len(payload)} bytes in {kind.name}")
    data = HEADER.pack(MAGIC, VERSION, kind, len(payload), argument, address) + payload
    ancillary = []
    if fd is not None:
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
    sent = sock.sendmsg([data], ancillary, flags)
    if sent != len(data):  # SEQPACKET sends whole records or nothing
        raise HandoffError(f"short send of {sent} bytes")


def recv_frame(sock: socket.socket) -> Frame | None:
    """Receive one frame; None when the peer has gone (empty read)."""
    fds = array.array("i")
    data, ancdata, msg_flags, _ = sock.recvmsg(
        HEADER.size + MAX_PAYLOAD, socket.CMSG_SPACE(_FD_ROOM * fds.itemsize),
        socket.MSG_CMSG_CLOEXEC)
    for level, ctype, cdata in ancdata:
        if level == socket.SOL_SOCKET and ctype == socket.SCM_RIGHTS:
            fds.frombytes(cdata[: len(cdata) - (len(cdata) % fds.itemsize)])
    if not data and not fds and not msg_flags & socket.MSG_CTRUNC:
        return None
    if len(data) < HEADER.size or msg_flags & socket.MSG_TRUNC:
        _close_all(fds)
        raise HandoffError(f"bad frame length {len(data)}")
    magic, version, kind, size, argument, address = HEADER.unpack_from(data)
    payload = data[HEADER.size:]
    if magic != MAGIC or version != VERSION or size != len(payload):
        _close_all(fds)
        raise HandoffError("bad frame magic, version or payload length")
    try:
        kind = Kind(kind)
    except ValueError:
        _close_all(fds)
        raise HandoffError(f"unknown frame kind {kind}") from None
    if payload and kind is not Kind.CONNECTION:
        _close_all(fds)
        raise HandoffError(f"{kind.name} frame with a payload")
    if msg_flags & socket.MSG_CTRUNC:
        _close_all(fds)
        if kind is Kind.CONNECTION:
            raise DescriptorDropped(Frame(kind, argument, None, address))
        raise HandoffError("descriptors truncated (MSG_CTRUNC)")
    wants_fd = kind is Kind.CONNECTION
    if len(fds) != (1 if wants_fd else 0):
        _close_all(fds)
        raise HandoffError(f"{kind.name} frame with {len(fds)} descriptors")
    return Frame(kind, argument, fds[0] if wants_fd else None, address, payload)


def _close_all(fds: array.array) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def channel_pair() -> tuple[socket.socket, socket.socket]:
    """A (supervisor end, worker end) pair; both close-on-exec until deliberately passed."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
