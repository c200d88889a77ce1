"""Every setting of iupop3, declared once.

The list ``SETTINGS`` drives the command line (IUPOP3 style: one dash, case-insensitive, never
abbreviated), the TOML config file, ``-help``, the example in ``etc/`` and the README table.
The supervisor parses; workers receive the resolved ``Settings`` as JSON.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from shared import accountspec, maillocation, netaddr, uidlformat
from shared.logsetup import FLUSH_SECONDS, LEVEL_CHOICES, LEVEL_NAMES


class SettingsError(ValueError):
    """A bad command line or config file; the message is one line for the user."""


@dataclass(frozen=True)
class Setting:
    name: str  # TOML key and attribute name
    kind: str  # "int", "str", "path", "bool", "list", "networks", "choice", "users"
    default: Any
    help: str
    flag: str = ""  # command-line flag without the dash; defaults to name
    choices: tuple[str, ...] = ()
    minimum: int | None = None
    maximum: int | None = None
    # Checks a converted value and returns the form to keep; ValueError says what is wrong.
    validator: Callable[[Any], Any] | None = None
    metavar: str = ""  # the value's name in -help; defaults by kind

    @property
    def option(self) -> str:
        return "-" + (self.flag or self.name)

    def convert(self, value: Any, where: str) -> Any:
        """Turn a command-line string or TOML value into this setting's type, or raise."""
        try:
            value = _CONVERTERS[self.kind](self, value)
            return value if self.validator is None else self.validator(value)
        except (TypeError, ValueError) as exc:
            raise SettingsError(f"{where}: {self.option} {exc}") from None

    def default_text(self) -> str:
        if self.kind == "bool":
            return "off" if not self.default else "on"
        if self.kind in ("list", "networks"):
            return " ".join(self.default) if self.default else "(none)"
        if self.default is None or self.default == "":
            return "(none)"
        if self.name == "workers" and self.default == 0:
            return "0 (one per CPU)"
        return str(self.default)


def _to_int(setting: Setting, value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("wants a whole number")
    if isinstance(value, str):
        if not value.strip().lstrip("-").isdigit():
            raise ValueError(f"wants a whole number, not {value!r}")
        value = int(value)
    if not isinstance(value, int):
        raise ValueError("wants a whole number")
    if setting.minimum is not None and value < setting.minimum:
        raise ValueError(f"must be at least {setting.minimum}, not {value}")
    if setting.maximum is not None and value > setting.maximum:
        raise ValueError(f"must be at most {setting.maximum}, not {value}")
    return value


def _to_str(setting: Setting, value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("wants a string")
    return value


def _to_path(setting: Setting, value: Any) -> str:
    value = _to_str(setting, value)
    return os.path.abspath(os.path.expanduser(value)) if value else ""


def _to_users(setting: Setting, value: Any) -> str:
    value = _to_str(setting, value)
    return accountspec.canonical(value) if value else ""


def _to_bool(setting: Setting, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise ValueError("wants true or false")


def _to_list(setting: Setting, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ValueError("wants a list of strings")


def _to_networks(setting: Setting, value: Any) -> tuple[str, ...]:
    return netaddr.parse_networks(_to_list(setting, value))


def _to_choice(setting: Setting, value: Any) -> str:
    if not isinstance(value, str) or value.upper() not in setting.choices:
        raise ValueError(f"must be one of {', '.join(setting.choices)}, not {value!r}")
    return value.upper()


def _metrics_address(value: str) -> str:
    """-metrics: empty, or an address and port (checked here, bound by the supervisor)."""
    if value:
        netaddr.host_port(value)
    return value


def _expire_days(value: str) -> str:
    """NEVER or a whole number of days, kept as text ("NEVER", "0", "30")."""
    if value.strip().upper() == "NEVER":
        return "NEVER"
    if not (value.isascii() and value.strip().isdigit()) or int(value) > 10_000_000:
        raise ValueError(f"wants a number of days or NEVER, not {value!r}")
    return str(int(value))


_CONVERTERS: dict[str, Callable[[Setting, Any], Any]] = {
    "int": _to_int,
    "str": _to_str,
    "path": _to_path,
    "users": _to_users,
    "bool": _to_bool,
    "list": _to_list,
    "networks": _to_networks,
    "choice": _to_choice,
}

SETTINGS: tuple[Setting, ...] = (
    # The IUPOP3 1.8 command line.
    Setting("port", "int", 110,
            "TCP port for POP3; 0 gives every listener a free port, logged (for tests)",
            minimum=0, maximum=65535),
    Setting("xtnd", "path", "", "authorization file for the privileged XTND commands"),
    Setting("loglevel", "choice", "THREAD", f"initial logging level: {LEVEL_CHOICES}",
            choices=LEVEL_NAMES),
    Setting("logfile", "path", "", "log to this file (new file each midnight) instead of stdout"),
    Setting("log_flush", "int", FLUSH_SECONDS,
            "seconds a line may wait in the log file's buffer (ERROR lines never wait); 0 = none",
            minimum=0, maximum=3600),
    Setting("maxmsg", "int", 20, "most messages a session may discover, oldest first; 0 = no limit",
            minimum=0),
    Setting("purge_reclaim", "bool", False,
            "delete for good instead of moving deleted mail to the wastebasket"),
    Setting("login_attempts", "int", 2,
            "failed logins a connection may make before the server closes it", minimum=1),
    Setting("wastebasket", "str", maillocation.WASTEBASKET,
            "Maildir++ folder that deleted mail is moved to (unless -purge_reclaim); for mbox,"
            " the suffix of the sibling file (/var/mail/jones.Trash)",
            validator=maillocation.folder_name),
    # Today's additions.
    Setting("listen", "list", ("0.0.0.0", "::"),
            "address to listen on (repeat the flag for several)"),
    Setting("workers", "int", 0, "worker processes; 0 = one per CPU", minimum=0, maximum=256),
    Setting("maxclients", "int", 1000,
            "concurrent sessions over all workers (IUPOP3 had 31); the excess is refused",
            minimum=1),
    Setting("timeout", "int", 120,
            "seconds without a complete command line before the server hangs up",
            minimum=1),
    Setting("login_timeout", "int", 60,
            "seconds from connect to a successful login before the server hangs up (time "
            "spent in a failed-login penalty does not count)", minimum=1, flag="login-timeout"),
    Setting("takeover_idle", "int", 30,
            "a login that finds its maildrop held by a session idle this many seconds (no "
            "complete command line) ends that session unapplied and proceeds; 0 = never",
            minimum=0, maximum=86400, flag="takeover-idle"),
    Setting("lock_wait", "int", 5,
            "seconds a login waits for a maildrop held by an active session before it "
            "answers -ERR [IN-USE]", minimum=0, maximum=600, flag="lock-wait"),
    Setting("max_bad_commands", "int", 10,
            "unknown commands, commands in the wrong state and over-long lines a connection "
            "may send; the next one is answered -ERR and the connection closed", minimum=0,
            flag="max-bad-commands"),
    Setting("grace", "int", 30,
            "seconds sessions get to finish on SIGTERM before they are closed unapplied",
            minimum=0),
    Setting("worker_timeout", "int", 10,
            "seconds a worker's heartbeat (event loop or thread pool) may stall before the "
            "supervisor kills and replaces it", minimum=2, maximum=3600),
    Setting("users", "users", "",
            "where accounts come from: passwd-file:PATH (Dovecot's format; a bare path too),"
            " shadow: (the system's users and /etc/shadow) or pam:SERVICE (default iupop3)",
            metavar="SOURCE"),
    Setting("min_uid", "int", 1000,
            "with shadow: or pam:, accounts with a lower uid (root, daemon ...) may not log in",
            minimum=0, flag="min-uid"),
    Setting("nologin_shells", "list",
            ("/usr/sbin/nologin", "/sbin/nologin", "/bin/false", "/usr/bin/false"),
            "with shadow: or pam:, an account with this login shell may not log in"
            " (repeat the flag for several; DISUSER's counterpart)",
            flag="nologin-shells", metavar="SHELL"),
    Setting("deny_users", "list", (),
            "these users may not log in, from any source (repeat the flag for several)",
            flag="deny-users", metavar="NAME"),
    Setting("allow_groups", "list", (),
            "with shadow: or pam:, only members of these groups may log in (e.g. pop;"
            " DISMAIL's counterpart); none = every group", flag="allow-groups",
            metavar="GROUP"),
    Setting("mail", "str", "maildir:~/Maildir",
            "where mail lives: maildir:PATH, or mbox:PATH for a Unix spool file"
            " (mbox:/var/mail/%u); %u is the user name, ~ the user's home",
            validator=maillocation.normalized),
    Setting("hostname", "str", "", "host name in the greeting and X-POP3-Server (default: this host's)"),
    Setting("personal_name", "bool", False,
            "IUPOP3's PERSONAL_NAME: a patched VMS From: keeps the sender's personal name"),
    Setting("ignore_mail11_headers", "bool", False,
            "IUPOP3's IGNORE_MAIL11_HEADERS: serve From: untouched (no VMS address patching)"),
    Setting("tls_cert", "path", "",
            "TLS certificate chain (PEM); enables STLS and the implicit-TLS port",
            flag="tls-cert"),
    Setting("tls_key", "path", "", "TLS private key (PEM); default: in the -tls-cert file",
            flag="tls-key"),
    Setting("tls_port", "int", 995,
            "port for implicit TLS (RFC 8314) when -tls-cert is set; 0 = none",
            minimum=0, maximum=65535, flag="tls-port"),
    Setting("cleartext_auth", "choice", "LOOPBACK",
            "USER/PASS without TLS: LOOPBACK (only from this host), ALWAYS or NEVER",
            choices=("LOOPBACK", "ALWAYS", "NEVER"), flag="cleartext-auth"),
    Setting("daemon", "bool", False,
            "detach into the background (needs -logfile); returns once the server listens"),
    Setting("pidfile", "path", "",
            "write the supervisor's pid here; refuse to start while it names a running server"),
    Setting("metrics", "str", "",
            "serve Prometheus/OpenMetrics figures over HTTP on this ADDRESS:PORT "
            "(e.g. 127.0.0.1:9110); empty = off", validator=lambda v: _metrics_address(v),
            metavar="ADDR:PORT"),
    Setting("user", "str", "",
            "after binding the ports as root, run the supervisor and all workers as this user"),
    Setting("group", "str", "", "group to run as with -user (default: that user's own group)"),
    Setting("apop", "bool", False,
            "offer APOP (RFC 1939; MD5-based and weak: only for {PLAIN} accounts, better use TLS)"),
    Setting("max_per_address", "int", 50,
            "sessions one client address may hold at once; 0 = no limit", minimum=0,
            flag="max-per-address"),
    Setting("auth_delay", "int", 1,
            "seconds every login from an address or for a user with a recent failure waits "
            "before it is checked, doubling with each failure; logins for one user are "
            "checked one at a time, this far apart", minimum=0, flag="auth-delay"),
    Setting("auth_delay_max", "int", 15, "the longest failed-login delay, in seconds",
            minimum=0, flag="auth-delay-max"),
    Setting("auth_block", "int", 20,
            "failed logins from one address within -auth-window before its logins are "
            "refused for the rest of the window; 0 = never", minimum=0, flag="auth-block"),
    Setting("auth_window", "int", 900,
            "seconds a failed login is remembered (from the last failure)", minimum=1,
            flag="auth-window"),
    Setting("ipv6_prefix", "int", 64,
            "IPv6 clients count per network of this many bits for -max-per-address and the "
            "failed-login limits (one subscriber holds a /64)", minimum=16, maximum=128,
            flag="ipv6-prefix"),
    Setting("trusted_networks", "networks", (),
            "CIDR networks (a webmail, a proxy) exempt from the per-address failed-login "
            "delay and block, not from the per-user one; the only peers whose PROXY header "
            "or XCLIENT is believed", flag="trusted-networks"),
    Setting("proxy_protocol", "bool", False,
            "the POP3 and TLS listeners expect a PROXY protocol header (v1 or v2, HAProxy's "
            "send-proxy-v2) from a -trusted-networks peer before the greeting",
            flag="proxy-protocol"),
    Setting("proxy_listen", "list", (),
            "also listen on ADDR:PORT for connections that begin with a PROXY header (a "
            "balancer's), while the POP3 port stays direct", flag="proxy-listen",
            validator=netaddr.parse_endpoints, metavar="ADDR:PORT"),
    Setting("proxy_tls_listen", "list", (),
            "also listen on ADDR:PORT for implicit TLS (needs -tls-cert) behind a PROXY header: "
            "a balancer passing port 995 through", flag="proxy-tls-listen",
            validator=netaddr.parse_endpoints, metavar="ADDR:PORT"),
    Setting("xclient", "bool", False,
            "accept XCLIENT ADDR= PORT= (Dovecot's POP3 proxy) before login from "
            "-trusted-networks peers that speak for themselves (no PROXY header, or v2 "
            "LOCAL); their greeting starts +OK [XCLIENT]"),
    Setting("login_delay", "int", 0,
            "RFC 2449 LOGIN-DELAY: seconds a user must wait between logins (0 = off); "
            "per user: login_delay=N in the users file's extra field", minimum=0,
            maximum=10_000_000, flag="login-delay"),
    Setting("expire", "str", "NEVER",
            "RFC 2449 EXPIRE: days a retrieved message stays before an UPDATE removes it "
            "(0 = at the end of the session that retrieved it), or NEVER; per user: "
            "expire_days=N or never", validator=_expire_days, metavar="DAYS|NEVER"),
    Setting("uidl_format", "str", uidlformat.DEFAULT,
            "how UIDLs imported from a Maildir's dovecot-uidlist are written (Dovecot's "
            "pop3_uidl_format; a saved P field wins)", validator=uidlformat.check,
            flag="uidl-format", metavar="FORMAT"),
    Setting("mbox_ledger_dir", "path", "",
            "folder for the ledgers of mbox spools (last login, first retrievals) when the "
            "spool folder is not the server's to write in; default: beside each spool",
            flag="mbox-ledger-dir"),
    Setting("demo", "bool", False,
            "run on the embedded demo: users and mail in -state, 127.0.0.1 and ::1 port 1110"),
    Setting("state", "path", "state", "folder for the demo's users file and mail"),
)

BY_NAME = {s.name: s for s in SETTINGS}
# "-tls-port" and "-tls_port" are one option: dashes and underscores are the same letter here.
BY_FLAG = {(s.flag or s.name).lower().replace("-", "_"): s for s in SETTINGS}

Settings = dataclasses.make_dataclass(
    "Settings", [(s.name, Any, dataclasses.field(default=s.default)) for s in SETTINGS],
    frozen=True,
)
Settings.__doc__ = "Resolved settings: defaults, then the config file, then the command line."


def _with_demo_defaults(values: dict[str, Any], explicit: set[str]) -> None:
    """The embedded default: demo data in the state folder, loopback only, port 1110."""
    from shared import demo  # only the demo needs it

    if "port" not in explicit:
        values["port"] = 1110
    if "listen" not in explicit:
        values["listen"] = ("127.0.0.1", "::1")
    values["state"] = os.path.abspath(values["state"])  # -daemon runs in /
    users, mail = demo.ensure_state(values["state"])
    if "users" not in explicit:
        values["users"] = users
    if "mail" not in explicit:
        values["mail"] = mail


def load_toml(path: str) -> dict[str, Any]:
    """Read a config file; unknown keys and wrong types are errors, never ignored."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise SettingsError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"config file {path}: {exc}") from None
    values: dict[str, Any] = {}
    for key, value in data.items():
        setting = BY_NAME.get(key)
        if setting is None:
            raise SettingsError(f"config file {path}: unknown setting {key!r}")
        values[key] = setting.convert(value, f"config file {path}")
    return values


def parse_command_line(argv: Sequence[str]) -> tuple[dict[str, Any], str | None, bool]:
    """Parse IUPOP3-style options into (values, config path, help wanted)."""
    values: dict[str, Any] = {}
    config: str | None = None
    want_help = False
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if not arg.startswith("-") or arg in ("-", "--"):
            raise SettingsError(f"unexpected argument {arg!r} (options start with one dash)")
        name = arg[1:].lower().replace("-", "_")
        if name in ("help", "h", "?"):
            want_help = True
            continue
        if name not in BY_FLAG and name != "config":
            raise SettingsError(
                f"unknown option {arg} (options may not be abbreviated; see -help)")
        setting = BY_FLAG.get(name)
        if setting is not None and setting.kind == "bool":
            values[setting.name] = True
            continue
        if i >= len(args):
            raise SettingsError(f"option {arg} needs a value")
        raw = args[i]
        i += 1
        if setting is None:
            config = raw
        elif setting.kind in ("list", "networks"):  # repeated: each adds to the list
            values[setting.name] = (values.get(setting.name, ())
                                    + setting.convert(raw, "command line"))
        else:
            values[setting.name] = setting.convert(raw, "command line")
    return values, config, want_help


def resolve(argv: Sequence[str]) -> tuple[Any, bool]:
    """Defaults < config file < command line. Returns (Settings, help wanted)."""
    cli_values, config, want_help = parse_command_line(argv)
    values = {s.name: s.default for s in SETTINGS}
    explicit = set(cli_values)
    if config:
        file_values = load_toml(os.path.abspath(config))
        values.update(file_values)
        explicit |= set(file_values)
    values.update(cli_values)
    if want_help:
        return Settings(**values), True
    if values["demo"]:
        _with_demo_defaults(values, explicit)
    if not values["users"]:
        raise SettingsError("no users: give -users FILE (or shadow: or pam:SERVICE), or -demo"
                            " for the embedded demo")
    return Settings(**values), False


def help_text(prog: str = "iupop3") -> str:
    lines = [f"usage: {prog} [options]   (one dash, case-insensitive, never abbreviated)", "",
             f"  {'-config FILE':<22} TOML file with any of the settings below; the command line wins"]
    for s in SETTINGS:
        arg = "" if s.kind == "bool" else " " + (s.metavar or {
            "int": "N", "path": "FILE", "list": "ADDR", "networks": "CIDR...",
            "choice": "LEVEL"}.get(s.kind, "VALUE"))
        lines.append(f"  {s.option + arg:<22} {s.help} [default: {s.default_text()}]")
    lines.append(f"  {'-check-config':<22} check the settings and the files they name as a "
                 "start would, print the effective settings, exit (0, or 2 and the error)")
    lines.append(f"  {'-help':<22} this text")
    return "\n".join(lines) + "\n"


def to_json(settings: Any) -> str:
    return json.dumps(dataclasses.asdict(settings))


def from_json(text: str) -> Any:
    data = json.loads(text)
    for setting in SETTINGS:
        if setting.kind in ("list", "networks"):
            data[setting.name] = tuple(data[setting.name])
    return Settings(**data)


def example_toml() -> str:
    """The annotated example config; etc/iupop3.toml must equal this (a test checks)."""
    out = ["# iupop3 example configuration. Every key is optional; the command line wins.",
           "# Generated from shared/settings.py (python3 dev.py docs); do not edit by hand.", ""]
    for s in SETTINGS:
        if s.name in ("demo", "state"):
            continue
        out.append(f"# {s.help}")
        out.append(f"#{s.name} = {toml_value(s.default)}")
        out.append("")
    return "\n".join(out)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(json.dumps(v) for v in value) + "]"
    if isinstance(value, int):
        return str(value)
    return json.dumps(value)


def markdown_table() -> str:
    """The README's settings table (between the SETTINGS markers)."""
    rows = ["| option | config key | default | meaning |", "| --- | --- | --- | --- |"]
    for s in SETTINGS:
        rows.append(f"| `{s.option}` | `{s.name}` | {s.default_text()} | {s.help} |")
    return "\n".join(rows)
