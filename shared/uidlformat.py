"""Dovecot's ``pop3_uidl_format`` variables, as ``-uidl-format`` fills them for UIDLs
imported from a Maildir's ``dovecot-uidlist`` (worker.migration); the setting's validator
lives here so that shared.settings can check it without importing worker code.
"""

from __future__ import annotations

import re

DEFAULT = "%08Xu%08Xv"   # Dovecot 2.x's default pop3_uidl_format
# %[0][width][modifiers]variable: u uid, v uidvalidity, f file name, g GUID, and %%.
TOKEN = re.compile(r"%(0?)([1-9][0-9]?)?([XLU]*)([uvfg%])")
VARIABLES = "%u (IMAP uid), %v (uidvalidity), %f (Maildir file name), %g (GUID), %%"


def check(text: str) -> str:
    """The -uidl-format validator: only the variables the Maildir's files can fill."""
    if not text:
        raise ValueError("must not be empty")
    if "%" in TOKEN.sub("", text):
        raise ValueError(f"{text!r} uses a variable iupop3 cannot fill: only {VARIABLES}, with "
                         "a width (%08u) and the X (hex), L, U modifiers; not %m (it needs "
                         "the headers of every message)")
    return text


def expand(fmt: str, uid: int, uidvalidity: int, name: str, guid: str = "") -> str:
    """Dovecot's var_expand for these variables: ``%08Xu`` is the uid in lower-case hex,
    zero-padded to 8 (what Dovecot 2.3 sends, e.g. ``000000016b0f1ae5``)."""
    values = {"u": str(uid), "v": str(uidvalidity), "f": name, "g": guid or name}

    def one(match: re.Match[str]) -> str:
        zero, width, modifiers, var = match.groups()
        if var == "%":
            return "%"
        value = values[var]
        if "X" in modifiers and value.isdigit():
            value = format(int(value), "x")
        if "L" in modifiers:
            value = value.lower()
        if "U" in modifiers:
            value = value.upper()
        if width:
            value = value.rjust(int(width), "0" if zero else " ")
        return value

    return TOKEN.sub(one, fmt)
