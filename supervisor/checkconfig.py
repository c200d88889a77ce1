"""``iupop3 -check-config``: the effective settings, printed the way ``dovecot -n`` does.

supervisor/main.py checks everything a start checks (settings, users, XTND and TLS files) and
then, instead of starting, prints every setting as a TOML line with where its value came from:
the command line over the config file over the default. The output is itself a valid config.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from shared import settings as settings_mod
from shared.version import VERSION

OPTION = "check_config"


def split_flag(argv: Sequence[str]) -> tuple[bool, list[str]]:
    """(was -check-config given, the other arguments); spelled like every option (one dash,
    any case, dashes or underscores)."""
    rest = [a for a in argv if a[1:].lower().replace("-", "_") != OPTION or a[:1] != "-"]
    return len(rest) != len(argv), rest


def render(settings, argv: Sequence[str]) -> str:
    cli, config, _ = settings_mod.parse_command_line(argv)
    config = os.path.abspath(config) if config else None
    from_file = settings_mod.load_toml(config) if config else {}
    lines = [f"# iupop3 {VERSION}: effective settings (command line > "
             f"{'config file ' + config if config else 'no config file'} > defaults)"]
    width = max(len(s.name) for s in settings_mod.SETTINGS)
    for setting in settings_mod.SETTINGS:
        if setting.name in ("demo", "state") and not settings.demo:
            continue  # as in etc/iupop3.toml: only the demo uses them
        value = getattr(settings, setting.name)
        if setting.name in cli:
            source = "command line"
        elif setting.name in from_file:
            source = "config file"
        elif value != setting.default:
            source = "-demo"
        else:
            source = "default"
        text = settings_mod.toml_value(value)
        lines.append(f"{setting.name:<{width}} = {text:<24} # {source}")
    return "\n".join(lines) + "\n"
