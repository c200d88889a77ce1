#!/usr/bin/env python3
"""Set up and run iupop3 from a checkout with nothing but python3.

    python3 dev.py run [iupop3 options]   set up, then serve the embedded demo on port 1110
    python3 dev.py test [pytest options]  set up (test extras and Debian tools), run the suite
    python3 dev.py docs                   regenerate etc/iupop3.toml and the README settings table
    python3 dev.py bench [options]        run the benchmarks in bench/ (see bench/README.md)

The virtual environment lives in .venv inside the checkout and is refreshed when pyproject.toml,
the C accelerator's source changes. On Debian, a missing python3-venv, the C
compiler and Python headers that build the accelerator (and the test tools) are installed with
apt-get when running as root; without a compiler iupop3 still installs, with slower RETR.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PY = VENV / "bin" / "python"
# passwd: the system-account tests (useradd, chage); ip and unshare: the admin client test builds
# a private network namespace (a non-loopback address that still never leaves the machine);
# fail2ban-regex checks etc/fail2ban; haproxy runs etc/haproxy/iupop3.cfg in front of two nodes.
TEST_DEBIAN_PACKAGES = {"curl": "curl", "fetchmail": "fetchmail", "openssl": "openssl",
                        "useradd": "passwd", "chage": "passwd", "ip": "iproute2",
                        "unshare": "util-linux", "fail2ban-regex": "fail2ban",
                        "haproxy": "haproxy",
                        # issue 14: promtool and a real Prometheus scrape -metrics;
                        # systemd-socket-activate passes LISTEN_FDS sockets.
                        "promtool": "prometheus", "prometheus": "prometheus",
                        "systemd-socket-activate": "systemd"}
# tests/test_migration.py serves one Maildir with a private Dovecot, then with iupop3.
DOVECOT_PACKAGES = {"/usr/sbin/dovecot": "dovecot-core", "/usr/lib/dovecot/pop3": "dovecot-pop3d"}
POLICY_RC = "/usr/sbin/policy-rc.d"
# What the install stamp hashes: a change to any of them reinstalls (and rebuilds the C part).
INSTALL_INPUTS = ("pyproject.toml", "worker/_wirestuff.c")


def say(text: str) -> None:
    print(f"dev.py: {text}", flush=True)


def apt_install(packages: list[str]) -> bool:
    if not packages:
        return True
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        say(f"please install {' '.join(packages)} (apt-get install {' '.join(packages)})")
        return False
    say(f"installing Debian packages: {' '.join(packages)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=False, env=env)
    return subprocess.run(["apt-get", "install", "-y", "-qq", *packages], env=env).returncode == 0


def install_without_starting(packages: list[str]) -> None:
    """apt-get install with a policy-rc.d that exits 101, so no system service starts (the
    tests run private instances); a policy file we made is removed again."""
    if not packages or os.geteuid() != 0 or not shutil.which("apt-get"):
        apt_install(packages)
        return
    made = not os.path.exists(POLICY_RC)
    if made:
        Path(POLICY_RC).write_text("#!/bin/sh\n# dev.py: no service starts on install\nexit 101\n")
        os.chmod(POLICY_RC, 0o755)
    try:
        apt_install(packages)
    finally:
        if made:
            os.remove(POLICY_RC)


def ensure_venv(extras: str = "") -> None:
    if not PY.exists():
        say("creating .venv")
        if subprocess.run([sys.executable, "-m", "venv", str(VENV)]).returncode != 0:
            shutil.rmtree(VENV, ignore_errors=True)
            version = f"python3.{sys.version_info.minor}-venv"
            if not apt_install([version]) and not apt_install(["python3-venv"]):
                sys.exit("dev.py: cannot create a virtual environment")
            subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    stamp = VENV / f".installed{extras}"
    digest = hashlib.sha256()
    for name in INSTALL_INPUTS:
        digest.update(name.encode() + b"\0" + (ROOT / name).read_bytes() + b"\0")
    want = digest.hexdigest()
    if stamp.exists() and stamp.read_text() == want:
        return
    ensure_build_tools()
    say("installing iupop3 and its dependencies into .venv")
    target = f".[{extras}]" if extras else "."
    subprocess.run([str(PY), "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True,
                   cwd=ROOT)
    subprocess.run([str(PY), "-m", "pip", "install", "-q", "-e", target], check=True, cwd=ROOT)
    probe = subprocess.run([str(PY), "-c", "import worker._wirestuff"], cwd=ROOT,
                           capture_output=True)
    if probe.returncode != 0:
        say("installed without the C accelerator (no compiler or Python headers; see "
            "`.venv/bin/pip install -v -e .`): RETR runs the slower Python stuffer")
    stamp.write_text(want)


def ensure_build_tools() -> None:
    """A C compiler and the venv Python's headers for worker/_wirestuff.c (pip builds it
    as an optional extension): installed with apt-get as root; without them pip installs
    iupop3 without it (worker/wire.py then uses its Python stuffer; ensure_venv says so)."""
    probe = ("import sys, sysconfig; print(sysconfig.get_paths()['include']); "
             "print((sysconfig.get_config_var('CC') or 'cc').split()[0]); "
             "print(sys.version_info.minor)")
    include, cc, minor = subprocess.run([str(PY), "-c", probe], capture_output=True, text=True,
                                        check=True).stdout.splitlines()
    have_cc, have_headers = _build_tools(include, cc)
    if have_cc and have_headers or os.geteuid() != 0 or not shutil.which("apt-get"):
        return
    packages = [] if have_cc else ["gcc", "libc6-dev"]
    headers = [] if have_headers else [f"python3.{minor}-dev"]
    if not apt_install(packages + headers) and headers:
        apt_install([*packages, "python3-dev"])


def _build_tools(include: str, cc: str) -> tuple[bool, bool]:
    """(a C compiler is on PATH, Python.h is in the venv Python's include folder)."""
    return bool(shutil.which(cc) or shutil.which("gcc")), (Path(include) / "Python.h").exists()


def run(args: list[str]) -> int:
    ensure_venv()
    os.execv(str(PY), [str(PY), "-m", "supervisor", "-demo", *args])


def test(args: list[str]) -> int:
    ensure_venv("test")
    # No system service starts on install (fail2ban, prometheus, dovecot...): tests run
    # private instances of what they need.
    missing = [pkg for tool, pkg in TEST_DEBIAN_PACKAGES.items() if not shutil.which(tool)]
    missing += [pkg for path, pkg in DOVECOT_PACKAGES.items() if not os.path.exists(path)]
    install_without_starting(sorted(set(missing)))
    return subprocess.run([str(PY), "-m", "pytest", *args], cwd=ROOT).returncode


def docs(args: list[str]) -> int:
    ensure_venv()
    code = (
        "from shared import settings as S\n"
        "open('etc/iupop3.toml', 'w').write(S.example_toml())\n"
        "text = open('README.md').read()\n"
        "a, b = '<!-- SETTINGS -->\\n', '<!-- /SETTINGS -->'\n"
        "head, rest = text.split(a, 1)\n"
        "_, tail = rest.split(b, 1)\n"
        "open('README.md', 'w').write(head + a + S.markdown_table() + '\\n' + b + tail)\n"
    )
    return subprocess.run([str(PY), "-c", code], cwd=ROOT).returncode


def bench(args: list[str]) -> int:
    ensure_venv("test,bench")
    return subprocess.run([str(PY), str(ROOT / "bench" / "run.py"), *args], cwd=ROOT).returncode


COMMANDS = {"run": run, "test": test, "docs": docs, "bench": bench}


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(__doc__.strip())
        return 2
    return COMMANDS[sys.argv[1]](sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
