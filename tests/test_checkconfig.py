"""``iupop3 -check-config`` (issue 14 item 7): the effective settings like ``dovecot -n``, after
the checks a start makes (users, XTND and TLS files), exit 0; or the first error and exit 2."""

from __future__ import annotations

import subprocess
import sys
import tomllib

from conftest import ROOT
from shared import settings as settings_mod


def _run(*args: str, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "supervisor", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=30)


def test_prints_effective_settings_with_their_source(tmp_path):
    """Command line over config file over defaults, each line saying which; the output is a
    config file that resolves to the same settings; nothing is started."""
    users = tmp_path / "users"
    users.write_text("alice:{PLAIN}x::::::\n")
    config = tmp_path / "iupop3.toml"
    config.write_text(f'users = "{users}"\nport = 2110\ntimeout = 300\n')
    result = _run("-config", str(config), "-Check-Config", "-timeout", "600",
                  "-trusted-networks", "10.0.0.0/8")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = {line.split()[0]: line for line in result.stdout.splitlines()[1:]}
    assert lines["timeout"].endswith("# command line") and " 600 " in lines["timeout"]
    assert lines["port"].endswith("# config file") and " 2110 " in lines["port"]
    assert lines["maxclients"].endswith("# default")
    assert lines["trusted_networks"].split("=")[1].split("#")[0].strip() == '["10.0.0.0/8"]'
    assert str(config) in result.stdout.splitlines()[0]
    printed = tmp_path / "printed.toml"
    printed.write_text(result.stdout)
    assert tomllib.loads(result.stdout)["timeout"] == 600
    again, _ = settings_mod.resolve(["-config", str(printed)])
    first, _ = settings_mod.resolve(["-config", str(config), "-timeout", "600",
                                     "-trusted-networks", "10.0.0.0/8"])
    assert again == first


def test_first_error_and_exit_2(tmp_path):
    """A missing users file, a bad XTND file, an unreadable certificate: one line, exit 2."""
    users = tmp_path / "users"
    users.write_text("alice:{PLAIN}x::::::\n")
    xtnd = tmp_path / "pop_xtnd.dat"
    xtnd.write_text("stats alice\nfrobnicate bob\n")
    cases = [(["-users", str(tmp_path / "none")], "cannot read users file"),
             (["-users", str(users), "-xtnd", str(xtnd)], "line 2"),
             (["-users", str(users), "-tls-cert", str(tmp_path / "none.pem")], "none.pem"),
             (["-users", str(users), "-proxy-protocol"], "needs -trusted-networks")]
    for args, words in cases:
        result = _run(*args, "-check-config")
        assert result.returncode == 2, (args, result.stdout)
        assert result.stdout == ""
        assert result.stderr.startswith("iupop3: ") and result.stderr.count("\n") == 1
        assert words in result.stderr, result.stderr
