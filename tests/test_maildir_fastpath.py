"""Differential tests of the Maildir scan's fast path (the ledger's entry, by readdir's inode,
stands in for a stat) against the plain path (a stat and a check per file): the same
messages, sizes, UIDLs and order, whatever changed in the Maildir since the ledger was
written (issue 15)."""

from __future__ import annotations

import os

import pytest

from worker import maildir as maildirs
from worker.maildir import Maildir, ensure_maildir

NAMES = ["1700000003.M3P1.host", "1700000001.M1P1.host", "1700000002.M2P1.host:2,S",
         "notimed-name", "1700000009.M9P9.h\u00e9st", ".hidden", "1700000005.M5P1.host"]


def _fill(box) -> None:
    ensure_maildir(str(box))
    for i, name in enumerate(NAMES):
        sub = "cur" if ":2," in name else "new"
        (box / sub / name).write_bytes(b"Subject: %d\n\n" % i + b"line\n" * (i * 7 + 1))


def _scan(box, plain: bool = False) -> tuple[list, Maildir]:
    """A new session's view (a fresh worker: no scan cache); ``plain`` ignores readdir's
    inodes, so every message is stat'd and checked."""
    maildirs.SCANS._scans.clear()
    drop = Maildir(str(box))
    drop.lock()
    try:
        with drop._root() as root:
            listing, regular = maildirs._listing(root)
            entries = drop._measure_all(root, listing, None if plain else regular)
        drop.save_ledger()
    finally:
        drop.unlock()
    return entries, drop


def _agree(box) -> Maildir:
    fast, drop = _scan(box)
    plain, _ = _scan(box, plain=True)
    assert fast == plain
    return drop


def _dovecot_list(box) -> None:
    (box / "dovecot-uidlist").write_text(
        "3 V1700000000 N9 Gabc\n1 :1700000005.M5P1.host\n2 :1700000003.M3P1.host\n")


CHANGES = {
    "nothing": lambda box: None,
    "new to cur with flags": lambda box: os.rename(box / "new" / NAMES[0],
                                                   box / "cur" / (NAMES[0] + ":2,RS")),
    "replaced by a symlink": lambda box: (os.unlink(box / "new" / NAMES[0]),
                                          os.symlink("/etc/passwd", box / "new" / NAMES[0])),
    # The Maildir way (written in tmp/, renamed over): a new inode. Deleting a message and
    # making another of the same unique name may reuse the inode; that is taken for the same
    # message, as ScanCache takes the same names for the same messages.
    "replaced by a new file": lambda box: ((box / "tmp" / "x").write_bytes(b"x\n" * 999),
                                           os.rename(box / "tmp" / "x", box / "new" / NAMES[1])),
    "replaced by a FIFO": lambda box: (os.unlink(box / "new" / NAMES[1]),
                                       os.mkfifo(box / "new" / NAMES[1])),
    "removed": lambda box: os.unlink(box / "new" / NAMES[6]),
    "delivered": lambda box: (box / "new" / "1700000000.M0P1.host").write_bytes(b"a\n\nb\n"),
    "hard link of another": lambda box: os.link(box / "new" / NAMES[1],
                                                box / "cur" / "1700000000.M7P7.host:2,"),
}


@pytest.mark.parametrize("imported", [False, True], ids=["own", "imported"])
@pytest.mark.parametrize("change", CHANGES)
def test_fast_path_lists_what_the_plain_path_lists(tmp_path, change, imported):
    """After any change to the Maildir since the ledger was written, a login that trusts the
    ledger by inode lists exactly what one that stats every file lists."""
    box = tmp_path / "Maildir"
    _fill(box)
    if imported:
        _dovecot_list(box)
    _scan(box)                       # first sight: every message measured, ledger written
    _, drop = _scan(box)
    assert drop.vouched == 4         # every timed, servable ASCII name: from the ledger
    CHANGES[change](box)
    _agree(box)
    _agree(box)                      # and again, with what that scan wrote


def test_version_1_ledger_is_read_and_upgraded(tmp_path):
    """A ledger without inodes (format 1) serves its sizes through the plain path, and the
    next ledger written lets the login after it take the fast path."""
    box = tmp_path / "Maildir"
    _fill(box)
    first, _ = _scan(box)
    text = (box / ".iupop3.ledger").read_text().replace("iupop3-ledger 2", "iupop3-ledger 1")
    (box / ".iupop3.ledger").write_text(
        "\n".join(line.rsplit(" ", 1)[0] if line.startswith("m ") else line
                  for line in text.split("\n")))
    again, drop = _scan(box)
    assert (again, drop.vouched, drop.ledger.measured) == (first, 0, 0)
    _, drop = _scan(box)
    assert drop.vouched == 4


@pytest.mark.skipif(os.geteuid() != 0, reason="needs a file of another uid (chown)")
def test_forged_inode_lists_at_most_a_file_that_is_then_refused(tmp_path):
    """A ledger the user forged to vouch for a hard link to someone else's file gains nothing:
    the name is listed with the size the user wrote, and RETR cannot open it."""
    box = tmp_path / "Maildir"
    _fill(box)
    foreign = tmp_path / "secret"
    foreign.write_bytes(b"not yours\n")
    os.chown(foreign, 4242, 4242)
    name = "1700000000.M8P8.host"
    os.link(foreign, box / "new" / name)
    _scan(box)
    assert name not in (box / ".iupop3.ledger").read_text()  # the plain path refused it
    with open(box / ".iupop3.ledger", "a") as fh:
        fh.write(f"m {name} {name} 77 10 0 - {os.stat(foreign).st_ino}\n")
    maildirs.SCANS._scans.clear()
    drop = Maildir(str(box))
    drop.lock()
    try:
        listed = {m.base: m for m in drop.scan()}
        assert listed[name].size == 77
        with pytest.raises(FileNotFoundError):
            drop.open_message(listed[name])
    finally:
        drop.unlock()


def test_many_messages_measured_at_once_give_the_sequential_result(tmp_path, monkeypatch):
    """A first scan of many messages measures them several at a time (overlapping the disk
    waits of a cold cache): the same list, sizes, UIDLs, skips and ledger as one at a time."""
    box = tmp_path / "Maildir"
    ensure_maildir(str(box))
    count = 3 * maildirs.PARALLEL_FROM
    for i in range(count):
        sub = "cur" if i % 3 else "new"
        name = f"{1700000000 + i % 17}.M{i}P1.host" + (":2,S" if sub == "cur" else "")
        (box / sub / name).write_bytes(b"Subject: %d\r\n\n" % i + b"x\r\ny\n" * (i % 13))
    os.symlink("/etc/passwd", box / "new" / "1700000000.Mlink.host")
    os.mkfifo(box / "new" / "1700000000.Mfifo.host")
    parallel, drop = _scan(box)
    ledger_text = (box / ".iupop3.ledger").read_text().split("\n", 3)[3]
    os.unlink(box / ".iupop3.ledger")
    monkeypatch.setattr("worker.maildir.PARALLEL_FROM", 10**9)
    sequential, _ = _scan(box)
    assert parallel == sequential and len(parallel) == count
    assert (box / ".iupop3.ledger").read_text().split("\n", 3)[3] == ledger_text
