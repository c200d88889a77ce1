"""The embedded default: a state folder with a demo user and a few sample messages.

Called by the settings resolver for ``-demo``; idempotent, so a second start keeps what the
first one (and the demo user's deletions) left.
"""

from __future__ import annotations

import os
import time

DEMO_USER = "demo"
DEMO_PASSWORD = "demo"

_SAMPLES = (
    ("Welcome to iupop3",
     "This is the first sample message of the iupop3 demo.\n"
     "Fetch it with:  curl -u demo:demo pop3://127.0.0.1:1110/1\n"),
    ("A line that starts with a dot",
     "The next line starts with a dot and is byte-stuffed on the wire:\n"
     ".like this\n"
     "..and this one has two.\n"),
    ("IUPOP3, 1994",
     "IUPOP3 was Indiana University's permanent, multithreaded POP3 server for VMS.\n"
     "iupop3 keeps its behaviour and runs it on Linux.\n"),
)


def ensure_state(state_dir: str) -> tuple[str, str]:
    """Create the state folder if missing; return (users file, mail spec)."""
    users = os.path.join(state_dir, "users")
    mail_root = os.path.join(state_dir, "mail")
    os.makedirs(state_dir, exist_ok=True)
    if not os.path.exists(users):
        with open(users, "w") as fh:
            fh.write("# iupop3 demo users, Dovecot passwd-file format:\n"
                     "# user:{SCHEME}password:uid:gid:gecos:home:shell:extra\n"
                     f"{DEMO_USER}:{{PLAIN}}{DEMO_PASSWORD}::::::\n")
        maildir = os.path.join(mail_root, DEMO_USER)
        write_samples(maildir)
    return users, "maildir:" + os.path.join(mail_root, "%u")


def write_samples(maildir: str) -> None:
    for sub in ("new", "cur", "tmp"):
        os.makedirs(os.path.join(maildir, sub), exist_ok=True)
    now = int(time.time())
    for n, (subject, body) in enumerate(_SAMPLES):
        text = (f"From: iupop3 <postmaster@localhost>\n"
                f"To: {DEMO_USER}@localhost\n"
                f"Subject: {subject}\n"
                f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime(now + n))}\n"
                f"Message-ID: <demo-{n + 1}@iupop3>\n\n{body}")
        name = f"{now + n}.M{n}P{os.getpid()}.demo"
        path = os.path.join(maildir, "new", name)
        with open(path, "w") as fh:
            fh.write(text)
        os.utime(path, (now + n, now + n))
