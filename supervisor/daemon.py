"""Running as a service: detaching (-daemon), the pid file, readiness, dropping root (-user).

``main`` calls ``check_settings`` and ``detach`` before the supervisor starts; the supervisor
calls ``drop_privileges`` once its ports are bound (port 110 needs root) and before it spawns
any worker, so every worker starts as the unprivileged user. ``Readiness`` tells whoever waits
(the parent of a -daemon start, systemd) that the server listens, or why it could not.
"""

from __future__ import annotations

import errno
import fcntl
import grp
import os
import pwd
import select
import socket
import stat
import sys
import time
from dataclasses import dataclass

from shared import logsetup

READY_TIMEOUT_SECONDS = 60.0


class DaemonError(Exception):
    """The server cannot start as asked; the message is one line for the user."""


# -- settings -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Identity:
    user: str
    uid: int
    gid: int


def check_settings(settings) -> str | None:
    """The reason these settings cannot run, or None; checked before anything forks."""
    if settings.daemon and not settings.logfile:
        return "-daemon needs -logfile FILE: a daemon has no standard output"
    if settings.group and not settings.user:
        return "-group needs -user"
    proxying = [o for o, on in (("-proxy-protocol", settings.proxy_protocol),
                                ("-proxy-listen", settings.proxy_listen),
                                ("-proxy-tls-listen", settings.proxy_tls_listen),
                                ("-xclient", settings.xclient)) if on]
    if proxying and not settings.trusted_networks:
        return f"{proxying[0]} needs -trusted-networks (the addresses of the proxies)"
    if settings.proxy_tls_listen and not settings.tls_cert:
        return "-proxy-tls-listen needs -tls-cert"
    if settings.user:
        try:
            identity = identity_for(settings.user, settings.group)
        except DaemonError as exc:
            return str(exc)
        if os.geteuid() != 0 and os.geteuid() != identity.uid:
            return f"-user {settings.user} needs the server to be started as root"
    return None


def identity_for(user: str, group: str = "") -> Identity:
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise DaemonError(f"-user {user}: no such user") from None
    gid = entry.pw_gid
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise DaemonError(f"-group {group}: no such group") from None
    if entry.pw_uid == 0:
        raise DaemonError(f"-user {user} is root: name an unprivileged user")
    return Identity(user, entry.pw_uid, gid)


# -- readiness ----------------------------------------------------------------------------------
class Readiness:
    """Reports "listening" or the error once: to the waiting parent's pipe and to systemd."""

    def __init__(self, fd: int = -1, main_pid: bool = False):
        self.fd = fd
        self.told = False
        self.main_pid = main_pid  # an upgrade: systemd's main process is us from now on

    def ready(self, message: str) -> None:
        self.told = True
        # NotifyAccess=all in the unit: systemd takes MAINPID= from a process it did not start.
        pid = f"MAINPID={os.getpid()}\n" if self.main_pid else ""
        sd_notify(f"{pid}READY=1\nSTATUS={message}")
        self._tell(f"ok {message}")

    def failed(self, message: str) -> None:
        self.told = True
        self._tell(f"error {message}")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _tell(self, line: str) -> None:
        if self.fd < 0:
            return
        try:
            os.write(self.fd, line.replace("\n", " ").encode() + b"\n")
        except OSError:
            pass  # the parent is gone: nobody to tell
        self.close()


def sd_notify(state: str) -> None:
    """The systemd readiness protocol (sd_notify(3)): one datagram to $NOTIFY_SOCKET."""
    where = os.environ.get("NOTIFY_SOCKET", "")
    if not where:
        return
    if where.startswith("@"):
        where = "\0" + where[1:]  # an abstract socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), where)
    except OSError:
        pass  # systemd not listening is not our failure


# -- detaching ----------------------------------------------------------------------------------
def detach() -> Readiness:
    """Double fork, setsid, chdir /, standard files to /dev/null; returns in the daemon only.

    The command's own process waits on a pipe and exits 0 once the daemon says it listens, or
    non-zero with the daemon's error, so an init script reports the truth.
    """
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    sys.stdout.flush()
    sys.stderr.flush()
    if os.fork():
        os.close(write_end)
        os._exit(_wait_for_daemon(read_end))
    # First child: a new session without a controlling terminal, then fork again so the daemon
    # is not a session leader and can never acquire one.
    os.close(read_end)
    os.setsid()
    if os.fork():
        os._exit(0)
    os.setpgid(0, 0)  # its own process group: "kill -- -PID" reaches the workers too
    os.chdir("/")
    os.umask(0o027)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    if null > 2:
        os.close(null)
    return Readiness(write_end)


def _wait_for_daemon(read_end: int) -> int:
    """In the command's process: the daemon's word, printed; the exit status to return."""
    os.wait()  # the first child exits at once
    data = b""
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while b"\n" not in data:
        ready, _, _ = select.select([read_end], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            print(f"iupop3: no word from the server in {READY_TIMEOUT_SECONDS:.0f}s; "
                  "see its log", file=sys.stderr)
            return 1
        chunk = os.read(read_end, 4096)
        if not chunk:
            break
        data += chunk
    status, _, message = data.decode(errors="replace").strip().partition(" ")
    if status == "ok":
        print(f"iupop3: {message}")
        return 0
    if status == "error":
        print(f"iupop3: {message}", file=sys.stderr)
        return 2
    print("iupop3: the server exited before it was listening; see its log", file=sys.stderr)
    return 1


# -- the pid file -------------------------------------------------------------------------------
def _not_ours(fd: int) -> str | None:
    """Why an opened pid file may not be written (a planted hard link, a FIFO, another
    owner's file: root must not write through them), or None."""
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        return "is not a regular file"
    if info.st_nlink != 1:
        return f"has {info.st_nlink} links"
    if info.st_uid != os.geteuid():
        return f"belongs to uid {info.st_uid}"
    return None


class PidFile:
    """The supervisor's pid, under an flock held while it runs: a live lock is a live server.

    A file left by a crash is not locked, so it is taken over; a pid that was reused by some
    other process cannot fool the check.
    """

    def __init__(self, path: str):
        self.path = path
        self.fd = -1
        self.pid = 0

    def acquire(self) -> "PidFile":
        try:
            fd = logsetup.open_nofollow(self.path, os.O_RDWR | os.O_CREAT | os.O_NONBLOCK, 0o644)
        except OSError as exc:
            raise DaemonError(f"pid file {self.path}: {exc.strerror}") from None
        problem = _not_ours(fd)
        if problem:
            os.close(fd)
            raise DaemonError(f"pid file {self.path} {problem}; refusing to write to it")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            other = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise DaemonError(f"already running as pid {other} (pid file {self.path})") from None
        self.pid = os.getpid()
        os.fchmod(fd, 0o644)  # stays root's with -user: a dropped server cannot forge it
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{self.pid}\n".encode(), 0)
        self.fd = fd
        return self

    def take_over(self, fd: int) -> "PidFile":
        """An upgrade: the old supervisor's open (and flocked) pid file, now naming us. The
        old one then leaves the file alone, since it no longer holds its pid."""
        self.fd = fd
        self.pid = os.getpid()
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{self.pid}\n".encode(), 0)
        return self

    def release(self) -> str | None:
        """Remove the file if it is still ours; returns why it could not be removed, or None."""
        if self.fd < 0:
            return None
        problem = None
        try:
            if os.pread(self.fd, 32, 0).strip() == str(self.pid).encode():
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            problem = f"cannot remove pid file {self.path}: {exc.strerror}"
        os.close(self.fd)
        self.fd = -1
        return problem


# -- dropping root ------------------------------------------------------------------------------
def drop_privileges(identity: Identity, own_fds: list[int]) -> None:
    """Become ``identity`` for good: no supplementary groups, no way back, no capabilities.

    ``own_fds`` are open files the unprivileged processes must go on writing (the log file),
    handed over by descriptor before root is given up: a chown by path would follow whatever
    the service user planted there meanwhile.
    """
    if os.geteuid() != 0:
        return  # already that user (check_settings allows nothing else): nothing to give up
    for fd in own_fds:
        os.fchown(fd, identity.uid, identity.gid)
    os.setgroups([])
    os.setresgid(identity.gid, identity.gid, identity.gid)
    os.setresuid(identity.uid, identity.uid, identity.uid)
    verify_unprivileged(identity)


def verify_unprivileged(identity: Identity) -> None:
    """Raise unless real, effective and saved ids are the user's and no capability is left."""
    if set(os.getresuid()) != {identity.uid} or set(os.getresgid()) != {identity.gid}:
        raise DaemonError(f"could not become user {identity.user}")
    if os.getgroups():
        raise DaemonError("supplementary groups remain after dropping them")
    try:
        os.setuid(0)
    except PermissionError:
        pass
    else:
        raise DaemonError("root could be regained after dropping privileges")
    left = {name: value for name, value in capabilities().items()
            if name in ("CapPrm", "CapEff", "CapAmb") and value}
    if left:
        raise DaemonError(f"capabilities remain after dropping privileges: {left}")


def capabilities(pid: int | str = "self") -> dict[str, int]:
    """The capability sets of a process from /proc/PID/status, as integers."""
    caps = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            name, _, value = line.partition(":")
            if name.startswith("Cap"):
                caps[name] = int(value.strip(), 16)
    return caps


def needed_after_drop(settings, project_root: str) -> list[tuple[str, int, str]]:
    """What the unprivileged supervisor and its workers must reach: (path, mode, what)."""
    log_dir = os.path.dirname(settings.logfile)
    return [
        (sys.executable, os.X_OK, "cannot run the worker interpreter"),
        (os.path.dirname(os.__file__), os.R_OK | os.X_OK, "cannot read the standard library"),
        (project_root, os.R_OK | os.X_OK, "cannot read the server's code in"),
        (settings.users, os.R_OK, "cannot read the users file"),
        (settings.xtnd, os.R_OK, "cannot read the XTND file"),
        (getattr(settings, "tls_cert", ""), os.R_OK, "cannot read the TLS certificate"),
        (getattr(settings, "tls_key", ""), os.R_OK, "cannot read the TLS key"),
        (settings.logfile, os.W_OK, "cannot write the log file"),
        (log_dir, os.W_OK | os.X_OK, "cannot rotate the log in (it must be writable)"),
    ]


def unreachable(wanted: list[tuple[str, int, str]]) -> list[str]:
    """Of (path, os.access mode, what), those this process cannot use, described for the user."""
    return [f"{what} {path}" for path, mode, what in wanted if path and not os.access(path, mode)]
