"""The users file: Dovecot's passwd-file format, read into an immutable table.

``user:{SCHEME}hash:uid:gid:gecos:home:shell:extra`` one account a line, ``#`` comments. The
extra field holds space-separated words. The counterparts of SYSUAF's flags, which IUPOP3 1.8
checked, live there: ``disuser``, ``dismail``, ``pwd_expired``, ``pwd2_expired``, plus Dovecot's
own ``nologin`` and an ``expire=YYYY-MM-DD`` date; ``Account.accessible`` is the one check.
Read by the supervisor (to fail fast) and by each worker.
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass, field

from shared import passwords

EXPIRE_NEVER = -1  # expire_days=never: RFC 2449's EXPIRE NEVER
MAX_POLICY_NUMBER = 10_000_000  # login_delay seconds, expire_days days: ~115 days / ~27,000 years
ACCOUNT_FLAGS = frozenset({"disuser", "dismail", "pwd_expired", "pwd2_expired", "nologin"})
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}\Z")
# The names a client may log in with (USER, APOP, AUTH) and the XTND file may grant to.
USER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._@+-]{0,63}")


def user_name(raw: str) -> str | None:
    """The folded user name, or None for one that could name a path or fool a log: only
    ASCII letters, digits and ``._@+-``, at most 64, checked before folding (a Kelvin sign
    folds to "k")."""
    return raw.lower() if raw.isascii() and USER_NAME.fullmatch(raw) else None


class UsersFileError(ValueError):
    """A users file that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class Account:
    name: str
    password: str  # "{SCHEME}data", or a bare crypt(3) string
    uid: str = ""
    gid: str = ""
    gecos: str = ""
    home: str = ""
    shell: str = ""
    flags: frozenset[str] = field(default_factory=frozenset)
    extra: tuple[str, ...] = ()
    expires: datetime.date | None = None  # inaccessible from this (local) date on
    login_delay: int | None = None  # seconds, RFC 2449 LOGIN-DELAY (None: the server's)
    expire_days: int | None = None  # days or EXPIRE_NEVER, RFC 2449 EXPIRE (None: the server's)

    def accessible_on(self, day: datetime.date) -> bool:
        """Whether the account may log in on ``day``: no flag set and not yet expired."""
        return not (self.flags & ACCOUNT_FLAGS) and (self.expires is None or day < self.expires)

    @property
    def accessible(self) -> bool:
        return self.accessible_on(datetime.date.today())


class Users(dict[str, Account]):
    """The parsed table by lower-case name; ``dummy`` is the hash unknown names are checked against.

    ``dummy`` costs what the site's most common (scheme, cost) costs, so a wrong name takes as
    long to refuse as a wrong password (worker/context.py).
    """

    dummy: str = passwords.DUMMY


def _policy_number(key: str, value: str, where: str) -> int:
    """login_delay=N or expire_days=N|never (RFC 2449 LOGIN-DELAY and EXPIRE per user)."""
    if key == "expire_days" and value == "never":
        return EXPIRE_NEVER
    if not (value.isascii() and value.isdigit()) or int(value) > MAX_POLICY_NUMBER:
        wanted = "a whole number of days or never" if key == "expire_days" else "seconds"
        raise UsersFileError(f"{where}: {key}={value!r} is not {wanted}")
    return int(value)


def _parse_extra(words: tuple[str, ...], where: str) -> tuple[frozenset[str], dict[str, object]]:
    flags: set[str] = set()
    values: dict[str, object] = {}
    for word in words:
        lower = word.lower()
        if lower in ACCOUNT_FLAGS:
            flags.add(lower)
            continue
        key, eq, value = lower.partition("=")
        if key not in ("expire", "login_delay", "expire_days") or not eq:
            continue  # other Dovecot extra fields (userdb_*, reason=...) are kept, not used
        field_name = "expires" if key == "expire" else key
        if field_name in values:
            raise UsersFileError(f"{where}: {key}= given twice")
        if key != "expire":
            values[key] = _policy_number(key, value, where)
            continue
        try:
            if not _DATE.match(value):
                raise ValueError(value)
            values["expires"] = datetime.date.fromisoformat(value)
        except ValueError:
            raise UsersFileError(f"{where}: expire={value!r} is not a date YYYY-MM-DD") from None
    return frozenset(flags), values


def parse_line(line: str, where: str) -> Account:
    """One non-comment line; ``where`` ("FILE line N") starts every error message."""
    fields = line.split(":", 7)
    if len(fields) < 2 or not fields[0].strip():
        raise UsersFileError(f"{where}: expected user:password[:uid:gid:gecos:home:shell:extra]")
    fields += [""] * (8 - len(fields))
    raw = fields[0].strip()
    name = raw.lower()
    if any(c.isspace() or not c.isprintable() for c in name):
        raise UsersFileError(f"{where}: user name {name!r} contains a space or control character")
    if user_name(raw) is None:  # no login could ever reach it: say so now, not never
        raise UsersFileError(f"{where}: user name {raw!r} cannot log in: only ASCII letters, "
                             "digits and ._@+- (not first), at most 64")
    password = fields[1]
    if password and not passwords.known_scheme(password):
        scheme = passwords.split_scheme(password)[0]
        raise UsersFileError(f"{where}: unknown password scheme {{{scheme}}} for user {name!r}")
    words = tuple(fields[7].split())
    flags, values = _parse_extra(words, where)
    return Account(name, password, fields[2], fields[3], fields[4], fields[5], fields[6],
                   flags, words, **values)  # type: ignore[arg-type]


def parse_users(text: str, path: str = "users file") -> Users:
    """The table for a whole file; UsersFileError names the first bad line."""
    accounts = Users()
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        account = parse_line(line, f"{path} line {number}")
        if account.name in accounts:
            raise UsersFileError(f"{path} line {number}: user {account.name!r} appears twice")
        accounts[account.name] = account
    accounts.dummy = passwords.site_dummy(a.password for a in accounts.values())
    return accounts


def load_users(path: str) -> Users:
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise UsersFileError(f"cannot read users file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise UsersFileError(f"users file {path} is not UTF-8") from None
    return parse_users(text, path)
