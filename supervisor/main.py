"""The ``iupop3`` command: parse settings, check the files they name, run the supervisor."""

from __future__ import annotations

import os
import sys

from shared import descriptors, settings as settings_mod
from shared.settings import SettingsError
from shared.tlsconfig import TlsConfigError, server_context
from shared.accountsource import startup_problem
from shared.xtndauth import XtndAuthError, load as load_xtnd_auth
from shared.logsetup import log
from supervisor import checkconfig, daemon
from supervisor.arbiter import Supervisor
from supervisor.listeners import ListenError
from supervisor.upgrade import Handover


def _fail(message: str) -> int:
    print(f"iupop3: {message}", file=sys.stderr)
    handover = Handover.from_environ()  # the new supervisor of an upgrade: tell the old one
    if handover is not None:
        daemon.Readiness(handover.ready_fd).failed(message)
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0].lower() == "passwd":
        from shared import pwtool

        return pwtool.main(argv[1:])
    check_only, argv = checkconfig.split_flag(argv)
    try:
        settings, want_help = settings_mod.resolve(argv)
    except SettingsError as exc:
        return _fail(str(exc))
    if want_help:
        sys.stdout.write(settings_mod.help_text() + _descriptor_note(settings))
        return 0
    problem = daemon.check_settings(settings)
    if problem:
        return _fail(problem)
    # Fail fast, before any worker starts: the users source, and -users shadow:/pam: with
    # -user (system accounts need the workers to keep root: shared/accountspec.py).
    problem = startup_problem(settings)
    if problem:
        return _fail(problem)
    try:
        load_xtnd_auth(settings.xtnd)  # workers load it themselves; a typo stops us here
        if settings.tls_cert:
            server_context(settings.tls_cert, settings.tls_key)
    except (TlsConfigError, XtndAuthError) as exc:
        return _fail(str(exc))
    if check_only:  # everything a start checks has passed: show what it would run with
        sys.stdout.write(checkconfig.render(settings, argv))
        return 0
    if settings.demo:
        _print_demo_banner(settings)
    return serve(settings)


def serve(settings) -> int:
    """Run the supervisor, detached with -daemon; the pid file lives exactly as long as it."""
    handover = Handover.from_environ()  # we are the new generation of an upgrade (SIGUSR2)
    if handover is not None:
        readiness = daemon.Readiness(handover.ready_fd, main_pid=True)
    else:
        readiness = daemon.detach() if settings.daemon else daemon.Readiness()
    pidfile = None
    try:
        pidfile_fd = -1
        if settings.pidfile and handover is None:
            pidfile = daemon.PidFile(settings.pidfile).acquire()
            pidfile_fd = pidfile.fd
        elif settings.pidfile and handover.pidfile_fd >= 0:
            pidfile = daemon.PidFile(settings.pidfile)  # taken over once we are ready
            pidfile_fd = handover.pidfile_fd
        on_ready = _on_ready(readiness, pidfile, handover)
        return Supervisor(settings, on_ready=on_ready, pidfile_fd=pidfile_fd,
                          handover=handover).run()
    except (ListenError, daemon.DaemonError, OSError) as exc:
        if isinstance(exc, OSError) and readiness.told:
            raise  # not a start-up failure: keep the traceback
        message = exc.strerror if isinstance(exc, ListenError) and exc.strerror else str(exc)
        # The waiting command exits as soon as it hears of the failure: leave nothing behind first.
        _release(pidfile)
        pidfile = None
        readiness.failed(message)
        if log.handlers:
            log.error("%s", message)
        return _fail(message)
    except KeyboardInterrupt:
        return 130
    finally:
        _release(pidfile)
        readiness.close()  # a daemon that dies before it listens: the parent sees EOF


def _on_ready(readiness: "daemon.Readiness", pidfile: "daemon.PidFile | None",
              handover: Handover | None):
    """Readiness; after an upgrade the pid file is taken over first, so whoever hears "ready"
    (the old supervisor, systemd) finds our pid in it."""
    if handover is None or pidfile is None:
        return readiness.ready

    def ready(message: str) -> None:
        pidfile.take_over(handover.pidfile_fd)
        readiness.ready(message)
    return ready


def _release(pidfile: "daemon.PidFile | None") -> None:
    if pidfile is not None:
        problem = pidfile.release()
        if problem:
            log.info("%s (the next start takes it over)", problem)


def _descriptor_note(settings) -> str:
    """-help says when -maxclients cannot be served with this machine's descriptor limit."""
    limit = descriptors.hard_limit()
    workers = settings.workers or os.cpu_count() or 1
    problem = descriptors.maxclients_problem(settings.maxclients, workers, limit)
    return f"\nwarning: {problem}\n" if problem else ""


def _print_demo_banner(settings) -> None:
    from shared.demo import DEMO_PASSWORD, DEMO_USER

    where = " and ".join(f"[{a}]" if ":" in a else a for a in settings.listen)
    print(f"iupop3 demo: listening on {where} port {settings.port}\n"
          f"  user {DEMO_USER}, password {DEMO_PASSWORD}; mail in {settings.state}\n"
          f"  try:  curl -u {DEMO_USER}:{DEMO_PASSWORD} pop3://127.0.0.1:{settings.port}/1\n"
          f"  stop: press Ctrl-C (or send SIGTERM)", flush=True)
