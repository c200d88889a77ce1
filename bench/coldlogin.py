"""A cold login after a restart, with and without the maildrop ledger (issue 13 item 4).

    python3 bench/coldlogin.py [--messages 5000] [--rounds 5]

One user, N messages of 2-20 KB in a Maildir. Each round restarts iupop3 with the page cache
of the mail files dropped (posix_fadvise DONTNEED, as bench/ does: only our files), then times
login + STAT + LIST + UIDL; "without" removes .iupop3.ledger first, so the server measures
every message again (what it did before the ledger). The two modes alternate round by round
(FACTS.md: compare within one run). Prints the median and the spread of each.
"""

from __future__ import annotations

import argparse
import os
import poplib
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from bench.mailgen import deliver, ensure_maildir, evict_page_cache  # noqa: E402
from bench.servers import Iupop3  # noqa: E402

PASSWORD = "pw-alice"


def cold_login(port: int) -> float:
    started = time.perf_counter()
    client = poplib.POP3("127.0.0.1", port, timeout=120)
    client.user("alice")
    client.pass_(PASSWORD)
    client.stat()
    client.list()
    client.uidl()
    elapsed = time.perf_counter() - started
    client.quit()
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="iupop3-coldlogin-")
    try:
        mail_root = os.path.join(work, "mail")
        box = os.path.join(mail_root, "alice", "Maildir")
        ensure_maildir(box)
        for seed in range(1, args.messages + 1):
            deliver(box, seed, 2000 + (seed * 7919) % 18000)
        users = os.path.join(work, "users")
        with open(users, "w") as fh:
            fh.write(f"alice:{{PLAIN}}{PASSWORD}::::::\n")
        server = Iupop3(os.path.join(work, "server"), users, workers=1)
        times: dict[str, list[float]] = {"with ledger": [], "without ledger": []}
        server.start(mail_root, 10)
        cold_login(server.port)  # the first login measures everything and writes the ledger
        server.stop()
        for _ in range(args.rounds):
            for mode in times:
                if mode == "without ledger":
                    os.unlink(os.path.join(box, ".iupop3.ledger"))
                evict_page_cache(mail_root)
                server.start(mail_root, 10)
                times[mode].append(cold_login(server.port))
                server.stop()
        for mode, values in times.items():
            print(f"{args.messages} messages, cold login+STAT+LIST+UIDL {mode}: median "
                  f"{statistics.median(values) * 1000:.0f} ms (min {min(values) * 1000:.0f}, "
                  f"max {max(values) * 1000:.0f}, {len(values)} rounds)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
