"""Sans-IO tests of the failed-login defence's parts: address keys (IPv6 prefixes, IPv4-mapped,
trusted networks), the keyed shared tables (no eviction of a running penalty, a full bucket
fails closed) and the guard's decisions on a fake clock."""

from __future__ import annotations

import pytest

from shared import netaddr
from shared import settings as settings_mod
from shared.keytable import FAILURES, ENTRY_WORDS, PENDING, PROBES, Keyer
from shared.stats import StatsArea, Table
from worker.authguard import AuthGuard, Outcome


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _guard(**overrides) -> tuple[AuthGuard, Clock, StatsArea]:
    values = dict(users="unused", auth_delay=1, auth_delay_max=8, auth_block=0)
    values.update(overrides)
    settings = settings_mod.Settings(**values)
    area = StatsArea.create(2, 0)
    clock = Clock()
    keys = Keyer(area.key_secret(), settings.ipv6_prefix)
    return AuthGuard(settings, area, 1, keys, sleep=lambda s: None, clock=clock), clock, area


@pytest.mark.parametrize("address, key", [
    ("192.0.2.7", "192.0.2.7"),
    ("::ffff:192.0.2.7", "192.0.2.7"),
    ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
    ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),
    ("fe80::1%lo", "fe80::/64"),
    ("", ""),
])
def test_limit_key_normalises_and_aggregates(address, key):
    """IPv4-mapped addresses count as IPv4, IPv6 per /64, zones dropped."""
    assert netaddr.limit_key(address, 64) == key


def test_ipv6_prefix_setting_changes_the_aggregate():
    """-ipv6-prefix 48 puts two /64s of one site under one key; 128 keeps addresses apart."""
    keys48, keys128 = Keyer(b"k" * 16, 48), Keyer(b"k" * 16, 128)
    assert keys48.address("2001:db8:1:2::1") == keys48.address("2001:db8:1:3::1")
    assert keys128.address("2001:db8:1:2::1") != keys128.address("2001:db8:1:2::2")


def test_keys_depend_on_the_secret_and_on_the_kind():
    """Two runs (secrets) give unrelated keys; a user name never collides with an address."""
    one, two = Keyer(b"a" * 16), Keyer(b"b" * 16)
    assert one.user("alice") != two.user("alice")
    assert one.user("192.0.2.1") != one.address("192.0.2.1")
    assert one.address("::ffff:192.0.2.1") == one.address("192.0.2.1")


def test_trusted_networks_parse_and_match():
    """CIDR lists (space or comma separated) match IPv4, IPv4-mapped and IPv6 clients."""
    networks = netaddr.Networks(["10.0.0.0/8, 2001:db8::/32", "192.0.2.9"])
    assert networks.contains("10.1.2.3") and networks.contains("::ffff:10.1.2.3")
    assert networks.contains("2001:db8:ffff::1") and networks.contains("192.0.2.9")
    assert not networks.contains("192.0.2.10") and not networks.contains("")


def test_a_bad_trusted_network_is_a_settings_error():
    """-trusted-networks with something that is not a network is one error line, naming it."""
    with pytest.raises(settings_mod.SettingsError, match="'10.0.0.300/8'"):
        settings_mod.resolve(["-users", "u", "-trusted-networks", "10.0.0.300/8"])
    settings, _ = settings_mod.resolve(["-users", "u", "-trusted-networks", "10.0.0.0/8",
                                        "-trusted-networks", "::1"])
    assert settings.trusted_networks == ("10.0.0.0/8", "::1/128")


def test_every_attempt_after_a_failure_waits_and_successes_take_it_back():
    """The first login is checked at once; after a failure every attempt for the user or from
    the address waits, right or wrong; a right password takes its presumed failure back."""
    guard, clock, _ = _guard()
    first = guard.admit("192.0.2.1", "alice")
    assert (first.outcome, first.wait) == (Outcome.CHECK, 0)
    clock.now += 5
    again = guard.admit("192.0.2.1", "alice")  # the first one failed (nothing taken back)
    assert (again.outcome, again.wait) == (Outcome.CHECK, 1)
    guard.succeeded(again)
    clock.now += 5
    assert guard.admit("192.0.2.1", "alice").wait == 1  # one failure is still remembered


def test_checks_for_one_user_are_serialised_across_addresses():
    """Parallel attempts for one user from fresh addresses get check times a penalty apart;
    one that would wait longer than auth_delay_max is deferred instead."""
    guard, clock, _ = _guard(auth_delay_max=4)
    outcomes = [guard.admit(f"192.0.2.{n + 1}", "alice") for n in range(5)]
    assert [(a.outcome, a.wait) for a in outcomes[:3]] == [
        (Outcome.CHECK, 0), (Outcome.CHECK, 1), (Outcome.CHECK, 3)]
    assert all(a.outcome is Outcome.DEFERRED and a.wait <= 4 for a in outcomes[3:])


def test_no_login_waits_longer_than_the_maximum_behind_fresh_addresses():
    """200 first attempts for alice from 200 IPv6 /64s used to queue her own
    login from a clean address 2955 s out; now nothing waits past auth_delay_max."""
    guard, clock, _ = _guard(auth_delay_max=15, auth_block=20)
    admissions = [guard.admit(f"2001:db8:{n:x}::1", "alice") for n in range(200)]
    own = guard.admit("198.51.100.7", "alice")
    assert max(a.wait for a in admissions + [own]) <= 15
    assert sum(a.outcome is Outcome.CHECK for a in admissions) < 10  # still serialised


def test_a_full_address_table_blocks_no_newcomer():
    """Failed attempts from 20,000 /64s within the window fill the address
    table; clean IPv4 clients are then held back like the worst, never BLOCKED."""
    guard, clock, area = _guard(auth_delay_max=15, auth_block=20)
    # 20,000 keys, not 5,000: the keys hash with a secret drawn per run, and only this many
    # leave no entry of the 4,095 free whatever the secret (each is the start of 16 probe runs).
    for n in range(20000):
        guard.admit(f"2001:db8:{n // 65536:x}:{n % 65536:x}::1", f"nobody{n}")
        clock.now += 0.02
    assert guard.addresses.is_overflow(
        guard.addresses.entry(guard.keys.address("2001:db8:ffff:1::1"),
                              int(clock.now * 1000), int(clock.now * 1000) - 900_000))
    for n in range(5):
        admission = guard.admit(f"203.0.113.{n + 1}", f"user{n}")
        assert admission.outcome is Outcome.CHECK and admission.wait <= 15, admission


def test_a_clean_login_takes_over_a_guessers_slot():
    """A guesser whose address is penalised holds only a provisional slot: the user's own
    login from a clean address would wait past the maximum behind it, so it takes the slot
    and the guesser's check is revoked (answered deferred, unchecked)."""
    guard, clock, _ = _guard(auth_delay_max=1)
    for _ in range(3):
        guard.failed(guard.admit("192.0.2.1", "alice"))  # the address and the user penalised
        clock.now += 5
    guesser = guard.admit("192.0.2.1", "alice")
    assert guesser.outcome is Outcome.CHECK and guard.confirm(guesser)
    clock.now += 0.5
    own = guard.admit("198.51.100.1", "alice")
    assert own.outcome is Outcome.CHECK and own.wait <= 1
    assert not guard.confirm(guesser)
    assert guard.confirm(own)


def test_a_penalised_address_is_deferred_rather_than_queued():
    """An address with failures cannot queue behind another check of the user: it waits its
    penalty and is deferred unchecked, so the user's own login is not pushed back."""
    guard, clock, _ = _guard(auth_delay_max=4)
    guard.failed(guard.admit("192.0.2.1", "alice"))  # the address and the user have 1 each
    guard.admit("192.0.2.1", "alice")          # checks after 1 s, reserves the next slot
    third = guard.admit("192.0.2.1", "alice")  # would have to queue: deferred
    assert third.outcome is Outcome.DEFERRED and third.wait == 2
    own = guard.admit("198.51.100.1", "alice")  # a clean address queues, and is checked
    assert own.outcome is Outcome.CHECK


def test_a_clean_address_logs_many_users_in_at_once():
    """32 logins in flight from one address with no failure (a NAT, a proxy, a load test) are
    all checked at once: checks in flight are not presumed failures of a clean address (they
    were, and the 21st login in flight was refused as from a guesser's address)."""
    guard, _, _ = _guard(auth_block=20)
    admissions = [guard.admit("192.0.2.9", f"user{n}") for n in range(32)]
    assert all((a.outcome, a.wait) == (Outcome.CHECK, 0) for a in admissions)
    for admission in admissions:
        guard.succeeded(admission)
    assert guard.admit("192.0.2.9", "user99").wait == 0


def test_a_penalised_address_has_its_checks_in_flight_counted():
    """Once an address has a confirmed failure, its parallel attempts count before they are
    answered: the n-th in flight waits as if the ones before it had failed, and enough of them
    block the address."""
    guard, _, _ = _guard(auth_block=4, auth_delay_max=60)
    guard.failed(guard.admit("192.0.2.9", "user0"))
    waits = [guard.admit("192.0.2.9", f"user{n}") for n in range(1, 5)]
    assert [a.wait for a in waits[:3]] == [1, 2, 4]
    assert waits[3].outcome is Outcome.BLOCKED


def test_a_check_settles_once_as_success_or_failure():
    """A failure confirms the address's check in flight; a success only ends it."""
    guard, _, _ = _guard(auth_block=0)
    ok = guard.admit("192.0.2.9", "alice")
    guard.succeeded(ok)
    assert guard.admit("192.0.2.9", "bob").wait == 0  # bob's check is now in flight
    table = guard.addresses
    at = table.find(guard.keys.address("192.0.2.9"))
    assert (table.get(at, FAILURES), table.get(at, PENDING)) == (0, 1)


def test_trusted_networks_skip_address_blocks_not_user_serialisation():
    """A trusted proxy address is never blocked, but its checks of one user are spaced."""
    guard, _, _ = _guard(auth_block=2, trusted_networks=("192.0.2.0/24",))
    waits = [guard.admit("192.0.2.5", "alice") for _ in range(4)]
    assert all(a.outcome is Outcome.CHECK for a in waits)
    assert [a.wait for a in waits] == sorted(a.wait for a in waits) and waits[-1].wait > 0
    untrusted, _, _ = _guard(auth_block=2)
    outcomes = []
    for n in range(3):
        admission = untrusted.admit("198.51.100.5", f"user{n}")
        untrusted.failed(admission)
        outcomes.append(admission.outcome)
    assert outcomes[-1] is Outcome.BLOCKED


def test_ipv6_addresses_of_one_prefix_share_a_penalty():
    """Failures from one /64 penalise every address in it; another /64 is clean."""
    guard, clock, _ = _guard()
    guard.failed(guard.admit("2001:db8:1:2::1", "alice"))
    assert guard.admit("2001:db8:1:2::ffff", "bob").wait == 1
    assert guard.admit("2001:db8:1:3::1", "carol").wait == 0


def test_a_running_penalty_is_never_evicted_and_a_full_bucket_fails_closed():
    """Fill every entry of a probe run with penalised keys: a newcomer evicts none of them and
    shares the overflow entry, penalised like the worst (auth_delay_max)."""
    guard, clock, area = _guard()
    table = area.table(Table.USER_FAILURES)
    victim = guard.keys.user("victim")
    guard.admit("192.0.2.1", "victim")
    # Plant PROBES - 1 penalised keys in the victim's run, then a newcomer that lands there.
    start = victim % table.buckets
    planted = []
    for i in range(1, PROBES):
        at = ((start + i) % table.buckets) * ENTRY_WORDS
        table.words[at], table.words[at + FAILURES] = 10_000 + i, 3
        table.words[at + 2] = int(clock.now * 1000)
        planted.append(at)
    newcomer = start + table.buckets  # same bucket as the victim, another key
    at = table.entry(newcomer, int(clock.now * 1000), int(clock.now * 1000) - 900_000)
    assert table.is_overflow(at)
    assert table.find(victim) is not None and all(table.words[a] != newcomer for a in planted)
    assert table.words[table.find(victim) + FAILURES] == 1
    # A real name whose key falls in that run (searched with this run's secret) is held back
    # as long as the worst penalty, with nothing evicted.
    name = next(f"n{i}" for i in range(100_000)
                if guard.keys.user(f"n{i}") % table.buckets == start)
    admission = guard.admit("198.51.100.9", name)
    assert admission.wait == guard.settings.auth_delay_max
    assert all(table.words[a + FAILURES] == 3 for a in planted)


def test_the_table_lock_excludes_another_process_and_dies_with_it():
    """The tables' lock (a record lock on the stats memfd) keeps a second process out while
    held, and a holder that exits releases it: a dead worker cannot wedge the others."""
    import subprocess
    import sys

    from conftest import ROOT

    area = StatsArea.create(2, 0)
    code = ("import sys; from shared.stats import StatsArea; "
            f"a = StatsArea.attach({area.fd}); assert a.lock_tables(blocking=True); "
            "print('locked', flush=True); sys.stdin.readline()")
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, pass_fds=(area.fd,),
                             env={"PYTHONPATH": str(ROOT)})
    try:
        assert child.stdout.readline() == b"locked\n"
        assert not area.lock_tables(blocking=False)
        child.stdin.close()
        assert child.wait(10) == 0
        assert area.lock_tables(blocking=False)
        area.unlock_tables()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(5)


def test_supervisor_and_worker_key_an_address_alike():
    """The supervisor's -max-per-address key of a connection equals the key a worker sends
    back in its CLOSED frame for that client's address (behind a PROXY header: the client's)."""
    import socket

    from shared.proxyprotocol import parse, v2_header
    from supervisor.proxyintake import address_key

    guard, _, area = _guard()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        with socket.create_connection(listener.getsockname()) as client:
            conn, _ = listener.accept()
            with conn:
                keys = Keyer(area.key_secret(), guard.settings.ipv6_prefix)
                key = address_key(conn, None, keys)
                proxied = address_key(conn, parse(v2_header(("192.0.2.7", 1))), keys)
            address = client.getsockname()[0]
    assert key == guard.keys.address(address)
    assert proxied == guard.keys.address("192.0.2.7") != key
