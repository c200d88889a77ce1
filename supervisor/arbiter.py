"""The supervisor: owns the listening sockets, preforks workers and hands them connections.

A reconciler loop in the gunicorn manner. Signal handlers only queue the signal and wake the
loop; the loop accepts, dispatches signals, reaps, and spawns toward the wanted number of
workers. It knows nothing of POP3: it passes descriptors and reads counters.
"""

from __future__ import annotations

import collections
import errno
import os
import selectors
import signal
import socket
import sys
import time
from collections.abc import Callable

from setproctitle import setproctitle

from shared import descriptors, handoff, keytable, logsetup, refusal
from shared import settings as settings_mod
from shared.accountspec import parse_users_spec
from shared.handoff import Kind
from shared.logsetup import log
from shared.stats import SUPERVISOR_SLOT, Counter, Header, StatsArea
from supervisor import activation, daemon, listeners, upgrade
from supervisor.logfiles import LogFiles
from supervisor.metrics import MetricsServer
from supervisor.proxyintake import Pending, ProxyIntake, address_key as proxied_key
from supervisor.rotation import MidnightRotation
from supervisor.upgrade import Handover, Upgrades
from supervisor.watchdog import HeartbeatWatch
from supervisor.workers import (KILL_MARGIN_SECONDS, PROCESS_STATES, ROUTABLE_STATES,
                                WAITING_STATES, WorkerProcess, WorkerState, load)

ACCEPT_BATCH = 64
LOOP_SECONDS = 1.0
ACCEPT_PAUSE_MIN = 0.05     # EMFILE on accept: the listeners pause this long, doubling...
ACCEPT_PAUSE_MAX = 1.0      # ...up to this (gevent's baseserver does the same)
PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# accept() errors that mean "no descriptor or memory now": pause the listeners, do not spin.
_ACCEPT_PAUSE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class Supervisor(HeartbeatWatch, LogFiles, Upgrades):
    def __init__(self, settings, on_ready: Callable[[str], None] | None = None,
                 pidfile_fd: int = -1, handover: Handover | None = None):
        self.settings = settings
        self.on_ready = on_ready  # told "listening on ..." once the ports are bound
        self.pidfile_fd = pidfile_fd  # an upgrade hands it on (supervisor/upgrade.py)
        self.handover = handover      # we are the new generation of an upgrade
        self.awaiting_workers = handover is not None  # accept only once they are all ready
        self.listening = activation.Listening()
        self.metrics: MetricsServer | None = None
        self.title_ports = ""
        self.rotation: MidnightRotation | None = None
        self.nworkers = settings.workers or os.cpu_count() or 1
        self.workers = [WorkerProcess(slot) for slot in range(1, self.nworkers + 1)]
        # Statistics slots for replacements of a process that survived SIGKILL: the dead
        # process keeps its slot (it may still write it), its replacement never shares one.
        self.spare_slots = list(range(self.nworkers + 1, 2 * self.nworkers + 1))
        self.undead: dict[int, int] = {}  # pid -> slot of processes that survived SIGKILL
        self.sockets: list[socket.socket] = []
        self.per_address: dict[int, int] = {}  # sessions handed out per client address key
        self.tls_sockets: list[socket.socket] = []
        self.selector = selectors.DefaultSelector()
        self.signals: collections.deque[int] = collections.deque()
        self.stats: StatsArea | None = None
        self.stopping = False
        self.stop_deadline: float | None = None
        self.exit_status = 0
        self.handler = None
        self.estimated_capacity = 0    # sessions per worker the descriptor limit allows
        self.accept_pause = 0.0        # current back-off of the listeners (0 = listening)
        self.accept_resume_at = 0.0
        self._turn = 0
        self.intake = ProxyIntake(settings, self.selector, self.hand_off, lambda: self.stats.add(
            SUPERVISOR_SLOT, Counter.PROXY_REFUSED))  # PROXY headers before the hand-off

    # -- startup ----------------------------------------------------------------------------
    def start(self) -> None:
        self.open_log()
        self.listening = activation.open_listening(self.settings)  # bound, or LISTEN_FDS
        self.intake.expect(self.listening)
        listening = self.listening
        self.sockets = listening.plain + listening.proxy_plain
        self.tls_sockets = listening.tls + listening.proxy_tls
        listening.held_elsewhere = (self.handover.held_elsewhere if self.handover
                                    else listening.inherited)
        self.title_ports = ",".join(map(str, sorted(
            {s.getsockname()[1] for s in self.sockets + self.tls_sockets})))
        self.drop_privileges()  # after binding (port 110 wants root), before any worker
        self.check_descriptor_limit()
        self.stats = StatsArea.create(2 * self.nworkers + 1, int(time.time()))
        self.stats.set(SUPERVISOR_SLOT, Counter.PID, os.getpid())
        self.stats.set_header(Header.LOGLEVEL,
                              logsetup.LEVEL_NAMES.index(self.settings.loglevel))
        if self.handover is not None:
            upgrade.carry_penalties(self.stats, self.handover.stats_fd)  # before any worker
        else:
            self.register_listeners()
        # The secret is fixed from here on (drawn by create(), or carried by an upgrade): one
        # Keyer for every connection's -max-per-address key, not one per accept.
        self.keys = keytable.Keyer(self.stats.key_secret(), self.settings.ipv6_prefix)
        self.start_metrics()
        self._install_signals()
        for worker in self.workers:
            self.spawn_worker(worker)
        where = ", ".join(listeners.describe(s) for s in self.sockets)
        log.info("iupop3 supervisor %d listening on %s with %d workers%s", os.getpid(), where,
                 self.nworkers, " (sockets passed with LISTEN_FDS)" * self.listening.inherited)
        if self.tls_sockets:
            log.info("implicit TLS listening on %s",
                     ", ".join(listeners.describe(s) for s in self.tls_sockets))
        self.update_title()
        if self.on_ready is not None and not self.awaiting_workers:
            self.on_ready(f"pid {os.getpid()} listening on {where}")

    def start_metrics(self) -> None:
        if self.listening.metrics is None:
            return
        self.metrics = MetricsServer(self.listening.metrics, self.stats,
                                     self.worker_states).start()
        log.info("metrics on http://%s/metrics", listeners.describe(self.listening.metrics))

    def worker_states(self) -> dict[str, int]:
        """Slots per state, for the metrics thread (reads attributes the loop writes)."""
        return collections.Counter(w.state.value for w in list(self.workers))

    def check_descriptor_limit(self) -> None:
        """Raise the soft RLIMIT_NOFILE to the hard one (workers inherit it) and say whether
        -maxclients fits in it."""
        before, limit = descriptors.raise_soft_limit()
        raised = f" (raised from {before})" if limit != before else ""
        log.info("descriptor limit %d per process%s", limit, raised)
        self.estimated_capacity = descriptors.session_capacity(limit)
        problem = descriptors.maxclients_problem(self.settings.maxclients, self.nworkers, limit)
        if problem:
            log.error("warning: %s", problem)

    def drop_privileges(self) -> None:
        """With -user, become that user for good and check it can reach what it needs."""
        settings = self.settings
        if not settings.user:
            if os.geteuid() == 0 and parse_users_spec(settings.users).system:
                # The privilege model (shared/accountspec.py): system accounts keep root.
                log.info("running as root: -users %s serves system accounts", settings.users)
            elif os.geteuid() == 0:
                log.info("warning: running as root; -user NAME would drop root after binding")
            return
        identity = daemon.identity_for(settings.user, settings.group)
        own = [self.handler.fd] if getattr(self.handler, "fd", -1) >= 0 else []
        daemon.drop_privileges(identity, own_fds=own)
        log.info("running as user %s (uid %d, gid %d)", identity.user,
                 identity.uid, identity.gid)
        missing = daemon.unreachable(daemon.needed_after_drop(settings, PROJECT_ROOT))
        if missing:
            raise daemon.DaemonError(f"as user {identity.user}: " + "; ".join(missing))

    def register_listeners(self) -> None:
        for sock in self.sockets:
            self.selector.register(sock, selectors.EVENT_READ, ("listener", handoff.PLAIN))
        for sock in self.tls_sockets:
            self.selector.register(sock, selectors.EVENT_READ, ("listener", handoff.IMPLICIT_TLS))

    def _install_signals(self) -> None:
        read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._wakeup = read_end
        signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
        self.selector.register(read_end, selectors.EVENT_READ, "wakeup")
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD,
                       signal.SIGUSR2):
            signal.signal(signum, self._record_signal)

    def _record_signal(self, signum, frame) -> None:
        # Only record: the loop does the work (gunicorn's 2026 lesson).
        self.signals.append(signum)

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> int:
        self.start()
        while True:
            for key, _ in self.selector.select(self._loop_timeout()):
                if isinstance(key.data, tuple):
                    self.accept_connections(key.fileobj, key.data[1])
                elif key.data == "wakeup":
                    self._drain_wakeup()
                elif isinstance(key.data, Pending):
                    self.intake.readable(key.data)
                elif key.data == "successor":
                    self.successor_spoke()
                else:
                    self.read_worker_frames(key.data)
            self.handle_signals()
            self.intake.expire()
            for worker in self.workers:
                if worker.outbox:
                    self.flush_outbox(worker)
            self.reap_workers()
            if self.stopping:
                if not self.alive_workers():
                    break
                self.murder_stragglers()
            else:
                self.watch_workers()
                self.manage_workers()
                self.resume_listeners()
                self.upgrade_turn()
            if self.rotation is not None and self.rotation.due():
                self.rotate_log()
            if self.handler is not None:
                self.handler.flush_if_due()
        self.close()
        log.info("iupop3 supervisor %d exits%s", os.getpid(),
                 f" with status {self.exit_status}" if self.exit_status else "")
        return self.exit_status

    def _loop_timeout(self) -> float:
        if self.accept_pause:
            return max(0.0, min(LOOP_SECONDS, self.accept_resume_at - time.monotonic()))
        return self.intake.time_left(LOOP_SECONDS)

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
            elif signum == signal.SIGUSR2:
                self.begin_upgrade()

    # -- connections ------------------------------------------------------------------------
    def accept_connections(self, listener: socket.socket, kind: int) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _ACCEPT_PAUSE_ERRNOS:
                    self.pause_listeners(exc)
                else:
                    log.error("accept failed: %s", exc.strerror)
                return
            self.accept_pause = 0.0  # accepting again: the next pause starts small
            if self.intake.takes(listener, conn, kind):
                continue  # it begins with a PROXY header, read before the hand-off
            try:
                self.hand_off(conn, kind)
            finally:
                conn.close()  # the worker has its own copy now, or the client was refused

    def pause_listeners(self, exc: OSError) -> None:
        """Out of descriptors: stop listening for a while (doubling), not retry every turn."""
        self.accept_pause = min(ACCEPT_PAUSE_MAX, max(ACCEPT_PAUSE_MIN, self.accept_pause * 2))
        self.accept_resume_at = time.monotonic() + self.accept_pause
        for sock in self.sockets + self.tls_sockets:
            if sock.fileno() in self.selector.get_map():
                self.selector.unregister(sock)
        log.error("accept failed: %s; not accepting for %.2fs", exc.strerror,
                  self.accept_pause)

    def resume_listeners(self) -> None:
        if not self.accept_pause or time.monotonic() < self.accept_resume_at:
            return
        if not any(s.fileno() in self.selector.get_map() for s in self.sockets):
            self.register_listeners()
        # accept_pause stays until an accept succeeds, so a failing one doubles it.

    def hand_off(self, conn: socket.socket, kind: int = handoff.PLAIN, proxied=None) -> None:
        """Send ``conn`` to the least-loaded worker; ``kind`` tags the listener it came from,
        ``proxied`` is the PROXY header it began with (shared.proxyprotocol.ProxyHeader)."""
        if self.stopping:
            self.refuse(conn, refusal.SHUTTING_DOWN)
            return
        address_key = 0
        if self.settings.max_per_address:
            address_key = proxied_key(conn, proxied, self.keys)
            if self.per_address.get(address_key, 0) >= self.settings.max_per_address:
                self.stats.add(SUPERVISOR_SLOT, Counter.ADDRESS_REFUSED)
                self.refuse(conn, refusal.TOO_MANY_FROM_ADDRESS)
                return
        loads = {w.slot: load(self.stats, w) for w in self.workers}
        concurrent = sum(loads.values())
        candidates = [w for w in self.workers if self.routable(w, loads[w.slot])]
        if concurrent >= self.settings.maxclients or not candidates:
            full = concurrent >= self.settings.maxclients or any(
                self.fresh(w) for w in self.workers if w.state in ROUTABLE_STATES)
            self.stats.add(SUPERVISOR_SLOT, Counter.REFUSED)
            self.refuse(conn, refusal.TOO_MANY_SESSIONS if full else refusal.NO_WORKER)
            return
        # Least loaded first; ties go round-robin so idle workers share the first sessions.
        self._turn += 1
        candidates.sort(key=lambda w: (loads[w.slot], (w.slot + self._turn) % self.nworkers))
        for worker in candidates:
            try:
                handoff.send_frame(worker.channel, Kind.CONNECTION, kind, fd=conn.fileno(),
                                   flags=socket.MSG_DONTWAIT, address=address_key,
                                   payload=proxied.raw if proxied else b"")
            except (BlockingIOError, OSError) as exc:
                log.debug("worker %d cannot take a connection: %s", worker.slot, exc)
                continue
            worker.sent += 1
            if self.settings.max_per_address:
                self._address_opened(worker, address_key)
            log.debug("connection fd %d handed to worker %d", conn.fileno(), worker.slot)
            if concurrent + 1 > self.stats.get(SUPERVISOR_SLOT, Counter.MAX_CONCURRENT):
                self.stats.set(SUPERVISOR_SLOT, Counter.MAX_CONCURRENT, concurrent + 1)
            return
        self.stats.add(SUPERVISOR_SLOT, Counter.REFUSED)
        self.refuse(conn, refusal.NO_WORKER)

    def routable(self, worker: WorkerProcess, current_load: int) -> bool:
        """May take one more session: ready or starting, heartbeat fresh, descriptors to spare."""
        # Until a starting worker publishes its capacity, the supervisor's own estimate holds.
        capacity = self.stats.get(worker.slot, Counter.CAPACITY) or self.estimated_capacity
        return (worker.state in ROUTABLE_STATES and worker.channel is not None
                and self.fresh(worker) and current_load < capacity)

    @staticmethod
    def refuse(conn: socket.socket, line: bytes) -> None:
        try:
            conn.send(line, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
        except OSError:
            pass

    # -- workers ----------------------------------------------------------------------------
    def spawn_worker(self, worker: WorkerProcess) -> None:
        try:  # EMFILE/ENFILE/ENOMEM: a failed start like posix_spawn's, never the loop's end
            ours, theirs = handoff.channel_pair()
        except OSError as exc:
            log.error("cannot start worker %d: %s", worker.slot, exc)
            self.died_before_ready(worker)
            return
        env = dict(os.environ)
        env["IUPOP3_SETTINGS"] = settings_mod.to_json(self.settings)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [PROJECT_ROOT,
                                                          env.get("PYTHONPATH", "")]))
        actions = [(os.POSIX_SPAWN_DUP2, theirs.fileno(), 3),
                   (os.POSIX_SPAWN_DUP2, self.stats.fd, 4)]
        # -P: the current directory is not on the worker's sys.path, so a module planted
        # there is never imported (-I would also drop the PYTHONPATH set above).
        argv = [sys.executable, "-P", "-m", "worker", str(worker.slot)]
        worker.started = time.monotonic()
        try:
            pid = os.posix_spawn(sys.executable, argv, env, file_actions=actions)
        except OSError as exc:
            log.error("cannot start worker %d: %s", worker.slot, exc)
            ours.close()
            theirs.close()
            self.died_before_ready(worker)
            return
        theirs.close()
        ours.setblocking(False)
        worker.pid = pid
        worker.channel = ours
        worker.sent = 0
        worker.ready = False
        worker.stale = False
        worker.sent_base = self.stats.get(worker.slot, Counter.RECEIVED)
        worker.change_state(WorkerState.STARTING)  # EXITED/BACKOFF/FATAL -> STARTING
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
            self._address_closed(worker, frame.address)
        elif frame.kind is Kind.DRAINING:
            if worker.state in ROUTABLE_STATES:
                log.info("worker %d is draining: no new sessions go to it", worker.slot)
                worker.change_state(WorkerState.DRAINING)  # STARTING/RUNNING -> DRAINING
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
        if worker.addresses.get(key, 0) <= 0:
            return  # not one we handed out (or already settled by a reap): nothing to undo
        count = min(count, worker.addresses[key])
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
            if worker.channel is not None and worker.state in PROCESS_STATES:
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
            cpu_us = int((rusage.ru_utime + rusage.ru_stime) * 1e6)
            self.stats.add(SUPERVISOR_SLOT, Counter.CPU_EXITED_US, cpu_us)
            if pid in self.undead:
                self.undead_reaped(pid)
                continue
            if self.successor_reaped(pid, status):  # an upgrade's new supervisor
                continue
            worker = next((w for w in self.workers if w.pid == pid), None)
            if worker is not None:
                self.worker_exited(worker, status)

    def settle_books(self, worker: WorkerProcess, slot_has_no_writer: bool) -> int:
        """The process is gone (or given up on): its sessions count as abnormal, its addresses
        are released, its channel closed. Returns how many sessions were lost."""
        lost = load(self.stats, worker)
        if slot_has_no_writer:  # one writer per slot: only then is the slot ours to write
            self.stats.add(worker.slot, Counter.ABNORMAL, lost)
            self.stats.set(worker.slot, Counter.CURRENT, 0)
            self.stats.clear_users(worker.slot)
        else:
            self.stats.add(SUPERVISOR_SLOT, Counter.ABNORMAL, lost)
        for key, count in list(worker.addresses.items()):
            self._address_closed(worker, key, count)
        worker.outbox.clear()
        if worker.channel is not None:
            if worker.channel.fileno() in self.selector.get_map():
                self.selector.unregister(worker.channel)
            worker.channel.close()
            worker.channel = None
        return lost

    def note_ready(self, worker: WorkerProcess) -> None:
        """STARTING -> RUNNING once the worker has published its pid (it is ready)."""
        if (worker.state is WorkerState.STARTING
                and self.stats.get(worker.slot, Counter.PID) == worker.pid):
            worker.change_state(WorkerState.RUNNING)  # STARTING -> RUNNING
            self.count_slots()

    def worker_exited(self, worker: WorkerProcess, status: int) -> None:
        self.note_ready(worker)  # it may have become ready since the last turn of the loop
        lost = self.settle_books(worker, slot_has_no_writer=True)
        how = (f"killed by signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status)
               else f"exited with status {os.waitstatus_to_exitcode(status)}")
        clean = os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        pid, worker.pid = worker.pid, 0
        if self.stopping and clean:
            log.info("worker %d (pid %d) %s", worker.slot, pid, how)
        else:
            log.error("worker %d (pid %d) %s; %d sessions lost", worker.slot, pid, how, lost)
        if self.stopping or worker.ready:
            # It had been ready: not a crash loop, so it is replaced at once (issue 11).
            worker.change_state(WorkerState.EXITED)  # RUNNING/DRAINING/HUNG -> EXITED
        else:
            self.died_before_ready(worker)
        self.update_title()

    def died_before_ready(self, worker: WorkerProcess) -> None:
        """STARTING/HUNG -> BACKOFF, or -> FATAL once the retries are used up."""
        state = worker.after_pre_ready_death(time.monotonic())
        delay = worker.respawn_at - time.monotonic()
        if state is WorkerState.FATAL:
            log.error("worker %d is FATAL: it died %d times before it was ready; retried "
                      "every %.0fs", worker.slot, worker.pre_ready_deaths, delay)
        else:
            log.error("worker %d died before it was ready (%d in a row): restarts in %.1fs",
                      worker.slot, worker.pre_ready_deaths, delay)
        self.count_slots()

    def manage_workers(self) -> None:
        now = time.monotonic()
        for worker in self.workers:
            if worker.state in WAITING_STATES and now >= worker.respawn_at:
                self.spawn_worker(worker)
                self.count_slots()
                self.update_title()
            else:
                self.note_ready(worker)
        if all(w.state is WorkerState.FATAL for w in self.workers):
            log.error("every worker slot is FATAL: the supervisor exits")
            self.exit_status = 1
            self.begin_stop(1)

    def count_slots(self) -> None:
        fatal = sum(w.state is WorkerState.FATAL for w in self.workers)
        if fatal != self.stats.get(SUPERVISOR_SLOT, Counter.FATAL_SLOTS):
            self.stats.set(SUPERVISOR_SLOT, Counter.FATAL_SLOTS, fatal)
            self.update_title()

    def alive_workers(self) -> list[WorkerProcess]:
        return [w for w in self.workers if w.pid]

    # -- stopping ---------------------------------------------------------------------------
    def begin_stop(self, grace: int) -> None:
        """Refuse new connections, let sessions finish (``grace`` seconds, 0 = unbounded)."""
        self.stopping = True
        if self.listening.held_elsewhere and self.sockets + self.tls_sockets:
            log.info("stopping: the queue of new connections is left to systemd")
            self.stop_accepting()
        if grace:
            deadline = time.monotonic() + grace + KILL_MARGIN_SECONDS
            self.stop_deadline = min(deadline, self.stop_deadline or deadline)
        for worker in self.workers:
            if worker.state in ROUTABLE_STATES:
                worker.change_state(WorkerState.DRAINING)  # STARTING/RUNNING -> DRAINING
            elif worker.state in WAITING_STATES - {WorkerState.EXITED}:
                worker.change_state(WorkerState.EXITED)  # BACKOFF/FATAL: no respawn now
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
        alive = len(self.alive_workers())
        notes = [f"{n} {what}" for n, what in (
            (sum(w.state is WorkerState.FATAL for w in self.workers), "FATAL"),
            (len(self.undead), "dead")) if n]
        extra = f" ({', '.join(notes)})" if notes else ""
        setproctitle(f"iupop3: supervisor [{self.title_ports}] {alive} workers{extra}")

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.stop()
        self.listening.close()
        signal.set_wakeup_fd(-1)

