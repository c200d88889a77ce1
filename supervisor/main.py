"""The ``iupop3`` command: parse settings, check the files they name, run the supervisor."""

from __future__ import annotations

import sys

from shared import settings as settings_mod
from shared.settings import SettingsError
from shared.users import UsersFileError, load_users
from supervisor.arbiter import Supervisor
from supervisor.listeners import ListenError


def _fail(message: str) -> int:
    print(f"iupop3: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        settings, want_help = settings_mod.resolve(argv)
    except SettingsError as exc:
        return _fail(str(exc))
    if want_help:
        sys.stdout.write(settings_mod.help_text())
        return 0
    try:
        load_users(settings.users)  # fail fast, before any worker starts
    except UsersFileError as exc:
        return _fail(str(exc))
    if settings.demo:
        _print_demo_banner(settings)
    try:
        return Supervisor(settings).run()
    except ListenError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return 130


def _print_demo_banner(settings) -> None:
    from shared.demo import DEMO_PASSWORD, DEMO_USER

    where = " and ".join(f"[{a}]" if ":" in a else a for a in settings.listen)
    print(f"iupop3 demo: listening on {where} port {settings.port}\n"
          f"  user {DEMO_USER}, password {DEMO_PASSWORD}; mail in {settings.state}\n"
          f"  try:  curl -u {DEMO_USER}:{DEMO_PASSWORD} pop3://127.0.0.1:{settings.port}/1\n"
          f"  stop: press Ctrl-C (or send SIGTERM)", flush=True)
