"""One POP3 session (RFC 1939) as a sans-IO state machine.

The connection feeds it lines with ``handle_line`` and gives it a ``write`` callable; the session
never sees a socket, so tests drive it with lists. Verbs are ``pop_VERB`` methods and ``ALLOWED``
says which state admits which verb.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from logging import ERROR
from enum import Enum

from shared.accountsource import Verdict
from shared.logsetup import FLUSH, THREAD, masked_line, session_logger
from shared.netaddr import normalized
from shared.stats import Counter
from shared.users import Account, user_name
from worker import replies as R
from worker import openahead, retention, rewrite, sasl, store, streamslots, takeover, xclient
from worker.authguard import Outcome
from worker.context import ServerContext
from worker.limits import ConnectionLimits
from worker.store import FOREIGN_FOLDER, LoginTooSoon, MaildropBusy, MaildropError, Message
from worker.saslsession import SaslExchange
from worker.wire import DotStuffer

MAX_LINE = 255  # RFC 2449 section 4: a command line is at most 255 octets with its CRLF
SASL_MAX_LINE = 4096  # RFC 5034 section 4: AUTH responses are not bound by the 255 limit
# Fewer, larger sends: each send on loopback also runs the receive path. One read of a stored
# message (worker.store.READ_CHUNK) is one send.
_CHUNK = store.READ_CHUNK


class ConnectionLost(Exception):
    """The client's side of the connection is gone (raised by the transport's write)."""


class State(Enum):
    AUTHORIZATION = "AUTHORIZATION"
    TRANSACTION = "TRANSACTION"
    UPDATE = "UPDATE"


ALLOWED: dict[State, frozenset[str]] = {
    State.AUTHORIZATION: frozenset({"USER", "PASS", "APOP", "AUTH", "QUIT", "CAPA", "STLS",
                                    "XCLIENT"}),
    State.TRANSACTION: frozenset({"STAT", "LIST", "RETR", "DELE", "NOOP", "RSET", "QUIT",
                                  "TOP", "UIDL", "CAPA", "XTND"}),
    State.UPDATE: frozenset(),
}

CAPABILITIES = ("TOP", "USER", "UIDL", "RESP-CODES", "PIPELINING", "AUTH-RESP-CODE")


class Session(SaslExchange):
    """The server half of one POP3 conversation."""

    def __init__(self, ctx: ServerContext, write: Callable[[bytes], None], peer: str,
                 session_id: str, *, secure: bool = False, tls_available: bool = False,
                 local: bool = True, address: str = "", limits: ConnectionLimits | None = None):
        self.ctx = ctx
        self._write = write
        self.peer = peer
        self.secure = secure                  # TLS is active on this connection
        self.tls_available = tls_available    # STLS could start TLS now
        self.local = local                    # the client is on this host (loopback)
        self.address = address                # the client's IP address, for the auth guard
        self.start_tls = False                # set by STLS: the connection starts TLS next
        self.xclient_trusted = False          # the peer may send XCLIENT (worker/xclient.py)
        self.unknown_source = False           # behind a PROXY header that named no client
        # While an AUTH exchange waits for the client's response, its next line goes here.
        self.continuation: Callable[[bytes], None] | None = None
        # An AUTH naming only a mechanism was just refused: a client that sent its response
        # without waiting for "+" gave us credentials on the next line (masked in the log).
        self.auth_refused = False
        self.apop_timestamp = ctx.accounts.apop_timestamp() if ctx.settings.apop else ""
        self.session_id = session_id
        self.log = session_logger(session_id)
        # The connection's limits (login deadline, bad-command budget, log repeats) survive STLS.
        self.limits = limits or ConnectionLimits.from_settings(ctx.settings)
        self.state = State.AUTHORIZATION
        self.closing = False          # the connection closes once this reply is out
        self.quit = False             # the client said QUIT (a normal disconnect)
        self.user: str | None = None  # from USER, waiting for PASS
        self.account_name: str | None = None
        self.took_over = False  # this login ended an idle session of its maildrop (issue 13)
        self.account: Account | None = None
        self.policy = retention.Policy()
        # RETRs sent whole (first retrievals if the client QUITs), and DELEs: dicts used as
        # ordered sets, 64 bytes empty against a set's 216, in every idle session (issue 15).
        self.retrieved: dict[int, None] = {}
        self.failures = 0
        self.maildrop = None
        self.messages: list[Message] = []
        self.deleted: dict[int, None] = {}
        self.ahead: openahead.OpenAhead | None = None  # RETR/TOP files opened ahead, by index

    # -- output ---------------------------------------------------------------------------
    def reply(self, line: str) -> None:
        self.log.debug("S: %s", line)  # the server's half: DEBUG only (THREAD logs the client's)
        self._write(line.encode("utf-8", "replace") + b"\r\n")

    def start(self) -> None:
        self.log.log(THREAD, "connect from %s", self.peer)
        greeting = R.GREETING.format(version=self.ctx.version, host=self.ctx.hostname,
                                     since=self.ctx.since)
        if self.xclient_trusted:  # as Dovecot's backends tell their proxies
            greeting = "+OK [XCLIENT]" + greeting[len("+OK"):]
        # RFC 1939 section 7: the APOP timestamp is offered only when APOP is on.
        self.reply(f"{greeting} {self.apop_timestamp}" if self.apop_timestamp else greeting)

    # -- input ----------------------------------------------------------------------------
    def handle_line(self, line: bytes) -> None:
        """Handle one command line (without its line end)."""
        if self.continuation is not None:
            self._log_client(masked_line(line, sasl_response=True))
            step, self.continuation = self.continuation, None
            self._guarded(step, line, "AUTH")
            return
        self._log_command(line)
        verb_raw, _, rest = line.partition(b" ")
        verb = verb_raw.decode("ascii", "replace").upper()
        method = getattr(self, "pop_" + verb, None) if verb.isalpha() else None
        if method is None:
            self._bad_command(R.UNKNOWN_COMMAND)
            return
        if verb not in ALLOWED[self.state]:
            self._bad_command(R.WRONG_STATE)
            return
        self._guarded(method, rest, verb)

    def _bad_command(self, reply: str) -> None:
        """Answer a bad command, or close once the connection is over ``-max-bad-commands``."""
        budget = self.limits.bad_commands
        if not budget.spend():
            self.reply(reply)
            return
        self.log.log(THREAD, "closing %s after %d bad commands", self.peer, budget.spent)
        self.reply(R.TOO_MANY_BAD_COMMANDS)
        self.closing = True

    def _guarded(self, method: Callable[[bytes], None], rest: bytes, verb: str) -> None:
        try:
            method(rest)
        except (ConnectionLost, TimeoutError):
            raise  # the transport's trouble, handled by the connection
        except Exception:
            # Exception text never reaches the wire; the log gets the traceback.
            self.log.exception("error in %s", verb)
            self.continuation = None
            self.reply(R.SERVER_ERROR)

    @property
    def max_line(self) -> int:
        """The longest line the session accepts now: SASL responses may exceed RFC 2449's 255."""
        return SASL_MAX_LINE if self.continuation is not None else MAX_LINE

    def line_too_long(self) -> None:
        self._log_client("line too long")
        self._bad_command(R.LINE_TOO_LONG)

    def _log_command(self, line: bytes) -> None:
        # PASS, APOP and AUTH arguments are masked at every level (logsetup.masked_line).
        stray_response = self.auth_refused
        self.auth_refused = False
        if not self.log.isEnabledFor(THREAD):
            return  # the default level: no masking or repeat counting for a line not written
        stray_response = stray_response and not self._is_command(line)
        self._log_client(masked_line(line, sasl_response=stray_response))

    def _is_command(self, line: bytes) -> bool:
        words = line.split()
        return bool(words) and words[0].isalpha() and hasattr(
            self, "pop_" + words[0].decode("ascii").upper())

    def log_failed_login(self, user: str, delay: float, note: str = "") -> None:
        """The line etc/fail2ban/filter.d/iupop3.conf matches: INFO, so it shows at the default
        level and at INFO, and written at once (``FLUSH``) so a ban need not wait for the
        buffer; the bare address (IPv4-mapped shown as IPv4) is what fail2ban's <HOST> parses."""
        port = self.peer.rpartition(":")[2]
        self.log.info("login failed for %s from %s port %s (attempt %d), %sdelay %.0fs",
                      user or "-", normalized(self.address), port, self.failures, note, delay,
                      extra=FLUSH)

    def _log_client(self, text: str) -> None:
        """A THREAD line the client can make us repeat: the same text at most a few times."""
        if self.limits.log_repeats.admit(text):
            self.log.log(THREAD, "%s", text)

    def _args(self, verb: str, rest: bytes, counts: tuple[int, ...]) -> list[str] | None:
        args = rest.decode("utf-8", "replace").split()
        if len(args) not in counts:
            self.reply(R.BAD_ARGUMENTS.format(verb=verb))
            return None
        return args

    def _message(self, arg: str) -> Message | None:
        """The live message numbered ``arg`` (1-based), or None after an -ERR reply."""
        if not (arg.isascii() and arg.isdigit()):  # "²".isdigit(), but int("²") raises
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
        if not self.cleartext_allowed():
            self.reply(R.CLEARTEXT_REFUSED)
            return
        name = user_name(args[0])
        if name is None:
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
        self._login(user, lambda: self.ctx.accounts.authenticate(user, rest, self.address))

    def pop_APOP(self, rest: bytes) -> None:
        args = self._args("APOP", rest, (2,))
        if args is None:
            return
        if not self.apop_timestamp:
            self.reply(R.APOP_UNAVAILABLE)
            return
        if self.ctx.settings.cleartext_auth == "NEVER" and not self.secure:
            # MD5 of a password-equivalent secret: as good as cleartext to an eavesdropper.
            self.reply(R.CLEARTEXT_REFUSED)
            return
        name, digest = user_name(args[0]), args[1]
        if name is None:
            self.reply(R.BAD_USER_NAME)
            return
        self._login(name, lambda: self.ctx.accounts.authenticate_apop(name, self.apop_timestamp, digest))

    def pop_AUTH(self, rest: bytes) -> None:
        args = rest.split()
        self.auth_refused = len(args) == 1  # cleared when the exchange starts
        if not args:
            self.reply(R.SASL_LIST)
            for mechanism in self._mechanisms():
                self.reply(mechanism)
            self._write(b".\r\n")
            return
        mechanism = args[0].decode("ascii", "replace").upper()
        if mechanism not in sasl.MECHANISMS:
            self.reply(R.SASL_UNKNOWN)
            return
        if len(args) > 2:
            self.reply(R.BAD_ARGUMENTS.format(verb="AUTH"))
            return
        if not self.cleartext_allowed():
            self.reply(R.CLEARTEXT_REFUSED)
            return
        initial = args[1] if len(args) == 2 else None
        if mechanism == "PLAIN":
            if initial is None:
                self._challenge("", self._auth_plain)
            else:
                self._auth_plain(initial)
        elif initial is None:
            self._challenge(sasl.LOGIN_USER_PROMPT, self._auth_login_user)
        else:
            self._auth_login_user(initial)

    def _wait_penalty(self, user: str, seconds: float) -> None:
        """Wait out a failed-login penalty before any answer; it does not count against
        -login-timeout (the wait is the server's doing, not the client's)."""
        if seconds:
            self.log.debug("login for %s waits %.1fs: recent failures", user, seconds)
            with self.limits.login.paused():
                self.ctx.sleep(seconds)

    def _sasl_failed(self, user: str | None) -> None:
        """A response that names no password to check: it pays the address's penalty only."""
        admission = self.ctx.guard.admit(self.address, None, exempt=not self.unknown_source)
        if admission.outcome is Outcome.BLOCKED:
            self._login_blocked()
            return
        self._wait_penalty(user or "", admission.wait)
        self._login_failed(user or "", R.SASL_FAILED if user else R.SASL_MALFORMED,
                           admission.wait)

    def _login(self, user: str, check: Callable[[], Verdict],
               failure: str = R.NOT_ACCESSIBLE) -> None:
        """Wait the guard's penalty, authenticate with ``check``, then open and lock the
        maildrop (TRANSACTION). Right or wrong, the answer comes only after the wait, and
        every refusal (unknown, wrong, locked, expired ...) gets the same reply."""
        admission = self.ctx.guard.admit(self.address, user, exempt=not self.unknown_source)
        if admission.outcome is Outcome.BLOCKED:
            self._login_blocked()
            return
        try:
            self._wait_penalty(user, admission.wait)
            if admission.outcome is Outcome.DEFERRED or not self.ctx.guard.confirm(admission):
                self.ctx.guard.failed(admission)
                self._login_failed(user, R.LOGIN_DEFERRED, admission.wait, "deferred, ")
                return
            verdict = check()
        except BaseException:
            self.ctx.guard.failed(admission)  # cut short (a hang-up, a shutdown): fail closed
            raise
        if verdict.account is None:
            self.ctx.guard.failed(admission)
            # The reason is for the log only; a source that could not decide is an ERROR.
            self.log.log(ERROR if verdict.fault else THREAD, "login of %s refused: %s", user,
                         verdict.reason or "refused")
            self._login_failed(user, failure, admission.wait)
            return
        self.ctx.guard.succeeded(admission)
        self._enter_transaction(user, verdict.account)

    def _enter_transaction(self, user: str, account: Account) -> None:
        """Open, lock and scan the account's maildrop; TRANSACTION if that works."""
        policy = retention.Policy.for_account(self.ctx.settings, account)
        try:
            maildrop = self.ctx.maildrop_for(account)
            # Lock and scan in the pool (worker.store); a held lock is waited for (the server's
            # doing: -login-timeout stands still) or taken over.
            with self.limits.login.paused():
                self.messages, self.took_over = takeover.lock_and_scan(
                    self.ctx, maildrop, self.session_id, self.log, user, policy)
        except LoginTooSoon as exc:
            self.log.log(THREAD, "login of %s refused: LOGIN-DELAY %ds, %ds left", user,
                         policy.login_delay, exc.seconds)
            self.ctx.stats.count(Counter.LOGIN_DELAYED)
            self.reply(R.LOGIN_DELAYED.format(seconds=exc.seconds))
            return
        except MaildropBusy:
            self.log.log(THREAD, "maildrop of %s in use", user)
            self.reply(R.IN_USE)
            return
        except MaildropError as exc:
            self.log.error("user %s: %s", user, exc)
            self.reply(R.MAILDROP_UNAVAILABLE)
            return
        except OSError as exc:
            self.log.error("user %s: cannot read maildrop: %s", user, exc)
            self.reply(R.MAILDROP_UNAVAILABLE)
            return
        self.maildrop = maildrop
        self.account_name, self.account, self.policy = account.name, account, policy
        self.state = State.TRANSACTION
        self.limits.login.met()
        self.ctx.stats.user_logged_in(id(self), account.name)
        self.log.log(THREAD, "user %s logged in from %s, %d messages", user, self.peer,
                     len(self.messages))
        self.reply(R.LOGIN_OK)

    def _login_blocked(self) -> None:
        self.log.log(THREAD, "login refused: too many failures from %s", self.address)
        self.reply(R.ADDRESS_BLOCKED)
        self.closing = True

    def _login_failed(self, user: str, reply: str = R.NOT_ACCESSIBLE, delay: float = 0.0,
                      note: str = "") -> None:
        """Answer a failed (or deferred: not checked) login; the guard's wait is over."""
        self.failures += 1
        self.ctx.stats.auth_failed()
        self.log_failed_login(user, delay, note)
        self.reply(reply.format(user=user))
        if self.failures >= self.ctx.settings.login_attempts:
            self.log.log(THREAD, "closing %s after %d failed logins", self.peer, self.failures)
            self.closing = True

    def cleartext_allowed(self) -> bool:
        """USER/PASS is allowed over TLS, and without it as the cleartext policy says."""
        policy = self.ctx.settings.cleartext_auth
        return self.secure or policy == "ALWAYS" or (policy == "LOOPBACK" and self.local)

    def pop_CAPA(self, rest: bytes) -> None:
        self.reply(R.CAPA)
        for capability in CAPABILITIES:
            if capability != "USER" or self.cleartext_allowed():
                self.reply(capability)
        if self._mechanisms():
            self.reply("SASL " + " ".join(self._mechanisms()))
        if self.tls_available and not self.secure and self.state is State.AUTHORIZATION:
            self.reply("STLS")
        for line in retention.capa_lines(self.ctx.settings, self.ctx.accounts.users,
                                         self.account):
            self.reply(line)
        self.reply(f"IMPLEMENTATION IUPOP3-V{self.ctx.version}")
        self._write(b".\r\n")

    def pop_STLS(self, rest: bytes) -> None:
        if self.secure or not self.tls_available:
            self.reply(R.STLS_UNAVAILABLE)
            return
        self.reply(R.STLS)
        # RFC 2595 section 4: the connection negotiates TLS next and throws away anything the
        # client sent after STLS; then a new session starts in AUTHORIZATION.
        self.start_tls = True

    def pop_QUIT(self, rest: bytes) -> None:
        self.quit = True
        self.closing = True
        if self.ahead is not None:
            self.ahead.close()  # before UPDATE moves or removes their files
        if self.state is State.TRANSACTION:
            self.state = State.UPDATE  # TRANSACTION -> UPDATE
            deleted = [self.messages[i] for i in sorted(self.deleted)]
            retrieved = [self.messages[i] for i in sorted(self.retrieved)]
            try:  # pool: worker.store; nothing to apply, nothing to wait for
                kept, expired = (self.ctx.offload(store.update, self.maildrop, deleted,
                                                  retrieved, self.messages, self.policy)
                                 if store.has_update(self.maildrop, deleted, retrieved,
                                                     self.messages, self.policy) else (0, 0))
            except OSError as exc:
                self.log.error("update of %s failed: %s", self.account_name, exc)
                self.release()
                self.reply(R.UPDATE_FAILED)
                return
            if expired:
                self.log.log(THREAD, "update: %d retrieved messages expired (EXPIRE %d)",
                             expired, self.policy.expire_days)
            self.log.log(THREAD, "update: %d messages deleted, %d of them foreign: moved to %s",
                         len(deleted) + expired, kept, FOREIGN_FOLDER)
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
        xid = rewrite.new_id(self.ctx.slot)
        with fh:
            # Logged before the transfer, so a download cut short can be found by its ID too.
            self.log.log(THREAD, "RETR %d uid %s, %d octets%s, X-POP3-ID %s", message.index + 1,
                         message.uid, message.size, " (foreign: notice only)" if message.foreign else "",
                         xid)
            pieces = self.ctx.rewriter.render(fh, message.foreign, xid)
            self._send_multiline(R.RETR.format(octets=message.size), pieces)
        self.retrieved[message.index] = None
        self.ctx.stats.retrieved(message.size)

    def pop_TOP(self, rest: bytes) -> None:
        args = self._args("TOP", rest, (2,))
        if args is None:
            return
        message = self._message(args[0])
        if message is None:
            return
        if not (args[1].isascii() and args[1].isdigit()):
            self.reply(R.BAD_ARGUMENTS.format(verb="TOP"))
            return
        body_lines = int(args[1])
        fh = self._open(message)
        if fh is None:
            return
        xid = rewrite.new_id(self.ctx.slot)
        with fh:
            self.log.debug("TOP %d uid %s, X-POP3-ID %s", message.index + 1, message.uid, xid)
            pieces = self.ctx.rewriter.render(fh, message.foreign, xid, body_lines)
            self._send_multiline(R.TOP, pieces)

    def _send_multiline(self, status: str, pieces: Iterable[bytes]) -> None:
        """Status line, stuffed pieces and terminator, in writes of about ``_CHUNK`` octets
        (a small message goes out in one send)."""
        stuffer = DotStuffer()
        pending = [status.encode("utf-8") + b"\r\n"]
        size = 0
        for piece in pieces:
            data = stuffer.feed(piece)
            pending.append(data)
            size += len(data)
            if size >= _CHUNK:
                self._write(b"".join(pending))
                pending, size = [], 0
        pending.append(stuffer.finish())
        self._write(b"".join(pending))

    def _open(self, message: Message):
        """The message's file in one of the worker's stream slots (worker.streamslots)."""
        return streamslots.counted(self.ctx.streams, lambda: self._open_stored(message))

    def _open_stored(self, message: Message):
        if self.ahead is None:
            self.ahead = openahead.OpenAhead()
        try:  # pool: worker.store; with the next few of the run (worker.openahead)
            return self.ahead.open(self.ctx.offload, self.maildrop, message, self.messages,
                                   self.deleted)
        except FileNotFoundError as exc:  # removed by another program since the scan
            self.log.error("cannot read message %s: %s", message.uid, exc)
            self.reply(R.NO_SUCH_MESSAGE)
            return None
        except OSError as exc:  # a spool locked too long (TimeoutError), a full disk for the
            # mbox dot-lock: the message is there, so [SYS/TEMP], not "no such message"
            self.log.error("cannot lock or read for message %s: %s", message.uid, exc)
            self.reply(R.MAILDROP_UNAVAILABLE)
            return None

    def pop_DELE(self, rest: bytes) -> None:
        args = self._args("DELE", rest, (1,))
        if args is None:
            return
        message = self._message(args[0])
        if message is None:
            return
        self.deleted[message.index] = None
        if message.foreign:
            # IUPOP3 1.8 "simply lies about having deleted" a foreign message: see commit.
            self.log.log(THREAD, "DELE %d: foreign, goes to %s at update", message.index + 1,
                         FOREIGN_FOLDER)
        self.reply(R.DELE.format(n=message.index + 1))

    def pop_RSET(self, rest: bytes) -> None:
        self.deleted.clear()
        live = self.messages
        self.reply(R.RSET.format(count=len(live), octets=sum(m.size for m in live)))

    def pop_NOOP(self, rest: bytes) -> None:
        self.reply(R.NOOP)

    def pop_XCLIENT(self, rest: bytes) -> None:
        if not self.xclient_trusted:
            self._bad_command(R.UNKNOWN_COMMAND)
            return
        xclient.apply(self, rest)

    def pop_XTND(self, rest: bytes) -> None:
        # IUPOP3's administration commands live in worker/xtnd.py; imported here so the
        # sans-IO session does not pull in gevent and watchdog for every import of this module.
        from worker import xtnd

        xtnd.handle(self, rest)

    # -- end --------------------------------------------------------------------------------
    def release(self) -> None:
        """Drop the maildrop lock without applying anything (also after a lost connection)."""
        if self.ahead is not None:
            self.ahead.close()
        if self.maildrop is not None:
            self.maildrop.unlock()
            self.maildrop = None
            self.ctx.stats.user_logged_out(id(self))


def verbs() -> set[str]:
    """Every verb the Session implements (a unit test checks ALLOWED against it)."""
    return {name[4:] for name in dir(Session) if name.startswith("pop_")}
