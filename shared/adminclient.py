"""``iupop3-xtnd``: run one XTND command on one or more iupop3 servers (IUPOP3's XTND.COM).

Asks ``IUPOP3 Node(s) >``, ``Username >``, ``Password >`` and ``XTND command >`` like the 1994
script, or takes them as positional arguments: ``iupop3-xtnd "node1 node2:1110" user password
"loglevel debug"``. Each node's answer is printed under its name; ``stats`` over several nodes
adds a table with a summed column. The password travels in TLS: STLS, or implicit TLS with
--tls; in clear only to a loopback address, or with --plaintext (a man in the middle can strip
STLS from CAPA). Server lines are printed with control characters escaped. Exit status: 0 all
nodes said +OK, 1 some did not, 2 bad input or a password that would have gone in clear.
"""

from __future__ import annotations

import argparse
import getpass
import poplib
import re
import ssl
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

from shared import statsreport
from shared.logsetup import escaped
from shared.netaddr import is_loopback

DEFAULT_PORT = 110
MAX_COMMAND = 240  # "XTND " + command + CRLF stays under RFC 2449's 255 octets
_NODE = re.compile(r"\[(?P<v6>[^\]]+)\](?::(?P<v6port>[^:]*))?|(?P<host>[^:\s]+)(?::(?P<port>[^:]*))?")


class UsageError(ValueError):
    """Bad input from the user; the message is one line."""


class CleartextRefused(Exception):
    """The node offers no STLS and is not loopback: the password is not sent (one line)."""


@dataclass(frozen=True)
class Node:
    name: str  # as the user wrote it: answers are printed under this
    host: str
    port: int


@dataclass
class Answer:
    node: Node
    ok: bool
    lines: list[str] = field(default_factory=list)
    refused: bool = False  # not run: the password would have travelled in clear


# -- input ------------------------------------------------------------------------------------
def parse_node(text: str) -> Node:
    """``host``, ``host:port``, ``[v6addr]``, ``[v6addr]:port`` or a bare IPv6 address."""
    if text.count(":") > 1 and not text.startswith("["):
        return Node(text, text, DEFAULT_PORT)  # a bare IPv6 address has no port
    match = _NODE.fullmatch(text)
    if match is None:
        raise UsageError(f"bad node {text!r}: use host, host:port or [v6addr]:port")
    host = match.group("v6") or match.group("host")
    port_text = match.group("v6port") if match.group("v6") else match.group("port")
    if port_text is None:
        return Node(text, host, DEFAULT_PORT)
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise UsageError(f"bad port in node {text!r}")
    return Node(text, host, int(port_text))


def parse_nodes(text: str) -> list[Node]:
    names = text.replace(",", " ").split()
    if not names:
        raise UsageError("no node given")
    return [parse_node(name) for name in names]


def check_command(text: str) -> str:
    if not all(c.isprintable() or c == "\t" for c in text):
        raise UsageError("the XTND command must be one printable line")
    command = " ".join(text.split())
    if not command:
        raise UsageError("no XTND command given")
    if len(command) > MAX_COMMAND:
        raise UsageError(f"the XTND command is longer than {MAX_COMMAND} characters")
    return command


def check_user(text: str) -> str:
    user = text.strip()
    if not user or any(c.isspace() for c in user) or not user.isprintable():
        raise UsageError("the user name must be one word")
    return user


# -- talking to a node ------------------------------------------------------------------------
@dataclass(frozen=True)
class TlsOptions:
    """How to secure the connection: STLS whenever offered, or implicit TLS (port 995)."""

    implicit: bool = False
    cafile: str | None = None  # trust this certificate (a site's own CA or self-signed cert)
    verify: bool = True
    plaintext: bool = False  # --plaintext: send the password in clear when there is no STLS

    def context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.cafile)
        if not self.verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context


def cleartext_allowed(peer_address: str, tls: TlsOptions) -> bool:
    """The password may go in clear only where nobody can listen in between: to the address we
    are connected to when that is loopback, or when the user said --plaintext."""
    return tls.plaintext or is_loopback(peer_address)


def connect(node: Node, timeout: float, tls: TlsOptions = TlsOptions()) -> poplib.POP3:
    """Open the POP3 connection, in TLS when the server offers STLS (or with implicit TLS);
    without TLS, raise CleartextRefused unless ``cleartext_allowed``."""
    if tls.implicit:
        return poplib.POP3_SSL(node.host, node.port, timeout=timeout, context=tls.context())
    client = poplib.POP3(node.host, node.port, timeout=timeout)
    try:
        offered = client.capa()
    except poplib.error_proto:
        offered = {}
    if "STLS" in offered:
        try:
            client.stls(tls.context())
        except (OSError, poplib.error_proto):
            try:
                client.close()
            except OSError:
                pass  # the failed handshake may have closed the socket already
            raise
        return client
    peer = client.sock.getpeername()[0]  # the address really connected, not the name given
    if not cleartext_allowed(peer, tls):
        client.close()
        raise CleartextRefused(f"{node.name} ({peer}) offers no STLS and is not loopback: "
                               "the password is not sent in clear (--plaintext sends it)")
    return client


def run_on(node: Node, user: str, password: str, command: str, timeout: float,
           tls: TlsOptions = TlsOptions()) -> Answer:
    """Log in, run ``XTND command``, QUIT; every failure becomes a not-ok answer."""
    multiline = command.split()[0].lower() == "stats"
    try:
        client = connect(node, timeout, tls)
    except CleartextRefused as exc:
        return Answer(node, False, [str(exc)], refused=True)
    except ssl.SSLError as exc:
        return Answer(node, False, [f"TLS failed: {exc.reason or exc} "
                                    "(--cafile FILE trusts a site certificate)"])
    except poplib.error_proto as exc:
        return Answer(node, False, [f"STLS refused: {exc}"])
    except OSError as exc:
        return Answer(node, False, [f"cannot connect: {exc.strerror or exc}"])
    try:
        client.user(user)
        client.pass_(password)
        if multiline:
            first, body, _ = client._longcmd(f"XTND {command}")
            lines = [first, *body]
        else:
            lines = [client._shortcmd(f"XTND {command}")]
        answer = Answer(node, True, [raw.decode("utf-8", "replace") for raw in lines])
        client.quit()
        return answer
    except poplib.error_proto as exc:
        reply = exc.args[0] if exc.args else b"-ERR"
        text = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else str(reply)
        return Answer(node, False, [text])
    except (OSError, EOFError) as exc:
        return Answer(node, False, [f"connection failed: {exc}"])
    finally:
        client.close()


# -- output -----------------------------------------------------------------------------------
_NOT_SUMMED = {"Current Time", "Start Time"}
_SAME_OR_MIXED = {"Version Number", "Logging Level"}


def stats_total(name: str, values: list[str]) -> str:
    """The summed column's cell for one report line."""
    if name in _NOT_SUMMED:
        return ""
    if name in _SAME_OR_MIXED:
        return values[0] if len(set(values)) == 1 else "mixed"
    numbers = [float(v.split()[0]) for v in values if v.split()]
    if name == "CPU Seconds":
        return statsreport.cpu_text(sum(numbers))
    if name == "Minimum Octets":
        nonzero = [n for n in numbers if n]
        return str(int(min(nonzero))) if nonzero else "0"
    if name == "Maximum Octets":
        return str(int(max(numbers, default=0)))
    return str(int(sum(numbers)))


def stats_table(answers: list[Answer]) -> list[str]:
    """One column per node that sent a report, then the total; a line per report field."""
    reports = [(a.node.name, statsreport.parse(a.lines[1:])[0]) for a in answers]
    rows = [["", *(name for name, _ in reports), "total"]]
    for name, _ in statsreport.FIELDS:
        values = [report.get(name, "") for _, report in reports]
        if name == "Average Octets":
            octets = sum(int(r.get("Retrieved Octets", "0")) for _, r in reports)
            messages = sum(int(r.get("Retrieved Messages", "0")) for _, r in reports)
            total = str(octets // messages if messages else 0)
        else:
            total = stats_total(name, values)
        rows.append([name, *values, total])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    out = []
    for row in rows:
        cells = [row[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(row[1:], widths[1:]))]
        out.append("  ".join(cells).rstrip())
    return out


def report(answers: list[Answer], command: str) -> list[str]:
    """The lines to print; a server's control characters come out escaped (``\\x1b``), so its
    answer cannot drive the terminal or forge lines of another node's."""
    out: list[str] = []
    for answer in answers:
        out.append(f"== {answer.node.name} ==")
        out.extend(answer.lines)
    reports = [a for a in answers if a.ok and a.lines[0].startswith("+OK")]
    if command.split()[0].lower() == "stats" and len(reports) > 1:
        out.append(f"== {len(reports)} nodes ==")
        out.extend(stats_table(reports))
    return [escaped(line) for line in out]


# -- the command ------------------------------------------------------------------------------
def _ask(prompt: str) -> str:
    try:
        return input(prompt)
    except EOFError:
        raise UsageError(f"no answer to {prompt.strip()!r}") from None


def _arguments(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="iupop3-xtnd",
        description="Run an XTND command (stats, loglevel LEVEL, shutdown, client INFO) on "
                    "iupop3 servers. Missing arguments are asked for; the password is not "
                    "echoed (on the command line it is visible to ps).")
    parser.add_argument("nodes", nargs="?", help='"host host:port [v6addr]:port" (port 110)')
    parser.add_argument("user", nargs="?")
    parser.add_argument("password", nargs="?")
    parser.add_argument("command", nargs="*", help='e.g. "loglevel debug"')
    parser.add_argument("-t", "--timeout", type=float, default=30.0,
                        help="seconds to wait for each node (default 30)")
    parser.add_argument("--tls", action="store_true",
                        help="implicit TLS (give the TLS port, e.g. host:995); without it, "
                             "STLS is used whenever the server offers it")
    parser.add_argument("--cafile", help="trust the certificates in this PEM file")
    parser.add_argument("--insecure", action="store_true",
                        help="do not verify the server's certificate")
    parser.add_argument("--plaintext", action="store_true",
                        help="send the password in clear to a server that offers no STLS even "
                             "when it is not on this host (by default only to a loopback "
                             "address)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _arguments(sys.argv[1:] if argv is None else argv)
    try:
        nodes = parse_nodes(args.nodes if args.nodes is not None else _ask("IUPOP3 Node(s) > "))
        user = check_user(args.user if args.user is not None else _ask("Username > "))
        password = args.password
        if password is None:
            with warnings.catch_warnings():
                # Without a terminal getpass reads stdin and says so itself; once is enough.
                warnings.simplefilter("ignore", getpass.GetPassWarning)
                try:
                    password = getpass.getpass("Password > ")
                except EOFError:
                    raise UsageError("no answer to 'Password >'") from None
        command = check_command(" ".join(args.command) if args.command
                                else _ask("XTND command > "))
    except UsageError as exc:
        print(f"iupop3-xtnd: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    if not (args.nodes and args.command) and not sys.stdin.isatty():
        print()  # the prompts echoed no line end: start the answers on a line of their own
    tls = TlsOptions(args.tls, args.cafile, not args.insecure, args.plaintext)
    answers = [run_on(node, user, password, command, args.timeout, tls) for node in nodes]
    print("\n".join(report(answers, command)), flush=True)
    for answer in answers:
        if answer.refused:
            print(f"iupop3-xtnd: {escaped(answer.lines[0])}", file=sys.stderr)
    if any(a.refused for a in answers):
        return 2
    return 0 if all(a.ok for a in answers) else 1


if __name__ == "__main__":
    sys.exit(main())
