"""Lock takeover, the holder's half: each worker's takeover socket and its sessions by id.

worker.main starts ``TakeoverDesk.serve`` beside the supervisor link; worker.connection
registers each connection. A request (from worker.takeover in any worker or node of this host)
names a session id and the identity of the lock file its sender found held: the session is
ended only if it holds exactly that file, is in TRANSACTION, and waits for a command line
since at least ``-takeover-idle`` seconds. The check and the end happen in one hub callback,
so a line that arrives meanwhile either comes first (the session is active) or not at all.
"""

from __future__ import annotations

import errno
import os
import re
import socket as stdsocket
from typing import Protocol

import gevent
import gevent.event
import gevent.pool
import gevent.socket

from shared.logsetup import log
from worker.store import LockKey
from worker.takeover import new_token, peer_credentials, socket_address

REQUEST_SECONDS = 2.0   # to read a request; the sender waits ASK_SECONDS for the whole exchange
RELEASE_SECONDS = 2.0   # for an ended session to drop its lock before we answer ENDED anyway
REQUEST_MAX = 200
MAX_PENDING = 64        # requests served at once; more wait in the listen backlog
BIND_TRIES = 8          # names tried (each a new random token) before giving takeover up
_REQUEST = re.compile(r"TAKEOVER ([\x21-\x7e]{1,32}) ([0-9]{1,20}) ([0-9]{1,20}) ([ -~]{0,80})")


class Holder(Protocol):
    """A connection as the desk sees it (worker.connection.Connection)."""

    released: gevent.event.Event

    def takeover_refusal(self, key: LockKey, idle_needed: float) -> str | None:
        """Why the session may not be ended for a login that found ``key`` held, as the
        answer to send ("ACTIVE 3.2", "UPDATE", "UNKNOWN"); None if it may."""

    def end_for_takeover(self, by: str) -> float:
        """End the session now (it is idle: checked just before); returns its idle seconds."""


class TakeoverDesk:
    """The sessions of this worker by id, and the socket other logins ask them to go on."""

    def __init__(self, idle_needed: float):
        self.idle_needed = idle_needed
        self.holders: dict[str, Holder] = {}
        self.listener: gevent.socket.socket | None = None
        self.token: str | None = None  # in this worker's stamps: names the socket (listen)

    def register(self, session_id: str, holder: Holder) -> None:
        self.holders[session_id] = holder

    def unregister(self, session_id: str) -> None:
        self.holders.pop(session_id, None)

    def listen(self) -> bool:
        """Bind this worker's takeover socket under a fresh random name, a new one for each
        name already taken; False, with one ERROR, if no name can be bound."""
        problem = "no name tried"
        for _ in range(BIND_TRIES):
            token = new_token()
            sock = gevent.socket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
            try:
                sock.bind(socket_address(token))
                sock.listen(MAX_PENDING)
            except OSError as exc:
                sock.close()
                problem = exc.strerror or str(exc)
                if exc.errno == errno.EADDRINUSE:
                    continue  # 128 random bits taken: someone squats; try another name
                break
            self.listener, self.token = sock, token
            return True
        log.error("lock takeover unavailable for this worker's sessions: %s", problem)
        return False

    def serve(self) -> None:
        """Accept requests until killed (worker.main runs this in its own greenlet)."""
        pool = gevent.pool.Pool(MAX_PENDING)
        assert self.listener is not None
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError as exc:
                log.debug("takeover socket: %s", exc)
                gevent.sleep(0.1)
                continue
            pool.wait_available()
            pool.spawn(self._answer, conn)

    def _answer(self, conn: gevent.socket.socket) -> None:
        with conn:
            try:
                pid, uid = peer_credentials(conn)
                if uid != os.geteuid():
                    log.info("takeover request from pid %d uid %d refused: not the server's"
                             " user", pid, uid)
                    return
                conn.settimeout(REQUEST_SECONDS)
                request = b""
                while b"\n" not in request and len(request) < REQUEST_MAX:
                    chunk = conn.recv(REQUEST_MAX)
                    if not chunk:
                        return
                    request += chunk
                match = _REQUEST.fullmatch(request.partition(b"\n")[0].decode("ascii", "replace"))
                reply = "UNKNOWN" if match is None else self.take_over(
                    match.group(1), (int(match.group(2)), int(match.group(3))), match.group(4))
                conn.sendall(reply.encode() + b"\n")
            except OSError as exc:
                log.debug("takeover request: %s", exc)

    def take_over(self, session_id: str, key: LockKey, by: str) -> str:
        """End session ``session_id`` if it holds ``key`` and is idle; the answer to send."""
        holder = self.holders.get(session_id)
        if holder is None or not self.idle_needed:
            return "UNKNOWN"
        outcome = gevent.event.AsyncResult()

        def decide() -> None:  # in the hub: nothing runs between the check and the end
            try:
                refusal = holder.takeover_refusal(key, self.idle_needed)
                if refusal is None:
                    refusal = f"ENDED {holder.end_for_takeover(by):.1f}"
            except Exception:  # the hub must go on; the asker waits for the lock instead
                log.exception("cannot end session %s for a takeover", session_id)
                refusal = "UNKNOWN"
            outcome.set(refusal)

        gevent.get_hub().loop.run_callback(decide)
        answer = outcome.get() if outcome.wait(RELEASE_SECONDS) else "UNKNOWN"
        if answer.startswith("ENDED"):
            holder.released.wait(RELEASE_SECONDS)
        return answer
