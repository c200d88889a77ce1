"""The supervisor: owns the listening sockets, preforks workers and hands them connections.

A reconciler loop in the gunicorn manner. Signal handlers only queue the signal and wake the
loop; the loop accepts, dispatches signals, reaps, and spawns toward the wanted number of
workers. It knows nothing of POP3: it passes descriptors and reads counters.
"""

from __future__ import annotations

import collections
import os
import selectors
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from setproctitle import setproctitle

from shared import handoff, keytable, logsetup, refusal
from shared import settings as settings_mod
from shared.handoff import Kind
from shared.logsetup import log
from shared.stats import Counter, Header, StatsArea
from supervisor import daemon, listeners
from supervisor.rotation import MidnightRotation

SUPERVISOR_SLOT = 0
ACCEPT_BATCH = 64
LOOP_SECONDS = 1.0
QUICK_DEATH_SECONDS = 5.0
MAX_BACKOFF_SECONDS = 30.0
KILL_MARGIN_SECONDS = 10.0
PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class WorkerState(Enum):
    STARTING = "starting"
    RUNNING = "running"
    DRAINING = "draining"
    EXITED = "exited"
    BACKOFF = "backoff"


@dataclass
class WorkerProcess:
    slot: int
    state: WorkerState = WorkerState.EXITED
    pid: int = 0
    channel: socket.socket | None = None
    started: float = 0.0
    sent_base: int = 0     # the slot's RECEIVED when this process started
    sent: int = 0          # connections handed to this process
    quick_deaths: int = 0
    respawn_at: float = 0.0
    addresses: collections.Counter = field(default_factory=collections.Counter)
    # Control frames waiting for room in the channel (a worker busy for a moment); kept in
    # order and retried every loop turn, so a DRAIN or a REOPEN_LOG is never dropped.
    outbox: collections.deque = field(default_factory=collections.deque)


class Supervisor:
    def __init__(self, settings, on_ready: Callable[[str], None] | None = None):
        self.settings = settings
        self.on_ready = on_ready  # told "listening on ..." once the ports are bound
        self.rotation: MidnightRotation | None = None
        self.nworkers = settings.workers or os.cpu_count() or 1
        self.workers = [WorkerProcess(slot) for slot in range(1, self.nworkers + 1)]
        self.sockets: list[socket.socket] = []
        self.per_address: dict[int, int] = {}  # sessions handed out per client address key
        self.tls_sockets: list[socket.socket] = []
        self.selector = selectors.DefaultSelector()
        self.signals: collections.deque[int] = collections.deque()
        self.stats: StatsArea | None = None
        self.stopping = False
        self.stop_deadline: float | None = None
        self.handler = None
        self._turn = 0

    # -- startup ----------------------------------------------------------------------------
    def start(self) -> None:
        try:
            self.handler = logsetup.configure("supervisor", self.settings.loglevel,
                                              self.settings.logfile, self.settings.log_flush)
        except OSError as exc:
            raise daemon.DaemonError(
                f"cannot open the log file {self.settings.logfile}: {exc.strerror}") from None
        if self.settings.logfile:
            self.rotation = MidnightRotation(self.settings.logfile)
            left = self.rotation.left_from_before()
            if left is not None:
                self.rotate_log(left)  # a file of an earlier day (stopped overnight)
        self.sockets = listeners.bind_all(self.settings.listen, self.settings.port)
        if self.settings.tls_cert and self.settings.tls_port:
            # With -port 0 (tests) every listener takes a free port; each is logged.
            tls_port = self.settings.tls_port if self.settings.port else 0
            self.tls_sockets = listeners.bind_all(self.settings.listen, tls_port)
        self.drop_privileges()  # after binding (port 110 wants root), before any worker
        self.stats = StatsArea.create(self.nworkers + 1, int(time.time()))
        self.stats.set(SUPERVISOR_SLOT, Counter.PID, os.getpid())
        self.stats.set_header(Header.LOGLEVEL,
                              logsetup.LEVEL_NAMES.index(self.settings.loglevel))
        for sock in self.sockets:
            self.selector.register(sock, selectors.EVENT_READ, ("listener", handoff.PLAIN))
        for sock in self.tls_sockets:
            self.selector.register(sock, selectors.EVENT_READ, ("listener", handoff.IMPLICIT_TLS))
        self._install_signals()
        for worker in self.workers:
            self.spawn_worker(worker)
        where = ", ".join(listeners.describe(s) for s in self.sockets)
        log.info("iupop3 supervisor %d listening on %s with %d workers", os.getpid(), where,
                 self.nworkers)
        if self.tls_sockets:
            log.info("implicit TLS listening on %s",
                     ", ".join(listeners.describe(s) for s in self.tls_sockets))
        self.update_title()
        if self.on_ready is not None:
            self.on_ready(f"pid {os.getpid()} listening on {where}")

    def drop_privileges(self) -> None:
        """With -user, become that user for good and check it can reach what it needs."""
        settings = self.settings
        if not settings.user:
            if os.geteuid() == 0:
                log.info("warning: running as root; -user NAME would drop root after binding")
            return
        identity = daemon.identity_for(settings.user, settings.group)
        daemon.drop_privileges(identity, own=[settings.logfile])
        log.info("running as user %s (uid %d, gid %d)", identity.user,
                 identity.uid, identity.gid)
        log_dir = os.path.dirname(settings.logfile)
        missing = daemon.unreachable([
            (sys.executable, os.X_OK, "cannot run the worker interpreter"),
            (os.path.dirname(os.__file__), os.R_OK | os.X_OK, "cannot read the standard library"),
            (PROJECT_ROOT, os.R_OK | os.X_OK, "cannot read the server's code in"),
            (settings.users, os.R_OK, "cannot read the users file"),
            (settings.xtnd, os.R_OK, "cannot read the XTND file"),
            (getattr(settings, "tls_cert", ""), os.R_OK, "cannot read the TLS certificate"),
            (getattr(settings, "tls_key", ""), os.R_OK, "cannot read the TLS key"),
            (settings.logfile, os.W_OK, "cannot write the log file"),
            (log_dir, os.W_OK | os.X_OK, "cannot rotate the log in (it must be writable)"),
        ])
        if missing:
            raise daemon.DaemonError(f"as user {identity.user}: " + "; ".join(missing))

    def rotate_log(self, day=None) -> None:
        """Midnight: the current file gets the day's name, every process continues in a new one."""
        assert self.rotation is not None and self.handler is not None
        log.info("a new day: the log continues in a new %s", self.rotation.path)
        self.handler.flush()
        try:
            old = self.rotation.rotate(day)
        except OSError as exc:
            log.error("cannot rotate the log file %s: %s; writing on in it",
                      self.rotation.path, exc.strerror or exc)
            return
        self.handler.reopen()
        self.broadcast(Kind.REOPEN_LOG)
        log.info("new log file; the lines before are in %s", old)

    def _install_signals(self) -> None:
        read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._wakeup = read_end
        signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
        self.selector.register(read_end, selectors.EVENT_READ, "wakeup")
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(signum, self._record_signal)

    def _record_signal(self, signum, frame) -> None:
        # Only record: the loop does the work (gunicorn's 2026 lesson).
        self.signals.append(signum)

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> int:
        self.start()
        while True:
            for key, _ in self.selector.select(LOOP_SECONDS):
                if isinstance(key.data, tuple):
                    self.accept_connections(key.fileobj, key.data[1])
                elif key.data == "wakeup":
                    self._drain_wakeup()
                else:
                    self.read_worker_frames(key.data)
            self.handle_signals()
            for worker in self.workers:
                if worker.outbox:
                    self.flush_outbox(worker)
            self.reap_workers()
            if self.stopping:
                if not self.alive_workers():
                    break
                self.murder_stragglers()
            else:
                self.manage_workers()
            if self.rotation is not None and self.rotation.due():
                self.rotate_log()
            if self.handler is not None:
                self.handler.flush_if_due()
        self.close()
        log.info("iupop3 supervisor %d exits", os.getpid())
        return 0

    def _drain_wakeup(self) -> None:
        try:
            while os.read(self._wakeup, 512):
                pass
        except BlockingIOError:
            pass

    def handle_signals(self) -> None:
        while self.signals:
            signum = self.signals.popleft()
            if signum == signal.SIGCHLD:
                continue  # reap_workers runs every turn of the loop
            if signum in (signal.SIGTERM, signal.SIGINT):
                name = signal.Signals(signum).name
                if self.stopping:
                    log.info("%s again: closing all sessions now", name)
                    self.begin_stop(1)
                else:
                    log.info("%s: stopping, sessions get %ds", name, self.settings.grace)
                    self.begin_stop(self.settings.grace or 1)
            elif signum == signal.SIGHUP:
                log.info("SIGHUP: reload")
                self.broadcast(Kind.RELOAD)

    # -- connections ------------------------------------------------------------------------
    def accept_connections(self, listener: socket.socket, kind: int) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # EMFILE and friends: log, and let the next loop turn retry.
                log.error("accept failed: %s", exc.strerror)
                return
            try:
                self.hand_off(conn, kind)
            finally:
                conn.close()  # the worker has its own copy now, or the client was refused

    def hand_off(self, conn: socket.socket, kind: int = handoff.PLAIN) -> None:
        """Send ``conn`` to the least-loaded worker; ``kind`` tags the listener it came from."""
        if self.stopping:
            self.refuse(conn, refusal.SHUTTING_DOWN)
            return
        address_key = None
        if self.settings.max_per_address:
            address_key = _address_key(conn, self.stats, self.settings)
            if self.per_address.get(address_key, 0) >= self.settings.max_per_address:
                self.stats.add(SUPERVISOR_SLOT, Counter.ADDRESS_REFUSED)
                self.refuse(conn, refusal.TOO_MANY_FROM_ADDRESS)
                return
        load = {w.slot: self.worker_load(w) for w in self.workers
                if w.state in (WorkerState.STARTING, WorkerState.RUNNING)}
        if sum(load.values()) >= self.settings.maxclients:
            self.stats.add(SUPERVISOR_SLOT, Counter.REFUSED)
            self.refuse(conn, refusal.TOO_MANY_SESSIONS)
            return
        # Least loaded first; ties go round-robin so idle workers share the first sessions.
        self._turn += 1
        order = sorted(load, key=lambda s: (load[s], (s + self._turn) % self.nworkers))
        for slot in order:
            worker = self.workers[slot - 1]
            try:
                handoff.send_frame(worker.channel, Kind.CONNECTION, kind, fd=conn.fileno(),
                                   flags=socket.MSG_DONTWAIT)
            except (BlockingIOError, OSError) as exc:
                log.debug("worker %d cannot take a connection: %s", slot, exc)
                continue
            worker.sent += 1
            if address_key is not None:
                self._address_opened(worker, address_key)
            log.debug("connection fd %d handed to worker %d", conn.fileno(), slot)
            concurrent = sum(load.values()) + 1
            if concurrent > self.stats.get(SUPERVISOR_SLOT, Counter.MAX_CONCURRENT):
                self.stats.set(SUPERVISOR_SLOT, Counter.MAX_CONCURRENT, concurrent)
            return
        self.stats.add(SUPERVISOR_SLOT, Counter.REFUSED)
        self.refuse(conn, refusal.NO_WORKER)

    def worker_load(self, worker: WorkerProcess) -> int:
        """Sessions open in the worker plus connections sent that it has not picked up."""
        received = self.stats.get(worker.slot, Counter.RECEIVED) - worker.sent_base
        pending = max(0, worker.sent - received)
        return self.stats.get(worker.slot, Counter.CURRENT) + pending

    @staticmethod
    def refuse(conn: socket.socket, line: bytes) -> None:
        try:
            conn.send(line, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
        except OSError:
            pass

    # -- workers ----------------------------------------------------------------------------
    def spawn_worker(self, worker: WorkerProcess) -> None:
        ours, theirs = handoff.channel_pair()
        env = dict(os.environ)
        env["IUPOP3_SETTINGS"] = settings_mod.to_json(self.settings)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [PROJECT_ROOT,
                                                          env.get("PYTHONPATH", "")]))
        actions = [(os.POSIX_SPAWN_DUP2, theirs.fileno(), 3),
                   (os.POSIX_SPAWN_DUP2, self.stats.fd, 4)]
        try:
            pid = os.posix_spawn(sys.executable, [sys.executable, "-m", "worker",
                                                  str(worker.slot)], env, file_actions=actions)
        except OSError as exc:
            log.error("cannot start worker %d: %s", worker.slot, exc)
            ours.close()
            theirs.close()
            worker.started = time.monotonic()  # a failed start counts as a quick death
            self._backoff(worker)
            return
        theirs.close()
        ours.setblocking(False)
        worker.pid = pid
        worker.channel = ours
        worker.started = time.monotonic()
        worker.sent = 0
        worker.sent_base = self.stats.get(worker.slot, Counter.RECEIVED)
        worker.state = WorkerState.STARTING  # EXITED/BACKOFF -> STARTING
        self.selector.register(ours, selectors.EVENT_READ, worker)
        log.info("worker %d started, pid %d", worker.slot, pid)

    def read_worker_frames(self, worker: WorkerProcess) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                frame = handoff.recv_frame(worker.channel)
            except BlockingIOError:
                return
            except ConnectionResetError:
                frame = None  # the worker exited with frames unread: an ordinary end
            except (handoff.HandoffError, OSError) as exc:
                log.error("bad frame from worker %d: %s", worker.slot, exc)
                frame = None
            if frame is None:
                self.selector.unregister(worker.channel)
                return  # the worker is exiting; reap_workers takes it from here
            self.handle_worker_frame(worker, frame)

    def handle_worker_frame(self, worker: WorkerProcess, frame: handoff.Frame) -> None:
        if frame.kind is Kind.CLOSED:
            self._address_closed(worker, frame.argument)
        elif frame.kind is Kind.DRAINING:
            if worker.state in (WorkerState.STARTING, WorkerState.RUNNING):
                log.info("worker %d is draining: no new sessions go to it", worker.slot)
                worker.state = WorkerState.DRAINING  # RUNNING -> DRAINING
        elif frame.kind is Kind.SHUTDOWN:
            log.info("XTND SHUTDOWN: waiting for sessions to end")
            self.begin_stop(0)
        elif frame.kind is Kind.SET_LOGLEVEL and frame.argument < len(logsetup.LEVEL_NAMES):
            level = logsetup.LEVEL_NAMES[frame.argument]
            logsetup.set_level(level)
            self.stats.set_header(Header.LOGLEVEL, frame.argument)
            self.broadcast(Kind.LOGLEVEL, frame.argument)
            log.info("logging level changed to %s", level.lower())

    # -- sessions per client address (-max-per-address) ------------------------------------
    def _address_opened(self, worker: WorkerProcess, key: int) -> None:
        self.per_address[key] = self.per_address.get(key, 0) + 1
        worker.addresses[key] += 1

    def _address_closed(self, worker: WorkerProcess, key: int, count: int = 1) -> None:
        left = self.per_address.get(key, 0) - count
        if left > 0:
            self.per_address[key] = left
        else:
            self.per_address.pop(key, None)
        worker.addresses[key] -= count
        if worker.addresses[key] <= 0:
            del worker.addresses[key]

    def broadcast(self, kind: Kind, argument: int = 0) -> None:
        for worker in self.workers:
            if worker.channel is not None and worker.state is not WorkerState.EXITED:
                worker.outbox.append((kind, argument))
                self.flush_outbox(worker)

    def flush_outbox(self, worker: WorkerProcess) -> None:
        while worker.outbox and worker.channel is not None:
            kind, argument = worker.outbox[0]
            try:
                handoff.send_frame(worker.channel, kind, argument)
            except BlockingIOError:
                return  # full for now: the next loop turn tries again
            except OSError as exc:
                log.error("cannot tell worker %d %s: %s", worker.slot, kind.name, exc)
                worker.outbox.clear()
                return
            worker.outbox.popleft()

    def reap_workers(self) -> None:
        while True:
            try:
                pid, status, rusage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = next((w for w in self.workers if w.pid == pid), None)
            if worker is None:
                continue
            cpu_us = int((rusage.ru_utime + rusage.ru_stime) * 1e6)
            self.stats.add(SUPERVISOR_SLOT, Counter.CPU_EXITED_US, cpu_us)
            self.worker_exited(worker, status)

    def worker_exited(self, worker: WorkerProcess, status: int) -> None:
        slot = worker.slot
        # The worker is gone, so its slot has no writer: the supervisor settles its books.
        lost = self.stats.get(slot, Counter.CURRENT) + max(
            0, worker.sent - (self.stats.get(slot, Counter.RECEIVED) - worker.sent_base))
        self.stats.add(slot, Counter.ABNORMAL, lost)
        self.stats.set(slot, Counter.CURRENT, 0)
        self.stats.clear_users(slot)
        for key, count in list(worker.addresses.items()):
            self._address_closed(worker, key, count)
        worker.outbox.clear()
        if worker.channel is not None:
            if worker.channel.fileno() in self.selector.get_map():
                self.selector.unregister(worker.channel)
            worker.channel.close()
            worker.channel = None
        how = (f"killed by signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status)
               else f"exited with status {os.waitstatus_to_exitcode(status)}")
        clean = os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        if self.stopping and clean:
            log.info("worker %d (pid %d) %s", slot, worker.pid, how)
            worker.state = WorkerState.EXITED  # DRAINING -> EXITED
        else:
            log.error("worker %d (pid %d) %s; %d sessions lost", slot, worker.pid, how, lost)
            self._backoff(worker)
        worker.pid = 0
        self.update_title()

    def _backoff(self, worker: WorkerProcess) -> None:
        now = time.monotonic()
        if worker.started and now - worker.started < QUICK_DEATH_SECONDS:
            worker.quick_deaths += 1
        else:
            worker.quick_deaths = 0
        delay = 0.0 if not worker.quick_deaths else min(
            MAX_BACKOFF_SECONDS, 0.5 * 2 ** (worker.quick_deaths - 1))
        worker.respawn_at = now + delay
        worker.state = WorkerState.BACKOFF  # STARTING/RUNNING -> BACKOFF
        if delay:
            log.error("worker %d restarts in %.1fs (died %d times quickly)", worker.slot, delay,
                      worker.quick_deaths)

    def manage_workers(self) -> None:
        now = time.monotonic()
        for worker in self.workers:
            if worker.state is WorkerState.BACKOFF and now >= worker.respawn_at:
                self.spawn_worker(worker)
                self.update_title()
            elif (worker.state is WorkerState.STARTING
                  and self.stats.get(worker.slot, Counter.PID) == worker.pid):
                worker.state = WorkerState.RUNNING  # STARTING -> RUNNING

    def alive_workers(self) -> list[WorkerProcess]:
        return [w for w in self.workers if w.pid]

    # -- stopping ---------------------------------------------------------------------------
    def begin_stop(self, grace: int) -> None:
        """Refuse new connections, let sessions finish (``grace`` seconds, 0 = unbounded)."""
        self.stopping = True
        if grace:
            deadline = time.monotonic() + grace + KILL_MARGIN_SECONDS
            self.stop_deadline = min(deadline, self.stop_deadline or deadline)
        for worker in self.workers:
            if worker.state in (WorkerState.STARTING, WorkerState.RUNNING, WorkerState.DRAINING):
                worker.state = WorkerState.DRAINING  # RUNNING -> DRAINING
            elif worker.state is WorkerState.BACKOFF:
                worker.state = WorkerState.EXITED  # no respawn while stopping
        self.broadcast(Kind.DRAIN, grace)

    def murder_stragglers(self) -> None:
        if self.stop_deadline is None or time.monotonic() < self.stop_deadline:
            return
        for worker in self.alive_workers():
            log.error("worker %d (pid %d) did not stop in time: killing it", worker.slot,
                      worker.pid)
            try:
                os.kill(worker.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.stop_deadline = time.monotonic() + KILL_MARGIN_SECONDS

    def update_title(self) -> None:
        ports = sorted({s.getsockname()[1] for s in self.sockets + self.tls_sockets})
        alive = len(self.alive_workers())
        setproctitle(f"iupop3: supervisor [{','.join(map(str, ports))}] {alive} workers")

    def close(self) -> None:
        for sock in self.sockets + self.tls_sockets:
            sock.close()
        signal.set_wakeup_fd(-1)


def _address_key(conn: socket.socket, stats: StatsArea, settings) -> int:
    """The -max-per-address key of a client: the keyed digest workers also send in CLOSED
    (IPv6 counted per -ipv6-prefix network, IPv4-mapped as IPv4; shared/keytable.Keyer)."""
    try:
        address = conn.getpeername()[0]
    except (OSError, IndexError):
        address = ""
    return keytable.Keyer(stats.key_secret(), settings.ipv6_prefix).address(address)
