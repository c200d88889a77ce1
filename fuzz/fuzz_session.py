"""Coverage-guided fuzzing of the POP3 command parser: ``Session.handle_line`` (sans-IO) with a
real ServerContext and a real Maildir, fed the input as command lines.

Run by ``make fuzz`` (atheris, libFuzzer options after the script: -max_total_time=60 DIR).
A crash is an exception out of handle_line, an ERROR logged (a traceback), or a reply that is
not +OK, -ERR or a SASL challenge.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile

import atheris

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

with atheris.instrument_imports():
    from shared import settings as settings_mod
    from shared.stats import StatsArea
    from shared.users import parse_users
    from worker.context import build_context
    from worker.pop3 import Session

USERS = "alice:{PLAIN}wonderland::::::\nbob:{PLAIN}builder pass::::::\n"
MESSAGES = [b"From: a@example.org\nSubject: one\n\nBody one.\n",
            b"Subject: dots\n\n.leading dot\r\n..two\nno end",
            b"\0binary\0foreign message"]
FOLDER = tempfile.mkdtemp(prefix="iupop3-fuzz-")


def deliver() -> None:
    """A fresh maildrop for alice (a QUIT that deleted mail changed the last one)."""
    shutil.rmtree(os.path.join(FOLDER, "alice"), ignore_errors=True)
    for sub in ("new", "cur", "tmp"):
        os.makedirs(os.path.join(FOLDER, "alice", sub))
    for n, text in enumerate(MESSAGES, 1):
        with open(os.path.join(FOLDER, "alice", "new", f"{1700000000 + n}.M{n}.fz"), "wb") as fh:
            fh.write(text)


class Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append(self.format(record))


ERRORS = Errors()
logging.getLogger("iupop3").addHandler(ERRORS)
logging.getLogger("iupop3").setLevel(logging.ERROR)
CTX = build_context(settings_mod.Settings(users="unused", mail=f"maildir:{FOLDER}/%u",
                                          hostname="fuzz.example", auth_delay=0, auth_block=0,
                                          apop=True),
                    StatsArea.create(2, 0), 1, parse_users(USERS), sleep=lambda seconds: None)
deliver()


def TestOneInput(data: bytes) -> None:
    out: list[bytes] = []
    session = Session(CTX, out.append, "127.0.0.1:4000", "fuzz")
    session.start()
    try:
        for line in data.split(b"\n")[:64]:
            if session.closing:
                break
            line = line[:-1] if line.endswith(b"\r") else line
            if len(line) + 2 > session.max_line:
                continue  # the connection answers "line too long" itself
            out.clear()
            session.handle_line(line)
            reply = b"".join(out)
            if not (reply.endswith(b"\r\n") and reply.startswith((b"+OK", b"-ERR", b"+ "))):
                raise AssertionError(f"bad reply {reply[:200]!r} to {line[:100]!r}")
            if ERRORS.seen:
                raise AssertionError(f"logged an error for {line[:100]!r}: {ERRORS.seen}")
    finally:
        session.release()
        if session.quit and session.deleted:
            deliver()


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
