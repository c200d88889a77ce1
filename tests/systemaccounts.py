"""Real system users for tests (issue 12): made with useradd and chpasswd, named ``iupt`` and
random hex, and deleted on the way out even when the test fails. Used by
tests/test_accountsource.py and tests/test_system_logins.py; they run as root when CI is set
or --system-accounts is given, and skip with the reason otherwise.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import secrets
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "iupt"  # every user and group these tests make starts with it


def why_not_system_accounts(config) -> str | None:
    if not (os.environ.get("CI") or config.getoption("--system-accounts")):
        return "creates real system users: runs when CI is set or with --system-accounts"
    if os.geteuid() != 0:
        return "creates real system users with useradd: needs root"
    missing = [tool for tool in ("useradd", "userdel", "chpasswd", "chage", "usermod", "passwd",
                                 "groupadd", "groupdel") if shutil.which(tool) is None]
    if missing:
        return f"needs {' '.join(missing)} (Debian package passwd)"
    if not os.path.isdir("/etc/pam.d"):
        return "needs Linux-PAM (/etc/pam.d)"
    return None


def run(*command: str, stdin: str | None = None) -> None:
    subprocess.run(command, input=stdin, text=True, check=True, capture_output=True, timeout=60)


def exists(name: str, database=pwd.getpwnam) -> bool:
    try:
        database(name)
    except KeyError:
        return False
    return True


@dataclass
class Site:
    """What the tests made: users by role, their passwords, the group and the PAM services."""

    suffix: str = field(default_factory=lambda: secrets.token_hex(3))
    users: dict[str, str] = field(default_factory=dict)  # role -> user name
    passwords: dict[str, str] = field(default_factory=dict)  # role -> password
    groups: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)

    @property
    def group(self) -> str:
        return f"{PREFIX}{self.suffix}g"

    def add_group(self, name: str) -> None:
        self.groups.append(name)
        run("groupadd", name)

    def add_user(self, role: str, *options: str, method: str = "") -> str:
        """useradd a user with a home, then chpasswd its password (-c METHOD if given)."""
        name = f"{PREFIX}{self.suffix}{role}"
        self.users[role] = name
        run("useradd", "-m", *options, name)
        self.passwords[role] = password = secrets.token_urlsafe(12) + " x"
        run("chpasswd", *(("-c", method) if method else ()), stdin=f"{name}:{password}\n")
        return name

    def install(self, path: Path, text: str) -> Path:
        self.files.append(path)
        path.write_text(text)
        return path

    def remove_all(self) -> list[str]:
        """Delete everything made (each step on its own); the names still present after."""
        for name in self.users.values():
            subprocess.run(["userdel", "-r", name], capture_output=True, timeout=60)
        for name in self.groups:
            subprocess.run(["groupdel", name], capture_output=True, timeout=60)
        for path in self.files:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        left = [n for n in self.users.values() if exists(n)]
        left += [n for n in self.groups if exists(n, grp.getgrnam)]
        left += [str(p) for p in self.files if p.exists()]
        return left + [n for n in self.users.values() if os.path.exists(f"/home/{n}")]


@contextlib.contextmanager
def system_site():
    """A Site whose users, groups and files are deleted on the way out, even on failure;
    leaving any behind fails the test that used it."""
    site = Site()
    try:
        yield site
    finally:
        left = site.remove_all()
        assert not left, f"test users, groups or files left behind: {left}"
