"""A Maildir as a POP3 maildrop: scan, size, read, lock, and commit deletions.

The session opens one ``Maildrop`` after a good login and calls ``commit`` only in the UPDATE
state; everything before that is read-only, so a dropped connection or a killed worker changes
nothing on disk. Deleted mail goes to the wastebasket folder (Maildir++ ``.Trash``) unless
``purge`` is set, like VMS MAIL's WASTEBASKET and IUPOP3's ``-purge_reclaim``. A foreign message
(see worker.rewrite) is never removed: "deleting" it moves it to the ``.MAIL`` folder.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Hashable, Iterator
from concurrent.futures import wait
from contextlib import contextmanager
from typing import BinaryIO

from shared.logsetup import escaped, log
from worker import ledger as ledgers
from worker import maildirquota, migration, safefs
from worker.ledger import Ledger
from worker.maildirscan import (MEASURERS, PARALLEL_FROM, SCANS, Entry, Inodes, Listing,
                                measurers)
from worker.maildirscan import listing as _listing
from worker.maildirscan import open_sub as _open_sub
from worker.safefs import UnsafeEntry
from worker.storebase import (FOREIGN_FOLDER, PLAIN, UIDL_OK, WASTEBASKET, MaildropError,
                              LockKey, Message, Sizing, fault_stop_point, session_flock)

LOCK_NAME = ".iupop3.lock"
LEDGER_NAME = ".iupop3.ledger"
MARKER = "maildirfolder"  # Maildir++: this directory is a folder, not a Maildir of its own
SUBS = ("cur", "new", "tmp")
IMPORTED = 1 << 62  # ranks of imported messages lie this far below any delivery time


def _digest(base: str) -> str:
    return "H" + hashlib.sha256(base.encode("utf-8", "surrogateescape")).hexdigest()[:40]


def uid_for(base: str) -> str:
    """The UIDL of a message: its Maildir unique name, or a digest of it when unfit.

    A unique name never changes while the message lives in this Maildir (moving new/ -> cur/
    and flag changes only touch the part after ':'), so the UIDL is stable forever.
    """
    return base if UIDL_OK.fullmatch(base) else _digest(base)


def ensure_maildir(path: str) -> None:
    """Make cur/, new/ and tmp/ by path: for tests and tools (the server makes them through
    ``Maildir.lock``, never following a symlink)."""
    for sub in SUBS:
        os.makedirs(os.path.join(path, sub), mode=0o700, exist_ok=True)


def _where(path: str) -> tuple[str, str]:
    """(sub folder, file name) of a Message.path."""
    sub, name = path.rsplit("/", 2)[-2:]
    return sub, name


class Maildir:
    """One user's Maildir, locked for the lifetime of a POP3 session (a worker.store.Maildrop).

    Opened from ``where`` = (trusted directory, components below it) as worker.safefs walks
    it; then every name is resolved relative to the Maildir's descriptor, and only regular
    files of ``owner`` (the users file's uid, else the Maildir's own) are counted, served,
    moved or deleted. Anything else is skipped with one INFO line. What the server makes in it
    (sub folders, the wastebasket, ``.MAIL``, the lock) belongs to ``owner`` and ``group``
    (else the Maildir's own) with the Maildir's mode: worker.safefs ``Owner``.
    """

    def __init__(self, where: str | tuple[str, tuple[str, ...]], wastebasket: str = WASTEBASKET,
                 purge: bool = False, sizing: Sizing = PLAIN, owner: int | None = None,
                 group: int | None = None, uidl_format: str = migration.DEFAULT_FORMAT,
                 home: bool = False):
        self.trusted, self.below = (where, ()) if isinstance(where, str) else where
        self.path = os.path.join(self.trusted, *self.below)
        self.sizing = sizing
        self.owner = owner
        self.group = group
        self.uidl_format = uidl_format
        self.ledger = Ledger(ledgers.sizing_fingerprint(sizing), fresh=True)
        self.imported: migration.Imported = {}
        self._positions: dict[str, int] = {}
        self.vouched = 0  # messages the ledger vouched for (no stat) in this session's scans
        self.home = home  # ``trusted`` is the account's home: never made here (safefs.walk)
        self.wastebasket = wastebasket
        self.purge = purge
        self._root_fd: int | None = None   # held from lock() to close_directory() only
        self._root_key: tuple[int, int] | None = None  # (st_dev, st_ino) of the locked Maildir
        self._lock_fd: int | None = None
        self.stamp = b""                     # written into the session lock (worker.takeover)
        self.lock_key: LockKey | None = None  # the held session lock file, while held

    # -- session lock --------------------------------------------------------------------------
    def lock(self) -> None:
        """Open the Maildir (made at a user's first login) and take the session lock; flock is
        per open file, so it holds across workers and between two sessions of one worker, and
        dies with the process that holds it."""
        try:
            root = safefs.walk(self.trusted, self.below, self.owner, create=True,
                               group=self.group, make_trusted=not self.home)
        except UnsafeEntry as exc:
            raise MaildropError(self._refused(exc)) from None
        except FileNotFoundError as exc:
            if not self.home or os.path.isdir(self.trusted):
                raise MaildropError(f"cannot open maildrop {self.path}: {exc.strerror}") from None
            raise MaildropError(f"home {escaped(self.trusted)} does not exist: not made by the"
                                " server (it would belong to root); login refused") from None
        except OSError as exc:
            raise MaildropError(f"cannot open maildrop {self.path}: {exc.strerror}") from None
        try:
            made = self.made_owner(root)
            owner = made.uid
            for sub in SUBS:  # none may be a symlink: checked once here, for the session
                os.close(safefs.open_dir(root, sub, create=True, owner=made))
            fd = safefs.open_or_create(root, LOCK_NAME, made, os.O_RDWR)
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                os.close(fd)
                raise UnsafeEntry(0, "is not a regular file of one link", LOCK_NAME)
            self._lock_fd = session_flock(fd, self.path, self.stamp)
            self.lock_key = (st.st_dev, st.st_ino)
        except OSError as exc:
            os.close(root)
            if isinstance(exc, UnsafeEntry) or exc.errno == errno.ELOOP:
                raise MaildropError(self._refused(exc)) from None
            raise MaildropError(f"cannot open maildrop {self.path}: {exc.strerror}") from None
        except BaseException:  # MaildropBusy from session_flock, which closed fd itself
            os.close(root)
            raise
        self._root_fd, self.owner = root, owner
        st = os.fstat(root)
        self._root_key = (st.st_dev, st.st_ino)
        self._read_ledger(root)

    def close_directory(self) -> None:
        """Close the Maildir's descriptor after the login's scan: a session holds only its
        lock file between commands, and each later command walks to the Maildir again and
        checks it is the one locked (``_root``). The lock file is what stays: flock on a file
        opened read-write works across NFS nodes, and the file names the holder."""
        if self._root_fd is not None:
            os.close(self._root_fd)
            self._root_fd = None

    def _read_ledger(self, root: int) -> None:
        """The ledger and the import table; on first sight, the previous server's UIDLs."""
        self.ledger = ledgers.load(root, LEDGER_NAME, (self.owner,), self.ledger.sizing,
                                   self.path)
        table = migration.load_table(root, self.owner)
        if table is None and self.ledger.fresh:
            table = migration.import_once(root, self.owner, self._group(root), self.uidl_format,
                                          self.path)
        self.imported = table or {}
        self._positions = {base: i for i, base in enumerate(self.imported)}

    def _group(self, root: int) -> int:
        return self.group if self.group is not None else os.fstat(root).st_gid

    def save_ledger(self) -> bool:
        """Write the ledger if it learned something (pool); a full disk is only logged."""
        if self._root_key is None or self.owner is None:
            return False
        if not self.ledger.dirty:
            return True  # nothing learned: no walk to the directory
        try:
            with self._root() as root:
                return ledgers.save(root, LEDGER_NAME, self.ledger,
                                    (self.owner, self._group(root)), self.path)
        except OSError as exc:  # the Maildir was swapped (_root): the ledger only is lost
            log.warning("ledger of %s not written: %s", escaped(self.path), exc)
            return False

    def made_owner(self, root: int) -> safefs.Owner:
        """Whom what the server makes in this Maildir belongs to: the account's uid and gid
        (else the Maildir's own), with the Maildir's mode (issue 12)."""
        return safefs.Owner.of(os.fstat(root), self.owner, self.group)

    def _refused(self, exc: OSError) -> str:
        what = escaped(str(exc.filename))
        reason = "is a symlink" if exc.errno == errno.ELOOP else exc.strerror
        return f"maildrop {escaped(self.path)}: {what} {reason}; refused"

    def unlock(self) -> None:
        for fd in (self._lock_fd, self._root_fd):
            if fd is not None:
                os.close(fd)  # closing the only descriptor releases the flock
        self._lock_fd = self._root_fd = None
        self.lock_key = self._root_key = None

    @contextmanager
    def _root(self) -> Iterator[int]:
        """The Maildir's descriptor: the login's, until ``close_directory``; then one walked
        for this call that must be the directory locked at login (else UnsafeEntry, an
        OSError: the command gets -ERR and nothing is read, moved or deleted); without a
        lock (tests and tools), one walked for this call."""
        if self._root_fd is not None:
            yield self._root_fd
            return
        if self._root_key is not None:
            fd = safefs.reopen(self.trusted, self.below, self.owner, self._root_key)
        else:
            fd = safefs.walk(self.trusted, self.below, self.owner, create=False)
        try:
            if self.owner is None:
                self.owner = os.fstat(fd).st_uid
            yield fd
        finally:
            os.close(fd)

    def _skip(self, where: str, reason: str) -> None:
        """One INFO line for an entry that is not served; names from disk are escaped."""
        log.info("maildrop %s: skipped %s: %s", escaped(self.path), escaped(where), reason)

    # -- reading -------------------------------------------------------------------------------
    def scan(self, maxmsg: int = 0) -> list[Message]:
        """The messages of the maildrop, oldest first, at most ``maxmsg`` (0 = all)."""
        with self._root() as root:
            listing, regular = _listing(root)
            # A rebuilt ledger is filled from the files, not from this worker's memory.
            entries = None if self.ledger.fresh else SCANS.get(self.path, listing, self.sizing)
            if entries is None:
                entries = self._measure_all(root, listing, regular)
                SCANS.put(self.path, listing, self.sizing, entries)
        if maxmsg:
            entries = entries[:maxmsg]
        return [Message(index, uid, size, path, base, foreign)
                for index, (uid, size, path, base, foreign) in enumerate(entries)]

    def _measure_all(self, root: int, listing: Listing, regular: Inodes | None = None
                     ) -> list[Entry]:
        """(uid, size, path, base, foreign) of every servable message, oldest first.

        With ``regular`` (the inodes readdir gave for the regular files of new/ and cur/), a
        message whose ledger entry names the same inode is taken from the ledger without a
        stat: the plain path stats and checks every file (the rule: ``_found``).
        """
        folders = {sub: _open_sub(root, sub) for sub in ("new", "cur")}
        try:
            found = self._found(folders, listing, regular or ({}, {}))
            found.sort()  # (sub, name) is unique: the last two fields are never compared
            measured = self._measure_new(folders, found)
            entries = []
            used: set[str] = set()  # RFC 1939 7: unique; an imported table may say otherwise
            imported = self.imported
            for _, base, sub, name, st, vouched in found:
                # A ledger UIDL equal to the name passed UIDL_OK (parse, or uid_for): no regex.
                uid = imported.get(base) or (base if vouched is not None and vouched.uidl == base
                                             else uid_for(base))
                if uid in used:
                    uid = uid_for(base) if uid_for(base) not in used else _digest(base)
                used.add(uid)
                if st is None:
                    if vouched.uidl != uid:  # the UIDL comes from the name or the import table
                        self.ledger.entries[base] = vouched._replace(uidl=uid)
                        self.ledger.dirty = True
                    value: tuple[int, bool] | None = (vouched.size, vouched.foreign)
                else:
                    value = self._value(folders[sub], sub, name, base, st, uid, measured)
                if value is not None:
                    entries.append((uid, value[0], f"{self.path}/{sub}/{name}", base, value[1]))
            return entries
        finally:
            for fd in folders.values():
                if fd is not None:
                    os.close(fd)

    def _found(self, folders: dict[str, int | None], listing: Listing, regular: Inodes
               ) -> list[tuple]:
        """(rank, base, sub, name, lstat or None, vouched ledger entry or None) of every listed
        name that may be a message; ``_order`` says what the rank is.

        A ledger entry vouches for a message, which is then not stat'd, when readdir says the
        name is a regular file with the inode the entry recorded when the server measured it
        (Maildir files are renamed, never rewritten: ScanCache takes the same names for the
        same messages on the same rule), its size is valid for this sizing, and the order
        needs no mtime (the previous server's, or a timed name). The user may forge the
        ledger: a forged inode at best lists, under a size the user chose, a file that RETR
        and DELE then refuse (they open and check it): their own maildrop only. A name
        swapped for a symlink or a new file has another type or inode.
        """
        found = []
        known, imported = self.ledger.entries.get, self.imported
        for sub, names, inodes in zip(("new", "cur"), listing, regular):
            for name in names:
                base = name.partition(":")[0]
                # Inline: this runs per message of a cold login.
                entry = known(base)
                if entry is not None and entry.stored >= 0 and name[:1] != "." \
                        and entry.inode >= 0 and inodes.get(name) == entry.inode:
                    if base in imported:
                        found.append((self._positions[base] - IMPORTED, base, sub, name, None, entry))
                        continue
                    head = name.partition(".")[0]
                    if head.isascii() and head.isdigit():
                        found.append((int(head), base, sub, name, None, entry))
                        continue
                st = self._servable(folders[sub], sub, name)
                if st is not None:
                    found.append((self._order(name, st), base, sub, name, st, None))
        self.vouched += sum(1 for item in found if item[4] is None)
        return found

    def _measure_new(self, folders: dict[str, int | None], found: list[tuple]
                     ) -> dict[tuple[str, str], tuple[int, bool] | None]:
        """(size, foreign) of the stat'd messages the ledger has no size for, measured several
        at a time when there are many: with a cold page cache each waits for the disk, and
        the waits overlap (the GIL is released while a thread reads)."""
        entries = self.ledger.entries
        todo = [(folders[sub], sub, name, base, st) for _, base, sub, name, st, _ in found
                if st is not None and folders[sub] is not None
                and ((entry := entries.get(base)) is None or entry.stored != st.st_size)]
        if len(todo) < PARALLEL_FROM:
            return {}
        slices = [todo[i::MEASURERS] for i in range(MEASURERS)]
        jobs = [measurers().submit(self._measure_slice, part) for part in slices]
        # Every thread is done with the folder descriptors before they are closed (whatever
        # failed): a number closed and reused would send a late open elsewhere.
        wait(jobs)
        return {(sub, name): value for part, job in zip(slices, jobs)
                for (_, sub, name, _, _), value in zip(part, job.result())}

    def _measure_slice(self, part: list[tuple]) -> list[tuple[int, bool] | None]:
        return [self._measure(*item) for item in part]

    def _value(self, folder: int | None, sub: str, name: str, base: str, st: os.stat_result,
               uid: str, measured: dict[tuple[str, str], tuple[int, bool] | None]
               ) -> tuple[int, bool] | None:
        """(size, foreign) of a stat'd message: from the ledger, else measured (and learned)."""
        value = self.ledger.known(base, st.st_size, uid, st.st_ino)
        if value is None and folder is not None:
            value = measured[sub, name] if (sub, name) in measured else \
                self._measure(folder, sub, name, base, st)
            if value is not None:
                self.ledger.learn(base, uid, value[0], st.st_size, value[1], st.st_ino)
        return value

    def _order(self, name: str, st: os.stat_result) -> int:
        """Where a message is listed (its rank, sorted first): the previous server's order
        first (so a client sees the same list after the move), then by delivery time. One
        int, not a (kind, number) pair: a scan sorts thousands of these."""
        base = name.split(":", 1)[0]
        if base in self.imported:
            return self._positions[base] - IMPORTED
        return _delivery_time(name, st)

    def _servable(self, folder: int | None, sub: str, name: str) -> os.stat_result | None:
        """The lstat of a listed name if it may be a message, else None (logged)."""
        if folder is None or name.startswith("."):
            return None
        try:
            st = os.stat(name, dir_fd=folder, follow_symlinks=False)
        except FileNotFoundError:
            return None  # moved or removed since the listing: the next scan sees it
        problem = safefs.refusal(st, self.owner)
        if problem is not None:
            self._skip(f"{sub}/{name}", problem)
            return None
        return st

    def _measure(self, folder: int, sub: str, name: str, base: str,
                 st: os.stat_result) -> tuple[int, bool] | None:
        key: Hashable = ("maildir", base, st.st_ino, st.st_size, st.st_mtime_ns)
        owner = self.owner

        def stored() -> BinaryIO:
            # The file is its own context manager (closed on exit): no @contextmanager
            # wrapper made per message of a first scan.
            return os.fdopen(safefs.open_regular(folder, name, owner, st), "rb")

        try:
            return self.sizing.size_of(key, stored)
        except FileNotFoundError:
            return None  # removed since the listing
        except UnsafeEntry as exc:
            self._skip(f"{sub}/{name}", exc.strerror)
            return None

    def open_message(self, message: Message) -> BinaryIO:
        """A binary file of the stored message; it may have moved new/ -> cur/ meanwhile.

        A name now holding a symlink, FIFO or another owner's file is FileNotFoundError (the
        session answers "no such message"), never opened for reading in a way that blocks.
        """
        with self._root() as root:
            sub, name = _where(message.path)
            try:
                try:
                    fd = _open_in(root, sub, name, self.owner)
                except FileNotFoundError:
                    sub, name = self._find(root, message.base)
                    message.path = f"{self.path}/{sub}/{name}"
                    fd = _open_in(root, sub, name, self.owner)
            except UnsafeEntry as exc:
                self._skip(f"{sub}/{name}", exc.strerror)
                raise FileNotFoundError(errno.ENOENT, "refused: " + exc.strerror,
                                        message.uid) from None
        return os.fdopen(fd, "rb")

    # -- update --------------------------------------------------------------------------------
    def commit(self, deleted: list[Message]) -> int:
        """Apply the session's deletions (UPDATE state only); returns how many of them were
        foreign and so moved to ``FOREIGN_FOLDER`` instead (IUPOP3 "lies about having
        deleted them"), whatever ``purge`` says."""
        if not deleted:
            return 0
        with self._root() as root:
            opened: list[int] = []
            try:
                trash = None if self.purge else self._folder(root, self.wastebasket, opened)
                foreign = (self._folder(root, FOREIGN_FOLDER, opened)
                           if any(m.foreign for m in deleted) else None)
                kept = self._apply(root, deleted, trash, foreign)
            finally:
                for fd in opened:
                    os.close(fd)
        if self.purge:
            self.empty_wastebasket()
        return kept

    def _apply(self, root: int, deleted: list[Message], trash: int | None,
               foreign: int | None) -> int:
        folders = {sub: _open_sub(root, sub) for sub in ("new", "cur")}
        kept = 0
        removed: list[int] = []
        try:
            for done, message in enumerate(deleted):
                fault_stop_point(done)
                try:
                    self._remove(root, folders, message, foreign if message.foreign else trash,
                                 removed)
                except FileNotFoundError:
                    continue  # already gone: another client deleted it, which is what we wanted
                except UnsafeEntry as exc:
                    self._skip(f"{exc.filename}", exc.strerror + "; not moved or deleted")
                    continue
                kept += message.foreign
        finally:
            maildirquota.record_removed(root, removed, self.owner)
            for fd in folders.values():
                if fd is not None:
                    os.close(fd)
        return kept

    def _folder(self, root: int, name: str, opened: list[int]) -> int:
        """The cur/ descriptor of a Maildir++ folder of this maildrop, made if missing."""
        made = self.made_owner(root)
        folder = safefs.open_dir(root, name, create=True, owner=made)
        opened.append(folder)
        for sub in SUBS:
            fd = safefs.open_dir(folder, sub, create=True, owner=made)
            opened.append(fd)
            if sub == "cur":
                cur = fd
        safefs.ensure_file(folder, MARKER, made)
        return cur

    def _remove(self, root: int, folders: dict[str, int | None], message: Message,
                target: int | None, removed: list[int]) -> None:
        sub, name = _where(message.path)
        st = _lstat(folders.get(sub), name)
        if st is None:
            sub, name = self._find(root, message.base)
            st = _lstat(folders.get(sub), name)
            if st is None:
                raise FileNotFoundError(errno.ENOENT, "no longer in the maildrop", name)
        problem = safefs.refusal(st, self.owner)
        if problem is not None:
            raise UnsafeEntry(0, problem, f"{sub}/{name}")
        folder = folders[sub]
        if target is None:
            os.unlink(name, dir_fd=folder)
            removed.append(maildirquota.counted_size(name, st))
            return
        # rename() is atomic: the message is in exactly one folder at every moment.
        os.rename(name, name if ":2," in name else name + ":2,", src_dir_fd=folder,
                  dst_dir_fd=target)

    def empty_wastebasket(self) -> None:
        """Remove the wastebasket's messages (``purge``): regular files of the owner only, and
        never through a symlinked folder."""
        if self.wastebasket.strip("/") == FOREIGN_FOLDER:
            return  # foreign messages are never removed
        with self._root() as root:
            try:
                trash = safefs.open_dir(root, self.wastebasket)
            except FileNotFoundError:
                return
            except UnsafeEntry as exc:
                self._skip(self.wastebasket, f"{exc.strerror}; not emptied")
                return
            removed: list[int] = []
            try:
                for sub in ("cur", "new"):
                    self._empty(trash, sub, removed)
            finally:
                os.close(trash)
            maildirquota.record_removed(root, removed, self.owner)

    def _empty(self, trash: int, sub: str, removed: list[int]) -> None:
        where = f"{self.wastebasket}/{sub}"
        try:
            folder = safefs.open_dir(trash, sub)
        except FileNotFoundError:
            return
        except UnsafeEntry as exc:
            self._skip(where, f"{exc.strerror}; not emptied")
            return
        try:
            for name in os.listdir(folder):
                try:
                    st = os.stat(name, dir_fd=folder, follow_symlinks=False)
                    problem = safefs.refusal(st, self.owner)
                    if problem is not None:
                        self._skip(f"{where}/{name}", problem + "; not deleted")
                        continue
                    os.unlink(name, dir_fd=folder)
                    removed.append(maildirquota.counted_size(name, st))
                except FileNotFoundError:
                    pass
        finally:
            os.close(folder)

    def _find(self, root: int, base: str) -> tuple[str, str]:
        """(sub, name) of the message ``base`` now (moved new/ -> cur/ or flagged meanwhile)."""
        for sub in ("cur", "new"):
            folder = _open_sub(root, sub)
            if folder is None:
                continue
            try:
                for name in os.listdir(folder):
                    if name == base or name.startswith(base + ":"):
                        return sub, name
            finally:
                os.close(folder)
        raise FileNotFoundError(errno.ENOENT, "no longer in the maildrop", base)


def _lstat(folder: int | None, name: str) -> os.stat_result | None:
    """lstat of ``name`` in ``folder`` (never dir_fd=None: that would be the working dir)."""
    if folder is None:
        return None
    try:
        return os.stat(name, dir_fd=folder, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _open_in(root: int, sub: str, name: str, owner: int | None) -> int:
    folder = safefs.open_dir(root, sub)
    try:
        return safefs.open_regular(folder, name, owner)
    finally:
        os.close(folder)


def _delivery_time(name: str, st: os.stat_result) -> int:
    """Maildir names start with the delivery time; other names fall back to the file's mtime."""
    head = name.split(".", 1)[0]
    if head.isascii() and head.isdigit():  # "²".isdigit() is true, int("²") fails
        return int(head)
    return int(st.st_mtime)
