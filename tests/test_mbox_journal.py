"""The mbox UPDATE journal (worker.mboxjournal, issue 11 item 7): a commit killed at each of its
crash points (after the journal, inside the append, after it, after the rename) leaves every
message exactly once, in the spool or the wastebasket, once the next lock has settled it; a
failed commit undoes its appends at once; a journal planted by someone else is never acted on.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import ROOT
from worker import mboxjournal
from worker.mbox import Mbox
from worker.mboxformat import format_record
from worker.mboxjournal import Append, Journal, Refused, decode

WHEN = 1_764_000_000
MESSAGES = [b"Subject: m%d\nMessage-ID: <m%d@example.org>\n\nbody %d\n%s" % (n, n, n, b"x\n" * 40)
            for n in range(6)]
FOREIGN = b"Subject: binary\nMessage-ID: <bin@example.org>\n\n\x00\x01\x02 not text\n"
OLD_TRASH = format_record(b"Subject: old\n\nalready in the wastebasket\n", "a@example.org", WHEN)
DELETED = (1, 3, 4)  # 4 is the foreign one: it goes to alice.MAIL


class Drop:
    """A spool with six messages (one foreign) and a wastebasket that already holds one."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.spool = folder / "alice"
        self.trash = folder / "alice.Trash"
        self.foreign = folder / "alice.MAIL"
        self.journal = folder / ".alice.iupop3.journal"
        texts = [FOREIGN if n == 4 else m for n, m in enumerate(MESSAGES)]
        self.records = [format_record(t, "mda@example.org", WHEN + n) for n, t in enumerate(texts)]
        self.old = b"".join(self.records)
        self.new = b"".join(r for n, r in enumerate(self.records) if n not in DELETED)
        self.trashed = OLD_TRASH + self.records[1] + self.records[3]
        self.spool.write_bytes(self.old)
        self.trash.write_bytes(OLD_TRASH)

    def settled(self) -> int:
        """A next session: lock and scan (which settles a journal); the number of messages."""
        box = Mbox(str(self.spool))
        box.lock_wait = 5  # the dead child's dot-locks name a dead pid: taken over at once
        box.lock()
        try:
            return len(box.scan())
        finally:
            box.unlock()

    def assert_old(self) -> None:
        assert self.spool.read_bytes() == self.old
        assert self.trash.read_bytes() == OLD_TRASH  # cut back to its length before, not to 0
        assert self.foreign.read_bytes() == b""  # made by the append, emptied by the undo
        assert not self.journal.exists()

    def assert_new(self) -> None:
        assert self.spool.read_bytes() == self.new
        assert self.trash.read_bytes() == self.trashed
        assert self.foreign.read_bytes() == self.records[4]
        assert not self.journal.exists()


# kill -9 of itself at one point of the commit: as deterministic as a crash can be
CHILD = textwrap.dedent("""
    import os, signal, sys
    from worker import mbox
    spool, point = sys.argv[1], sys.argv[2]
    copy = mbox._copy_range
    def die():
        os.kill(os.getpid(), signal.SIGKILL)
    def copy_half_then_die(source, fd, start, stop, touch, hook=None):
        if hook is None and os.readlink(f"/proc/self/fd/{fd}").endswith(".Trash"):
            copy(source, fd, start, start + (stop - start) // 2, touch)
            die()
        return copy(source, fd, start, stop, touch, hook)
    if point == "inside the append":
        mbox._copy_range = copy_half_then_die
    box = mbox.Mbox(spool)
    box.hook = lambda stage: die() if stage == point else None
    box.lock()
    found = box.scan()
    box.commit([found[1], found[3], found[4]])
    print("finished", flush=True)
""")


@pytest.mark.parametrize("point", ["journaled", "inside the append", "appended", "written",
                                   "renamed"])
def test_kill_at_each_crash_point_leaves_each_message_once(tmp_path, point):
    """kill -9 after the journal is written, inside the wastebasket append, after the appends,
    after the new spool is written, after the rename: the journal is there; the next lock
    restores the old spool's wastebasket and USER.MAIL byte for byte (before the rename) or
    keeps the committed ones (after it), and removes the journal."""
    drop = Drop(tmp_path)
    child = subprocess.run([sys.executable, "-c", CHILD, str(drop.spool), point], cwd=ROOT,
                           capture_output=True, timeout=60)
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()[-2000:]
    assert drop.journal.exists()
    assert (drop.journal.stat().st_mode & 0o777, drop.journal.stat().st_uid) == (0o600,
                                                                                 os.geteuid())
    if point == "inside the append":
        cut = drop.trash.read_bytes()
        assert len(OLD_TRASH) < len(cut) < len(drop.trashed)  # a cut copy, as a crash leaves
    renamed = point == "renamed"
    assert drop.spool.read_bytes() == (drop.new if renamed else drop.old)
    assert drop.settled() == (3 if renamed else 6)
    drop.assert_new() if renamed else drop.assert_old()


def test_a_commit_after_the_undo_applies_the_deletions_once(tmp_path):
    """After an undone commit, the user's next QUIT applies the same deletions: each deleted
    message is in the wastebasket once, each kept one in the spool once."""
    drop = Drop(tmp_path)
    child = subprocess.run([sys.executable, "-c", CHILD, str(drop.spool), "appended"], cwd=ROOT,
                           capture_output=True, timeout=60)
    assert child.returncode == -signal.SIGKILL
    box = Mbox(str(drop.spool))
    box.lock_wait = 5
    box.lock()
    found = box.scan()
    assert box.commit([found[1], found[3], found[4]]) == 1
    box.unlock()
    drop.assert_new()


def test_a_failed_rewrite_undoes_the_appends_at_once(tmp_path):
    """An error after the appends (here while the new spool is written): the commit raises,
    the wastebasket and USER.MAIL are cut back at once and no journal is left."""
    drop = Drop(tmp_path)
    box = Mbox(str(drop.spool))
    box.lock()
    found = box.scan()

    def fail(stage: str) -> None:
        if stage == "written":
            raise OSError(28, "No space left on device")

    box.hook = fail
    with pytest.raises(OSError):
        box.commit([found[1], found[3], found[4]])
    box.unlock()
    drop.assert_old()


def test_no_journal_when_nothing_is_appended(tmp_path):
    """With purge and no foreign message nothing is appended: the commit writes no journal."""
    drop = Drop(tmp_path)
    box = Mbox(str(drop.spool), purge=True)
    box.lock()
    found = box.scan()
    seen = []
    box.hook = seen.append
    box.commit([found[1]])
    box.unlock()
    assert "journaled" not in seen and "renamed" in seen and not drop.journal.exists()


# -- a journal someone else wrote ---------------------------------------------------------------
def _forged(drop: Drop) -> bytes:
    """A well-formed journal that would cut the wastebasket to nothing if it were believed."""
    spool, trash = drop.spool.stat(), drop.trash.stat()
    with open(drop.spool, "rb") as fh:
        crc = mboxjournal.prefix_crc(fh.fileno(), len(drop.old))
    return Journal(spool.st_dev, spool.st_ino, len(drop.old), crc,
                   (Append("wastebasket", trash.st_dev, trash.st_ino, 0, trash.st_size),)
                   ).encode()


def test_our_own_journal_format_would_cut_the_wastebasket(tmp_path):
    """The forged journal of the tests below is one the server acts on when it wrote it: the
    wastebasket is cut to the recorded length (so the refusals below are the owner checks)."""
    drop = Drop(tmp_path)
    drop.journal.write_bytes(_forged(drop))
    drop.journal.chmod(0o600)
    assert drop.settled() == 6
    assert drop.trash.read_bytes() == b"" and not drop.journal.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a file to another uid")
def test_a_journal_of_another_uid_is_removed_unread(tmp_path):
    """A journal planted by another user (the spool directory is group- or user-writable):
    removed, never acted on; the wastebasket is intact."""
    drop = Drop(tmp_path)
    drop.journal.write_bytes(_forged(drop))
    os.chown(drop.journal, 65534, 65534)
    assert drop.settled() == 6
    assert drop.trash.read_bytes() == OLD_TRASH and not drop.journal.exists()


@pytest.mark.parametrize("kind", ["symlink", "hardlink", "fifo", "huge", "garbage"])
def test_a_planted_journal_is_removed_and_its_target_untouched(tmp_path, kind):
    """A symlink (to a forged journal or a victim), a hard link, a FIFO, a huge file or garbage
    at the journal's name: no blocked read, nothing followed or truncated; it is removed and a
    commit works afterwards."""
    drop = Drop(tmp_path)
    victim = tmp_path / "victim"
    victim.write_bytes(_forged(drop))
    if kind == "symlink":
        drop.journal.symlink_to(victim)
    elif kind == "hardlink":
        os.link(victim, drop.journal)
    elif kind == "fifo":
        os.mkfifo(drop.journal)
    else:
        drop.journal.write_bytes(b"9" * 5_000_000 if kind == "huge" else b"\x00garbage\n")
    box = Mbox(str(drop.spool))
    box.lock()
    found = box.scan()
    assert not drop.journal.exists() and not drop.journal.is_symlink()
    assert drop.trash.read_bytes() == OLD_TRASH and victim.read_bytes() == _forged(drop)
    box.commit([found[1], found[3], found[4]])
    box.unlock()
    drop.assert_new()


def test_a_journal_whose_spool_was_replaced_keeps_the_copies(tmp_path):
    """A journal whose spool is no longer the one it names (the rename happened, or another
    program rewrote the spool): the wastebasket copies stay, nothing can be lost."""
    drop = Drop(tmp_path)
    drop.journal.write_bytes(_forged(drop))
    drop.journal.chmod(0o600)
    replacement = tmp_path / "replacement"
    replacement.write_bytes(drop.new)
    os.rename(replacement, drop.spool)
    assert drop.settled() == 3
    assert drop.trash.read_bytes() == OLD_TRASH and not drop.journal.exists()


def test_a_wastebasket_appended_to_since_is_left_as_it_is(tmp_path):
    """A wastebasket that grew past the journal's planned end (another program appended after
    the killed commit): left whole rather than cut through someone else's mail."""
    drop = Drop(tmp_path)
    drop.journal.write_bytes(_forged(drop))
    drop.journal.chmod(0o600)
    with open(drop.trash, "ab") as fh:
        fh.write(format_record(b"Subject: later\n\nmoved here by a MUA\n"))
    before = drop.trash.read_bytes()
    assert drop.settled() == 6
    assert drop.trash.read_bytes() == before and not drop.journal.exists()


# -- the format -----------------------------------------------------------------------------------
def test_journal_round_trip_and_every_cut_refused():
    """decode(encode(j)) == j; every cut of an encoded journal (a write a crash ended) and
    every malformed field is Refused, never half read."""
    journal = Journal(2049, 123456, 987654, 0xFFFFFFFF,
                      (Append("foreign", 2049, 11, 0, 500), Append("wastebasket", 2049, 12, 7, 9)))
    data = journal.encode()
    assert decode(data) == journal
    for n in range(len(data)):
        with pytest.raises(Refused):
            decode(data[:n])
    bad = [data.replace(b"wastebasket", b"foreign"),          # one kind twice
           data.replace(b"wastebasket", b"../../etc/passwd"),  # a path is never taken from it
           data.replace(b" 7 9", b" 9 7"),                      # an append that shrinks
           data.replace(b"4294967295", b"4294967296"),          # not a crc32
           data.replace(b"987654", b"9" * 21),                  # a number too long
           data.replace(b"987654", b"-1"),
           data.replace(b"987654", "٣".encode()),               # a non-ASCII digit
           data.replace(b"123456", b"123456 7"),
           data.replace(b"iupop3-mbox-journal 1", b"iupop3-mbox-journal 2"),
           data + b"x" * mboxjournal.JOURNAL_MAX]
    for forged in bad:
        with pytest.raises(Refused):
            decode(forged)
