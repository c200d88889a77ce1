"""One PAM transaction for a POP3 login: authenticate, then PAM's own account checks.

Called by shared/accountsource.py's PAM source, in the worker's thread pool: PAM blocks (pam_unix
hashes; other modules may ask a network service). The binding is pamela (ctypes, maintained by
Jupyter's authors), loaded on first use: its import runs ldconfig to find libpam, which only a
server configured with ``pam:`` should pay for.
"""

from __future__ import annotations

import os
from functools import lru_cache
from types import ModuleType

# <security/_pam_types.h>
PAM_SILENT = 0x8000
PAM_DISALLOW_NULL_AUTHTOK = 0x0001
PAM_RHOST = 4
PAM_SUCCESS = 0
_FLAGS = PAM_SILENT | PAM_DISALLOW_NULL_AUTHTOK  # an empty password never passes, nullok or not
PAM_DIRECTORIES = ("/etc/pam.d", "/usr/lib/pam.d")  # Linux-PAM's config dir, then vendordir


class PamUnavailable(RuntimeError):
    """The PAM binding or libpam cannot be loaded; the message says which."""


@lru_cache(maxsize=1)
def binding() -> ModuleType:
    """pamela, imported once; PamUnavailable if it or libpam is missing."""
    try:
        import pamela
    except (ImportError, OSError) as exc:
        raise PamUnavailable(f"pam: needs the pamela package and libpam ({exc})") from None
    return pamela


def service_file(service: str) -> str | None:
    """The file that configures ``service``, or None: PAM would silently use "other" then."""
    for directory in PAM_DIRECTORIES:
        path = os.path.join(directory, service)
        if os.path.isfile(path):
            return path
    return None


def check(service: str, user: str, password: bytes, rhost: str) -> str | None:
    """Run ``service``'s auth then account stacks for ``user``: None if both pass, else why.

    Blocking. PAM_RHOST carries the client's address, so pam_unix logs it and modules such as
    pam_access can decide on it; the password answers every prompt that hides its echo.
    ``pam_acct_mgmt`` runs only after a good password, as login(1) does.
    """
    if b"\0" in password or "\0" in user or "\0" in rhost:
        return "NUL in the user name, password or address"
    pamela = binding()
    conversation = pamela.new_simple_password_conv([password], "utf-8")  # kept alive to pam_end
    try:
        handle = pamela.pam_start(service, user, conv_func=conversation)
    except pamela.PAMError as exc:
        return f"pam_start failed: {exc.message}"
    result, stage = PAM_SUCCESS, "setting PAM_RHOST"
    try:
        if rhost:
            result = pamela.PAM_SET_ITEM(handle, PAM_RHOST, rhost.encode("utf-8"))
        if result == PAM_SUCCESS:
            result = pamela.PAM_AUTHENTICATE(handle, _FLAGS)
            stage = "authentication"
        if result == PAM_SUCCESS:
            result = pamela.PAM_ACCT_MGMT(handle, _FLAGS)
            stage = "account"
        if result == PAM_SUCCESS:
            return None
        return f"PAM {stage}: {pamela.pam_strerror(handle, result)}"
    finally:
        pamela.PAM_END(handle, result)
