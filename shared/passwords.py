"""Password hashes in Dovecot's ``{SCHEME}data`` form: verify, generate, and dummies.

The worker calls ``verify`` in gevent's threadpool; ``iupop3 passwd`` (shared/pwtool.py) calls
``hash_password``; shared/users.py asks ``site_dummy`` for the hash that unknown users are checked
against. crypt(3) strings go to the system's libxcrypt when it is there (the library Dovecot calls,
and a C call that releases the GIL), else to passlib; argon2 to argon2-cffi; bcrypt to bcrypt.
"""

from __future__ import annotations

import base64
import ctypes
import ctypes.util
import hashlib
import hmac
import re
import secrets
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache

import argon2
import bcrypt
from argon2.exceptions import VerificationError
from passlib.hash import des_crypt, md5_crypt, sha256_crypt, sha512_crypt

DEFAULT_SCHEME = "SHA512-CRYPT"  # what `doveadm pw` writes without -s

# -- crypt(3) ---------------------------------------------------------------------------------
_BLF_PREFIXES = ("$2a$", "$2b$", "$2x$", "$2y$")
_CRYPT_KINDS = {"$1$": "MD5-CRYPT", "$5$": "SHA256-CRYPT", "$6$": "SHA512-CRYPT",
                **{p: "BLF-CRYPT" for p in _BLF_PREFIXES}}
_DES = re.compile(r"[./0-9A-Za-z]{13}\Z")
_SHA_CRYPT_ROUNDS = re.compile(r"\$[56]\$rounds=(\d{1,10})\$")
# libxcrypt's CRYPT_MAX_PASSPHRASE_SIZE counts the terminating NUL; both backends share the limit.
_MAX_CRYPT_PASSWORD = 511
_BCRYPT_MAX = 72  # bcrypt reads only this many bytes of a password


def crypt_kind(data: str) -> str | None:
    """The scheme a crypt(3) string belongs to ("SHA512-CRYPT", "DES-CRYPT" ...), or None."""
    if _DES.match(data):
        return "DES-CRYPT"
    head = data[:4] if data.startswith("$2") else data[:3]
    return _CRYPT_KINDS.get(head)


class LibXCrypt:
    """``crypt_rn`` of the system's libxcrypt (libcrypt.so.1), the library Dovecot itself calls.

    ctypes drops the GIL for the call, so the worker's threadpool hashes on the second core while
    the event loop keeps serving; passlib's builtin SHA-crypt holds the GIL but for the 5 ms
    switch interval. Measured on the 2-core dev machine, SHA512-CRYPT at 5000 rounds, 4 pool
    threads: 444 vs 123 verifications/s, and the gevent loop's 1 ms timer late by 0.15 vs 8.5 ms
    (median), 4.8 vs 32 ms (p99).
    """

    DATA_SIZE = 32768  # sizeof(struct crypt_data) in libxcrypt 4 (crypt.h)
    # Ulrich Drepper's SHA-crypt specification, first SHA-512 test vector.
    SELF_TEST = (b"Hello world!", b"$6$saltstring",
                 b"$6$saltstring$svn8UoSVapNtMuq1ukKS4tPQd8iKwSMHWjl/O817G3uBnIFNjnQJuesI68u"
                 b"4OTLiBFdcbYEdFCoEOfaS35inz1")

    def __init__(self, library: ctypes.CDLL):
        crypt_rn = library.crypt_rn  # AttributeError: an old libcrypt without crypt_rn
        crypt_rn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int]
        crypt_rn.restype = ctypes.c_char_p  # NULL on failure instead of a "*0" token
        self._crypt_rn = crypt_rn

    def crypt(self, password: bytes, setting: bytes) -> bytes | None:
        data = ctypes.create_string_buffer(self.DATA_SIZE)
        try:
            return self._crypt_rn(password, setting, data, self.DATA_SIZE)
        finally:
            ctypes.memset(data, 0, self.DATA_SIZE)  # the work area holds a copy of the password

    @classmethod
    def load(cls) -> LibXCrypt | None:
        try:
            lib = cls(ctypes.CDLL("libcrypt.so.1"))
        except (OSError, AttributeError):
            name = ctypes.util.find_library("crypt")  # runs ldconfig: only when the soname fails
            try:
                lib = cls(ctypes.CDLL(name)) if name else None
            except (OSError, AttributeError):
                lib = None
        password, setting, expected = cls.SELF_TEST
        return lib if lib is not None and lib.crypt(password, setting) == expected else None


LIBXCRYPT = LibXCrypt.load()
CRYPT_BACKEND = "libxcrypt" if LIBXCRYPT is not None else "passlib"
_PASSLIB_CRYPT = {"MD5-CRYPT": md5_crypt, "SHA256-CRYPT": sha256_crypt,
                  "SHA512-CRYPT": sha512_crypt, "DES-CRYPT": des_crypt}


def verify_crypt(data: str, password: bytes, backend: str | None = None) -> bool:
    """Check ``password`` against a crypt(3) string; ``backend`` "libxcrypt" or "passlib".

    libxcrypt takes every hash it knows (yescrypt too, Debian's default for /etc/shadow); passlib,
    the fallback where libxcrypt is missing, takes DES, $1$, $5$, $6$ and bcrypt.
    """
    if b"\0" in password or len(password) > _MAX_CRYPT_PASSWORD or not data.isascii():
        return False  # a C string would end at the NUL and check a shorter password
    if (backend or CRYPT_BACKEND) == "libxcrypt":
        if LIBXCRYPT is None:
            return False
        setting = data.encode("ascii")
        result = LIBXCRYPT.crypt(password, setting)
        return result is not None and hmac.compare_digest(result, setting)
    kind = crypt_kind(data)
    try:
        if kind == "BLF-CRYPT":
            # libxcrypt and Dovecot read the first 72 bytes; bcrypt >= 5 refuses longer ones.
            return bcrypt.checkpw(password[:_BCRYPT_MAX], data.encode("ascii"))
        handler = _PASSLIB_CRYPT.get(kind or "")
        return handler is not None and handler.verify(password, data)
    except ValueError:  # a malformed hash of a known kind (passlib's MalformedHashError ...)
        return False


# -- salted and plain digests (SSHA512 and relatives) -------------------------------------------
_DIGESTS: dict[str, tuple[str, bool]] = {  # scheme -> (hashlib name, salted)
    "SHA1": ("sha1", False), "SHA256": ("sha256", False), "SHA512": ("sha512", False),
    "PLAIN-MD5": ("md5", False), "LDAP-MD5": ("md5", False),
    "SSHA": ("sha1", True), "SSHA256": ("sha256", True), "SSHA512": ("sha512", True),
    "SMD5": ("md5", True),
}


def _decode(data: str, encoding: str | None, raw_size: int) -> bytes:
    if encoding is None:
        # Dovecot's password_decode() guesses hex when the length fits a fixed-size digest.
        encoding = "HEX" if raw_size and len(data) == 2 * raw_size else "B64"
    if encoding == "HEX":
        return bytes.fromhex(data)
    if encoding in ("B64", "BASE64"):
        return base64.b64decode(data, validate=True)
    raise ValueError(f"unknown encoding {encoding}")


def _verify_digest(scheme: str, encoding: str | None, data: str, password: bytes) -> bool:
    algorithm, salted = _DIGESTS[scheme]
    size = hashlib.new(algorithm).digest_size
    raw = _decode(data, encoding, 0 if salted else size)
    digest, salt = raw[:size], raw[size:]
    if len(digest) != size or bool(salt) != salted:
        return False
    return hmac.compare_digest(hashlib.new(algorithm, password + salt).digest(), digest)


def _make_salted(scheme: str, password: bytes) -> str:
    algorithm, _ = _DIGESTS[scheme]
    salt = secrets.token_bytes(16)  # Dovecot writes 4 bytes and reads any length
    raw = hashlib.new(algorithm, password + salt).digest() + salt
    return f"{{{scheme}}}{base64.b64encode(raw).decode('ascii')}"


# -- scheme names -----------------------------------------------------------------------------
_ALIASES = {"CLEARTEXT": "PLAIN", "CLEAR": "PLAIN", "DES-CRYPT": "CRYPT", "MD5": "MD5-CRYPT",
            "SHA": "SHA1"}
_CRYPT_SCHEMES = {"CRYPT", "MD5-CRYPT", "SHA256-CRYPT", "SHA512-CRYPT", "BLF-CRYPT"}
_ARGON2_SCHEMES = {"ARGON2I": "$argon2i$", "ARGON2ID": "$argon2id$"}
KNOWN_SCHEMES = frozenset({"PLAIN", *_ALIASES, *_CRYPT_SCHEMES, *_ARGON2_SCHEMES, *_DIGESTS})


def split_scheme(stored: str) -> tuple[str, str]:
    """("SCHEME", data) of a users-file password; a bare hash is CRYPT, as in Dovecot."""
    if stored.startswith("{") and "}" in stored:
        scheme, _, data = stored[1:].partition("}")
        return scheme.upper(), data
    return "CRYPT", stored


def parse(stored: str) -> tuple[str, str | None, str]:
    """(canonical scheme, encoding suffix or None, data): "{SSHA512.HEX}..." -> SSHA512, HEX."""
    scheme, data = split_scheme(stored)
    scheme, _, encoding = scheme.partition(".")
    return _ALIASES.get(scheme, scheme), encoding or None, data


def known_scheme(stored: str) -> bool:
    """Whether ``stored`` names a scheme ``verify`` knows (the users file checks this)."""
    scheme, encoding, _ = parse(stored)
    takes_encoding = scheme == "PLAIN" or scheme in _DIGESTS
    return scheme in KNOWN_SCHEMES and (encoding is None or takes_encoding)


# -- verification -----------------------------------------------------------------------------
_ARGON2 = argon2.PasswordHasher()


def verify(stored: str, password: bytes) -> bool:
    """Whether ``password`` matches the users-file field ``stored``; never raises.

    Unknown schemes and malformed hashes are simply a mismatch: the worker answers every failure
    the same way, and the users file loader has already named bad lines.
    """
    try:
        scheme, encoding, data = parse(stored)
        if scheme == "PLAIN":
            expected = data.encode("utf-8") if encoding is None else _decode(data, encoding, 0)
            return hmac.compare_digest(expected, password)
        if encoding is not None:
            return scheme in _DIGESTS and _verify_digest(scheme, encoding, data, password)
        if scheme in _DIGESTS:
            return _verify_digest(scheme, None, data, password)
        if scheme in _CRYPT_SCHEMES:
            kind = crypt_kind(data)
            if scheme != "CRYPT" and kind != scheme:
                return False  # "{MD5-CRYPT}$6$..." is mislabelled; Dovecot rejects it too
            return verify_crypt(data, password)
        if scheme in _ARGON2_SCHEMES:
            # Dovecot hands either argon2 type to libsodium, whatever the braces say.
            return data.startswith(tuple(_ARGON2_SCHEMES.values())) and _ARGON2.verify(
                data, password)
        return False
    except (ValueError, TypeError, OverflowError, VerificationError):
        return False  # malformed hash (passlib, base64, hex and argon2 all raise ValueError kin)


def is_cheap(stored: str) -> bool:
    """Whether verifying costs microseconds (PLAIN, plain digests): no thread hop is worth it."""
    scheme, _, _ = parse(stored)
    return scheme == "PLAIN" or scheme in _DIGESTS


def plain_secret(stored: str) -> bytes | None:
    """The password itself for a {PLAIN} entry (APOP needs it), else None."""
    try:
        scheme, encoding, data = parse(stored)
        if scheme != "PLAIN":
            return None
        return data.encode("utf-8") if encoding is None else _decode(data, encoding, 0)
    except (ValueError, TypeError):
        return None


# -- generation -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Maker:
    """How ``hash_password`` makes one scheme; ``rounds`` is None for schemes without a cost."""

    make: Callable[[str, str, int | None], str]  # (scheme, password, rounds) -> stored form
    rounds: tuple[int, int, int] | None = None  # (default, lowest, highest)


def _make_plain(scheme: str, password: str, rounds: int | None) -> str:
    # A ":" or a line break would split the users-file line: write Dovecot's base64 form then.
    if password.isprintable() and ":" not in password and password.strip() == password:
        return f"{{{scheme}}}{password}"
    return f"{{{scheme}.B64}}{base64.b64encode(password.encode('utf-8')).decode('ascii')}"


def _make_sha_crypt(scheme: str, password: str, rounds: int | None) -> str:
    handler = sha512_crypt if scheme == "SHA512-CRYPT" else sha256_crypt
    return f"{{{scheme}}}" + handler.using(rounds=rounds).hash(password)


def _make_md5_crypt(scheme: str, password: str, rounds: int | None) -> str:
    return f"{{{scheme}}}" + md5_crypt.hash(password)


def _make_bcrypt(scheme: str, password: str, rounds: int | None) -> str:
    raw = password.encode("utf-8")
    if len(raw) > _BCRYPT_MAX:
        raise ValueError(f"{scheme} reads only the first {_BCRYPT_MAX} bytes of a password: "
                         "choose a shorter password or another scheme")
    return f"{{{scheme}}}" + bcrypt.hashpw(raw, bcrypt.gensalt(rounds)).decode("ascii")


# Dovecot 2.3's argon2 defaults (libsodium's "interactive" limits), one lane as libsodium does.
_ARGON2_MEMORY = {"ARGON2I": 32768, "ARGON2ID": 65536}


def _make_argon2(scheme: str, password: str, rounds: int | None,
                 memory: int | None = None, lanes: int = 1) -> str:
    kind = argon2.Type.ID if scheme == "ARGON2ID" else argon2.Type.I
    hasher = argon2.PasswordHasher(time_cost=rounds, memory_cost=memory or _ARGON2_MEMORY[scheme],
                                   parallelism=lanes, hash_len=32, salt_len=16, type=kind)
    return f"{{{scheme}}}" + hasher.hash(password)


def _make_ssha(scheme: str, password: str, rounds: int | None) -> str:
    return _make_salted(scheme, password.encode("utf-8"))


_SHA_ROUNDS = (5000, 1000, 999_999_999)  # glibc's default and limits, as `doveadm pw` writes
GENERATORS: dict[str, Maker] = {
    "PLAIN": Maker(_make_plain),
    "CLEARTEXT": Maker(_make_plain),
    "CRYPT": Maker(_make_bcrypt, (10, 4, 31)),  # Dovecot 2.3 writes bcrypt for CRYPT too
    "MD5-CRYPT": Maker(_make_md5_crypt),
    "SHA256-CRYPT": Maker(_make_sha_crypt, _SHA_ROUNDS),
    "SHA512-CRYPT": Maker(_make_sha_crypt, _SHA_ROUNDS),
    "BLF-CRYPT": Maker(_make_bcrypt, (10, 4, 31)),  # Dovecot's default 5 is too cheap now
    "ARGON2I": Maker(_make_argon2, (4, 1, 1000)),
    "ARGON2ID": Maker(_make_argon2, (3, 1, 1000)),
    "SSHA256": Maker(_make_ssha),
    "SSHA512": Maker(_make_ssha),
}


def maker(scheme: str) -> Maker:
    """The maker of ``scheme`` (any case); ValueError naming the choices if there is none."""
    found = GENERATORS.get(scheme.upper())
    if found is None:
        raise ValueError(f"unknown scheme {scheme!r} (choose from {', '.join(GENERATORS)})")
    return found


def check_rounds(scheme: str, rounds: int | None) -> int | None:
    """The rounds ``hash_password`` uses for ``scheme`` (None: its default); ValueError if bad."""
    limits = maker(scheme).rounds
    if limits is None:
        if rounds is not None:
            raise ValueError(f"scheme {scheme.upper()} takes no rounds")
        return None
    default, low, high = limits
    if rounds is None:
        return default
    if not low <= rounds <= high:
        raise ValueError(f"scheme {scheme.upper()} takes rounds from {low} to {high}")
    return rounds


def hash_password(password: str, scheme: str = DEFAULT_SCHEME, rounds: int | None = None) -> str:
    """The users-file field for ``password``, e.g. "{SHA512-CRYPT}$6$...", as Dovecot reads it.

    Raises ValueError (with a message fit for a person) for an unknown scheme, rounds outside the
    scheme's range, or a password that cannot be stored (empty, NUL, too long for bcrypt).
    """
    rounds = check_rounds(scheme, rounds)
    if not password:
        raise ValueError("empty password")
    if "\0" in password:
        raise ValueError("the password contains a NUL character")
    return maker(scheme).make(scheme.upper(), password, rounds)


# -- dummies for unknown users ----------------------------------------------------------------
Cost = tuple[str | int, ...]


def cost_of(stored: str) -> Cost | None:
    """What checking ``stored`` costs: (scheme, cost parameters...), or None if unrecognised."""
    scheme, encoding, data = parse(stored)
    if scheme == "PLAIN" or scheme in _DIGESTS:
        return (scheme,)
    if encoding is not None:
        return None
    if scheme in _ARGON2_SCHEMES:
        try:
            p = argon2.extract_parameters(data)
        except ValueError:  # argon2.exceptions.InvalidHashError
            return None
        name = "ARGON2ID" if p.type is argon2.Type.ID else "ARGON2I"
        return (name, p.time_cost, p.memory_cost, p.parallelism)
    kind = crypt_kind(data) if scheme in _CRYPT_SCHEMES else None
    if kind in ("SHA256-CRYPT", "SHA512-CRYPT"):
        found = _SHA_CRYPT_ROUNDS.match(data)
        return (kind, int(found.group(1)) if found else _SHA_ROUNDS[0])
    if kind == "BLF-CRYPT":
        return (kind, int(data[4:6])) if data[4:6].isdigit() else None
    return (kind,) if kind is not None else None


@lru_cache(maxsize=64)
def _dummy(cost: Cost) -> str:
    """A hash of a random secret that costs ``cost`` to check; nobody knows its password."""
    secret = secrets.token_urlsafe(18)
    name, params = str(cost[0]), [int(p) for p in cost[1:]]
    if name in _ARGON2_SCHEMES and len(params) == 3:
        time_cost, memory, lanes = params
        return _make_argon2(name, secret, time_cost, memory, lanes)
    if name == "DES-CRYPT":
        return "{CRYPT}" + des_crypt.hash(secret[:8])
    if name in _DIGESTS:
        algorithm, salted = _DIGESTS[name]
        if salted:
            return _make_salted(name, secret.encode())
        return f"{{{name}}}" + hashlib.new(algorithm, secret.encode()).hexdigest()
    return hash_password(secret, name, params[0] if params else None)


def dummy_for(scheme: str) -> str:
    """A dummy hash of ``scheme`` at the cost ``hash_password`` gives it; ValueError if unknown."""
    name = _ALIASES.get(scheme.upper(), scheme.upper())
    if name not in GENERATORS and name not in _DIGESTS:
        raise ValueError(f"unknown scheme {scheme!r}")
    return _dummy((name,))


def dummy_like(stored: str) -> str:
    """A dummy hash with the scheme and cost parameters of ``stored`` (DUMMY if unrecognised)."""
    cost = cost_of(stored)
    try:
        return _dummy(cost) if cost is not None else DUMMY
    except ValueError:
        return DUMMY  # e.g. SHA-crypt rounds below the range libxcrypt clamps to


def site_dummy(stored_hashes: Iterable[str]) -> str:
    """The dummy for unknown users: as costly as the most common (scheme, cost) among accounts.

    Checking an unknown name then takes as long as checking most real ones, so timing does not
    tell whether a name exists (it can still tell a user of a rarer, costlier scheme).
    """
    costs = Counter(c for c in map(cost_of, stored_hashes) if c is not None)
    if not costs:
        return DUMMY
    (cost, _), = costs.most_common(1)
    try:
        return _dummy(cost)
    except ValueError:
        return DUMMY


DUMMY = dummy_for(DEFAULT_SCHEME)
