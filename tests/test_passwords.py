"""shared/passwords.py and `iupop3 passwd`: every Dovecot scheme verifies the right password and
only that one, Dovecot's own output verifies, generated hashes round-trip, dummies cost what real
hashes cost, and the command line behaves (run as a real process, on stdin or a terminal).
"""

from __future__ import annotations

import base64
import ctypes
import hashlib
import os
import pty
import select
import subprocess
import sys
import threading
import time
from pathlib import Path

import argon2
import bcrypt
import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st
from passlib.hash import des_crypt, md5_crypt, sha256_crypt, sha512_crypt

from shared import passwords
from shared.passwords import cost_of, hash_password, verify, verify_crypt

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "pässword 1"
RIGHT = PASSWORD.encode()
WRONG = [b"", b"password 1", "pässword 2".encode(), "Pässword 1".encode(),
         "pässword 1 ".encode(), "pässword".encode(), RIGHT + b"\0"]


def _ssha512(password: bytes, salt: bytes) -> bytes:
    return hashlib.sha512(password + salt).digest() + salt


def _library_hashes() -> list[tuple[str, str, str]]:
    """(id, stored, password): each scheme made by the library that owns the algorithm."""
    raw, salt = RIGHT, os.urandom(8)
    blf = bcrypt.hashpw(raw, bcrypt.gensalt(4)).decode()  # $2b$
    fast_argon = dict(time_cost=1, memory_cost=1024, parallelism=1)
    return [
        ("PLAIN", "{PLAIN}" + PASSWORD, PASSWORD),
        ("CLEARTEXT", "{CLEARTEXT}" + PASSWORD, PASSWORD),
        ("PLAIN.B64", "{PLAIN.B64}" + base64.b64encode(raw).decode(), PASSWORD),
        ("CRYPT-des", "{CRYPT}" + des_crypt.hash("s3cr;t"), "s3cr;t"),
        ("CRYPT-md5", "{CRYPT}" + md5_crypt.hash(PASSWORD), PASSWORD),
        ("CRYPT-sha256", "{CRYPT}" + sha256_crypt.using(rounds=1000).hash(PASSWORD), PASSWORD),
        ("CRYPT-sha512", "{CRYPT}" + sha512_crypt.using(rounds=1000).hash(PASSWORD), PASSWORD),
        ("CRYPT-2b", "{CRYPT}" + blf, PASSWORD),
        ("CRYPT-2y", "{CRYPT}$2y$" + blf[4:], PASSWORD),
        ("bare-sha512", sha512_crypt.using(rounds=1000).hash(PASSWORD), PASSWORD),
        ("bare-des", des_crypt.hash("s3cr;t"), "s3cr;t"),
        ("MD5-CRYPT", "{MD5-CRYPT}" + md5_crypt.hash(PASSWORD), PASSWORD),
        ("SHA256-CRYPT", "{SHA256-CRYPT}" + sha256_crypt.using(rounds=5000).hash(PASSWORD),
         PASSWORD),
        ("SHA512-CRYPT", "{SHA512-CRYPT}" + sha512_crypt.using(rounds=5000).hash(PASSWORD),
         PASSWORD),
        ("SHA512-CRYPT-rounds", "{SHA512-CRYPT}" + sha512_crypt.using(rounds=7777).hash(PASSWORD),
         PASSWORD),
        ("BLF-CRYPT", "{BLF-CRYPT}" + blf, PASSWORD),
        ("BLF-CRYPT-2a", "{BLF-CRYPT}" + bcrypt.hashpw(raw, bcrypt.gensalt(4, b"2a")).decode(),
         PASSWORD),
        ("ARGON2I", "{ARGON2I}" + argon2.PasswordHasher(type=argon2.Type.I, **fast_argon)
         .hash(PASSWORD), PASSWORD),
        ("ARGON2ID", "{ARGON2ID}" + argon2.PasswordHasher(type=argon2.Type.ID, **fast_argon)
         .hash(PASSWORD), PASSWORD),
        ("ARGON2ID-4-lanes", "{ARGON2ID}" + argon2.PasswordHasher(
            time_cost=1, memory_cost=1024, parallelism=4).hash(PASSWORD), PASSWORD),
        ("SSHA512", "{SSHA512}" + base64.b64encode(_ssha512(raw, salt)).decode(), PASSWORD),
        ("SSHA512.HEX", "{SSHA512.HEX}" + _ssha512(raw, salt).hex(), PASSWORD),
        ("SSHA512-1-byte-salt", "{SSHA512}" + base64.b64encode(_ssha512(raw, b"s")).decode(),
         PASSWORD),
    ]


LIBRARY_HASHES = _library_hashes()
CRYPT_HASHES = [(i, passwords.split_scheme(s)[1], p) for i, s, p in LIBRARY_HASHES
                if "CRYPT" in i or i.startswith("bare")]
BACKENDS = ["passlib", pytest.param("libxcrypt", marks=pytest.mark.skipif(
    passwords.LIBXCRYPT is None, reason="no libxcrypt (libcrypt.so.1) on this machine"))]

# `doveadm pw -s SCHEME -p 'pässword 1'`, Dovecot 2.3.19.1 on Debian 12.
DOVECOT_VECTORS = """\
{CRYPT}$2y$05$7Q95UkuxhnbEtHAg3xoFXeyAfknFGDJnhQSMnPJTMapCIffJjE4Nu
{DES-CRYPT}MS8WExv852qAE
{MD5-CRYPT}$1$r0ogpF90$vRkOTt5HW.GlLV97uyDC9.
{SHA256-CRYPT}$5$ed8UkU79poDAQAP2$JGqDeL/8/5k5Gn4NvEPUBhR1hdPHtE7f8pv5Mpp5Ww1
{SHA512-CRYPT}$6$xL.ndh07oBuzLSVO$aslH/NpKP7GxLotQpPHs64HRGlbGgMnMtW8vUDhoORwPDAVl45UbuqQr9MYmVgBVss/esp3IIaOu75E39j3nf/
{SHA512-CRYPT}$6$rounds=12000$.XXOFxt3DSbh.Oqm$vOS1K6pPq5rAyS3b0V4I1U.mBQsdxZ9RG/urL.mzk95Ph0xGcTBNqVD6qSp3h8nmDNV1aPBj/wXN7Jf4F8xBx.
{BLF-CRYPT}$2y$05$Ri.q7xOxKTIYhMjLm9BIyOJolfVFSzQLDK6w/u37tTd4EP47c/uZC
{ARGON2I}$argon2i$v=19$m=32768,t=4,p=1$ZOpVF/gxsglqPAbxlBnZOw$Uwf2MFd1GYk2S9Th9DbSxB/+b7aahCjqEkOSyhpr37Y
{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$Ym2uhMzbfmT58uFrsXz0Pw$VNItElcqsQ2RNrR7wyzhUJ2i24H8WfWOc8OS0nsxnJE
{SSHA512}tLdiPTbj37ekV0ci+/n3SS93l01dRLWC6ONBCzoBGUwSOsh5VemW853SeTtD8MkV0wPBau3gL3tCfO6xZgB6C9QPOkc=
{SSHA512.HEX}1c3f4633be70ebb019770f5bfb286215243ae8440f4298b7a1dbdd0d65ad8c58386327cd19bbe40e56fe81cb0e233196da3dbc12658ccde172efb96cd5a6a160fcd82b5d
{SSHA256}VVAwH0Y7Tx1VfdjCwu6Tra7V2sWF4iN/7yCa0RS8QuRjOwXt
{SSHA}CctzbP2yH72fQZySTmo6JQrfbdXis5VY
{SMD5}q8nV18LKUs52ESkR6Guc14HJw8k=
{SHA512}CKWQ1bFe+6HuV0fkV78KrhRH5bOjFVbkHBnd8vTWw2lc3YVFx8X2I6wtGQoVpZVuVsftC++RLO5GPIvd7H4Lyg==
{SHA256}f7RERuWhObO3oHciFhtpNCnGhD0FNBL7CyE3AkK4vbA=
{SHA1}wBFJYYjnh5eS5Eft5JORpd7Gkko=
{PLAIN-MD5}ee0a0fa09df7c1e10c13c2792a1c5fba
{LDAP-MD5}7goPoJ33weEME8J5Khxfug==
{PLAIN.B64}cMOkc3N3b3JkIDE=
{CLEARTEXT}pässword 1
""".splitlines()


# -- verify -----------------------------------------------------------------------------------
@pytest.mark.parametrize("stored,password", [(s, p) for _, s, p in LIBRARY_HASHES],
                         ids=[i for i, _, _ in LIBRARY_HASHES])
def test_library_hash_verifies_right_password_only(stored, password):
    """Each scheme accepts the password it was made from and refuses near misses."""
    assert verify(stored, password.encode())
    for wrong in WRONG + [password.encode() + b"x", password.encode()[:-1]]:
        assert not verify(stored, wrong), wrong


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("data,password", [(d, p) for _, d, p in CRYPT_HASHES],
                         ids=[i for i, _, _ in CRYPT_HASHES])
def test_both_crypt_backends_agree(backend, data, password):
    """libxcrypt and the passlib fallback each verify every crypt(3) kind, right and wrong."""
    assert verify_crypt(data, password.encode(), backend)
    assert not verify_crypt(data, b"password 1", backend)


@pytest.mark.parametrize("stored", DOVECOT_VECTORS, ids=[v.split("}")[0][1:] + str(n)
                                                         for n, v in enumerate(DOVECOT_VECTORS)])
def test_dovecot_doveadm_vectors(stored):
    """What `doveadm pw` wrote for 'pässword 1' verifies; another password does not."""
    assert verify(stored, RIGHT)
    assert not verify(stored, "pässwXrd 1".encode())


@pytest.mark.parametrize("backend", BACKENDS)
def test_drepper_sha512_crypt_vector(backend):
    """The SHA-crypt specification's own test vector (implicit 5000 rounds) verifies."""
    password, _, expected = passwords.LibXCrypt.SELF_TEST
    assert verify_crypt(expected.decode(), password, backend)
    assert verify("{SHA512-CRYPT}" + expected.decode(), password)


def test_libxcrypt_is_chosen_where_present():
    """Where libcrypt.so.1 loads, crypt(3) goes to it rather than to pure-Python passlib."""
    try:
        ctypes.CDLL("libcrypt.so.1")
    except OSError:
        pytest.skip("no libcrypt.so.1 here")
    assert passwords.CRYPT_BACKEND == "libxcrypt"


@pytest.mark.skipif(passwords.LIBXCRYPT is None, reason="no libxcrypt on this machine")
def test_libxcrypt_releases_the_gil():
    """Another thread runs Python while libxcrypt hashes: the event loop is not stalled."""
    data = sha512_crypt.using(rounds=400_000).hash("x")  # ~0.3 s of C
    span: list[float] = []

    def hash_in_thread():
        span.append(time.monotonic())
        verify_crypt(data, b"x", "libxcrypt")
        span.append(time.monotonic())

    thread = threading.Thread(target=hash_in_thread)
    ticks = [time.monotonic()]
    thread.start()
    while len(span) < 2 and len(ticks) < 10_000_000:  # bounded: the hash ends in seconds
        sum(range(50))
        ticks.append(time.monotonic())
    thread.join(30)
    # Held GIL: this thread stops for the whole hash. Released: it never waits long. Two
    # figures of the same run, so it holds on a fast machine and on a loaded one.
    longest_stall = max(b - a for a, b in zip(ticks, ticks[1:]) if b > span[0] and a < span[1])
    assert longest_stall < (span[1] - span[0]) / 2, (longest_stall, span)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nul_in_password_never_matches_a_crypt_prefix(backend):
    """A NUL would end the C string early: "abc\\0def" must not pass for "abc"."""
    data = sha512_crypt.using(rounds=1000).hash("abc")
    assert verify_crypt(data, b"abc", backend)
    assert not verify_crypt(data, b"abc\0def", backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bcrypt_reads_72_bytes_like_dovecot(backend):
    """Both backends, like libxcrypt and Dovecot, compare only the first 72 bytes for bcrypt."""
    data = bcrypt.hashpw(b"a" * 72, bcrypt.gensalt(4)).decode()
    assert verify_crypt(data, b"a" * 80, backend)
    assert not verify_crypt(data, b"a" * 71, backend)


MALFORMED = [
    "", "{", "{}", "{}x", "{NOSUCH}x", "{SHA512-CRYPT}", "{SHA512-CRYPT}garbage",
    "{SHA512-CRYPT}$6$",
    "{SHA512-CRYPT}$6$salt", "{CRYPT}*", "{CRYPT}!", "{CRYPT}$9$x$y", "{BLF-CRYPT}$2y$99$abc",
    "{BLF-CRYPT}$2y$05$short", "{ARGON2ID}$argon2id$v=19$m=x,t=1,p=1$abc$def", "{ARGON2ID}nope",
    "{ARGON2ID}$argon2d$v=19$m=1024,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA",
    "{SSHA512}!!!!", "{SSHA512}" + base64.b64encode(b"short").decode(),
    "{SSHA512}" + base64.b64encode(hashlib.sha512(RIGHT).digest()).decode(),  # no salt at all
    "{SHA1.HEX}zz", "{SHA1.ZIP}abcd", "{PLAIN.B64}@@@", "{SHA512-CRYPT.HEX}abcd",
    "{MD5-CRYPT}" + sha512_crypt.using(rounds=1000).hash(PASSWORD),  # mislabelled
    "{CRYPT}" + sha512_crypt.using(rounds=1000).hash(PASSWORD) + "x",
    "{CRYPT}$6$ünïcode$x",
]


@pytest.mark.parametrize("stored", MALFORMED)
def test_unknown_or_malformed_hash_is_false(stored):
    """Unknown schemes and broken hashes are a mismatch, never an exception."""
    assert verify(stored, RIGHT) is False


@hsettings(max_examples=300, deadline=None)
@given(scheme=st.sampled_from(sorted(passwords.KNOWN_SCHEMES) + ["NOSUCH", "PLAIN.HEX"]),
       data=st.text(max_size=80), password=st.binary(max_size=40))
def test_verify_never_raises(scheme, data, password):
    """Whatever the users file holds, verify answers True or False."""
    assert verify("{" + scheme + "}" + data, password) in (True, False)
    assert verify(data, password) in (True, False)


# -- hash_password ----------------------------------------------------------------------------
_PASSWORDS = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"),
                     min_size=1, max_size=18)  # 18 characters fit bcrypt's 72 bytes
_FAST = {"PLAIN": None, "CLEARTEXT": None, "MD5-CRYPT": None, "SHA256-CRYPT": 1000,
         "SHA512-CRYPT": 1000, "SSHA256": None, "SSHA512": None}
_SLOW = {"CRYPT": 4, "BLF-CRYPT": 4, "ARGON2I": 1, "ARGON2ID": 1}


def test_every_generated_scheme_is_tested():
    """The round-trip tests below cover every scheme hash_password offers."""
    assert set(_FAST) | set(_SLOW) == set(passwords.GENERATORS)


def _round_trip(scheme: str, rounds: int | None, password: str) -> None:
    stored = hash_password(password, scheme, rounds)
    assert stored.startswith("{" + scheme)
    assert "\n" not in stored and ":" not in stored
    assert verify(stored, password.encode())
    assert not verify(stored, (password + "x").encode())


@pytest.mark.parametrize("scheme", sorted(_FAST))
@hsettings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(password=_PASSWORDS)
def test_round_trip_fast_schemes(scheme, password):
    """hash_password then verify accepts the password and refuses it with one more character."""
    _round_trip(scheme, _FAST[scheme], password)


@pytest.mark.parametrize("scheme", sorted(_SLOW))
@hsettings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(password=_PASSWORDS)
def test_round_trip_slow_schemes(scheme, password):
    """The same round trip for the deliberately slow schemes, with few examples."""
    _round_trip(scheme, _SLOW[scheme], password)


def test_defaults_match_doveadm():
    """SHA512-CRYPT with 5000 implicit rounds by default, and Dovecot's argon2 parameters."""
    stored = hash_password(PASSWORD)
    assert stored.startswith("{SHA512-CRYPT}$6$") and "rounds=" not in stored
    assert cost_of(stored) == ("SHA512-CRYPT", 5000)
    assert cost_of(hash_password(PASSWORD, "argon2id")) == ("ARGON2ID", 3, 65536, 1)
    assert cost_of(hash_password(PASSWORD, "ARGON2I")) == ("ARGON2I", 4, 32768, 1)
    assert cost_of(hash_password(PASSWORD, "blf-crypt")) == ("BLF-CRYPT", 10)


def test_rounds_are_honoured():
    """-rounds reaches the hash: SHA rounds, bcrypt cost, argon2 passes."""
    assert cost_of(hash_password(PASSWORD, "SHA256-CRYPT", 6000)) == ("SHA256-CRYPT", 6000)
    assert cost_of(hash_password(PASSWORD, "CRYPT", 5)) == ("BLF-CRYPT", 5)
    assert cost_of(hash_password(PASSWORD, "ARGON2ID", 1))[:2] == ("ARGON2ID", 1)


@pytest.mark.parametrize("password,scheme,rounds,message", [
    (PASSWORD, "NOSUCH", None, "unknown scheme"),
    (PASSWORD, "DES-CRYPT", None, "unknown scheme"),  # verified, never written anew
    (PASSWORD, "SHA512-CRYPT", 999, "rounds from 1000"),
    (PASSWORD, "BLF-CRYPT", 32, "rounds from 4 to 31"),
    (PASSWORD, "PLAIN", 5, "takes no rounds"),
    ("", "SHA512-CRYPT", None, "empty password"),
    ("a\0b", "PLAIN", None, "NUL"),
    ("é" * 37, "BLF-CRYPT", None, "72 bytes"),
])
def test_hash_password_refuses_bad_input(password, scheme, rounds, message):
    """Bad input raises ValueError with a message a person can act on."""
    with pytest.raises(ValueError, match=message):
        hash_password(password, scheme, rounds)


@pytest.mark.parametrize("password", ["a:b", " lead", "trail ", "tab\there", "line\nbreak"])
def test_plain_that_would_break_the_line_is_base64(password):
    """A PLAIN password with ':' or odd whitespace is written {PLAIN.B64}, which Dovecot reads."""
    stored = hash_password(password, "PLAIN")
    assert stored.startswith("{PLAIN.B64}") and ":" not in stored and "\n" not in stored
    assert verify(stored, password.encode())


# -- dummies ----------------------------------------------------------------------------------
def test_dummy_is_a_typical_hash_nobody_knows():
    """DUMMY is SHA512-CRYPT at the default cost, and no simple password opens it."""
    assert cost_of(passwords.DUMMY) == ("SHA512-CRYPT", 5000)
    for guess in (b"", b"x", b"iupop3", b"password", b"demo"):
        assert not verify(passwords.DUMMY, guess)


@pytest.mark.parametrize("scheme", sorted(passwords.GENERATORS) + ["SSHA", "SHA1", "DES-CRYPT"])
def test_dummy_for_each_scheme(scheme):
    """dummy_for(scheme) is a hash of that scheme, at its default cost."""
    dummy = passwords.dummy_for(scheme)
    expected = {"CLEARTEXT": "PLAIN", "DES-CRYPT": "CRYPT"}.get(scheme, scheme)
    assert passwords.parse(dummy)[0] == expected


def test_dummy_for_unknown_scheme_raises():
    """Asking for a dummy of a scheme nobody knows is a programming error."""
    with pytest.raises(ValueError):
        passwords.dummy_for("NOSUCH")


@pytest.mark.parametrize("stored", [
    "{BLF-CRYPT}$2y$05$Ri.q7xOxKTIYhMjLm9BIyOJolfVFSzQLDK6w/u37tTd4EP47c/uZC",
    DOVECOT_VECTORS[5],  # SHA512-CRYPT rounds=12000
    "{ARGON2ID}" + argon2.PasswordHasher(time_cost=2, memory_cost=2048, parallelism=2).hash("x"),
    "{MD5-CRYPT}$1$r0ogpF90$vRkOTt5HW.GlLV97uyDC9.",
    "{SSHA256}VVAwH0Y7Tx1VfdjCwu6Tra7V2sWF4iN/7yCa0RS8QuRjOwXt",
    des_crypt.hash("x"),
])
def test_dummy_like_keeps_the_cost(stored):
    """dummy_like copies the scheme and every cost parameter of a real hash."""
    assert cost_of(passwords.dummy_like(stored)) == cost_of(stored) is not None


def test_site_dummy_follows_the_most_common_cost():
    """The site's dummy has the (scheme, cost) most accounts have; no accounts: DUMMY."""
    blf5 = [hash_password(f"p{n}", "BLF-CRYPT", 5) for n in range(3)]
    sha = [hash_password("q", "SHA512-CRYPT", 6000)] * 2
    assert cost_of(passwords.site_dummy(blf5 + sha + ["{PLAIN}x"])) == ("BLF-CRYPT", 5)
    assert passwords.site_dummy([]) == passwords.DUMMY
    assert passwords.site_dummy(["{NOSUCH}x", "", "*"]) == passwords.DUMMY


def _median_seconds(stored: str, runs: int = 5) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        verify(stored, b"wrong password")
        times.append(time.perf_counter() - t0)
    return sorted(times)[runs // 2]


def test_unknown_user_costs_what_a_known_user_costs():
    """Checking the dummy takes about as long as checking a real hash of the same cost."""
    real = hash_password("secret", "SHA512-CRYPT", 40_000)
    dummy = passwords.dummy_like(real)
    ratio = _median_seconds(dummy) / _median_seconds(real)
    assert 0.5 < ratio < 2.0, ratio


# -- iupop3 passwd ----------------------------------------------------------------------------
def passwd(*args: str, stdin: bytes = RIGHT + b"\n") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "supervisor", "passwd", *args], input=stdin,
                          capture_output=True, cwd=ROOT, timeout=60)


def test_passwd_reads_stdin_and_prints_default_scheme():
    """`iupop3 passwd` with a pipe prints one SHA512-CRYPT line that verifies."""
    result = passwd()
    assert result.returncode == 0 and result.stderr == b""
    line = result.stdout.decode()
    assert line.endswith("\n") and line.count("\n") == 1
    assert line.startswith("{SHA512-CRYPT}$6$") and verify(line.strip(), RIGHT)


def test_passwd_options_are_case_insensitive():
    """-SCHEME and -Rounds work, and the scheme name's case does not matter."""
    result = passwd("-SCHEME", "blf-crypt", "-Rounds", "5")
    assert result.returncode == 0, result.stderr
    assert cost_of(result.stdout.decode().strip()) == ("BLF-CRYPT", 5)
    assert verify(result.stdout.decode().strip(), RIGHT)


def test_passwd_reads_only_the_first_line_and_strips_crlf():
    """A CRLF line ends at CR LF; later lines are not part of the password."""
    result = passwd("-scheme", "plain", stdin=b"one two\r\nsecond line\n")
    assert result.stdout == b"{PLAIN}one two\n"


@pytest.mark.parametrize("args,stdin,message", [
    (["-scheme", "nosuch"], RIGHT, "unknown scheme"),
    (["-sch", "PLAIN"], RIGHT, "may not be abbreviated"),
    (["--scheme", "PLAIN"], RIGHT, "unknown option"),
    (["plain"], RIGHT, "unknown option"),
    (["-scheme"], RIGHT, "needs a value"),
    (["-rounds", "many"], RIGHT, "whole number"),
    (["-rounds", "10"], RIGHT, "rounds from 1000"),
    (["-scheme", "ssha512", "-rounds", "10"], RIGHT, "takes no rounds"),
    ([], b"", "empty password"),
    ([], b"\n", "empty password"),
    ([], b"\xff\xfe\n", "not UTF-8"),
])
def test_passwd_bad_input_exits_2_with_one_line(args, stdin, message):
    """Bad input: nothing on stdout, one line on stderr, exit status 2."""
    result = passwd(*args, stdin=stdin)
    assert result.returncode == 2 and result.stdout == b""
    err = result.stderr.decode()
    assert err.startswith("iupop3 passwd: ") and err.count("\n") == 1 and message in err


def test_passwd_help():
    """-help prints the usage with the scheme list and exits 0."""
    result = passwd("-HELP")
    assert result.returncode == 0 and b"-scheme NAME" in result.stdout
    assert b"ARGON2ID" in result.stdout


def _on_terminal(answers: list[bytes]) -> tuple[int, bytes]:
    """Run `iupop3 passwd` on a new pseudo-terminal, typing each answer after a prompt."""
    pid, fd = pty.fork()
    if pid == 0:  # child: the pty is its controlling terminal, so getpass uses /dev/tty
        try:
            os.chdir(ROOT)
            os.execv(sys.executable, [sys.executable, "-m", "supervisor", "passwd"])
        finally:
            os._exit(127)
    seen, pending, deadline = b"", list(answers), time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.5)
            if not ready:
                continue
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
            # Answer each prompt once it is shown: getpass flushes earlier typing (TCSAFLUSH).
            if pending and seen.count(b"assword:") > len(answers) - len(pending):
                os.write(fd, pending.pop(0) + b"\n")
    finally:
        os.close(fd)
        _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), seen


def test_passwd_on_a_terminal_asks_twice_without_echo():
    """On a terminal the password is typed twice, never echoed, and the hash is printed."""
    code, screen = _on_terminal([b"tty secret", b"tty secret"])
    assert code == 0, screen
    assert b"Password:" in screen and b"Retype password:" in screen
    assert b"tty secret" not in screen
    hashed = screen.split(b"Retype password:")[1].strip().decode()
    assert hashed.startswith("{SHA512-CRYPT}") and verify(hashed, b"tty secret")


def test_passwd_on_a_terminal_refuses_a_mismatch():
    """Two different answers on a terminal: exit 2 and a one-line reason."""
    code, screen = _on_terminal([b"first", b"second"])
    assert code == 2 and b"passwords do not match" in screen
