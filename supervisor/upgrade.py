"""Upgrading in place (SIGUSR2): a new supervisor takes the listening sockets, the old one drains.

nginx's and gunicorn's binary upgrade. The old supervisor forks and execs the installed code
with its own arguments, passing the listening sockets the systemd way (LISTEN_FDS, read by
supervisor/activation.py) and, in ``IUPOP3_UPGRADE``, three more descriptors: a pipe for the
new one's word, the pid file (its flock goes along) and the statistics area (so failed-login
penalties carry over). The new supervisor accepts nothing until every worker of its own is
ready; then it takes over the pid file, tells systemd ``MAINPID=`` and says "ok" on the pipe.
Only then does the old one stop accepting and drain its sessions: the listening sockets never
close, so no connection is refused. If the new one fails or is not ready in time, the old one
keeps serving as before.

    SERVING -> SPAWNED (SIGUSR2) -> HANDED_OVER (word "ok") -> the old one drains and exits
    SPAWNED -> SERVING (the new one failed, exited or timed out; it is stopped)
"""

from __future__ import annotations

import fcntl
import os
import selectors
import signal
import sys
import time
from dataclasses import dataclass

from shared import keytable
from shared.logsetup import log
from shared.stats import Header, StatsArea, Table
from supervisor import activation

ENV = "IUPOP3_UPGRADE"
READY_TIMEOUT_SECONDS = 90.0  # the new one's workers start in seconds; past this it failed
_OUT_OF_THE_WAY = 256         # descriptors are moved above this before being placed at 3, 4...
START_DIRECTORY = os.getcwd()  # before -daemon's chdir("/"): relative arguments mean this


@dataclass(frozen=True)
class Handover:
    """What the new supervisor received from the old one (parsed from ``IUPOP3_UPGRADE``)."""

    ready_fd: int
    pidfile_fd: int   # -1 without -pidfile
    stats_fd: int
    old_pid: int
    held_elsewhere: bool  # the sockets came from systemd first: it keeps a copy

    @classmethod
    def from_environ(cls, environ=os.environ) -> "Handover | None":
        text = environ.pop(ENV, "")
        if not text:
            return None
        fields = dict(part.partition("=")[::2] for part in text.split(","))
        try:
            handover = cls(int(fields["ready"]), int(fields["pidfile"]), int(fields["stats"]),
                           int(fields["from"]), fields.get("held") == "1")
        except (KeyError, ValueError):
            return None
        # Close-on-exec at once: workers start before these are taken over or closed, and a
        # worker holding the pid file (its flock) or the ready pipe outlives us.
        for fd in (handover.ready_fd, handover.pidfile_fd, handover.stats_fd):
            if fd >= 0:
                try:
                    os.set_inheritable(fd, False)
                except OSError:
                    pass  # not open: whoever uses it reports that
        return handover


@dataclass
class Successor:
    pid: int
    word_fd: int          # read end of the pipe the new supervisor answers on
    deadline: float
    heard: bytes = b""
    ended: bool = False   # EOF on the pipe: it is exiting; the reap says how (no signal then)


def spawn_successor(listening: activation.Listening, pidfile_fd: int,
                    stats_fd: int) -> Successor:
    """Fork and exec the installed code with our arguments and the sockets; returns at once."""
    pairs = listening.by_name()
    read_end, write_end = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    os.set_blocking(write_end, True)
    sources = [sock.fileno() for _, sock in pairs] + [write_end, stats_fd]
    sources += [pidfile_fd] if pidfile_fd >= 0 else []
    first = activation.FIRST_FD
    extra = first + len(pairs)
    env = dict(os.environ, LISTEN_FDS=str(len(pairs)),
               LISTEN_FDNAMES=":".join(name for name, _ in pairs))
    env[ENV] = (f"ready={extra},stats={extra + 1},pidfile={extra + 2 if pidfile_fd >= 0 else -1}"
                f",from={os.getpid()},held={int(listening.held_elsewhere)}")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH", "")]))
    argv = [sys.executable, "-P", "-m", "supervisor", *sys.argv[1:]]
    pid = os.fork()
    if pid == 0:
        _become_successor(sources, first, argv, env)  # never returns
    os.close(write_end)
    return Successor(pid, read_end, time.monotonic() + READY_TIMEOUT_SECONDS)


def _become_successor(sources: list[int], first: int, argv: list[str], env: dict) -> None:
    """In the forked child: descriptors to 3, 4, ... (inheritable), then exec. Nothing here
    logs or takes a lock: another thread of the parent (metrics) may have held one."""
    try:
        # A source may sit on a target number: move every one out of the way first.
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, _OUT_OF_THE_WAY) for fd in sources]
        for i, fd in enumerate(high):
            os.dup2(fd, first + i, inheritable=True)
        env["LISTEN_PID"] = str(os.getpid())
        os.chdir(START_DIRECTORY)
        os.execve(sys.executable, argv, env)
    finally:
        os._exit(127)


def carry_penalties(new: StatsArea, stats_fd: int) -> None:
    """Copy the failed-login tables and their key from the old generation's area: an upgrade
    gives no attacker a fresh budget. Failures the old one records after this are its own."""
    try:
        old = StatsArea.attach(stats_fd)
    except (OSError, ValueError) as exc:
        log.error("upgrade: cannot read the old statistics (%s): failed-login penalties "
                  "start afresh", exc)
        return
    try:
        for i in range(keytable.SECRET_BYTES // 8):
            new.set_header(Header.KEY_SECRET + i, old.get_header(Header.KEY_SECRET + i))
        for which in Table:
            new.table(which).words[:] = old.table(which).words
    finally:
        old.close()
        os.close(stats_fd)


class Upgrades:
    """The supervisor's part of an upgrade, on both sides; mixed into Supervisor, whose
    listening sockets, selector, stats, workers and begin_stop it uses."""

    successor: Successor | None = None
    handed_over = False

    def begin_upgrade(self) -> None:
        """SIGUSR2: start the new generation, unless one is on its way or we handed over."""
        if self.handed_over or self.stopping:
            log.info("SIGUSR2: this supervisor is stopping; no upgrade from it")
            return
        if self.successor is not None:
            log.info("SIGUSR2: an upgrade is already under way (pid %d)", self.successor.pid)
            return
        try:
            self.successor = spawn_successor(self.listening, self.pidfile_fd, self.stats.fd)
        except OSError as exc:
            log.error("upgrade: cannot start a new supervisor: %s", exc)
            return
        self.selector.register(self.successor.word_fd, selectors.EVENT_READ, "successor")
        log.info("SIGUSR2: upgrade: new supervisor pid %d started; serving on until its "
                 "workers are ready", self.successor.pid)

    def successor_spoke(self) -> None:
        """The new one's word: "ok ..." (it serves now: we drain); an error or EOF means it is
        exiting, and its reap (successor_reaped) settles the upgrade, so that no signal is
        ever sent to a pid that may have been reaped and reused."""
        successor = self.successor
        try:
            chunk = os.read(successor.word_fd, 4096)
        except BlockingIOError:
            return
        successor.heard += chunk
        if chunk and b"\n" not in successor.heard:
            return
        status, _, message = successor.heard.decode(errors="replace").strip().partition(" ")
        if status == "ok":
            self.hand_over(message)
        else:
            successor.ended = True
            self._close_word()

    def successor_reaped(self, pid: int, status: int) -> bool:
        """For reap_workers: True if ``pid`` was the new supervisor, which is settled now."""
        successor = self.successor
        if successor is None or pid != successor.pid:
            return False
        if not successor.ended:  # what it said before it died (even "ok": it serves no more)
            try:
                successor.heard += os.read(successor.word_fd, 4096)
            except OSError:
                pass
        how = (f"killed by signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status)
               else f"exited with status {os.waitstatus_to_exitcode(status)}")
        said = successor.heard.decode(errors="replace").strip()
        self.upgrade_failed(f"{said} ({how})" if said else f"{how} before it was ready",
                            reaped=True)
        return True

    def hand_over(self, message: str) -> None:
        """SPAWNED -> HANDED_OVER: stop accepting (the sockets stay open in the new one). The
        drain begins once the connections still waiting for their PROXY header are settled:
        they were accepted here, so they go to our workers, not refused."""
        pid = self.successor.pid
        self._forget_successor()
        self.handed_over = True
        self.stop_accepting()
        alive = sum(1 for w in self.workers if w.pid)
        log.info("upgrade: new supervisor %d serves (%s); this one (%d) stopped accepting and "
                 "drains the sessions of its %d workers", pid, message, os.getpid(), alive)
        self.drain_when_settled()

    def drain_when_settled(self) -> None:
        """After the hand-over, each loop turn: drain once no accepted connection waits for
        its header (each waits HEADER_SECONDS at most)."""
        if self.handed_over and not self.stopping and not self.intake.pending:
            self.begin_stop(0)  # the old generation's sessions end on their own (-timeout)

    def upgrade_failed(self, why: str, reaped: bool = False) -> None:
        """SPAWNED -> SERVING: stop the new one (unless reaped: its pid is free for reuse) and
        go on as before."""
        pid = self.successor.pid
        self._forget_successor()
        if not reaped:
            try:
                os.kill(pid, signal.SIGTERM)  # our child, not reaped yet: still that process
            except ProcessLookupError:
                pass
        log.error("upgrade failed: new supervisor %d: %s; this one serves on", pid, why)

    def upgrade_turn(self) -> None:
        """Each loop turn: the old side's deadline and drain; the new side's readiness."""
        self.drain_when_settled()
        if self.successor is not None and time.monotonic() > self.successor.deadline:
            if not self.successor.ended:
                self.successor_spoke()  # an "ok" that came with the deadline wins
            if self.successor is not None:
                self.upgrade_failed(f"not ready in {READY_TIMEOUT_SECONDS:.0f}s")
        if self.awaiting_workers and all(w.ready for w in self.workers):
            self.awaiting_workers = False
            self.register_listeners()  # only now: connections go to ready workers only
            if self.on_ready is not None:
                self.on_ready(f"pid {os.getpid()} took over from pid {self.handover.old_pid}")

    def _forget_successor(self) -> None:
        self._close_word()
        self.successor = None

    def _close_word(self) -> None:
        if self.successor.word_fd >= 0:
            self.selector.unregister(self.successor.word_fd)
            os.close(self.successor.word_fd)
            self.successor.word_fd = -1

    def stop_accepting(self) -> None:
        """Close our copies of the listening sockets: new connections queue for whoever else
        holds them (the new generation, systemd). The metrics thread stops too."""
        for sock in self.sockets + self.tls_sockets:
            if sock.fileno() in self.selector.get_map():
                self.selector.unregister(sock)
        if self.metrics is not None:
            self.metrics.stop()
            self.metrics = None
        self.listening.close()
        self.sockets, self.tls_sockets = [], []
