"""The ``-mail`` setting parsed once: store kind, the trusted fixed part, the rest per user.

The supervisor checks it at start (a bad spec is one line on stderr and exit 2, through
shared.settings); each worker parses the same text again into a ``MailLocation`` and the store
(worker.store) walks from ``MailLocation.fixed_part`` down, one component at a time.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

KINDS = ("maildir", "mbox")
USER = "%u"
# Maildir++ folder names (for mbox, suffixes of the spool's sibling files). Declared here, in
# shared/, because the settings default needs the first; worker.store exports both.
WASTEBASKET = ".Trash"  # VMS MAIL's WASTEBASKET, IUPOP3's place for deleted mail
FOREIGN_FOLDER = ".MAIL"  # IUPOP3 1.8 moved MAIL/FOREIGN messages to the MAIL folder
MAILDIR_SUBS = ("cur", "new", "tmp")  # a Maildir's own directories: no folder may take them


@dataclass(frozen=True, slots=True)
class MailLocation:
    """``kind:template``; the template is absolute or starts at the user's home (``~/``)."""

    kind: str
    template: str

    @property
    def text(self) -> str:
        return f"{self.kind}:{self.template}"

    def split_for(self, user: str, home: str) -> tuple[str, tuple[str, ...]]:
        """(trusted directory, components below it) of ``user``'s maildrop.

        Trusted is what the administrator wrote or the home in the users file: for
        ``~/Maildir`` the home, for ``/var/mail/%u/Maildir`` ``/var/mail``. The components
        below it may be controlled by the user and are walked without following symlinks.
        Raises ValueError when the template needs a home the account lacks.
        """
        template = self.template
        if template.startswith("~"):
            if not home or not os.path.isabs(home):
                raise ValueError(f"user {user} has no home for {self.text!r}")
            fixed, rest = home.rstrip("/") or "/", template[2:]
        elif USER in template:
            head = template[:template.index(USER)].rpartition("/")[0]
            fixed, rest = head or "/", template[len(head) + 1:]
        else:
            fixed, rest = template.rstrip("/") or "/", ""
        below = tuple(part.replace(USER, user) for part in rest.split("/") if part)
        return fixed, below


@functools.lru_cache(maxsize=8)
def parse(spec: str) -> MailLocation:
    """``maildir:PATH`` or ``mbox:PATH``; raises ValueError saying what is wrong."""
    kind, colon, template = spec.partition(":")
    if not colon or kind not in KINDS:
        raise ValueError(f"must be maildir:PATH or mbox:PATH, not {spec!r}")
    if not template:
        raise ValueError(f"needs a path after {kind}:")
    if "\0" in template:
        raise ValueError("holds a NUL character")
    if template == "~" or (template.startswith("~") and not template.startswith("~/")):
        raise ValueError(f"~ must be followed by / (the user's home), not {template!r}")
    parts = template.split("/")
    if ".." in parts or "." in parts[1:]:
        raise ValueError(f"may not hold . or .. components: {template!r}")
    if kind == "mbox" and (template.endswith("/") or template.startswith("~/") and
                           len(template.rstrip("/")) < 3):
        raise ValueError(f"mbox:PATH names a spool file, not a directory: {template!r}")
    if not template.startswith("~/"):
        template = os.path.abspath(template)  # a relative path is the one of the start
    return MailLocation(kind, template)


def normalized(spec: str) -> str:
    """The validator shared.settings applies to ``-mail``: the checked, absolute spec."""
    return parse(spec).text


def folder_name(name: str) -> str:
    """The validator of ``-wastebasket``: one folder name, never a path, and never one of a
    Maildir's own ``cur``/``new``/``tmp`` (the folder would be made inside the inbox's)."""
    if not name.strip(".") or "/" in name or "\0" in name:
        raise ValueError(f"must be one folder name such as {WASTEBASKET}, not {name!r}")
    if name in MAILDIR_SUBS:
        raise ValueError(f"may not be a Maildir's own {name!r} (use a folder such as "
                         f"{WASTEBASKET})")
    return name
