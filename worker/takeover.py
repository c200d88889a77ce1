"""Lock takeover, the login's half: wait for a held maildrop, or ask its idle holder to go.

A session that holds a maildrop's lock stamps the lock file with who it is (this host, its
worker's pid, the random token in its worker's socket name, its session id). A login that finds the lock held reads the stamp and asks that
worker, over the worker's takeover socket (worker.takeoverdesk), to end the session; only the
holder decides whether its session is idle enough, so a stamp the maildrop's user forged can
name no session but one that holds this very lock file. Called by worker.pop3 at login; the
blocking parts (lock attempts, the request) run in the pool, the waits on the event loop.
"""

from __future__ import annotations

import math
import os
import re
import secrets
import socket
import struct
import time
from dataclasses import dataclass
from typing import Any

from shared.logsetup import THREAD
from worker import retention, store
from worker.store import LockHolder, MaildropBusy, Message

STAMP_MAGIC = "iupop3-session"
HOST = socket.gethostname()
ASK_SECONDS = 3.0     # a request to a holder's worker, answer included (it waits <= 2 s)
FIRST_PAUSE = 0.02    # between lock attempts: doubling up to MAX_PAUSE
MAX_PAUSE = 0.2
RETRY_ASK = 1.0       # a holder that could not be asked, or is in UPDATE: ask again after this
MAX_TURNS = 100_000   # a bound on the wait loop beside its deadline
REPLY_MAX = 64
TOKEN_BYTES = 16     # the random part of a takeover socket's name (32 hex digits)
_STAMP = re.compile(rb"iupop3-session 2 ([\x21-\x7e]{1,64}) ([0-9]{1,10}) ([0-9a-f]{32})"
                    rb" ([\x21-\x7e]{1,32}) [0-9]{1,12}\n")
_ANSWER = re.compile(r"(ENDED|ACTIVE|UPDATE|UNKNOWN)(?: ([0-9]{1,7}(?:\.[0-9])?))?")
_PEERCRED = struct.Struct("3i")


@dataclass(frozen=True, slots=True)
class Stamp:
    """Who holds a session lock, as its stamp says (untrusted until the holder confirms)."""

    host: str
    pid: int
    token: str     # names the worker's takeover socket (socket_address)
    session: str


@dataclass(frozen=True, slots=True)
class Answer:
    """A holder's answer: ENDED (the session is gone, its lock released), ACTIVE (idle for
    ``idle`` seconds: too little), UPDATE, UNKNOWN (no such session holds that lock), or
    UNREACHABLE (another host, no stamp, no worker answering as the server's user)."""

    word: str
    idle: float = 0.0
    why: str = ""


def socket_address(token: str) -> bytes:
    """A worker's takeover socket: Linux abstract namespace, so no directory need be shared by
    the nodes of one host and no stale file outlives a worker; who listens is checked by
    SO_PEERCRED on both sides, since any local user may bind an abstract name. The name holds
    a random token, written in the stamps, not the pid: a user who could guess names could
    bind those of future workers first and so turn takeover off."""
    return f"\0iupop3-takeover-{token}".encode()


def new_token() -> str:
    return secrets.token_hex(TOKEN_BYTES)


def make_stamp(session_id: str, token: str, pid: int | None = None) -> bytes:
    pid = os.getpid() if pid is None else pid
    return (f"{STAMP_MAGIC} 2 {HOST} {pid} {token} {session_id} {int(time.time())}\n"
            .encode())


def parse_stamp(raw: bytes) -> Stamp | None:
    """The stamp of a held lock, or None for anything that is not exactly one of ours."""
    match = _STAMP.fullmatch(raw)
    if match is None:
        return None
    host, pid, token, session = (g.decode("ascii") for g in match.groups())
    return Stamp(host, int(pid), token, session) if int(pid) > 0 else None


def parse_answer(text: str) -> Answer:
    match = _ANSWER.fullmatch(text.strip())
    if match is None:
        return Answer("UNREACHABLE", why="unreadable answer")
    return Answer(match.group(1), float(match.group(2) or 0))


def peer_credentials(sock: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process at the other end of a Unix socket."""
    pid, uid, _ = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                   _PEERCRED.size))
    return pid, uid


def ask_holder(holder: LockHolder, requester: str) -> Answer:
    """Ask the worker named in ``holder``'s stamp to end its session; blocking (pool)."""
    stamp = parse_stamp(holder.stamp)
    if stamp is None:
        return Answer("UNREACHABLE", why="no stamp in the lock file")
    if stamp.host != HOST:
        return Answer("UNREACHABLE", why=f"held on host {stamp.host}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(ASK_SECONDS)
    try:
        sock.connect(socket_address(stamp.token))
        pid, uid = peer_credentials(sock)
        if uid != os.geteuid() or pid != stamp.pid:
            return Answer("UNREACHABLE", why=f"socket of pid {pid} uid {uid} is not a worker's")
        dev, ino = holder.key
        sock.sendall(f"TAKEOVER {stamp.session} {dev} {ino} {requester}\n".encode())
        reply = b""
        while b"\n" not in reply and len(reply) < REPLY_MAX:
            chunk = sock.recv(REPLY_MAX)
            if not chunk:
                break
            reply += chunk
    except OSError as exc:
        return Answer("UNREACHABLE", why=f"worker pid {stamp.pid}: {exc.strerror or exc}")
    finally:
        sock.close()
    return parse_answer(reply.partition(b"\n")[0].decode("ascii", "replace"))


class LockWait:
    """One login's wait for a held maildrop: lock attempts with backoff until ``-lock-wait``,
    asking the holder to go whenever its stamp changed or the holder said when to ask again."""

    def __init__(self, ctx: Any, maildrop: store.Maildrop, session_id: str, log: Any,
                 policy: Any = None):
        self.ctx, self.maildrop, self.session_id, self.log = ctx, maildrop, session_id, log
        self.policy = policy if policy is not None else retention.Policy()
        self.requester = f"{session_id} pid {os.getpid()}"
        self.took_over = False
        self.next_ask = -math.inf
        self.asked: bytes | None = None
        self.waiting_logged = False

    def run(self, user: str) -> list[Message]:
        """Lock and scan, waiting and taking over as the settings say; MaildropBusy at the end."""
        settings = self.ctx.settings
        token = self.ctx.takeover.token  # None: this worker has no takeover socket to name
        self.maildrop.stamp = make_stamp(self.session_id, token) if token else b""
        deadline = time.monotonic() + settings.lock_wait
        pause = FIRST_PAUSE
        for _ in range(MAX_TURNS):
            try:
                # A login that took over a session of this maildrop continues that poll:
                # LOGIN-DELAY does not refuse it (issue 13).
                return self.ctx.offload(store.lock_and_scan, self.maildrop, settings.maxmsg,
                                        self.policy, self.took_over)
            except MaildropBusy as busy:
                if busy.holder is not None and settings.takeover_idle and self._ask(busy.holder):
                    continue  # the holder is gone: try the lock again at once
                left = deadline - time.monotonic()
                if left <= 0:
                    raise
                if not self.waiting_logged:
                    self.waiting_logged = True
                    self.log.log(THREAD, "maildrop of %s held by another session: waiting up"
                                 " to %ds", user, settings.lock_wait)
                self.ctx.sleep(min(pause, left))
                pause = min(pause * 2, MAX_PAUSE)
        raise MaildropBusy(getattr(self.maildrop, "path", "maildrop"))

    def _ask(self, holder: LockHolder) -> bool:
        """Ask the holder if it is time; True when it ended its session."""
        now = time.monotonic()
        if holder.stamp == self.asked and now < self.next_ask:
            return False
        self.asked = holder.stamp
        answer = self.ctx.offload(ask_holder, holder, self.requester)
        stamp = parse_stamp(holder.stamp)
        if answer.word == "ENDED" and stamp is not None:
            self.took_over = True
            self.log.log(THREAD, "took over session %s of pid %d, idle %.1fs", stamp.session,
                         stamp.pid, answer.idle)
            return True
        if answer.word == "ACTIVE":
            # Ask again when it would have been idle long enough, if nothing happens meanwhile.
            self.next_ask = now + max(self.ctx.settings.takeover_idle - answer.idle, MAX_PAUSE)
        else:
            self.next_ask = now + RETRY_ASK
        self.log.debug("lock holder %s: %s %.1f%s", stamp.session if stamp else "unknown",
                       answer.word, answer.idle, f" ({answer.why})" if answer.why else "")
        return False


def lock_and_scan(ctx: Any, maildrop: store.Maildrop, session_id: str, log: Any,
                  user: str, policy: Any = None) -> tuple[list[Message], bool]:
    """(messages, took_over): the login's lock and first scan; ``took_over`` says it ended
    another session of this maildrop (a continued poll: LOGIN-DELAY lets it through)."""
    wait = LockWait(ctx, maildrop, session_id, log, policy)
    messages = wait.run(user)
    return messages, wait.took_over

