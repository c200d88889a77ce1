"""The big mailbox's cold logins, iupop3 against a private Dovecot (issue 13 item 4, issue 15).

    python3 bench/coldlogin.py [--messages 5000] [--rounds 5] [--no-dovecot]

One user, N messages of 1-12 KiB in a Maildir (names without S=/W=: both servers size them).
Each round starts a server with the page cache of its mail files dropped (posix_fadvise
DONTNEED, as bench/ does: only our files) and times connect + login + STAT + LIST + UIDL:

- "restart": a maildrop the server has seen before (iupop3's ledger, Dovecot's index exist);
- "first": a fresh copy of the mail (no ledger, no index): every message is measured.

Each server has its own hard-linked copy (cp -al: the same files, so the same page cache;
Dovecot's dovecot-uidlist would otherwise be imported by iupop3). The servers and modes
alternate round by round (FACTS.md: compare within one run); prints the median, the spread,
the server's CPU per login (its process tree, clock ticks of 10 ms: a mean over the rounds)
and the ratio to Dovecot. Dovecot needs root here (it will not serve mail as root: the mail
belongs to nobody).
"""

from __future__ import annotations

import argparse
import os
import poplib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from bench.mailgen import (deliver, ensure_maildir, evict_page_cache,  # noqa: E402
                           user, write_iupop3_users)
from bench.servers import Dovecot, Iupop3, Server, tree_cpu_seconds  # noqa: E402

ALICE = user("alice")
NOBODY = (65534, 65534)  # Dovecot will not serve mail as root (bench/run.py MAIL_OWNER)
MODES = ("restart", "first")


def cold_login(server: Server) -> tuple[float, float]:
    """(seconds for connect+login+STAT+LIST+UIDL, server CPU seconds meanwhile)."""
    cpu = tree_cpu_seconds(server.root_pid)
    started = time.perf_counter()
    client = poplib.POP3("127.0.0.1", server.port, timeout=120)
    client.user(ALICE.name)
    client.pass_(ALICE.password)
    count, _ = client.stat()
    listed = client.list()[1]
    uids = client.uidl()[1]
    elapsed = time.perf_counter() - started
    cpu = tree_cpu_seconds(server.root_pid) - cpu  # before QUIT: Dovecot's pop3 still lives
    client.quit()
    if not count == len(listed) == len(uids):
        raise SystemExit(f"{server.name}: STAT {count}, LIST {len(listed)}, UIDL {len(uids)}")
    return elapsed, cpu


def make_master(work: str, messages: int, owner: tuple[int, int] | None) -> str:
    master = os.path.join(work, "master")
    box = os.path.join(master, ALICE.name, "Maildir")
    ensure_maildir(box)
    for seed in range(1, messages + 1):
        deliver(box, seed, 1024 + (seed * 7919) % (11 * 1024))
    if owner is not None:
        subprocess.run(["chown", "-R", f"{owner[0]}:{owner[1]}", master], check=True)
    return master


def copy_of(master: str, where: str) -> str:
    shutil.rmtree(where, ignore_errors=True)
    subprocess.run(["cp", "-al", master, where], check=True)
    return where


def one_login(server: Server, mail_root: str) -> tuple[float, float]:
    evict_page_cache(mail_root)
    server.start(mail_root, 10)
    try:
        return cold_login(server)
    finally:
        server.stop()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-dovecot", action="store_true", help="iupop3 alone")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    with_dovecot = not args.no_dovecot and Dovecot.available() and os.geteuid() == 0
    work = tempfile.mkdtemp(prefix="iupop3-coldlogin-")
    os.chmod(work, 0o755)  # Dovecot's auth and mail processes (not root) read below it
    try:
        master = make_master(work, args.messages, NOBODY if with_dovecot else None)
        users = os.path.join(work, "users")
        write_iupop3_users(users, [ALICE])
        servers: list[Server] = [Iupop3(os.path.join(work, "iupop3"), users, workers=1)]
        if with_dovecot:
            servers.append(Dovecot(os.path.join(work, "dovecot"), [ALICE], *NOBODY))
        seen = {s.name: copy_of(master, os.path.join(work, f"seen-{s.name}")) for s in servers}
        for server in servers:  # the first login ever: writes the ledger, builds the index
            one_login(server, seen[server.name])
        times = {(s.name, m): [] for s in servers for m in MODES}
        cpus = {(s.name, m): [] for s in servers for m in MODES}
        load = os.getloadavg()[0]
        for _ in range(args.rounds):
            for mode in MODES:
                for server in servers:
                    root = seen[server.name] if mode == "restart" else \
                        copy_of(master, os.path.join(work, f"fresh-{server.name}"))
                    elapsed, cpu = one_login(server, root)
                    times[server.name, mode].append(elapsed)
                    cpus[server.name, mode].append(cpu)
        report(args, times, cpus, load)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def report(args: argparse.Namespace, times: dict, cpus: dict, load: float) -> None:
    print(f"{args.messages} messages of 1-12 KiB, connect+login+STAT+LIST+UIDL, page cache "
          f"dropped, {args.rounds} rounds; load average {load:.2f} -> {os.getloadavg()[0]:.2f}")
    for (name, mode), values in times.items():
        median = statistics.median(values)
        line = (f"  {mode:8} {name:8} median {median * 1000:6.0f} ms (min {min(values) * 1000:.0f}"
                f", max {max(values) * 1000:.0f}); server CPU "
                f"{statistics.mean(cpus[name, mode]) * 1000:.0f} ms per login")
        peer = times.get(("dovecot", mode))
        if name != "dovecot" and peer:
            line += (f"; {median / statistics.median(peer):.2f}x Dovecot's time, "
                     f"{statistics.mean(cpus[name, mode]) / max(statistics.mean(cpus['dovecot', mode]), 1e-3):.2f}x its CPU")
        print(line)


if __name__ == "__main__":
    sys.exit(main())
