"""Settings: the IUPOP3 command line, the TOML file, -help, and the generated etc/ example."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from shared import settings as S

ROOT = Path(__file__).resolve().parent.parent


def _resolve(*argv: str):
    return S.resolve(["-users", "/dev/null", *argv])[0]


def test_readme_options_case_insensitive():
    """-PORT, -LogLevel debug and -PURGE_RECLAIM work as the README's options do."""
    s = _resolve("-PORT", "2000", "-LogLevel", "debug", "-PURGE_RECLAIM", "-maxmsg", "50",
                 "-xtnd", "pop_xtnd.dat", "-logfile", "/tmp/iupop3.log")
    assert (s.port, s.loglevel, s.purge_reclaim, s.maxmsg) == (2000, "DEBUG", True, 50)
    assert s.xtnd == os.path.abspath("pop_xtnd.dat")


def test_readme_defaults():
    """The README's own defaults are kept: maxmsg 20, THREAD, 2 attempts, 2 minutes."""
    s = _resolve()
    assert (s.maxmsg, s.loglevel, s.login_attempts, s.timeout, s.port) == (20, "THREAD", 2, 120, 110)
    assert s.maxclients > 31


@pytest.mark.parametrize("argv, message", [
    (["-por", "2000"], "unknown option -por"),
    (["-port"], "needs a value"),
    (["-port", "x"], "whole number"),
    (["-loglevel", "loud"], "must be one of"),
    (["--port", "1"], "unknown option"),
    (["port"], "unexpected argument"),
    (["-maxmsg", "-1"], "at least 0"),
])
def test_bad_command_lines(argv, message):
    """Abbreviations, missing and wrong values are one-line errors."""
    with pytest.raises(S.SettingsError, match=message):
        _resolve(*argv)


def test_listen_repeatable():
    """-listen may be given several times."""
    s = _resolve("-listen", "127.0.0.1", "-listen", "::1")
    assert s.listen == ("127.0.0.1", "::1")


def test_config_file_and_command_line_wins(tmp_path):
    """TOML keys set settings; the command line overrides them; unknown keys are errors."""
    cfg = tmp_path / "c.toml"
    cfg.write_text('port = 2110\nmaxmsg = 5\nlisten = ["127.0.0.1"]\nusers = "/dev/null"\n')
    s, _ = S.resolve(["-config", str(cfg), "-maxmsg", "7"])
    assert (s.port, s.maxmsg, s.listen) == (2110, 7, ("127.0.0.1",))
    cfg.write_text("prot = 1\n")
    with pytest.raises(S.SettingsError, match="unknown setting 'prot'"):
        S.resolve(["-config", str(cfg)])
    cfg.write_text('port = "x"\n')
    with pytest.raises(S.SettingsError, match="whole number"):
        S.resolve(["-config", str(cfg)])


def test_every_setting_in_help_and_example():
    """-help and the example config name every setting with its default."""
    text = S.help_text()
    for setting in S.SETTINGS:
        assert setting.option in text
    example = S.example_toml()
    for setting in S.SETTINGS:
        if setting.name not in ("demo", "state"):
            assert f"#{setting.name} = " in example


def test_etc_example_is_current():
    """etc/iupop3.toml is exactly what the settings list generates (python3 dev.py docs)."""
    assert (ROOT / "etc" / "iupop3.toml").read_text() == S.example_toml()


def test_readme_table_is_current():
    """The README's settings table is generated from the same list."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index("<!-- SETTINGS -->") + len("<!-- SETTINGS -->\n")
    end = readme.index("<!-- /SETTINGS -->")
    assert readme[start:end].strip() == S.markdown_table().strip()


def test_settings_json_round_trip():
    """Workers get exactly the supervisor's settings."""
    s = _resolve("-listen", "::1", "-maxmsg", "3")
    assert S.from_json(S.to_json(s)) == s


def test_cli_errors_exit_nonzero():
    """The iupop3 command prints one line and exits 2 on a bad option."""
    out = subprocess.run([sys.executable, "-m", "supervisor", "-por", "2000"], cwd=ROOT,
                         capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "unknown option -por" in out.stderr
    out = subprocess.run([sys.executable, "-m", "supervisor", "-users", "/nonexistent"], cwd=ROOT,
                         capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 2 and "cannot read users file" in out.stderr


def test_cli_help_exits_zero():
    """-help prints every option with its default."""
    out = subprocess.run([sys.executable, "-m", "supervisor", "-HELP"], cwd=ROOT,
                         capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 0 and "-purge_reclaim" in out.stdout and "[default: 20]" in out.stdout
