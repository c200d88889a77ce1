"""Garbage the server must survive (issue 5): random bytes, NUL, invalid UTF-8, megabyte lines,
thousands of pipelined commands (TLS bytes on the wrong port are in test_attack.py); then
hypothesis over command sequences, against a live server with a model of its state and
against the sans-IO Session. Coverage-guided runs of the parsers are in fuzz/ (``make fuzz``).
"""

from __future__ import annotations

import base64
import logging
import random
import re
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition,
                                 rule, run_state_machine_as_test)

from conftest import USERS, assert_healthy, sample, write_message
from shared import settings as settings_mod
from shared.stats import StatsArea
from test_attack import no_control_characters_logged, read_all
from shared.users import USER_NAME as _USER_NAME
from shared.users import parse_users
from worker import replies as R
from worker.context import build_context
from worker.pop3 import MAX_LINE, Session, verbs

MULTILINE = {"CAPA", "LIST", "UIDL", "RETR", "TOP", "AUTH"}  # when +OK (LIST/UIDL: no argument)


def _line(reply: str) -> bytes:
    return reply.encode()


# -- garbage ------------------------------------------------------------------------------------
def test_random_bytes(start_server):
    """Random octets with random line ends: one -ERR per line, and the session and the worker
    carry on."""
    # Every garbage line is a bad command: the budget is lifted so each one is answered
    # (tests/test_abuse.py pins the default budget of 10).
    server = start_server("-loglevel", "THREAD", "-max-bad-commands", "100000")
    rng = random.Random(5)
    connections = lines_sent = 0
    for _ in range(30):
        raw = server.raw()
        raw.line()
        data = bytes(rng.getrandbits(8) for _ in range(16384))
        data = data.replace(b"\r", b"")  # line ends below are ours, so replies can be counted
        data = b"".join(piece + (b"\r\n" if rng.random() < 0.5 else b"\n")
                        for piece in re.split(rb"\n", data))
        raw.send(data + b"NOOP\r\n")  # in AUTHORIZATION: -ERR, and the last reply
        raw.sock.shutdown(socket.SHUT_WR)
        replies = read_all(raw.sock).split(b"\r\n")[:-1]
        expected = data.count(b"\n") + 1
        assert len(replies) == expected, (len(replies), expected)
        assert all(r.startswith(b"-ERR") for r in replies), [r for r in replies
                                                              if not r.startswith(b"-ERR")]
        raw.close()
        connections += 1
        lines_sent += expected
    print(f"\nrandom bytes: {connections} connections, {lines_sent} garbage lines, each one -ERR")
    assert_healthy(server)
    no_control_characters_logged(server)


def test_nul_and_invalid_utf8(server):
    """NUL, invalid UTF-8 and non-ASCII digits in verbs and arguments get exact -ERR replies,
    never an internal error; the log shows them escaped."""
    raw = server.raw()
    raw.line()
    cases = [
        (b"\x00", R.UNKNOWN_COMMAND), (b"NOOP\x00", R.UNKNOWN_COMMAND),
        (b"\xff\xfe\xfd", R.UNKNOWN_COMMAND), (b"ST\xc3\x28T", R.UNKNOWN_COMMAND),
        (b"USER \x00alice", R.BAD_USER_NAME), (b"USER al\xc3\x28ice", R.BAD_USER_NAME),
        (b"USER \xe2\x84\xaa/..", R.BAD_USER_NAME), (b"PASS \xff\x00", R.USER_FIRST),
        (b"\x1b[2J\rUSER x", R.UNKNOWN_COMMAND),
        (b"USER alice", R.PASSWORD_REQUIRED.format(user="alice")),
        (b"PASS " + USERS["alice"].encode(), R.LOGIN_OK),
        ("RETR ²".encode(), R.NO_SUCH_MESSAGE), ("LIST ١".encode(), R.NO_SUCH_MESSAGE),
        ("TOP 1 ²".encode(), R.BAD_ARGUMENTS.format(verb="TOP")),
        (b"DELE \xff", R.NO_SUCH_MESSAGE), (b"RETR 1\x00", R.NO_SUCH_MESSAGE),
        (b"UIDL " + b"9" * 240, R.NO_SUCH_MESSAGE), (b"STAT\x00", R.UNKNOWN_COMMAND),
    ]
    for line, reply in cases:
        raw.send(line + b"\r\n")
        assert raw.line() == _line(reply), line
    assert raw.command("STAT").startswith(b"+OK 3 ")
    assert raw.command("QUIT").startswith(b"+OK")
    print(f"\nNUL / invalid UTF-8: {len(cases)} hostile lines, each answered exactly")
    assert_healthy(server)
    no_control_characters_logged(server)


def _worker_rss_kb(server) -> int:
    total = 0
    for pid in server.worker_pids().values():
        with open(f"/proc/{pid}/status") as fh:
            total += int(re.search(r"VmRSS:\s+(\d+)", fh.read()).group(1))
    return total


def test_megabyte_lines(server):
    """Lines of 1 MB (with and without a line end in sight) get one "line too long" each;
    nothing is buffered past the limit and the session goes on."""
    raw = server.raw(timeout=30)
    raw.line()
    raw.command("USER alice")
    assert raw.command(f"PASS {USERS['alice']}") == _line(R.LOGIN_OK)
    before = _worker_rss_kb(server)
    for n in range(8):
        line = bytes([65 + n]) * (1 << 20)
        raw.send(line + (b"\r\n" if n % 2 else b"\n"))
        assert raw.line() == _line(R.LINE_TOO_LONG)
        assert raw.command("NOOP") == _line(R.NOOP)
    raw.send(b"S" * (1 << 20))  # a megabyte of no line end at all, then a command
    assert raw.line() == _line(R.LINE_TOO_LONG)
    raw.send(b"\r\nSTAT\r\n")
    assert raw.line().startswith(b"+OK 3 ")
    grown = _worker_rss_kb(server) - before
    print(f"\nmegabyte lines: 9 MiB of over-long lines, worker RSS grew {grown} KiB")
    assert grown < 8 * 1024
    assert raw.command("QUIT").startswith(b"+OK")
    assert_healthy(server)


def test_thousands_of_pipelined_commands(server):
    """10,000 commands in one write (RFC 2449 PIPELINING): one reply each, in order."""
    commands, expected = [b"USER alice", f"PASS {USERS['alice']}".encode()], [
        _line(R.PASSWORD_REQUIRED.format(user="alice")), _line(R.LOGIN_OK)]
    rng = random.Random(7)
    deleted: set[int] = set()
    for _ in range(10_000):
        n = rng.randint(1, 4)
        verb = rng.choice(["NOOP", "STAT", "LIST", "DELE", "RSET", "UIDL"])
        if verb == "NOOP":
            commands.append(b"NOOP")
            expected.append(_line(R.NOOP))
        elif verb == "STAT":
            commands.append(b"STAT")
            expected.append(re.compile(rb"\+OK %d \d+" % (3 - len(deleted))))
        elif verb == "RSET":
            commands.append(b"RSET")
            deleted.clear()
            expected.append(re.compile(rb"\+OK maildrop has 3 messages \(\d+ octets\)"))
        else:
            commands.append(f"{verb} {n}".encode())
            if n == 4:
                expected.append(_line(R.NO_SUCH_MESSAGE))
            elif n in deleted:
                expected.append(_line(R.ALREADY_DELETED.format(n=n)))
            elif verb == "DELE":
                deleted.add(n)
                expected.append(_line(R.DELE.format(n=n)))
            else:
                expected.append(re.compile(rb"\+OK %d \S+" % n))
    commands.append(b"RSET")
    expected.append(re.compile(rb"\+OK maildrop has 3 messages"))
    payload = b"".join(c + b"\r\n" for c in commands)
    raw = server.raw(timeout=30)
    raw.line()
    # Send from a thread: the replies must be read while the commands still go out.
    sender = threading.Thread(target=raw.send, args=(payload,))
    started = time.monotonic()
    sender.start()
    for n, want in enumerate(expected):
        got = raw.line()
        if isinstance(want, bytes):
            assert got == want, (n, commands[n], got)
        else:
            assert want.match(got), (n, commands[n], got)
    sender.join(10)
    elapsed = time.monotonic() - started
    assert raw.command("QUIT").startswith(b"+OK")
    print(f"\npipelining: {len(commands)} commands in one write ({len(payload)} octets),"
          f" {len(expected)} replies in order in {elapsed:.2f}s")
    assert_healthy(server)


# -- hypothesis against a live server --------------------------------------------------------------
NAMES = ["alice", "bob", "carol", "nobody", "ALICE", "../x", "x" * 70, "", "a b"]
NUMBERS = st.one_of(st.integers(-1, 24).map(str), st.sampled_from(["", "x", "²", "1 2", "0"]))


@st.composite
def commands(draw) -> bytes:
    """One command line (no line end): mostly well-formed POP3, some garbage."""
    kind = draw(st.sampled_from(["USER", "PASS", "STAT", "LIST", "UIDL", "RETR", "TOP", "DELE",
                                 "RSET", "NOOP", "CAPA", "QUIT", "APOP", "AUTH", "PLAIN",
                                 "GARBAGE", "LONG"]))
    case = draw(st.sampled_from([str.upper, str.lower, str.capitalize]))
    if kind == "USER":
        return f"{case('USER')} {draw(st.sampled_from(NAMES))}".encode()
    if kind == "PASS":
        password = draw(st.sampled_from([*USERS.values(), "wrong", ""]))
        return f"{case('PASS')} {password}".encode()
    if kind in ("LIST", "UIDL"):
        arg = draw(st.none() | NUMBERS)
        return case(kind).encode() + (b"" if arg is None else b" " + arg.encode())
    if kind in ("RETR", "DELE"):
        return f"{case(kind)} {draw(NUMBERS)}".encode()
    if kind == "TOP":
        return f"{case(kind)} {draw(NUMBERS)} {draw(NUMBERS)}".encode()
    if kind == "APOP":
        return f"{case(kind)} {draw(st.sampled_from(NAMES))} {'0' * 32}".encode()
    if kind == "AUTH":
        return case("AUTH").encode()
    if kind == "PLAIN":
        user = draw(st.sampled_from(NAMES))
        password = draw(st.sampled_from([*USERS.values(), "wrong"]))
        token = base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode())
        return b"AUTH PLAIN " + token
    if kind == "GARBAGE":
        junk = draw(st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")))
        verb = junk.partition(b" ")[0].decode("ascii", "replace").upper()
        return b"\x00" + junk if verb.isalpha() and verb in verbs() else junk
    if kind == "LONG":
        return b"NOOP " + b"z" * draw(st.integers(MAX_LINE - 6, 600))
    return case(kind).encode()


@dataclass
class Expect:
    reply: bytes | re.Pattern  # the first line
    multiline: bool = False


@dataclass
class Model:
    """What the server must be doing: the maildrops on disk and one connection's state."""

    store: dict[str, list[str]]            # user -> unique names on disk, oldest first
    maxmsg: int = 20
    connected: bool = False
    user: str | None = None                # from USER, waiting for PASS
    account: str | None = None             # logged in (TRANSACTION)
    seen: list[str] = field(default_factory=list)
    deleted: set[int] = field(default_factory=set)
    failures: int = 0
    bad_commands: int = 0                  # unknown, wrong state, too long: -max-bad-commands
    logins: int = 0                        # sessions that reached TRANSACTION, for the figures

    def _bad(self, reply: str) -> Expect:
        self.bad_commands += 1
        if self.bad_commands > 10:  # the default -max-bad-commands: the server closes
            self.connected = False
            return Expect(_line(R.TOO_MANY_BAD_COMMANDS))
        return Expect(_line(reply))

    def _fail(self, reply: str) -> Expect:
        self.failures += 1
        if self.failures >= 2:
            self.connected = False  # login_attempts: the server closes after its reply
        return Expect(_line(reply))

    def _login(self, name: str, password: str, failure: str) -> Expect:
        if USERS.get(name) == password:
            self.account, self.seen, self.deleted = name, self.store[name][:self.maxmsg], set()
            self.logins += 1
            return Expect(_line(R.LOGIN_OK))
        return self._fail(failure.format(user=name))

    def _number(self, arg: str) -> int | Expect:
        if not (arg.isascii() and arg.isdigit()) or not 1 <= int(arg) <= len(self.seen):
            return Expect(_line(R.NO_SUCH_MESSAGE))
        if int(arg) - 1 in self.deleted:
            return Expect(_line(R.ALREADY_DELETED.format(n=int(arg))))
        return int(arg)

    def expect(self, line: bytes) -> Expect | None:
        """The reply ``line`` must get, updating the model; None if the server has closed."""
        if not self.connected:
            return None
        if len(line) + 2 > MAX_LINE:
            return self._bad(R.LINE_TOO_LONG)
        verb_raw, _, rest_raw = line.partition(b" ")
        verb = verb_raw.decode("ascii", "replace").upper()
        rest = rest_raw.decode("utf-8", "replace")
        args = rest.split()
        if not (verb.isalpha() and verb in verbs()):
            return self._bad(R.UNKNOWN_COMMAND)
        trans = self.account is not None
        allowed_auth = {"USER", "PASS", "APOP", "AUTH", "QUIT", "CAPA", "STLS"}
        if (verb in allowed_auth) == trans and verb not in ("QUIT", "CAPA"):
            return self._bad(R.WRONG_STATE)
        if verb == "QUIT":
            if trans:
                gone = {self.seen[i] for i in self.deleted}
                self.store[self.account] = [u for u in self.store[self.account] if u not in gone]
            self.connected = False
            return Expect(re.compile(rb"\+OK IUPOP3 server at \S+ signing off\."))
        if verb == "CAPA":
            return Expect(_line(R.CAPA), multiline=True)
        if verb == "USER":
            if len(args) != 1:
                return Expect(_line(R.BAD_ARGUMENTS.format(verb="USER")))
            name = args[0].lower()
            self.user = name if _USER_NAME.fullmatch(name) else None
            return Expect(_line(R.PASSWORD_REQUIRED.format(user=name) if self.user
                                else R.BAD_USER_NAME))
        if verb == "PASS":
            if self.user is None:
                return Expect(_line(R.USER_FIRST))
            user, self.user = self.user, None
            return self._login(user, rest_raw.decode("utf-8", "surrogateescape"),
                               R.NOT_ACCESSIBLE)
        if verb == "APOP":
            return Expect(_line(R.BAD_ARGUMENTS.format(verb="APOP") if len(args) != 2
                                else R.APOP_UNAVAILABLE))
        if verb == "AUTH":
            if not args:
                return Expect(_line(R.SASL_LIST), multiline=True)
            user, password = base64.b64decode(args[1]).split(b"\0")[1:]
            name = user.decode().lower()
            if not user or not _USER_NAME.fullmatch(name):
                return self._fail(R.SASL_MALFORMED)
            return self._login(name, password.decode(), R.SASL_FAILED)
        live = [i for i in range(len(self.seen)) if i not in self.deleted]
        if verb == "STAT":
            return Expect(re.compile(rb"\+OK %d \d+$" % len(live)))
        if verb == "NOOP":
            return Expect(_line(R.NOOP))
        if verb == "RSET":
            self.deleted.clear()
            return Expect(re.compile(rb"\+OK maildrop has %d messages \(\d+ octets\)$"
                                     % len(self.seen)))
        if verb in ("LIST", "UIDL"):
            if len(args) > 1:
                return Expect(_line(R.BAD_ARGUMENTS.format(verb=verb)))
            if not args:
                first = (rb"\+OK %d messages \(\d+ octets\)$" % len(live) if verb == "LIST"
                         else re.escape(_line(R.UIDL_ALL)) + b"$")
                return Expect(re.compile(first), multiline=True)
            n = self._number(args[0])
            if isinstance(n, Expect):
                return n
            value = rb"\d+" if verb == "LIST" else re.escape(self.seen[n - 1].encode())
            return Expect(re.compile(rb"\+OK %d %s$" % (n, value)))
        if verb in ("RETR", "DELE"):
            if len(args) != 1:
                return Expect(_line(R.BAD_ARGUMENTS.format(verb=verb)))
            n = self._number(args[0])
            if isinstance(n, Expect):
                return n
            if verb == "DELE":
                self.deleted.add(n - 1)
                return Expect(_line(R.DELE.format(n=n)))
            return Expect(re.compile(rb"\+OK (\d+) octets$"), multiline=True)
        assert verb == "TOP", verb
        if len(args) != 2:
            return Expect(_line(R.BAD_ARGUMENTS.format(verb="TOP")))
        n = self._number(args[0])
        if isinstance(n, Expect):
            return n
        if not (args[1].isascii() and args[1].isdigit()):
            return Expect(_line(R.BAD_ARGUMENTS.format(verb="TOP")))
        return Expect(_line(R.TOP), multiline=True)


class LiveServer(RuleBasedStateMachine):
    """Random pipelined command batches over raw sockets, each reply checked against Model."""

    server = None           # set by the test
    model: Model | None = None
    delivered = 0

    @initialize()
    def start(self) -> None:
        self.raw = None
        self.model = type(self).model
        # Each example starts from the disk as the last one left it.
        for user in self.model.store:
            self.model.store[user] = _on_disk(self.server.maildir(user))
        self._connect()

    def _connect(self) -> None:
        self.raw = self.server.raw()
        assert self.raw.line().startswith(b"+OK IUPOP3 server")
        self.model.connected = True
        self.model.user = self.model.account = None
        self.model.failures = 0
        self.model.bad_commands = 0

    @precondition(lambda self: not self.model.connected)
    @rule()
    def reconnect(self) -> None:
        self.raw.close()
        self._connect()

    @precondition(lambda self: self.model.connected)
    @rule(user=st.sampled_from(sorted(USERS)), right=st.booleans(),
          then=st.lists(commands(), max_size=6))
    def login(self, user: str, right: bool, then: list[bytes]) -> None:
        """USER and PASS (right or wrong) and more commands, pipelined in one write."""
        password = USERS[user] if right else "wrong"
        self.send_batch([f"USER {user}".encode(), f"PASS {password}".encode(), *then], False)

    @precondition(lambda self: self.model.connected)
    @rule(batch=st.lists(commands(), min_size=1, max_size=8), lf_only=st.booleans())
    def send_batch(self, batch: list[bytes], lf_only: bool) -> None:
        self.raw.send(b"".join(c + (b"\n" if lf_only else b"\r\n") for c in batch))
        for command in batch:
            want = self.model.expect(command)
            if want is None:
                break
            self._check(command, want)
        if not self.model.connected:
            assert self.raw.closed(), "the server should have closed the connection"
            assert self.raw.buffer == b"", self.raw.buffer  # and said nothing more

    def _check(self, command: bytes, want: Expect) -> None:
        got = self.raw.line()
        if isinstance(want.reply, bytes):
            assert got == want.reply, (command, got)
        else:
            assert want.reply.match(got), (command, got)
        if not want.multiline:
            return
        body = self.raw.multiline()
        verb = command.split()[0].upper()
        if verb == b"RETR":
            octets = int(re.match(rb"\+OK (\d+)", got).group(1))
            unstuffed = [line[1:] if line.startswith(b".") else line for line in body]
            assert sum(len(line) + 2 for line in unstuffed) == octets, command
        elif verb in (b"LIST", b"UIDL"):
            live = [i for i in range(len(self.model.seen)) if i not in self.model.deleted]
            assert [int(line.split()[0]) for line in body] == [i + 1 for i in live]
            if verb == b"UIDL":
                assert [line.split()[1].decode() for line in body] == [
                    self.model.seen[i] for i in live]

    @rule(user=st.sampled_from(sorted(USERS)))
    def deliver(self, user: str) -> None:
        """New mail during a session: not shown in it, never lost."""
        type(self).delivered += 1
        name = f"{1700001000 + self.delivered}.M{self.delivered}.fuzz"
        write_message(self.server.maildir(user), name, sample(len(self.model.store[user])))
        self.model.store[user].append(name)

    @invariant()
    def worker_alive(self) -> None:
        assert self.server.proc.poll() is None

    def teardown(self) -> None:
        if self.raw is None:
            return
        if self.model.connected:
            self.raw.send(b"QUIT\r\n")
            self._check(b"QUIT", self.model.expect(b"QUIT"))
        assert self.raw.closed() and self.raw.buffer == b""
        self.raw.close()
        for user, names in self.model.store.items():
            assert _on_disk(self.server.maildir(user)) == sorted(names), user


def _on_disk(maildir: Path) -> list[str]:
    return sorted(p.name.split(":")[0] for sub in ("new", "cur") for p in (maildir / sub).iterdir())


@pytest.mark.parametrize("examples", [
    pytest.param(40, id="ci"), pytest.param(400, id="full", marks=pytest.mark.long)])
def test_live_server_follows_the_model(start_server, examples):
    """Hypothesis drives pipelined command batches at a live server: every reply is the one
    the model predicts (+OK/-ERR, multi-line bodies, one reply per command in order), the
    maildrops on disk match, no traceback is logged and no worker dies."""
    server = start_server("-auth-delay", "0", "-auth-block", "0", "-loglevel", "THREAD")
    store = {user: sorted(p.name for p in (server.maildir(user) / "new").iterdir())
             for user in USERS}
    LiveServer.server = server
    LiveServer.model = Model(store)
    started = time.monotonic()
    run_state_machine_as_test(LiveServer, settings=hsettings(
        max_examples=examples, stateful_step_count=20, deadline=None,
        suppress_health_check=list(HealthCheck)))
    commands_sent = len(re.findall(r" THREAD worker-\d w\d+\.\d+ ", server.output))
    print(f"\nlive fuzz: {examples} examples, {commands_sent} commands logged,"
          f" {LiveServer.model.logins} logins, {time.monotonic() - started:.1f}s")
    assert_healthy(server)
    no_control_characters_logged(server)


# -- hypothesis against the sans-IO session ------------------------------------------------------
class _Errors(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@hsettings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(lines=st.lists(commands() | st.binary(max_size=300), max_size=30))
def test_session_never_errs_on_any_line(lines):
    """Any sequence of lines fed to a Session with a real context and Maildir: every reply is
    +OK, -ERR or a SASL challenge, multi-line ones end with ".", nothing is logged as an error."""
    folder = Path(tempfile.mkdtemp(prefix="iupop3-fuzz-"))
    errors = _Errors()
    logging.getLogger("iupop3").addHandler(errors)
    try:
        for n in (1, 2, 3):
            write_message(folder / "alice", f"{1700000000 + n}.M{n}.t", sample(n))
        values = dict(users="unused", mail=f"maildir:{folder}/%u", hostname="fuzz.example",
                      auth_delay=0, auth_block=0)
        ctx = build_context(settings_mod.Settings(**values), StatsArea.create(2, 0), 1,
                            parse_users("".join(f"{u}:{{PLAIN}}{p}::::::\n"
                                                for u, p in USERS.items())))
        out: list[bytes] = []
        session = Session(ctx, out.append, "127.0.0.1:4000", "fuzz")
        session.start()
        for line in lines:
            if session.closing:
                break
            line = line.split(b"\n")[0].rstrip(b"\r")
            if len(line) + 2 > session.max_line:
                continue  # the connection answers these itself
            out.clear()
            session.handle_line(line)
            reply = b"".join(out)
            assert reply.endswith(b"\r\n") and reply.startswith((b"+OK", b"-ERR", b"+ ")), \
                (line, reply)
            verb = line.partition(b" ")[0].upper()
            if reply.startswith(b"+OK") and reply.count(b"\r\n") > 1:
                assert verb.decode("ascii", "replace") in MULTILINE, (line, reply)
                assert reply.endswith(b"\r\n.\r\n"), (line, reply)
            else:
                assert reply.count(b"\r\n") == 1, (line, reply)
        session.release()
        assert not errors.records, [r.getMessage() for r in errors.records]
    finally:
        logging.getLogger("iupop3").removeHandler(errors)
        shutil.rmtree(folder)
