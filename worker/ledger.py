"""The maildrop ledger: what the server knows about one maildrop, kept across restarts.

One small text file per maildrop (``.iupop3.ledger`` in a Maildir, ``.USER.iupop3.ledger``
beside an mbox spool). Per message, by its unique name: the UIDL, the exact LIST size and
foreign flag (valid for one ``sizing`` fingerprint and one stored size), when it was first
retrieved; per maildrop: the last login. With it a login after a restart reads no message it
has measured before; LOGIN-DELAY and EXPIRE (worker.retention) hold across workers.

The user may be able to write this file: it is read like any other input, bounded in size,
checked line by line, and thrown away whole (then rebuilt from the messages) at the first
line that does not parse. Nothing in it can name a path. Written crash-safely (a temp file,
fsync, rename, fsync of the directory); a write that fails (a full disk) is logged and
forgotten, never an error for the session. Runs in the worker's thread pool (worker.store).
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import repeat
from typing import NamedTuple

from shared.logsetup import escaped, log
from worker import filecache, safefs
from worker.storebase import UIDL_OK

VERSION = 2                 # 2 added the inode; version 1 files are still read
HEADER = f"iupop3-ledger {VERSION}"
HEADERS = {"iupop3-ledger 1": 7, HEADER: 8}  # header -> words on each message line
MAX_BYTES = 40 << 20        # MAX_ENTRIES lines of the longest names; more is refused unread
MAX_ENTRIES = 100_000
MAX_NUMBER = 1 << 48        # sizes and times beyond this are not real
NAME_OK = re.compile(r"[\x21-\x7e]{1,255}")  # Maildir unique names and mbox UIDLs, no spaces
FUTURE_SLACK = 86400        # a clock set back a day does not invalidate the ledger
_SERIAL = itertools.count()
PARSED = filecache.ParsedFiles()  # this worker's parsed ledgers, by file identity and sizing


class LedgerCorrupt(ValueError):
    """A ledger that is not what this server writes; the caller rebuilds it."""


class Entry(NamedTuple):
    """One message's line. Immutable: a worker's cache (PARSED) shares entries between
    sessions, so a change replaces the entry in that session's ``Ledger.entries``."""

    uidl: str
    size: int           # octets RETR sends (served form, for the ledger's sizing)
    stored: int         # the stored file's size when measured: a changed file is re-measured
    foreign: bool
    first_retrieved: int | None = None  # epoch seconds of the first RETR of a QUIT session
    inode: int = -1     # the file's inode when measured (-1: unknown): worker.maildir's fast path


@dataclass
class Ledger:
    sizing: str = ""
    last_login: int | None = None
    entries: dict[str, Entry] = field(default_factory=dict)
    dirty: bool = False       # something learned since it was read or written
    measured: int = 0         # messages measured this session (not found in the ledger)
    fresh: bool = False       # not read from a file: first sight, or a rebuild

    def known(self, name: str, stored: int, uidl: str, inode: int = -1) -> tuple[int, bool] | None:
        """(size, foreign) when this message was measured before under the same sizing; the
        file's ``inode`` is noted for the next login's fast path (worker.maildir)."""
        entry = self.entries.get(name)
        if entry is None or entry.stored != stored:
            return None
        inode = inode if inode >= 0 else entry.inode
        # The UIDL comes from the name or the import table, never from here.
        if entry.uidl != uidl or entry.inode != inode:
            self.entries[name] = entry._replace(uidl=uidl, inode=inode)
            self.dirty = True
        return entry.size, entry.foreign

    def learn(self, name: str, uidl: str, size: int, stored: int, foreign: bool,
              inode: int = -1) -> None:
        if not NAME_OK.fullmatch(name):
            return  # a name with a space or non-ASCII: measured each time, never written here
        old = self.entries.get(name)
        first = old.first_retrieved if old is not None else None
        if len(self.entries) < MAX_ENTRIES or old is not None:
            self.entries[name] = Entry(uidl, size, stored, foreign, first, inode)
            self.dirty = True
            self.measured += 1

    def keep_only(self, names: set[str]) -> None:
        """Forget messages no longer in the maildrop."""
        if self.entries.keys() <= names:  # in C: at most logins nothing is gone
            return
        gone = [name for name in self.entries if name not in names]
        for name in gone:
            del self.entries[name]
        self.dirty = self.dirty or bool(gone)

    def forget(self, names: Iterable[str]) -> None:
        """Messages the session removed (deleted, expired, moved to the foreign folder)."""
        for name in names:
            if self.entries.pop(name, None) is not None:
                self.dirty = True

    def retrieved(self, name: str, uidl: str, now: int) -> None:
        """A RETR of ``name`` was fully sent in a session that QUIT: its first retrieval."""
        entry = self.entries.get(name)
        if entry is None:  # mbox keeps no sizes here: an entry that is never "known"
            if len(self.entries) >= MAX_ENTRIES or not NAME_OK.fullmatch(name) \
                    or not UIDL_OK.fullmatch(uidl):
                return
            entry = Entry(uidl, 0, -1, False)
        if entry.first_retrieved is None:
            self.entries[name] = entry._replace(first_retrieved=now)
            self.dirty = True

    def first_retrieved(self, name: str) -> int | None:
        entry = self.entries.get(name)
        return entry.first_retrieved if entry is not None else None

    def text(self) -> bytes:
        lines = [HEADER, f"sizing {self.sizing or '-'}",
                 f"login {self.last_login if self.last_login is not None else '-'}"]
        for name, e in self.entries.items():
            first = "-" if e.first_retrieved is None else str(e.first_retrieved)
            stored = "-" if e.stored < 0 else str(e.stored)  # "-": no size known (mbox, stale)
            inode = "-" if e.inode < 0 else str(e.inode)
            lines.append(f"m {name} {e.uidl} {e.size} {stored} {int(e.foreign)} {first} {inode}")
        return ("\n".join(lines) + "\n").encode("ascii")


def _number(word: str, now: int, optional: bool = False, time_value: bool = False) -> int | None:
    if optional and word == "-":
        return None
    if not (word.isascii() and word.isdigit()) or len(word) > 15:
        raise LedgerCorrupt(f"not a number: {word[:20]!r}")
    value = int(word)
    if value >= MAX_NUMBER or (time_value and value > now + FUTURE_SLACK):
        raise LedgerCorrupt(f"out of range: {value}")
    return value


def _head(data: bytes, sizing: str, now: int) -> tuple[Ledger, int, bool, str]:
    """(the ledger without its messages, words per message line, same sizing?, the message
    lines as one text, each ended by a newline)."""
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise LedgerCorrupt("not ASCII") from None
    lines = text.split("\n", 3)
    if len(lines) < 4 or lines[0] not in HEADERS or not text.endswith("\n"):
        raise LedgerCorrupt("no header of a known version, or not ended by a newline")
    if text.count("\n") > MAX_ENTRIES + 3:
        raise LedgerCorrupt("too many lines")
    stored_sizing = lines[1].removeprefix("sizing ").replace("-", "", lines[1] == "sizing -")
    login = lines[2].split(" ")
    if not lines[1].startswith("sizing ") or len(login) != 2 or login[0] != "login":
        raise LedgerCorrupt("bad sizing or login line")
    ledger = Ledger(sizing, _number(login[1], now, optional=True, time_value=True))
    ledger.dirty = stored_sizing != sizing
    return ledger, HEADERS[lines[0]], stored_sizing == sizing, lines[3]


def parse_lines(data: bytes, sizing: str, now: int) -> Ledger:
    """The ledger in ``data``, checked line by line (the plain path: ``parse`` is the fast one
    and must give the same result); LedgerCorrupt at the first thing this server would not
    write."""
    ledger, width, same_sizing, body = _head(data, sizing, now)
    for line in body.split("\n")[:-1]:
        words = line.split(" ")
        if len(words) != width or words[0] != "m" or not NAME_OK.fullmatch(words[1]) \
                or not UIDL_OK.fullmatch(words[2]) or words[5] not in ("0", "1"):
            raise LedgerCorrupt(f"bad message line {escaped(line[:80])}")
        size, stored = _number(words[3], now), _number(words[4], now, optional=True)
        first = _number(words[6], now, optional=True, time_value=True)
        inode = _number(words[7], now, optional=True) if width == 8 else None
        if words[1] in ledger.entries:
            raise LedgerCorrupt(f"message {words[1]} twice")
        # A stale size is marked by a stored size no file has: the message is re-measured.
        known = stored if same_sizing and stored is not None else -1
        ledger.entries[words[1]] = Entry(words[2], size or 0, known, words[5] == "1", first,
                                         -1 if inode is None else inode)
    return ledger


# Every message line as ``text`` writes it: the words hold no space, so a line that matches
# splits into exactly its words. Numbers are ASCII digits (the text was decoded as ASCII).
_NUM = r"[0-9]{1,15}"
_OPT = r"(?:[0-9]{1,15}|-)"
_LINE = rf"m [\x21-\x7e]{{1,255}} [\x21-\x7e]{{1,70}} {_NUM} {_OPT} [01] {_OPT}"
_LINES = {7: re.compile(rf"(?:{_LINE}\n)*"), 8: re.compile(rf"(?:{_LINE} {_OPT}\n)*")}


@dataclass(frozen=True)
class Parsed:
    """A ledger file as parsed: what a worker keeps (PARSED) and copies into a new ``Ledger``
    for each session (the entries are immutable; each session changes its own dict)."""

    last_login: int | None
    dirty: bool
    entries: dict[str, Entry]

    @classmethod
    def of(cls, ledger: Ledger) -> Parsed:
        return cls(ledger.last_login, ledger.dirty, dict(ledger.entries))

    def ledger(self, sizing: str) -> Ledger:
        return Ledger(sizing, self.last_login, dict(self.entries), dirty=self.dirty)

    @property
    def size(self) -> int:
        return len(self.entries)


def parse(data: bytes, sizing: str, now: int) -> Ledger:
    return _parse(data, sizing, now).ledger(sizing)


def _parse(data: bytes, sizing: str, now: int) -> Parsed:
    """The ledger in ``data``; LedgerCorrupt at the first thing this server would not write.

    Sizes are kept only when they were measured with the same ``sizing`` (settings that
    change the served form make them stale); UIDLs, retrieval and login times are kept.
    One regex checks every message line at once and one split cuts them into columns (a
    cold login of 5,000 messages parses this while the client waits); when the regex
    refuses, the plain ``parse_lines`` finds and names the bad line.
    """
    ledger, width, same_sizing, body = _head(data, sizing, now)
    if not body:
        return Parsed.of(ledger)
    if _LINES[width].fullmatch(body) is None:
        return Parsed.of(parse_lines(data, sizing, now))
    words = body.replace("\n", " ").split(" ")
    # Column by column, in C where possible: this runs per message of a cold login.
    names, uidls, sizes, stored, flags, firsts = (words[i:-1:width] for i in range(1, 7))
    count = len(names)
    unknown = {"-": "-1"}.get  # "-" (no value) reads as -1; the regex let no "-1" through
    sizes_n = list(map(int, sizes))
    stored_n = list(map(int, map(unknown, stored, stored)))
    inode_words = words[7:-1:width] if width == 8 else ["-"] * count
    inodes_n = list(map(int, map(unknown, inode_words, inode_words)))
    times = [int(word) for word in firsts if word != "-"]
    firsts_n = [None if word == "-" else int(word) for word in firsts] if times \
        else [None] * count
    if max(sizes_n) >= MAX_NUMBER or max(stored_n) >= MAX_NUMBER \
            or max(inodes_n) >= MAX_NUMBER or len(set(names)) != count \
            or (times and max(times) > now + FUTURE_SLACK):
        return Parsed.of(parse_lines(data, sizing, now))  # names the problem
    if not same_sizing:
        stored_n = [-1] * count
    foreign = list(map("1".__eq__, flags))
    # tuple.__new__ makes each Entry in C (no Python __new__ per message).
    rows = map(tuple.__new__, repeat(Entry), zip(uidls, sizes_n, stored_n, foreign, firsts_n,
                                                  inodes_n))
    return Parsed(ledger.last_login, ledger.dirty, dict(zip(names, rows)))


def load(folder: int, name: str, owners: tuple[int, ...], sizing: str, where: str) -> Ledger:
    """The ledger ``name`` in the directory ``folder``; an empty one (to be rebuilt) when it
    is missing, too big, not a regular file of one of ``owners``, or corrupt (logged). A file
    this worker parsed before and nobody changed since is not read again (PARSED)."""
    now = int(time.time())
    try:
        fd = safefs.open_regular(folder, name, None)
        st = os.fstat(fd)
        if st.st_uid not in owners:
            os.close(fd)
            raise safefs.UnsafeEntry(0, f"owned by uid {st.st_uid}", name)
    except FileNotFoundError:
        return Ledger(sizing, dirty=True, fresh=True)
    except OSError as exc:
        log.info("ledger of %s not used (%s); rebuilding it", escaped(where), exc.strerror)
        return Ledger(sizing, dirty=True, fresh=True)
    key = (filecache.identity(st), sizing)
    try:
        parsed = PARSED.get(key)
        if parsed is not None:
            return parsed.ledger(sizing)
        data = b"" if st.st_size > MAX_BYTES else _read_all(fd)
    except OSError as exc:
        log.info("ledger of %s unreadable (%s); rebuilding it", escaped(where), exc.strerror)
        return Ledger(sizing, dirty=True, fresh=True)
    finally:
        os.close(fd)
    try:
        if not data or len(data) > MAX_BYTES:
            raise LedgerCorrupt(f"empty or larger than {MAX_BYTES} bytes")
        parsed = _parse(data, sizing, now)
    except LedgerCorrupt as exc:
        log.info("ledger of %s is corrupt (%s); rebuilding it", escaped(where), exc)
        return Ledger(sizing, dirty=True, fresh=True)
    PARSED.put(key, parsed, max(parsed.size, 1))
    return parsed.ledger(sizing)


def _read_all(fd: int) -> bytes:
    """At most MAX_BYTES + 1 bytes of ``fd`` (more means too big)."""
    data = os.read(fd, MAX_BYTES + 1)
    while data and len(data) <= MAX_BYTES and (more := os.read(fd, MAX_BYTES + 1 - len(data))):
        data += more
    return data


def save(folder: int, name: str, ledger: Ledger, owner: tuple[int, int] | None,
         where: str) -> bool:
    """Write the ledger if it changed; False (logged) when the disk refused."""
    if not ledger.dirty:
        return True
    if not write_file(folder, name, ledger.text(), owner, where):
        return False
    ledger.dirty = False
    return True


def write_file(folder: int, name: str, data: bytes, owner: tuple[int, int] | None,
               where: str) -> bool:
    """Replace ``name`` in ``folder`` crash-safely (temp file, fsync, rename, fsync of the
    folder); False, logged at WARNING, when the disk refused (ENOSPC, EDQUOT, EROFS...).

    ``owner`` (uid, gid) is given to the new file when the server runs as root, so the file
    belongs to the account like the rest of its maildrop.
    """
    temp = f".{name}.{os.getpid()}.{next(_SERIAL)}.tmp"
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=folder)
        try:
            if owner is not None and os.geteuid() == 0:
                os.fchown(fd, owner[0], owner[1])
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temp, name, src_dir_fd=folder, dst_dir_fd=folder)
        os.fsync(folder)
    except OSError as exc:
        log.warning("%s of %s not written: %s", name, escaped(where), exc.strerror)
        try:
            os.unlink(temp, dir_fd=folder)
        except OSError:
            pass
        return False
    return True


def spool_place(spool: str, state_dir: str) -> tuple[str, str]:
    """(folder, file name) of an mbox spool's ledger: beside the spool, or in ``state_dir``
    (``-mbox-ledger-dir``) when the spool's folder is not the server's to write in."""
    name = os.path.basename(spool)
    if state_dir:
        digest = hashlib.sha256(os.path.abspath(spool).encode()).hexdigest()[:16]
        return state_dir, f"{name}.{digest}.ledger"
    return os.path.dirname(spool) or ".", f".{name}.iupop3.ledger"


def _spool_folder(spool: str, state_dir: str, directory: int | None = None
                  ) -> tuple[int, str, os.stat_result | None]:
    """The ledger's folder, the ledger's name, and the spool's lstat (None when missing).

    Beside the spool the folder is the spool directory the session walked (``directory``,
    worker.mbox, duplicated: the caller closes its copy), so a component the user swaps for a
    symlink after the walk cannot send root's write elsewhere; the state folder (and a
    directory not given: tools, tests) is opened as the administrator wrote it (/var/mail may
    be a symlink)."""
    folder_path, name = spool_place(spool, state_dir)
    if state_dir:
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
    if directory is not None and not state_dir:
        folder = os.dup(directory)
        spool_name, where = os.path.basename(spool), {"dir_fd": directory}
    else:
        folder = os.open(folder_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        spool_name, where = spool, {}
    try:
        return folder, name, os.lstat(spool_name, **where)
    except FileNotFoundError:
        return folder, name, None
    except BaseException:
        os.close(folder)
        raise


def load_for_spool(spool: str, state_dir: str, sizing: str,
                   directory: int | None = None) -> Ledger:
    """An mbox spool's ledger: beside it the spool owner's file or the server's own; in a
    state folder only the server's."""
    try:
        folder, name, st = _spool_folder(spool, state_dir, directory)
    except OSError as exc:
        log.info("ledger of %s not used (%s)", escaped(spool), exc.strerror)
        return Ledger(sizing, dirty=True, fresh=True)
    try:
        owners = (os.geteuid(),) if st is None or state_dir else (st.st_uid, os.geteuid())
        return load(folder, name, owners, sizing, spool)
    finally:
        os.close(folder)


def save_for_spool(spool: str, state_dir: str, ledger: Ledger,
                   directory: int | None = None) -> bool:
    """Write an mbox spool's ledger; beside the spool it is given to the spool's owner."""
    if not ledger.dirty:
        return True
    try:
        folder, name, st = _spool_folder(spool, state_dir, directory)
    except OSError as exc:
        log.warning("ledger of %s not written: %s", escaped(spool), exc.strerror)
        return False
    try:
        owner = None if st is None or state_dir else (st.st_uid, st.st_gid)
        return save(folder, name, ledger, owner, spool)
    finally:
        os.close(folder)


def sizing_fingerprint(sizing: object) -> str:
    """What the served sizes depend on: the Rewriter's rules (worker.rewrite), or "plain"."""
    rules = getattr(sizing, "rules", None)
    if rules is None:
        return "plain"
    return hashlib.sha256(repr(rules).encode()).hexdigest()[:16]
