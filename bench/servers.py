"""The two servers under test, started privately on loopback, and what /proc says about them.

``Iupop3`` runs the project's own ``iupop3`` command; ``Dovecot`` runs Debian's dovecot with a
config file of ours (``-c``), so the system's Dovecot, if any, is never touched. Both expose the
process tree they own, for memory (PSS/RSS) and CPU figures.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

from bench.fleet import workers_for
from bench.mailgen import User, write_dovecot_passwd
from shared.descriptors import hard_limit, session_capacity

DOVECOT = "/usr/sbin/dovecot"
DOVECOT_POP3 = "/usr/lib/dovecot/pop3"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    """A currently free loopback port (bind 0, close): racy, acceptable for a benchmark."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_greeting(port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    last = "no attempt"
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with status {proc.returncode} before serving")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
                if sock.recv(512).startswith(b"+OK"):
                    sock.sendall(b"QUIT\r\n")
                    return
        except OSError as exc:
            last = str(exc)
        time.sleep(0.1)
    raise RuntimeError(f"no POP3 greeting on port {port} within {timeout:.0f}s ({last})")


# -- /proc -------------------------------------------------------------------------------------
def process_tree(root: int) -> list[int]:
    """ROOT and all its descendants, from the PPid of every process."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def tree_cpu_seconds(root: int) -> float:
    """CPU time of the tree, reaped children included (cutime/cstime), so exits don't lose it."""
    total = 0
    for pid in process_tree(root):
        try:
            with open(f"/proc/{pid}/stat", "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    return total / CLOCK_TICKS


def tree_cpu_ns_running(root: int) -> int:
    """CPU time of the tree's live processes in ns (/proc/PID/schedstat): precise where
    clock ticks are not, e.g. 1,000 Dovecot processes that each NOOP twice in a window; it
    misses processes that exit within the window, so it is for steady states only."""
    total = 0
    for pid in process_tree(root):
        try:
            with open(f"/proc/{pid}/schedstat") as fh:
                total += int(fh.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total


@dataclass(frozen=True)
class Memory:
    processes: int
    pss_kib: int
    rss_kib: int


def tree_memory(root: int) -> Memory:
    """PSS and RSS summed over the tree (PSS shares a page among the processes mapping it)."""
    pss = rss = count = 0
    for pid in process_tree(root):
        try:
            with open(f"/proc/{pid}/smaps_rollup") as fh:
                text = fh.read()
        except OSError:
            continue
        count += 1
        for line in text.splitlines():
            if line.startswith("Pss:"):
                pss += int(line.split()[1])
            elif line.startswith("Rss:"):
                rss += int(line.split()[1])
    return Memory(count, pss, rss)


def settle(server: "Server", seconds: float = 30.0) -> None:
    """Until every process the server starts is up and quiet (its tree uses under 10% of a
    core over half a second), so a memory baseline does not catch workers still importing."""
    deadline = time.time() + seconds
    wanted = server.expected_processes()
    last = tree_cpu_seconds(server.root_pid)
    while time.time() < deadline:
        time.sleep(0.5)
        now = tree_cpu_seconds(server.root_pid)
        if len(process_tree(server.root_pid)) >= wanted and now - last < 0.05:
            return
        last = now


# -- the servers ----------------------------------------------------------------------------
class Server:
    name = "?"

    def __init__(self, work: str):
        self.work = work
        self.mail_root = ""
        self.port = 0
        self.proc: subprocess.Popen | None = None
        os.makedirs(work, exist_ok=True)

    @property
    def root_pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        proc = self.proc
        if proc is None:
            return
        self.proc = None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # our own process group (start_new_session)
                proc.wait(timeout=10)
        self._wait_tree_gone(proc.pid)

    def _wait_tree_gone(self, pid: int) -> None:
        """Dovecot's pop3 processes may outlive the master a moment; wait them out."""
        deadline = time.time() + 20
        while time.time() < deadline and len(process_tree(pid)) > 1:
            time.sleep(0.1)

    def log_size(self) -> int:
        try:
            return os.path.getsize(self.log_path)
        except OSError:
            return 0

    def log_errors(self, since: int) -> list[str]:
        """Lines the server logged as errors since byte offset SINCE (shown, never hidden)."""
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(since)
                text = fh.read().decode("utf-8", "replace")
        except OSError:
            return []
        marks = ("ERROR", "Error:", "Fatal:", "Panic:", "Traceback")
        return [line for line in text.splitlines() if any(m in line for m in marks)]

    def log_tail(self, lines: int = 15) -> str:
        try:
            with open(self.log_path, errors="replace") as fh:
                return "".join(fh.readlines()[-lines:])
        except OSError:
            return ""

    log_path = ""

    def expected_processes(self) -> int:
        return 1


class Iupop3(Server):
    name = "iupop3"

    def __init__(self, work: str, users_file: str, workers: int = 2):
        super().__init__(work)
        self.users_file = users_file
        self.workers = workers
        self.log_path = os.path.join(work, "iupop3.log")
        self.command = _iupop3_command()
        self.workers_started = workers

    def start(self, mail_root: str, max_sessions: int) -> None:
        """Serve the Maildirs MAIL_ROOT/<user>/Maildir; accept MAX_SESSIONS and some more,
        with enough workers that each stays under its descriptor capacity."""
        self.mail_root = mail_root
        self.port = free_port()
        self.workers_started = workers_for(max_sessions, self.workers, worker_capacity())
        argv = [*self.command, "-users", self.users_file,
                "-mail", f"maildir:{self.mail_root}/%u/Maildir", "-listen", "127.0.0.1",
                "-port", str(self.port), "-loglevel", "ERROR", "-maxmsg", "0",
                "-maxclients", str(max_sessions + 100), "-timeout", "600",
                "-workers", str(self.workers_started), "-grace", "2",
                # every bench client comes from 127.0.0.1: no per-address cap (Dovecot has none)
                "-max-per-address", "0"]
        log = open(self.log_path, "a")
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True,
                                     cwd=self.work)
        log.close()
        # 26 workers each reading 100,000 users start in well over 30 s on two busy cores
        wait_for_greeting(self.port, self.proc, timeout=60.0 + 3 * self.workers_started)

    def worker_pids(self) -> list[int]:
        return [pid for pid in process_tree(self.root_pid) if pid != self.root_pid]

    def expected_processes(self) -> int:
        return 1 + self.workers_started


def worker_capacity() -> int:
    """Sessions one iupop3 worker can hold under the hard descriptor limit, by the server's
    own budget (shared/descriptors.py: what it counts per session may change)."""
    return session_capacity(hard_limit())


def _iupop3_command() -> list[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    script = os.path.join(os.path.dirname(here), ".venv", "bin", "iupop3")
    if os.path.exists(script):
        return [script]
    found = shutil.which("iupop3")
    return [found] if found else [sys.executable, "-m", "supervisor"]


class Dovecot(Server):
    name = "dovecot"

    def __init__(self, work: str, users: list[User], uid: int, gid: int, reuse: bool = False):
        super().__init__(work)
        self.reuse = reuse  # pop3 processes serve many sessions in turn (service_count = 0)
        self.users = users
        self.uid, self.gid = uid, gid
        self.passwd_file = os.path.join(work, "passwd")
        self.config = os.path.join(work, "dovecot.conf")
        self.log_path = os.path.join(work, "dovecot.log")

    @staticmethod
    def available() -> bool:
        return os.path.exists(DOVECOT) and os.path.exists(DOVECOT_POP3)

    def start(self, mail_root: str, max_sessions: int) -> None:
        """Serve MAIL_ROOT/<user>/Maildir (home = MAIL_ROOT/<user>); MAX_SESSIONS and more."""
        self.mail_root = mail_root
        self.port = free_port()
        write_dovecot_passwd(self.passwd_file, self.users, mail_root, self.uid, self.gid)
        self._write_config(max_sessions + 100)
        log = open(self.log_path, "a")
        # -F: stay in the foreground, so the master is our child and its pid is ours to signal.
        self.proc = subprocess.Popen([DOVECOT, "-F", "-c", self.config], stdout=log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        log.close()
        wait_for_greeting(self.port, self.proc)

    def _write_config(self, limit: int) -> None:
        for sub in ("base", "state"):
            os.makedirs(os.path.join(self.work, sub), exist_ok=True)
        text = DOVECOT_CONFIG.format(work=self.work, port=self.port, passwd=self.passwd_file,
                                     limit=limit, log=self.log_path,
                                     pop3_reuse=POP3_REUSE if self.reuse else "")
        with open(self.config, "w") as fh:
            fh.write(text)


# Dovecot's "high-performance" mail processes: each serves sessions one after another instead
# of exiting after one (safe here: every bench user has the same uid).
POP3_REUSE = "  service_count = 0\n  process_min_avail = 4\n"

# FACTS.md: stock limits stall near 1,000 sessions (stats client_limit, 100 pop3-login
# processes); pop3-login runs in high-performance mode, pop3 keeps client_limit = 1.
DOVECOT_CONFIG = """\
# Private Dovecot for the iupop3 benchmark (written by bench/servers.py).
instance_name = iupop3-bench
base_dir = {work}/base
state_dir = {work}/state
protocols = pop3
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
mail_location = maildir:~/Maildir
log_path = {log}
info_log_path = /dev/null
pop3_uidl_format = %08Xu%08Xv
default_client_limit = {limit}
default_process_limit = {limit}
default_vsz_limit = 1G
passdb {{
  driver = passwd-file
  args = scheme=PLAIN {passwd}
}}
userdb {{
  driver = passwd-file
  args = {passwd}
}}
service pop3-login {{
  inet_listener pop3 {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener pop3s {{
    port = 0
  }}
  service_count = 0
  process_min_avail = 2
  process_limit = 8
  client_limit = {limit}
}}
service pop3 {{
  process_limit = {limit}
  client_limit = 1
{pop3_reuse}}}
service stats {{
  client_limit = {limit}
}}
service anvil {{
  client_limit = {limit}
}}
service auth {{
  client_limit = {limit}
}}
service imap-login {{
  inet_listener imap {{
    port = 0
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
"""


def ensure_dovecot(allow_install: bool) -> str | None:
    """Install dovecot-pop3d when missing (root only); None when ready, else what to do.

    A policy-rc.d that exits 101 keeps the system's Dovecot service from starting on install;
    one we create is removed again afterwards.
    """
    if Dovecot.available():
        return None
    how = ("apt-get update && apt-get install -y dovecot-pop3d (as root, with a "
           "/usr/sbin/policy-rc.d that exits 101 so the system service does not start)")
    if not allow_install:
        return f"Dovecot is not installed; to compare, run: {how}"
    if os.geteuid() != 0:
        return f"Dovecot is not installed and this is not root; to compare, run: {how}"
    policy = "/usr/sbin/policy-rc.d"
    created = not os.path.exists(policy)
    if created:
        with open(policy, "w") as fh:
            fh.write("#!/bin/sh\n# iupop3 bench: do not start services on install\nexit 101\n")
        os.chmod(policy, 0o755)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        print("installing dovecot-pop3d (apt-get update, apt-get install) ...", flush=True)
        for argv in (["apt-get", "update"], ["apt-get", "install", "-y", "dovecot-pop3d"]):
            done = subprocess.run(argv, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
            if done.returncode != 0:
                return f"{' '.join(argv)} failed:\n{done.stdout[-2000:]}"
    finally:
        if created:
            os.remove(policy)
    return None if Dovecot.available() else "dovecot-pop3d installed but dovecot not found"
