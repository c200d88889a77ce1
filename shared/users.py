"""The users file: Dovecot's passwd-file format, read into an immutable table.

``user:{SCHEME}hash:uid:gid:gecos:home:shell:extra`` one account a line, ``#`` comments. The
extra field holds space-separated words; ``disuser``, ``dismail`` and ``pwd_expired`` are the
account flags of IUPOP3's SYSUAF (a user with any of them cannot log in).
"""

from __future__ import annotations

from dataclasses import dataclass, field

ACCOUNT_FLAGS = frozenset({"disuser", "dismail", "pwd_expired", "pwd2_expired"})


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

    @property
    def accessible(self) -> bool:
        return not (self.flags & ACCOUNT_FLAGS)


def parse_users(text: str, path: str = "users file") -> dict[str, Account]:
    accounts: dict[str, Account] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = line.split(":", 7)
        if len(fields) < 2 or not fields[0]:
            raise UsersFileError(f"{path} line {number}: expected user:password[:...]")
        fields += [""] * (8 - len(fields))
        name = fields[0].strip().lower()
        if name in accounts:
            raise UsersFileError(f"{path} line {number}: user {name!r} appears twice")
        words = tuple(fields[7].split())
        flags = frozenset(w.lower() for w in words if w.lower() in ACCOUNT_FLAGS)
        accounts[name] = Account(name, fields[1], fields[2], fields[3], fields[4], fields[5],
                                 fields[6], flags, words)
    return accounts


def load_users(path: str) -> dict[str, Account]:
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise UsersFileError(f"cannot read users file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise UsersFileError(f"users file {path} is not UTF-8") from None
    return parse_users(text, path)
