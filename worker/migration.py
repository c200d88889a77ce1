"""UIDLs carried over from the previous server, so a move to iupop3 downloads nothing twice.

On first sight of a Maildir (no ledger, no import table yet) the UIDLs Dovecot
(``dovecot-uidlist``, formatted with ``-uidl-format``, a saved ``P`` field winning) or Courier
(``courierpop3dsizelist``) gave are read once and kept in ``.iupop3.uidls``, a file of its
own that the ledger's loss does not touch; its order is the previous server's order. New
mail gets iupop3's own UIDLs (worker.maildir.uid_for). Both inputs are the user's files:
bounded, checked, and ignored line by line when they do not parse. Runs in the pool.
"""

from __future__ import annotations

import os

from shared import uidlformat
from shared.logsetup import escaped, log
from worker import filecache, ledger, safefs
from worker.ledger import NAME_OK
from worker.storebase import UIDL_OK

TABLE_NAME = ".iupop3.uidls"
TABLE_HEADER = "iupop3-uidls 1"
DOVECOT_LIST = "dovecot-uidlist"
COURIER_LIST = "courierpop3dsizelist"
MAX_BYTES = 32 << 20
MAX_ENTRIES = 500_000
DEFAULT_FORMAT = uidlformat.DEFAULT
Imported = dict[str, str]   # unique name -> UIDL, in the previous server's order
TABLES = filecache.ParsedFiles()  # this worker's parsed import tables, by file identity


def _read(folder: int, name: str, owner: int | None) -> bytes | None:
    found = _open(folder, name, owner)
    if found is None:
        return None
    try:
        return _read_fd(found[0])
    finally:
        os.close(found[0])


def _open(folder: int, name: str, owner: int | None) -> tuple[int, os.stat_result] | None:
    """A descriptor of the account's regular file ``name`` and its fstat; None when missing,
    or not the account's: nothing to import from it."""
    try:
        fd = safefs.open_regular(folder, name, owner)
    except OSError:
        return None
    try:
        return fd, os.fstat(fd)
    except OSError:
        os.close(fd)
        return None


def _read_fd(fd: int) -> bytes | None:
    try:
        data = b""
        while len(data) <= MAX_BYTES and (more := os.read(fd, MAX_BYTES + 1 - len(data))):
            data += more
    except OSError:
        return None  # unreadable (EIO, EISDIR...): as if it were not there
    return data if len(data) <= MAX_BYTES else None


def _lines(data: bytes) -> list[str]:
    return data.decode("utf-8", "replace").split("\n")[: MAX_ENTRIES + 1]


def _put(table: Imported, base: str, uidl: str) -> None:
    if NAME_OK.fullmatch(base) and UIDL_OK.fullmatch(uidl) and base not in table:
        table[base] = uidl


def parse_dovecot(data: bytes, fmt: str) -> Imported:
    """``dovecot-uidlist`` version 1 (``1 V N``) or 3 (``3 V<uidv> N<next> ...``), lines
    ``uid [ext...] :name`` (3) or ``uid name`` (1); in uid order, as Dovecot's POP3 lists."""
    lines = _lines(data)
    head = lines[0].split()
    if not head or head[0] not in ("1", "3"):
        return {}
    if head[0] == "1":
        uidvalidity = int(head[1]) if len(head) > 1 and head[1].isdigit() else 0
    else:
        fields = {w[:1]: w[1:] for w in head[1:] if w}
        uidvalidity = int(fields["V"]) if fields.get("V", "").isdigit() else 0
    found: list[tuple[int, str, str]] = []
    for line in lines[1:]:
        if head[0] == "3":
            front, sep, name = line.partition(" :")
            words = front.split(" ")
            if not sep:
                continue
        else:
            words = line.split(" ")
            if len(words) != 2:
                continue
            name, words = words[1], words[:1]
        if not (words[0].isascii() and words[0].isdigit()) or len(words[0]) > 10:
            continue
        ext = {w[:1]: w[1:] for w in words[1:] if w}
        base = name.split(":", 1)[0]
        uidl = ext.get("P") or uidlformat.expand(fmt, int(words[0]), uidvalidity, base,
                                                 ext.get("G", ""))
        found.append((int(words[0]), base, uidl))
    table: Imported = {}
    for _, base, uidl in sorted(found):
        _put(table, base, uidl)
    return table


def _courier_v0(name: str) -> str:
    """Courier's UIDL for a message without a uid: its name, odd characters as +XX."""
    return "".join(c if 0x21 <= ord(c) <= 0x7e and c not in "'\"+" else f"+{ord(c):02X}"
                   for c in name)


def parse_courier(data: bytes) -> Imported:
    """``courierpop3dsizelist`` version 2 or 3: ``/V next uidv`` then ``name size uid:uidv[:utf8]``
    lines; UIDL ``UID<uid>-<uidv>`` as Courier sends it; in Courier's order (arrival time)."""
    lines = _lines(data)
    head = lines[0].split()
    if not head or head[0] not in ("/2", "/3"):
        return {}
    found: list[tuple[int, str, str]] = []
    for line in lines[1:]:
        name, _, rest = line.rpartition(" ")
        name, _, size = name.rpartition(" ")
        ids = rest.split(":")
        if not name or not size.isdigit() or len(ids) < 2 or not all(i.isdigit() for i in ids[:2]):
            continue
        base = name.split(":", 1)[0]
        uid, uidv = int(ids[0]), int(ids[1])
        uidl = (f"UID{uid}-{uidv}" if uidv else f"UID{uid}") if uid else _courier_v0(base)
        stamp = base.split(".", 1)[0]
        found.append((int(stamp) if stamp.isdigit() and len(stamp) < 12 else 0, base, uidl))
    table: Imported = {}
    for _, base, uidl in sorted(found):
        _put(table, base, uidl)
    return table


def previous_server(root: int, owner: int | None, fmt: str) -> tuple[str, Imported]:
    """(which server, its table) from the Maildir's files; the newer file wins when both are
    there (the server the user used last)."""
    candidates = []
    for name in (DOVECOT_LIST, COURIER_LIST):
        try:
            st = os.stat(name, dir_fd=root, follow_symlinks=False)
        except OSError:
            continue
        candidates.append((st.st_mtime_ns, name))
    for _, name in sorted(candidates, reverse=True):
        data = _read(root, name, owner)
        if data is None:
            continue
        table = parse_dovecot(data, fmt) if name == DOVECOT_LIST else parse_courier(data)
        if table:
            return name, table
    return "", {}


def parse_table(data: bytes) -> Imported:
    lines = _lines(data)
    table: Imported = {}
    if lines[0].split(" ")[:2] != TABLE_HEADER.split(" "):
        return table
    for line in lines[1:]:
        base, _, uidl = line.partition(" ")
        _put(table, base, uidl)
    return table


def load_table(root: int, owner: int | None) -> Imported | None:
    """The import table kept in the Maildir; None when there is none. A table this worker
    parsed before and nobody changed since is not read again (TABLES); the callers only read
    it (worker.maildir), so the one dict is shared."""
    found = _open(root, TABLE_NAME, owner)
    if found is None:
        return None
    fd, st = found
    key = filecache.identity(st)
    try:
        table = TABLES.get(key)
        if table is not None:
            return table
        data = _read_fd(fd)
    finally:
        os.close(fd)
    if data is None:
        return None
    table = parse_table(data)
    TABLES.put(key, table, max(len(table), 1))
    return table


def import_once(root: int, owner: int | None, group: int | None, fmt: str,
                where: str) -> Imported:
    """The previous server's UIDLs, written to the import table so that they survive the
    ledger; an empty table when there was no previous server (nothing written)."""
    source, table = previous_server(root, owner, fmt)
    if not table:
        return table
    text = "\n".join([f"{TABLE_HEADER} {source}", *(f"{b} {u}" for b, u in table.items())])
    done = ledger.write_file(root, TABLE_NAME, (text + "\n").encode("ascii", "replace"),
                             None if owner is None else (owner, group if group is not None
                                                         else os.fstat(root).st_gid), where)
    log.info("maildrop %s: %d UIDLs imported from %s%s", escaped(where), len(table), source,
             "" if done else " (not saved: will be read again)")
    return table
