"""The XTND authorization file (``-xtnd FILE``): who may run the privileged XTND commands.

IUPOP3's POP_XTND.DAT format, one ``xtnd_command [valid_user ...]`` a line, ``#`` comments. A
command not listed is allowed to nobody, and so is every command when no file is given. The file
is parsed whole into an immutable ``XtndAuth``; a file with a bad line raises ``XtndAuthError``
naming the line, so a reload can keep the table it had (workers reload; the supervisor validates
at startup).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

from shared.users import user_name

# The commands that need the file's blessing; XTND CLIENT needs none (IUPOP3 1.8 README).
PRIVILEGED = ("loglevel", "shutdown", "stats")


class XtndAuthError(ValueError):
    """An unreadable or malformed authorization file; the message is one line."""


@dataclass(frozen=True)
class XtndAuth:
    """Command -> the users allowed to run it; built by ``parse``, swapped whole on reload."""

    grants: Mapping[str, frozenset[str]] = field(default_factory=lambda: MappingProxyType({}))
    source: str = ""

    def allows(self, command: str, user: str | None) -> bool:
        return user is not None and user.lower() in self.grants.get(command.lower(), ())

    def describe(self) -> str:
        """A short summary for the log: ``stats: alice bob; shutdown: (nobody)``."""
        if not self.grants:
            return "nobody may run privileged XTND commands"
        return "; ".join(f"{c}: {' '.join(sorted(u)) or '(nobody)'}"
                         for c, u in sorted(self.grants.items()))


NOBODY = XtndAuth()


def parse(text: str, source: str) -> XtndAuth:
    """Parse the file's text; a command listed on several lines gets the union of its users."""
    grants: dict[str, set[str]] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        words = raw.partition("#")[0].split()
        if not words:
            continue
        command = words[0].lower()
        if command not in PRIVILEGED:
            # A typo must not silently lock the administrator out (or in): say so.
            raise XtndAuthError(f"{source} line {number}: unknown XTND command {words[0]!r}"
                                f" (known: {', '.join(PRIVILEGED)})")
        users = grants.setdefault(command, set())
        for word in words[1:]:
            name = user_name(word)  # the shape a client may log in with, folded the same way
            if name is None:
                raise XtndAuthError(f"{source} line {number}: invalid user name {word!r}")
            users.add(name)
    return XtndAuth(MappingProxyType({c: frozenset(u) for c, u in grants.items()}), source)


def load(path: str) -> XtndAuth:
    """Read and parse ``path`` ("" = no file: nobody is authorized).

    The file is opened, read and closed at once: IUPOP3 before 1.8 leaked a handle per lookup.
    """
    if not path:
        return NOBODY
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise XtndAuthError(f"cannot read XTND authorization file {path}: "
                            f"{exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise XtndAuthError(f"{path} line {line}: not UTF-8 text") from None
    return parse(text, path)
