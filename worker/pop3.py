"""One POP3 session (RFC 1939) as a sans-IO state machine.

The connection feeds it lines with ``handle_line`` and gives it a ``write`` callable; the session
never sees a socket, so tests drive it with lists. Verbs are ``pop_VERB`` methods and ``ALLOWED``
says which state admits which verb.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from enum import Enum
from typing import TYPE_CHECKING

from shared.logsetup import THREAD, session_logger
from worker import replies as R
from worker.maildir import MaildropBusy, MaildropError, Message
from worker.wire import DotStuffer

if TYPE_CHECKING:
    from worker.context import ServerContext

MAX_LINE = 255  # RFC 2449 section 4: a command line is at most 255 octets with its CRLF
_CHUNK = 64 * 1024
_USER_NAME = re.compile(r"[a-z0-9_][a-z0-9._@+-]{0,63}")


class ConnectionLost(Exception):
    """The client's side of the connection is gone (raised by the transport's write)."""


class State(Enum):
    AUTHORIZATION = "AUTHORIZATION"
    TRANSACTION = "TRANSACTION"
    UPDATE = "UPDATE"


ALLOWED: dict[State, frozenset[str]] = {
    State.AUTHORIZATION: frozenset({"USER", "PASS", "QUIT", "CAPA"}),
    State.TRANSACTION: frozenset({"STAT", "LIST", "RETR", "DELE", "NOOP", "RSET", "QUIT",
                                  "TOP", "UIDL", "CAPA"}),
    State.UPDATE: frozenset(),
}

CAPABILITIES = ("TOP", "USER", "UIDL", "RESP-CODES", "PIPELINING", "AUTH-RESP-CODE")


class Session:
    """The server half of one POP3 conversation."""

    def __init__(self, ctx: "ServerContext", write: Callable[[bytes], None], peer: str,
                 session_id: str):
        self.ctx = ctx
        self._write = write
        self.peer = peer
        self.log = session_logger(session_id)
        self.state = State.AUTHORIZATION
        self.closing = False          # the connection closes once this reply is out
        self.quit = False             # the client said QUIT (a normal disconnect)
        self.user: str | None = None  # from USER, waiting for PASS
        self.account_name: str | None = None
        self.failures = 0
        self.maildrop = None
        self.messages: list[Message] = []
        self.deleted: set[int] = set()

    # -- output ---------------------------------------------------------------------------
    def reply(self, line: str) -> None:
        self._write(line.encode("utf-8", "replace") + b"\r\n")

    def start(self) -> None:
        self.log.log(THREAD, "connect from %s", self.peer)
        self.reply(R.GREETING.format(version=self.ctx.version, host=self.ctx.hostname,
                                     since=self.ctx.since))

    # -- input ----------------------------------------------------------------------------
    def handle_line(self, line: bytes) -> None:
        """Handle one command line (without its line end)."""
        verb_raw, _, rest = line.partition(b" ")
        verb = verb_raw.decode("ascii", "replace").upper()
        self._log_command(verb, rest)
        method = getattr(self, "pop_" + verb, None) if verb.isalpha() else None
        if method is None:
            self.reply(R.UNKNOWN_COMMAND)
            return
        if verb not in ALLOWED[self.state]:
            self.reply(R.WRONG_STATE)
            return
        try:
            method(rest)
        except (ConnectionLost, TimeoutError):
            raise  # the transport's trouble, handled by the connection
        except Exception:
            # Exception text never reaches the wire; the log gets the traceback.
            self.log.exception("error in %s", verb)
            self.reply(R.SERVER_ERROR)

    def line_too_long(self) -> None:
        self.log.log(THREAD, "line too long")
        self.reply(R.LINE_TOO_LONG)

    def _log_command(self, verb: str, rest: bytes) -> None:
        if verb == "PASS":
            self.log.log(THREAD, "PASS ********")
        else:
            self.log.log(THREAD, "%s %s", verb, rest.decode("utf-8", "backslashreplace")[:100])

    def _args(self, verb: str, rest: bytes, counts: tuple[int, ...]) -> list[str] | None:
        args = rest.decode("utf-8", "replace").split()
        if len(args) not in counts:
            self.reply(R.BAD_ARGUMENTS.format(verb=verb))
            return None
        return args

    def _message(self, arg: str) -> Message | None:
        """The live message numbered ``arg`` (1-based), or None after an -ERR reply."""
        if not arg.isdigit():
            self.reply(R.NO_SUCH_MESSAGE)
            return None
        n = int(arg)
        if not 1 <= n <= len(self.messages):
            self.reply(R.NO_SUCH_MESSAGE)
            return None
        if n - 1 in self.deleted:
            self.reply(R.ALREADY_DELETED.format(n=n))
            return None
        return self.messages[n - 1]

    def _live(self) -> list[Message]:
        return [m for m in self.messages if m.index not in self.deleted]

    # -- AUTHORIZATION ----------------------------------------------------------------------
    def pop_USER(self, rest: bytes) -> None:
        args = self._args("USER", rest, (1,))
        if args is None:
            return
        name = args[0].lower()
        if not _USER_NAME.fullmatch(name):
            self.user = None
            self.reply(R.BAD_USER_NAME)
            return
        self.user = name
        self.reply(R.PASSWORD_REQUIRED.format(user=name))

    def pop_PASS(self, rest: bytes) -> None:
        if self.user is None:
            self.reply(R.USER_FIRST)
            return
        user, self.user = self.user, None
        # PASS takes the rest of the line verbatim: passwords may contain spaces.
        account = self.ctx.authenticate(user, rest)
        if account is None:
            self._login_failed(user)
            return
        maildrop = self.ctx.maildrop_for(account)
        try:
            maildrop.lock()
        except MaildropBusy:
            self.log.log(THREAD, "maildrop of %s in use", user)
            self.reply(R.IN_USE)
            return
        except MaildropError as exc:
            self.log.error("user %s: %s", user, exc)
            self.reply(R.MAILDROP_UNAVAILABLE)
            return
        try:
            self.messages = maildrop.scan(self.ctx.settings.maxmsg)
        except OSError as exc:
            maildrop.unlock()
            self.log.error("user %s: cannot read maildrop: %s", user, exc)
            self.reply(R.MAILDROP_UNAVAILABLE)
            return
        self.maildrop = maildrop
        self.account_name = account.name
        self.state = State.TRANSACTION
        self.ctx.user_logged_in(self)
        self.log.log(THREAD, "user %s logged in from %s, %d messages", user, self.peer,
                     len(self.messages))
        self.reply(R.LOGIN_OK)

    def _login_failed(self, user: str) -> None:
        self.failures += 1
        self.ctx.auth_failed()
        self.log.log(THREAD, "login failed for %s from %s (attempt %d)", user, self.peer,
                     self.failures)
        self.reply(R.NOT_ACCESSIBLE.format(user=user))
        if self.failures >= self.ctx.settings.login_attempts:
            self.log.info("closing %s after %d failed logins", self.peer, self.failures)
            self.closing = True

    def pop_CAPA(self, rest: bytes) -> None:
        self.reply(R.CAPA)
        for capability in CAPABILITIES:
            self.reply(capability)
        self.reply(f"IMPLEMENTATION IUPOP3-V{self.ctx.version}")
        self._write(b".\r\n")

    def pop_QUIT(self, rest: bytes) -> None:
        self.quit = True
        self.closing = True
        if self.state is State.TRANSACTION:
            self.state = State.UPDATE  # TRANSACTION -> UPDATE
            deleted = [self.messages[i] for i in sorted(self.deleted)]
            try:
                self.maildrop.commit(deleted)
            except OSError as exc:
                self.log.error("update of %s failed: %s", self.account_name, exc)
                self.release()
                self.reply(R.UPDATE_FAILED)
                return
            self.log.log(THREAD, "update: %d messages deleted", len(deleted))
        self.release()
        self.reply(R.SIGNING_OFF.format(host=self.ctx.hostname))

    # -- TRANSACTION ------------------------------------------------------------------------
    def pop_STAT(self, rest: bytes) -> None:
        live = self._live()
        self.reply(R.STAT.format(count=len(live), octets=sum(m.size for m in live)))

    def pop_LIST(self, rest: bytes) -> None:
        self._listing("LIST", rest, lambda m: str(m.size))

    def pop_UIDL(self, rest: bytes) -> None:
        self._listing("UIDL", rest, lambda m: m.uid)

    def _listing(self, verb: str, rest: bytes, field: Callable[[Message], str]) -> None:
        args = self._args(verb, rest, (0, 1))
        if args is None:
            return
        if args:
            message = self._message(args[0])
            if message is not None:
                template = R.LIST_ONE if verb == "LIST" else R.UIDL_ONE
                value = field(message)
                self.reply(template.format(n=message.index + 1, octets=value, uid=value))
            return
        live = self._live()
        if verb == "LIST":
            self.reply(R.LIST_ALL.format(count=len(live), octets=sum(m.size for m in live)))
        else:
            self.reply(R.UIDL_ALL)
        body = "".join(f"{m.index + 1} {field(m)}\r\n" for m in live)
        self._write(body.encode("utf-8") + b".\r\n")

    def pop_RETR(self, rest: bytes) -> None:
        args = self._args("RETR", rest, (1,))
        if args is None:
            return
        message = self._message(args[0])
        if message is None:
            return
        fh = self._open(message)
        if fh is None:
            return
        with fh:
            self.reply(R.RETR.format(octets=message.size))
            stuffer = DotStuffer()
            while chunk := fh.read(_CHUNK):
                self._write(stuffer.feed(chunk))
            self._write(stuffer.finish())
        self.ctx.retrieved(message.size)
        self.log.log(THREAD, "RETR %d uid %s, %d octets", message.index + 1, message.uid,
                     message.size)

    def pop_TOP(self, rest: bytes) -> None:
        args = self._args("TOP", rest, (2,))
        if args is None:
            return
        message = self._message(args[0])
        if message is None:
            return
        if not args[1].isdigit():
            self.reply(R.BAD_ARGUMENTS.format(verb="TOP"))
            return
        body_lines = int(args[1])
        fh = self._open(message)
        if fh is None:
            return
        with fh:
            self.reply(R.TOP)
            stuffer = DotStuffer()
            in_body = False
            for line in fh:
                if in_body:
                    if body_lines <= 0:
                        break
                    body_lines -= 1
                elif line in (b"\n", b"\r\n"):
                    in_body = True
                self._write(stuffer.feed(line))
            self._write(stuffer.finish())

    def _open(self, message: Message):
        try:
            return self.maildrop.open_message(message)
        except OSError as exc:
            self.log.error("cannot read message %s: %s", message.uid, exc)
            self.reply(R.NO_SUCH_MESSAGE)
            return None

    def pop_DELE(self, rest: bytes) -> None:
        args = self._args("DELE", rest, (1,))
        if args is None:
            return
        message = self._message(args[0])
        if message is None:
            return
        self.deleted.add(message.index)
        self.reply(R.DELE.format(n=message.index + 1))

    def pop_RSET(self, rest: bytes) -> None:
        self.deleted.clear()
        live = self.messages
        self.reply(R.RSET.format(count=len(live), octets=sum(m.size for m in live)))

    def pop_NOOP(self, rest: bytes) -> None:
        self.reply(R.NOOP)

    # -- end --------------------------------------------------------------------------------
    def release(self) -> None:
        """Drop the maildrop lock without applying anything (also after a lost connection)."""
        if self.maildrop is not None:
            self.maildrop.unlock()
            self.maildrop = None
            self.ctx.user_logged_out(self)


def verbs() -> set[str]:
    """Every verb the Session implements (a unit test checks ALLOWED against it)."""
    return {name[4:] for name in dir(Session) if name.startswith("pop_")}
