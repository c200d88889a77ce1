"""Deterministic test mail: messages, Maildirs and users files for the benchmark.

Every message names its own seed and size in an ``X-Bench-Seed`` header, so any process can
rebuild the exact stored bytes and check a RETR reply against them without a shared table.
Bodies carry lines that start with "." (and lines that are only ".") to exercise dot-stuffing.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable
from dataclasses import dataclass

BASE_TIME = 1_700_000_000  # Maildir names start with a delivery time; oldest first = by seed
_WORDS = ("mail pop3 server client message maildir octets delivery inbox header body line "
          "quick brown fox jumps over lazy dog indiana university vax vms wastebasket "
          "retrieve delete update session greeting capability unique listing").split()


def _make_block(length: int = 2 * 1024 * 1024) -> bytes:
    """A fixed pseudo-random text with LF line ends, some lines starting with '.'."""
    rng = random.Random(19940101)
    lines: list[str] = []
    total = 0
    while total < length:
        roll = rng.random()
        if roll < 0.01:
            line = "."
        elif roll < 0.04:
            line = "." + " ".join(rng.choices(_WORDS, k=rng.randint(1, 8)))
        elif roll < 0.07:
            line = ""
        else:
            line = " ".join(rng.choices(_WORDS, k=rng.randint(1, 12)))
        lines.append(line)
        total += len(line) + 1
    return ("\n".join(lines) + "\n").encode("ascii")


BLOCK = _make_block()


def make_message(seed: int, size: int) -> bytes:
    """The stored bytes (LF line ends) of message ``seed``, about ``size`` octets long."""
    head = (f"Return-Path: <sender{seed % 97}@bench.invalid>\n"
            f"X-Bench-Seed: {seed} {size}\n"
            f"From: Sender {seed % 97} <sender{seed % 97}@bench.invalid>\n"
            f"To: <rcpt@bench.invalid>\n"
            f"Subject: benchmark message {seed}\n"
            f"Date: Thu, 01 Dec 1994 12:00:00 -0500\n"
            f"Message-ID: <{seed}.{size}@bench.invalid>\n"
            f"\n").encode("ascii")
    n = max(0, size - len(head))
    if n >= len(BLOCK) - 1:
        raise ValueError(f"message size {size} too large for the text block")
    offset = (seed * 7919) % (len(BLOCK) - n)
    body = BLOCK[offset:offset + n]
    return head + body[:body.rfind(b"\n") + 1]


def seed_of(headers: bytes) -> tuple[int, int] | None:
    """(seed, size) from a message's header block, or None when it has none."""
    for line in headers.split(b"\n"):
        if line[:14].lower() == b"x-bench-seed: ":
            seed, _, size = line[14:].strip().partition(b" ")
            if seed.isdigit() and size.isdigit():
                return int(seed), int(size)
    return None


def maildir_name(seed: int) -> str:
    """A Maildir unique name in the style of a local delivery agent (no S=/W= size fields:
    both servers must find sizes themselves, the common case for mail delivered by Postfix)."""
    return f"{BASE_TIME + seed}.M{seed}P{seed % 30011}.bench"


def ensure_maildir(path: str) -> None:
    for sub in ("cur", "new", "tmp"):
        os.makedirs(os.path.join(path, sub), exist_ok=True)


def deliver(maildir: str, seed: int, size: int) -> str:
    """Deliver one message the Maildir way: write in tmp/, rename into new/."""
    name = maildir_name(seed)
    tmp = os.path.join(maildir, "tmp", name)
    with open(tmp, "wb") as fh:
        fh.write(make_message(seed, size))
    final = os.path.join(maildir, "new", name)
    os.rename(tmp, final)
    return final


@dataclass(frozen=True)
class User:
    name: str
    password: str


def user(name: str) -> User:
    return User(name, f"pw-{name}")


class SeedCounter:
    """Hands out unique message seeds (one per message in the whole run)."""

    def __init__(self, start: int = 1) -> None:
        self.next = start

    def take(self) -> int:
        seed, self.next = self.next, self.next + 1
        return seed


def fill_mailbox(root: str, who: User, sizes: Iterable[int], seeds: SeedCounter) -> int:
    """Create ROOT/NAME/Maildir with one message per size; returns the number written."""
    maildir = os.path.join(root, who.name, "Maildir")
    ensure_maildir(maildir)
    count = 0
    for size in sizes:
        seed = seeds.take()
        with open(os.path.join(maildir, "new", maildir_name(seed)), "wb") as fh:
            fh.write(make_message(seed, size))
        count += 1
    return count


def write_iupop3_users(path: str, users: Iterable[User]) -> None:
    """iupop3 reads Dovecot's passwd-file format: ``name:{PLAIN}password::::::``."""
    with open(path, "w") as fh:
        for u in users:
            fh.write(f"{u.name}:{{PLAIN}}{u.password}::::::\n")


def write_dovecot_passwd(path: str, users: Iterable[User], mail_root: str, uid: int,
                         gid: int) -> None:
    """Dovecot passwd-file: the same users and passwords; home = MAIL_ROOT/NAME."""
    with open(path, "w") as fh:
        for u in users:
            fh.write(f"{u.name}:{{PLAIN}}{u.password}:{uid}:{gid}::{mail_root}/{u.name}::\n")


def evict_page_cache(root: str) -> int:
    """Drop the page cache of every file under ROOT (posix_fadvise DONTNEED), only ours.

    A 'cold' run should not find the messages in memory; dropping the whole machine's cache
    would disturb the other users of this shared machine.
    """
    count = 0
    for folder, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                count += 1
            finally:
                os.close(fd)
    return count


INDEX_PREFIXES = ("dovecot", ".iupop3")  # Dovecot's index and uidlist, iupop3's ledger


def index_files(maildir: str) -> dict[str, int]:
    """The servers' own files at the top of a Maildir (name: size), for the report."""
    found = {}
    for entry in sorted(os.scandir(maildir), key=lambda e: e.name):
        if entry.is_file(follow_symlinks=False) and entry.name.startswith(INDEX_PREFIXES):
            found[entry.name] = entry.stat().st_size
    return found
