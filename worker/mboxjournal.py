"""An mbox UPDATE's appends to the spool's siblings, undone after a crash (issue 11 item 7):
every message ends up exactly once, in the spool or the wastebasket. Used by worker.mbox.

Before a commit appends deleted records to ``USER.Trash`` (foreign ones to ``USER.MAIL``) it
writes ``.USER.iupop3.journal`` (``O_EXCL|O_NOFOLLOW``, fsync'd, its directory too): each
sibling's identity, its length before the append and after, and the spool's identity with the
crc32 of a prefix holding every deleted record. The journal goes once the new spool is renamed
in. Whoever next takes the spool's locks (a login's scan, a commit) settles a journal left
behind: if the spool is still the one the commit read, or an append was cut, the rename never
happened and the siblings are cut back; otherwise the rename happened and the appends stay.
The spool's directory may be writable by the user or the mail group, so a journal is untrusted
input: never read through a symlink, only a regular file of the server's uid with one link, at
most JOURNAL_MAX bytes, every field checked; anything else is removed, never acted on; paths
come from worker.mbox, never from the journal. Runs in the thread pool (worker.store's rule).
"""

from __future__ import annotations

import errno
import os
import re
import zlib
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass
from typing import Any

from shared.logsetup import escaped, log
from worker.mboxformat import Record, from_line
from worker.safefs import FILE_FLAGS, refusal
from worker.storebase import SPOOL_CHUNK

JOURNAL_MAX = 512  # a spool line, two sibling lines and the frame: far less
MAGIC = "iupop3-mbox-journal 1"
KINDS = ("wastebasket", "foreign")
_NUMBER = re.compile(r"[0-9]{1,20}")  # fullmatch on ASCII: no int() of a planted megabyte

# (bytes written before, start, stop, bytes written after) a range of the spool copied out
Piece = tuple[bytes, int, int, bytes]
# worker.mbox's spool locks: (path, write=, owner=) -> a context giving (fd or None, dot-lock)
Locker = Callable[..., AbstractContextManager[tuple[int | None, Any]]]
Copier = Callable[[int, int, int], None]  # (sibling fd, start, stop): spool bytes to the sibling


class Refused(ValueError):
    """Something at the journal's name that this server did not write, or a cut write."""


@dataclass(frozen=True, slots=True)
class Append:
    """One sibling mbox the commit appends to: which one, its identity, its length before the
    append and the length the whole append gives it."""

    kind: str  # a key of KINDS: worker.mbox maps it to a path, never the journal
    dev: int
    ino: int
    before: int
    after: int

    def same_file(self, st: os.stat_result) -> bool:
        return (st.st_dev, st.st_ino) == (self.dev, self.ino)

    def undoable(self, st: os.stat_result) -> bool:
        """Only our bytes past ``before``: nobody truncated it or appended after us."""
        return self.same_file(st) and self.before <= st.st_size <= self.after

    def cut(self, st: os.stat_result) -> bool:
        """Killed inside this append: the rename, which comes after every append, never ran."""
        return self.same_file(st) and self.before <= st.st_size < self.after


@dataclass(frozen=True, slots=True)
class Journal:
    """The spool the commit read (identity, and the length and crc32 of a prefix holding every
    deleted record), and its appends."""

    dev: int
    ino: int
    length: int
    crc: int
    appends: tuple[Append, ...]

    def encode(self) -> bytes:
        lines = [MAGIC, f"spool {self.dev} {self.ino} {self.length} {self.crc}"]
        lines += [f"append {a.kind} {a.dev} {a.ino} {a.before} {a.after}" for a in self.appends]
        return ("\n".join(lines) + "\nend\n").encode("ascii")

    def spool_kept(self, spool: int | None) -> bool:
        """The spool (an open descriptor) is still the one the commit read, every deleted record
        still in it: the rename never happened. A reused inode number fails the crc."""
        if spool is None:
            return False
        st = os.fstat(spool)
        return ((st.st_dev, st.st_ino) == (self.dev, self.ino) and st.st_size >= self.length
                and prefix_crc(spool, self.length) == self.crc)


@dataclass(frozen=True, slots=True)
class Siblings:
    """The spool's sibling mboxes by kind (a key of KINDS), appended to under a journal."""

    maildrop: str           # the spool's path, for the log
    journal: str            # the journal's path, for the log; opened by name in ``directory``
    paths: dict[str, str]   # kind -> the sibling's path
    locked: Locker
    directory: int          # the spool directory's descriptor (held by the session's lock)

    @property
    def journal_name(self) -> str:
        return os.path.basename(self.journal)

    def append(self, moves: dict[str, list[Record]], source: int, spool: os.stat_result,
               prefix: tuple[int, int], copy: Copier, hook: Callable[[str], None]) -> bool:
        """Append each kind's records (``source``: the spool, locked) to its sibling, each
        under its own locks, once a journal that undoes them is on disk; False if none."""
        by_path: dict[str, tuple[str, list[Record]]] = {}
        for kind, records in moves.items():
            if records:  # a wastebasket named like USER.MAIL gets both kinds in one append
                by_path.setdefault(self.paths[kind], (kind, []))[1].extend(records)
        if not by_path:
            return False
        head = from_line()
        with ExitStack() as stack:
            targets = []
            for path, (kind, records) in by_path.items():
                fd, _ = stack.enter_context(self.locked(path, write=True, owner=spool))
                assert fd is not None  # made with the spool's owner when missing
                pieces = plan(fd, source, records, head)
                st = os.fstat(fd)
                targets.append((fd, pieces, Append(kind, st.st_dev, st.st_ino, st.st_size,
                                                   st.st_size + length_of(pieces))))
            write(self.directory, self.journal_name, Journal(spool.st_dev, spool.st_ino, *prefix,
                                        tuple(append for _, _, append in targets)))
            try:
                hook("journaled")
                for fd, pieces, append in targets:
                    _append(fd, pieces, append.after, copy)
            except BaseException:
                for fd, _, append in targets:
                    os.ftruncate(fd, append.before)
                    os.fsync(fd)
                remove(self.directory, self.journal_name)
                raise
        return True

    def settle(self, spool: int | None) -> None:
        """Settle a journal that a killed or failed commit left (under the spool's locks; the
        spool's descriptor, None if it is missing): undo its appends unless its rename
        happened, then remove it."""
        try:
            journal = read(self.directory, self.journal_name)
        except Refused as exc:
            log.warning("maildrop %s: removed %s: %s", escaped(self.maildrop),
                        escaped(self.journal), exc)
            remove(self.directory, self.journal_name)
            return
        if journal is None:
            return
        if journal.spool_kept(spool) or any(
                append.cut(st) for append in journal.appends
                if (st := _lstat(self.directory, self.paths[append.kind])) is not None):
            for append in journal.appends:
                self._undo(self.paths[append.kind], append)
        else:
            log.info("maildrop %s: an interrupted update had replaced the spool: its"
                     " wastebasket copies stay", escaped(self.maildrop))
        remove(self.directory, self.journal_name)

    def _undo(self, path: str, append: Append) -> None:
        """Cut a sibling back to its length before an append that was not committed."""
        with self.locked(path, write=True) as (fd, _):
            st = os.fstat(fd) if fd is not None else None
            if fd is not None and st is not None and append.undoable(st):
                os.ftruncate(fd, append.before)
                os.fsync(fd)
                log.info("maildrop %s: undid an interrupted update's %d bytes in %s",
                         escaped(self.maildrop), st.st_size - append.before, escaped(path))
            elif st is not None and st.st_size != append.before:
                log.warning("maildrop %s: left %s as it is: changed since an interrupted"
                            " update", escaped(self.maildrop), escaped(path))


def decode(data: bytes) -> Journal:
    """Refused unless ``data`` is exactly what ``Journal.encode`` writes."""
    if len(data) > JOURNAL_MAX or not data.isascii():
        raise Refused("not a journal of this server")
    lines = data.decode("ascii").split("\n")
    if len(lines) < 4 or lines[0] != MAGIC or lines[-2:] != ["end", ""]:
        raise Refused("not a journal of this server, or a cut one")
    word, *spool = lines[1].split(" ")
    if word != "spool":
        raise Refused("no spool line")
    dev, ino, length, crc = _numbers(spool, 4)
    appends = []
    for line in lines[2:-2]:
        words = line.split(" ")
        kind = words[1] if len(words) == 6 and words[0] == "append" else ""
        if kind not in KINDS or any(a.kind == kind for a in appends):
            raise Refused("a bad append line")
        a_dev, a_ino, before, after = _numbers(words[2:], 4)
        if before > after:
            raise Refused("an append that shrinks its file")
        appends.append(Append(kind, a_dev, a_ino, before, after))
    if crc >= 1 << 32:
        raise Refused("not a crc32")
    return Journal(dev, ino, length, crc, tuple(appends))


def _numbers(words: list[str], count: int) -> list[int]:
    if len(words) != count or not all(_NUMBER.fullmatch(word) for word in words):
        raise Refused("a field is not a number")
    return [int(word) for word in words]


def plan(target: int, source: int, records: list[Record], head: bytes) -> list[Piece]:
    """The append of ``records`` (spool ``source``) to the sibling ``target`` as pieces, so the
    journal can hold the length it ends at before a byte is written. Each record gets a From
    line if it had none (``head``), a final newline if it lacks one, and a blank line; the
    first is preceded by what the sibling needs to end with a blank line."""
    end = os.lseek(target, 0, os.SEEK_END)
    last = os.pread(target, 2, max(end - 2, 0))
    if end == 0 or last.endswith(b"\n\n") or last == b"\n":
        lead = b""  # empty, or already ends with the blank line a record needs
    else:
        lead = b"\n" if last.endswith(b"\n") else b"\n\n"
    pieces: list[Piece] = []
    for record in records:
        before = b"" if record.start != record.body else head
        unended = record.end > record.body and os.pread(source, 1, record.end - 1) != b"\n"
        pieces.append((lead + before, record.start, record.end, b"\n\n" if unended else b"\n"))
        lead = b""
    return pieces


def length_of(pieces: list[Piece]) -> int:
    return sum(len(before) + stop - start + len(after) for before, start, stop, after in pieces)


def _append(fd: int, pieces: list[Piece], length: int, copy: Copier) -> None:
    """Write the planned records to a locked sibling and make them durable."""
    for before, start, stop, after in pieces:
        _write_all(fd, before)
        copy(fd, start, stop)
        _write_all(fd, after)
    if os.lseek(fd, 0, os.SEEK_CUR) != length:
        raise OSError(errno.EIO, "the spool ended inside a record")
    os.fsync(fd)


def prefix_crc(fd: int, length: int) -> int | None:
    """crc32 of the file's first ``length`` bytes; None if it is shorter."""
    crc = pos = 0
    while pos < length:  # ends: each turn reads bytes or returns
        data = os.pread(fd, min(length - pos, SPOOL_CHUNK), pos)
        if not data:
            return None
        crc = zlib.crc32(data, crc)
        pos += len(data)
    return crc


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _lstat(directory: int, path: str) -> os.stat_result | None:
    try:
        return os.lstat(os.path.basename(path), dir_fd=directory)
    except FileNotFoundError:
        return None


def write(directory: int, name: str, journal: Journal) -> None:
    """Create the journal in ``directory`` (never over an existing name nor through a
    symlink), then make it and its name durable: an append must never be on disk without the
    journal that undoes it."""
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600, dir_fd=directory)
    try:
        _write_all(fd, journal.encode())
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        remove(directory, name)
        raise
    os.close(fd)
    os.fsync(directory)


def read(directory: int, name: str) -> Journal | None:
    """The journal ``name`` in ``directory``; None if there is none; Refused if it is not one
    we wrote."""
    try:
        fd = os.open(name, FILE_FLAGS, dir_fd=directory)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise Refused("a symlink") from None
        raise
    try:
        st = os.fstat(fd)
        problem = refusal(st, os.geteuid())
        if problem is None and st.st_nlink != 1:
            problem = "a hard link"
        if problem is not None:
            raise Refused(problem)
        data = b""
        while len(data) <= JOURNAL_MAX and (chunk := os.read(fd, JOURNAL_MAX + 1 - len(data))):
            data += chunk  # ends: each turn adds bytes, at most JOURNAL_MAX + 1 in all
    finally:
        os.close(fd)
    return decode(data)


def remove(directory: int, name: str) -> None:
    """Remove the journal's name (a planted symlink goes, its target stays)."""
    try:
        os.unlink(name, dir_fd=directory)
    except FileNotFoundError:
        pass
