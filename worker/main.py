"""A worker process: receive client sockets from the supervisor, run one greenlet per session.

The supervisor exec's ``python -m worker SLOT`` with the channel on fd 3 and the statistics
memfd on fd 4. The worker never accepts on a listening socket; an empty read on the channel
means the supervisor is gone, and then the worker finishes its sessions and exits.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import socket as stdsocket
import sys
import time
from collections.abc import Callable

import gevent
import gevent.event
import gevent.lock
import gevent.pool
import gevent.socket
from gevent import GreenletExit
from setproctitle import setproctitle

from shared import descriptors, handoff, logsetup, proxyprotocol, refusal
from shared import settings as settings_mod
from shared.handoff import Kind
from shared.logsetup import log
from shared.stats import TICK_SECONDS, Counter, Header, StatsArea
from shared.accountsource import AccountSourceError, open_source
from worker import openahead, xtnd
from worker.connection import Connection
from worker.context import ServerContext, build_context
from worker.parking import Parking
from worker.pop3 import State
from worker.reloading import Reloader
from worker.supervisorlink import SupervisorLink

CHANNEL_FD = 3
STATS_FD = 4
# How long past -grace a session in UPDATE may take to finish its commit; the supervisor
# SIGKILLs a worker KILL_MARGIN_SECONDS (10 s) after -grace, so this stays below it.
COMMIT_WAIT_SECONDS = 8


class Worker:
    def __init__(self, slot: int, settings, stats: StatsArea, ctx: ServerContext,
                 link: SupervisorLink, reloader: Reloader, handler=None):
        self.slot = slot
        self.settings = settings
        self.stats = stats
        self.ctx = ctx
        self.link = link
        self.sessions = gevent.pool.Group()
        self.connections: dict[gevent.Greenlet, Connection] = {}  # session greenlet -> its own
        # Idle logged-in sessions without a greenlet (worker.parking): sessions = both.
        self.parking = Parking(self.resume_later)
        self.channel = link.channel
        self.draining = False
        self.supervisor_gone = False
        self.drain_started = gevent.event.Event()
        self.drain_deadline: float | None = None
        self.serial = 0
        self.handler = handler  # the log file's handler (None when logging to stdout)
        self.reloader = reloader
        self.reload_lock = gevent.lock.Semaphore()
        link.on_broken = self.channel_ended

    def run(self) -> int:
        self.parent = os.getppid()
        self.exit_status = 0
        self.pool_probe = None
        hub = gevent.get_hub()
        hub.print_exception = self._log_greenlet_error  # never raw tracebacks on stderr
        self.stats.set(self.slot, Counter.PID, os.getpid())
        # The slot's CURRENT belongs to this process now (the supervisor zeroed it on a reap).
        self.stats.set(self.slot, Counter.CURRENT, 0)
        self.stats.clear_users(self.slot)
        gevent.signal_handler(signal.SIGTERM, self.begin_drain, self.settings.grace)
        ticker = gevent.spawn(self.tick)
        receiver = gevent.spawn(self.receive)
        essentials = [ticker, receiver]
        if self.ctx.takeover.listen():  # other logins ask our idle sessions to go here
            essentials.append(gevent.spawn(self.ctx.takeover.serve))
        for essential in essentials:
            essential.link_exception(self._essential_died)
        self.reloader.watch()
        log.info("worker %d ready, pid %d", self.slot, os.getpid())
        self.drain_started.wait()
        self.finish_sessions()
        for essential in reversed(essentials):
            essential.kill()
        self.reloader.stop()
        log.info("worker %d exits", self.slot)
        return self.exit_status

    def _essential_died(self, greenlet) -> None:
        """A receiver or ticker that died would leave the worker half alive: end it instead."""
        log.error("worker %d: internal error, %s", self.slot, greenlet.exception,
                  exc_info=greenlet.exc_info if any(greenlet.exc_info) else None)
        self.exit_status = 1
        self.begin_drain(self.settings.grace or self.settings.timeout)

    def _log_greenlet_error(self, context, kind, value, tb) -> None:
        """gevent's hub reports a greenlet's uncaught exception here: into the log format."""
        if kind is not None and issubclass(kind, (gevent.GreenletExit, KeyboardInterrupt)):
            return
        log.error("uncaught error in %s", context, exc_info=(kind, value, tb))

    def receive(self) -> None:
        """Take frames from the supervisor until the channel ends, however it ends."""
        while True:
            try:
                frame = handoff.recv_frame(self.channel)
            except handoff.DescriptorDropped as exc:
                self.descriptor_dropped(exc.frame)
                continue
            except (handoff.HandoffError, OSError) as exc:
                # EOF, ECONNRESET and a bad frame end the channel alike (issue 11).
                self.channel_ended(f"bad frame from the supervisor: {exc}"
                                   if isinstance(exc, handoff.HandoffError) else
                                   f"channel error: {exc.strerror or exc}")
                return
            if frame is None:
                self.channel_ended("supervisor gone")
                return
            try:
                self.dispatch(frame)
            except Exception:
                # A receiver that died would leave the worker deaf to the supervisor.
                log.exception("cannot handle frame %s", frame.kind.name)
                if frame.fd is not None:
                    _close_quietly(frame.fd)
            # After, so a LOGLEVEL frame is logged at the level it sets.
            if log.isEnabledFor(logging.DEBUG):  # the name is not looked up for nothing
                log.debug("frame %s %d from the supervisor", frame.kind.name, frame.argument)

    def channel_ended(self, why: str) -> None:
        """The one way out when the supervisor can no longer be heard: drain within -grace."""
        if self.supervisor_gone:
            return
        self.supervisor_gone = True
        log.info("%s: finishing %d sessions", why, self.session_count())
        self.begin_drain(self.settings.grace or self.settings.timeout)

    def descriptor_dropped(self, frame: handoff.Frame) -> None:
        """No free descriptor when a connection arrived (MSG_CTRUNC): that one connection is
        lost, counted, and its address slot given back; the worker goes on."""
        log.error("a connection was lost: no free descriptor to receive it (MSG_CTRUNC)")
        self.stats.add(self.slot, Counter.RECEIVED)
        self.stats.add(self.slot, Counter.TRUNCATED)
        self.stats.add(self.slot, Counter.ABNORMAL)
        self.address_closed(frame.address)

    def dispatch(self, frame: handoff.Frame) -> None:
        if frame.kind is Kind.CONNECTION:
            if self.draining:
                # Raced with our drain: say so, and give the address its slot back.
                self.stats.add(self.slot, Counter.RECEIVED)
                self.refuse(frame.fd, frame.address)
                return
            self.serial += 1
            session_id = f"w{self.slot}.{self.serial}"
            implicit_tls = frame.argument == handoff.IMPLICIT_TLS
            try:  # the supervisor parsed these bytes already: an error here is a bug
                proxied = proxyprotocol.parse(frame.payload) if frame.payload else None
            except proxyprotocol.ProxyError as exc:
                log.error("bad PROXY header from the supervisor: %s", exc)
                self.refuse(frame.fd, frame.address)
                return
            self.sessions.spawn(self.serve, frame.fd, frame.address, session_id, implicit_tls,
                                proxied)
        elif frame.kind is Kind.DRAIN:
            self.begin_drain(frame.argument)
        elif frame.kind is Kind.LOGLEVEL:
            xtnd.apply_level(frame.argument)
        elif frame.kind is Kind.REOPEN_LOG and self.handler is not None:
            try:
                self.handler.reopen()
            except OSError as exc:  # keep writing the old file rather than stop serving
                log.error("cannot reopen the log file: %s", exc)
        elif frame.kind is Kind.RELOAD:
            log.info("reload requested")
            # Its own greenlet, as the file watcher's: a reload waits for dummy hashes in the
            # pool, and meanwhile the receiver must keep taking connections.
            gevent.spawn(self.reload, "reload request")

    def reload(self, why: str) -> None:
        """One reload at a time, in the order requested: the last file read is the one kept."""
        with self.reload_lock:
            self.reloader.reload_all(why)

    def refuse(self, fd: int, address_key: int) -> None:
        sock = stdsocket.socket(fileno=fd)
        try:
            sock.send(refusal.SHUTTING_DOWN, stdsocket.MSG_DONTWAIT | stdsocket.MSG_NOSIGNAL)
        except OSError:
            pass
        finally:
            sock.close()
        self.address_closed(address_key)

    def serve(self, fd: int, address_key: int, session_id: str, implicit_tls: bool,
              proxied: proxyprotocol.ProxyHeader | None = None) -> None:
        # RECEIVED counts only once the greenlet runs, right after serve's CURRENT + 1 (in
        # Connection.serve): the supervisor's load (CURRENT + handed off but not received) then
        # never misses a session that waits for its greenlet, so -maxclients stays exact.
        me = gevent.getcurrent()
        parked = False
        try:
            sock = gevent.socket.socket(fileno=fd)
            connection = Connection(sock, self.ctx, session_id, implicit_tls, proxied)
            connection.parking, connection.address_key = self.parking, address_key
            self.connections[me] = connection
            parked = connection.serve()
        finally:
            self.connections.pop(me, None)
            # The supervisor's own key for the address, even if the client reset before its
            # address could be read here (issue 10), so its per-address count comes down.
            if not parked:
                self.address_closed(address_key)

    def resume_later(self, connection: Connection,
                     error: BaseException | None) -> gevent.Greenlet:
        """A parked session's next greenlet, in the session group (worker.parking)."""
        return self.sessions.spawn(self.resume, connection, error)

    def resume(self, connection: Connection, error: BaseException | None) -> None:
        me = gevent.getcurrent()
        parked = False
        self.connections[me] = connection
        try:
            parked = connection.resume(error)
        finally:
            self.connections.pop(me, None)
            if not parked:
                self.address_closed(connection.address_key)

    def session_count(self) -> int:
        return len(self.sessions) + len(self.parking)

    def address_closed(self, address_key: int) -> None:
        if self.settings.max_per_address:
            self.tell_supervisor(Kind.CLOSED, address=address_key)

    def tell_supervisor(self, kind: Kind, argument: int = 0, address: int = 0) -> bool:
        """Send a frame up the channel (DRAINING, CLOSED); False if it cannot go."""
        if self.supervisor_gone:
            return False
        return self.link.tell(kind, argument, address)

    def begin_drain(self, deadline_seconds: int = 0) -> None:
        """Stop taking work; sessions get ``deadline_seconds`` (0 = as long as they need)."""
        if not self.draining:
            self.draining = True  # RUNNING -> DRAINING
            log.info("worker %d draining, %d sessions", self.slot, self.session_count())
            self.drain_started.set()
            if not self.supervisor_gone:
                # Stop being sent sessions (a drain may start here: SIGTERM to this pid).
                self.tell_supervisor(Kind.DRAINING)
        if deadline_seconds:
            deadline = time.monotonic() + deadline_seconds
            if self.drain_deadline is None or deadline < self.drain_deadline:
                self.drain_deadline = deadline

    def finish_sessions(self) -> None:
        """Wait for sessions; past the deadline, close the rest without applying them, except
        those in UPDATE: their commit runs in the pool, where no kill can stop it, so they get
        up to COMMIT_WAIT_SECONDS more to finish it and say +OK."""
        while self.session_count():
            if len(self.sessions):
                self.sessions.join(timeout=0.2)
            else:
                gevent.sleep(0.2)  # only parked sessions: join would return at once
            if self.drain_deadline is None or time.monotonic() < self.drain_deadline:
                continue
            # Parked sessions end like killed ones (they say goodbye in their new greenlet).
            woken = self.parking.wake_all(GreenletExit())
            updating = [g for g in self.sessions if self._updating(g)]
            idle = [g for g in self.sessions if g not in updating and g not in woken]
            if idle:
                log.info("grace period over: closing %d sessions unapplied", len(idle))
                gevent.killall(idle, block=False)
            if updating:
                log.info("grace period over: waiting up to %ds for %d updates to finish",
                         COMMIT_WAIT_SECONDS, len(updating))
                gevent.joinall(updating, timeout=COMMIT_WAIT_SECONDS)
            self.sessions.join(timeout=1)  # a session still in the pool ends with the process
            break

    def _updating(self, greenlet: gevent.Greenlet) -> bool:
        connection = self.connections.get(greenlet)
        return connection is not None and connection.session.state is State.UPDATE

    def tick(self) -> None:
        """The heartbeats the supervisor's watchdog reads, the title, the log flush, and a
        check that the parent is still the supervisor that started us."""
        shown = None
        capacity = descriptors.session_capacity(descriptors.soft_limit(),
                                                descriptors.open_count())
        self.stats.set(self.slot, Counter.CAPACITY, capacity)
        while True:
            self.stats.set(self.slot, Counter.HEARTBEAT, int(time.monotonic() * 1000))
            self.probe_pool()
            if os.getppid() != self.parent:
                self.channel_ended("the supervisor is gone (the parent process changed)")
            current = self.session_count()
            if current != shown:
                setproctitle(f"iupop3: worker {self.slot} [{current} sessions]")
                shown = current
            if self.handler is not None:
                self.handler.flush_if_due()
            gevent.sleep(TICK_SECONDS)

    def probe_pool(self) -> None:
        """Queue a no-op in the thread pool unless the last one is still waiting. POOL_BEAT is
        stamped whenever any pool task ends (``pool_beat`` from ``in_threadpool``) and by this
        probe, which runs at once in an idle pool: it goes stale only when no task has
        finished for -worker-timeout while work waited. A long queue of legitimate work (a
        login flood of costly hashes) keeps finishing tasks, so it is never taken for a hang
       . A single task may take long (an mbox dot-lock wait, up to
        min(20 s, half of -worker-timeout): worker/context.py); only all threads stuck at
        once go stale."""
        if self.pool_probe is not None and not self.pool_probe.ready():
            return
        # In its own greenlet: gevent's threadpool.spawn waits for a free thread, and the
        # ticker waiting there stopped the loop's own heartbeat while the pool was busy.
        self.pool_probe = gevent.spawn(in_threadpool, gevent.get_hub(), pool_beat,
                                       self.stats, self.slot)


def pool_beat(stats: StatsArea, slot: int) -> None:
    """A pool task ended (or the probe ran): the pool moves. Runs in a pool thread; an aligned
    8-byte store, so threads racing here are safe (the latest wins within microseconds)."""
    stats.set(slot, Counter.POOL_BEAT, int(time.monotonic() * 1000))


def in_threadpool(hub, function, *args, beat: Callable[[], None] | None = None):
    """``function(*args)`` in gevent's threadpool; its exception is raised here, in the calling
    greenlet, and only here: gevent would also print it to stderr with a traceback, as if it
    were a crash (an ENOSPC from an mbox scan did: tests/test_faults.py). ``beat`` runs in the
    pool thread when the task ends: the pool is moving (Worker.probe_pool)."""
    def call():
        try:
            return function(*args), None
        except Exception as exc:  # the caller handles it (or logs it with the session id)
            return None, exc
        finally:
            if beat is not None:
                beat()

    task = hub.threadpool.spawn(call)
    try:
        result, error = task.get()
    except gevent.GreenletExit:
        # A kill (the grace deadline) cannot stop the thread: unwind only once it is done, so
        # the session's finally never drops a lock or closes a descriptor it still uses
        #; a kill that comes again cuts this short (the worker is exiting).
        task.wait(COMMIT_WAIT_SECONDS)
        raise
    if error is not None:
        raise error
    return result


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def main(argv: list[str]) -> int:
    slot = int(argv[0])
    settings = settings_mod.from_json(os.environ["IUPOP3_SETTINGS"])
    # Ctrl-C and a terminal hangup reach the whole process group; the supervisor decides.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    setproctitle(f"iupop3: worker {slot} [starting]")
    stats = StatsArea.attach(STATS_FD)
    level = logsetup.LEVEL_NAMES[stats.get_header(Header.LOGLEVEL)]
    handler = logsetup.configure(f"worker-{slot}", level, settings.logfile, settings.log_flush)
    try:
        # Blocking, on purpose before serving: it reads the users file or /etc/shadow, and a
        # pam: source imports its binding (which runs ldconfig) here, not in a session.
        source = open_source(settings)
    except AccountSourceError as exc:
        log.error("%s", exc)
        return 1
    hub = gevent.get_hub()
    hub.threadpool.maxsize = descriptors.POOL_THREADS  # the descriptor budget counts them
    link = SupervisorLink(gevent.socket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_SEQPACKET,
                                               fileno=CHANNEL_FD))
    ctx = build_context(settings, stats, slot, source,
                        offload=lambda f, *a: in_threadpool(hub, f, *a,
                                                             beat=lambda: pool_beat(stats, slot)),
                        sleep=gevent.sleep, supervisor=link,
                        streams=gevent.lock.BoundedSemaphore(
                            descriptors.stream_slots(descriptors.soft_limit())))
    openahead.WORKER_BUDGET = descriptors.open_ahead_files(descriptors.soft_limit())
    reloader = Reloader([ctx.accounts, ctx.tls, ctx.xtnd])
    worker = Worker(slot, settings, stats, ctx, link, reloader, handler)
    # What is made so far lives as long as the process (the accounts table, modules): keep it
    # out of the cyclic collector's full passes, which walked it again at every one while
    # sessions waited (100,000 accounts: about 70 ms a pass). A reload's table is collected
    # as usual; freed by reference counting, the frozen one does not stay.
    gc.freeze()
    return worker.run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
