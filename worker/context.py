"""What every session of a worker shares, in named parts: accounts, TLS, statistics, the
supervisor link, the XTND authorization, the failed-login guard, the takeover desk, and the
mail location.

``build_context`` makes the parts once (worker/main.py, and the sans-IO tests without a
supervisor) and passes each in; sessions reach a part by its name (``ctx.accounts``,
``ctx.tls``, ``ctx.stats``, ``ctx.supervisor``), never through a catch-all method.
"""

from __future__ import annotations

import functools
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from shared import descriptors
from shared.accountsource import AccountSource, PasswdFileSource, Policy
from shared.accountspec import PASSWD_FILE, UsersSpec
from shared.keytable import Keyer
from shared.stats import Header, StatsArea
from shared.users import Account, Users
from shared.version import VERSION
from worker.accounts import Accounts
from worker.authguard import AuthGuard
from worker import store
from worker.rewrite import Rewriter, Rules
from worker.sessionstats import SessionStats
from worker.streamslots import Semaphore
from worker.supervisorlink import DETACHED, SupervisorLink
from worker.takeoverdesk import TakeoverDesk
from worker.tlsservice import TlsService
from worker.xtnd import XtndAuthorization


def _direct(function: Callable[..., Any], *args: Any) -> Any:
    return function(*args)


class ServerContext:
    def __init__(self, settings: Any, *, accounts: Accounts, tls: TlsService,
                 stats: SessionStats, supervisor: SupervisorLink, xtnd: XtndAuthorization,
                 guard: AuthGuard, takeover: TakeoverDesk,
                 offload: Callable[..., Any] = _direct,
                 sleep: Callable[[float], Any] = time.sleep,
                 streams: Semaphore | None = None):
        self.settings = settings
        self.accounts = accounts
        self.tls = tls
        self.stats = stats
        self.supervisor = supervisor
        self.xtnd = xtnd
        self.guard = guard
        self.takeover = takeover  # this worker's sessions, for logins that find a lock held
        self.slot = stats.slot
        self.version = VERSION
        self.hostname = accounts.hostname
        started = stats.area.get_header(Header.START_TIME) or int(time.time())
        self.since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))
        self._offload = offload
        self.sleep = sleep  # gevent.sleep in a worker: a failed login's delay blocks no one else
        # Message files open at once (RETR, TOP): a gevent semaphore in a worker, so the
        # descriptor budget holds (shared/descriptors.py, worker/streamslots.py).
        self.streams = streams or threading.BoundedSemaphore(descriptors.STREAMS_AT_ONCE)

    @functools.cached_property
    def rewriter(self) -> Rewriter:
        """The served form of messages and its size cache: settings never change in a worker,
        so one Rewriter serves every session (not one per RETR)."""
        return Rewriter(Rules.from_context(self))

    def offload(self, function: Callable[..., Any], *args: Any) -> Any:
        """Run blocking work (hashing, a maildrop scan) where it stalls no other session."""
        return self._offload(function, *args)

    def maildrop_for(self, account: Account) -> store.Maildrop:
        maildrop = store.open_maildrop(self.settings, account, self.rewriter)
        if hasattr(maildrop, "lock_wait"):
            # An mbox dot-lock wait sleeps in a pool thread: keep it well below
            # -worker-timeout, or ten logins to spools a stuck MDA holds would look like a
            # hung pool and get the worker killed with all its sessions.
            maildrop.lock_wait = min(maildrop.lock_wait, self.settings.worker_timeout / 2)
        return maildrop


def build_context(settings: Any, area: StatsArea, slot: int,
                  source: AccountSource | dict[str, Account], *,
                  offload: Callable[..., Any] = _direct,
                  sleep: Callable[[float], Any] = time.sleep,
                  supervisor: SupervisorLink = DETACHED,
                  streams: Semaphore | None = None) -> ServerContext:
    """Every part, made once; worker/main.py passes the thread pool, gevent's sleep and the
    channel, a sans-IO test takes the defaults (no supervisor, work done in place). A test
    may pass a parsed users table for ``source``: it serves as a passwd-file."""
    if isinstance(source, dict):
        table = source if isinstance(source, Users) else Users(source)
        source = PasswdFileSource(UsersSpec(PASSWD_FILE, settings.users), table,
                                  Policy.from_settings(settings))
    hostname = settings.hostname or socket.gethostname()
    xtnd = XtndAuthorization(settings.xtnd)
    xtnd.reload("startup")  # a bad file: an ERROR, and nobody is authorized until it is fixed
    return ServerContext(
        settings,
        accounts=Accounts(source, offload, hostname, sleep),
        tls=TlsService(settings.tls_cert, settings.tls_key),
        stats=SessionStats(area, slot),
        supervisor=supervisor,
        xtnd=xtnd,
        guard=AuthGuard(settings, area, slot, Keyer(area.key_secret(), settings.ipv6_prefix),
                        sleep),
        takeover=TakeoverDesk(settings.takeover_idle),
        offload=offload,
        sleep=sleep,
        streams=streams,
    )
