"""A full disk under the log file: the supervisor and the workers keep serving,
only the lines that could not be written are lost, the failure is told once on stderr, and
writing resumes by itself when space comes back."""

from __future__ import annotations

import logging
import os
import re
import subprocess

import pytest

from conftest import USERS, sample, write_message
from processes import wait_until
from shared import logsetup
from test_logging import FileLoggedServer


def _record(text: str, level: int = logging.INFO) -> logging.LogRecord:
    return logging.makeLogRecord({"name": "iupop3", "levelno": level,
                                  "levelname": logging.getLevelName(level), "msg": text})


def test_flush_to_a_full_disk_drops_only_those_lines_and_resumes(tmp_path, capfd):
    """/dev/full under the handler: flush never raises, counts the lost lines, says so once on
    stderr; the next write that works carries a line saying how many were dropped."""
    path = tmp_path / "log"
    handler = logsetup.LogFileHandler(str(path), flush_seconds=180)
    handler.setFormatter(logsetup.LineFormatter("worker-1"))
    handler.emit(_record("before"))
    handler.flush()
    good = handler.fd
    handler.fd = os.open("/dev/full", os.O_WRONLY)
    try:
        handler.emit(_record("lost one"))
        handler.last_flush -= 1000
        handler.flush_if_due()  # the loops' call: raised ENOSPC before
        handler.emit(_record("lost two", logging.ERROR))  # written at once: fails again
        assert handler.pending == [] and handler.dropped_lines == 2
    finally:
        os.close(handler.fd)
        handler.fd = good
    handler.emit(_record("after", logging.ERROR))
    text = path.read_text()
    assert "before" in text and "after" in text and "lost" not in text
    assert "log file writable again: 2 lines were dropped (No space left on device)" in text
    err = capfd.readouterr().err
    assert err.count("cannot write the log file") == 1, err
    assert "iupop3 worker-1: cannot write the log file" in err
    handler.close()


@pytest.fixture
def tiny_log_disk(tmp_path):
    """A 1 MiB tmpfs for the log directory (root only), unmounted after the test."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "server0" / "log"
    mount.mkdir(parents=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(folder) -> None:
    """Write a filler file until the file system is full."""
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for _ in range(1024):  # 64 MiB at most: the tmpfs holds 1 MiB
            os.write(fd, b"\0" * 65536)
    except OSError:
        pass
    finally:
        os.close(fd)


def test_server_keeps_serving_while_the_log_disk_is_full(tmp_path, tiny_log_disk):
    """Log file on a full tmpfs: logins keep working (the supervisor used to die with ENOSPC
    from its loop, a worker's ticker too), stderr says so once per process, and after space
    is freed the log carries on with a count of the dropped lines."""
    root = tmp_path / "server0"
    server = FileLoggedServer(root, ["-loglevel", "DEBUG", "-log_flush", "1"])
    for user in USERS:
        write_message(server.maildir(user), "1700000001.M1.test", sample(1))
    server.start()
    try:
        assert server.log_has(r"worker 1 ready")
        _fill(tiny_log_disk)

        def login_until_told() -> bool:
            client = server.login("alice")
            client.stat()
            client.quit()
            out = server.output
            return ("iupop3 supervisor: cannot write the log file" in out
                    and re.search(r"iupop3 worker-\d: cannot write the log file", out) is not None)
        assert wait_until(login_until_told, 60, step=0.5), server.output
        for _ in range(5):  # still serving, every process alive, nothing repeated on stderr
            client = server.login("bob")
            assert client.stat()[0] == 1
            client.quit()
        assert server.proc.poll() is None
        out = server.output
        assert "Traceback" not in out, out
        assert out.count("supervisor: cannot write the log file") == 1, out
        assert len(re.findall(r"worker-\d: cannot write", out)) <= 2, out  # once per worker
        (tiny_log_disk / "filler").unlink()
        client = server.login("carol")
        client.quit()
        assert server.log_has(r"ERROR  supervisor - log file writable again: \d+ lines were "
                              r"dropped \(No space left on device\)", timeout=20)
        assert server.log_has(r"ERROR  worker-\d - log file writable again", timeout=20)
        assert server.log_has(r"USER carol", timeout=20)
        assert "exited" not in server.output and "killed" not in server.output
    finally:
        server.stop()
