"""``iupop3 passwd``: print a users-file password field, as ``doveadm pw`` does for Dovecot.

supervisor/main.py hands ``iupop3 passwd ...`` here before parsing server settings. Options are
IUPOP3-style: one dash, any case, never abbreviated.
"""

from __future__ import annotations

import getpass
import sys
import textwrap
from collections.abc import Sequence

from shared import passwords

PROG = "iupop3 passwd"
USAGE = f"""usage: {PROG} [-scheme NAME] [-rounds N]

Reads a password (twice, without echo, from a terminal; else one line of standard input) and
prints it hashed for the users file:  alice:<printed field>::::::
  -scheme NAME  default {passwords.DEFAULT_SCHEME} (as `doveadm pw`), or one of
{textwrap.fill(', '.join(passwords.GENERATORS), 96, initial_indent=16 * ' ',
               subsequent_indent=16 * ' ')}
  -rounds N     the cost: rounds for SHA*-CRYPT, log2 cost for BLF-CRYPT and CRYPT,
                passes for ARGON2*; each scheme's default otherwise
"""


class PasswdError(ValueError):
    """Bad input: printed as one line on stderr, exit status 2, like passwords' ValueErrors."""


def parse_args(argv: Sequence[str]) -> tuple[str, int | None, bool]:
    """(scheme, rounds or None, help wanted) from the command line."""
    scheme, rounds, want_help = passwords.DEFAULT_SCHEME, None, False
    args = list(argv)
    while args:
        arg = args.pop(0)
        name = arg[1:].lower() if arg.startswith("-") else ""
        if name in ("help", "h", "?"):
            want_help = True
            continue
        if name not in ("scheme", "rounds"):
            raise PasswdError(f"unknown option {arg} (options may not be abbreviated; see -help)")
        if not args:
            raise PasswdError(f"option {arg} needs a value")
        value = args.pop(0)
        if name == "scheme":
            passwords.maker(value)  # ValueError names the choices
            scheme = value.upper()
        else:
            try:
                rounds = int(value)
            except ValueError:
                raise PasswdError(f"option {arg} needs a whole number, not {value!r}") from None
    return scheme, rounds, want_help


def read_password() -> str:
    """The password: asked twice without echo on a terminal, else the first line of stdin."""
    if sys.stdin is None:
        raise PasswdError("no standard input to read the password from")
    if sys.stdin.isatty():
        try:
            first = getpass.getpass("Password: ")
            if not first:
                raise PasswdError("empty password")
            if getpass.getpass("Retype password: ") != first:
                raise PasswdError("passwords do not match")
        except EOFError:
            raise PasswdError("no password given") from None
        return first
    line = sys.stdin.buffer.readline()
    line = line.removesuffix(b"\n").removesuffix(b"\r")
    if not line:
        raise PasswdError("empty password on standard input")
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError:
        raise PasswdError("the password on standard input is not UTF-8") from None


def main(argv: Sequence[str]) -> int:
    try:
        scheme, rounds, want_help = parse_args(argv)
        if want_help:
            sys.stdout.write(USAGE)
            return 0
        passwords.check_rounds(scheme, rounds)  # a typo should not cost typing it twice
        print(passwords.hash_password(read_password(), scheme, rounds))
    except ValueError as exc:  # PasswdError, or hash_password refusing the input
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return 0

