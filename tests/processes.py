"""Helpers for tests of detached servers: find their processes in /proc, wait, clean up.

A daemon is not our child, so tests find it by its process group (the daemon leads one) or by
the log file that every one of its processes holds open, and read ids and capabilities from
/proc/PID/status.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def wait_until(predicate, timeout: float = 10.0, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return bool(predicate())


def stat(pid: int) -> dict[str, int | str] | None:
    """state, ppid, pgrp, session and tty_nr of a process (None once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return {"state": fields[0], "ppid": int(fields[1]), "pgrp": int(fields[2]),
            "session": int(fields[3]), "tty_nr": int(fields[4])}


def alive(pid: int) -> bool:
    """Running or sleeping: a zombie counts as gone."""
    info = stat(pid)
    return info is not None and info["state"] != "Z"


def status(pid: int) -> dict[str, str]:
    """/proc/PID/status as a dict of strings (Uid, Gid, Groups, CapPrm, CapEff, ...)."""
    out = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            name, _, value = line.partition(":")
            out[name] = value.strip()
    return out


def all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def group_pids(pgid: int) -> list[int]:
    """Live processes of process group ``pgid`` (a daemon's supervisor leads its own group)."""
    return [pid for pid in all_pids()
            if (info := stat(pid)) is not None and info["pgrp"] == pgid and info["state"] != "Z"]


def holders(path: Path | str) -> list[int]:
    """Live processes with a descriptor open on ``path`` (every iupop3 process holds its log)."""
    target = os.path.realpath(path)
    found = []
    for pid in all_pids():
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    if alive(pid):
                        found.append(pid)
                    break
            except OSError:
                continue
    return found


def ancestors(pid: int) -> list[int]:
    chain = []
    while pid > 1 and (info := stat(pid)) is not None:
        pid = int(info["ppid"])
        chain.append(pid)
    return chain


def kill_group(pgid: int) -> None:
    """Cleanup after a failed test: only the group of a server this test started."""
    if pgid > 1:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
