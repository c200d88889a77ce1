"""The XTND authorization file: IUPOP3's format parsed strictly into an immutable table."""

from __future__ import annotations

import pytest

from shared import xtndauth
from shared.xtndauth import XtndAuthError

README_EXAMPLE = """#
# Format:
# xtnd_command [valid_user ...]
#
shutdown system
stats system levanon hughes
loglevel hughes levanon
"""


def test_readme_example_grants_exactly_what_it_lists():
    """The IUPOP3 1.8 README's POP_XTND.DAT: listed users may, others may not."""
    table = xtndauth.parse(README_EXAMPLE, "pop_xtnd.dat")
    assert table.allows("stats", "hughes") and table.allows("STATS", "Levanon")
    assert table.allows("shutdown", "system")
    assert not table.allows("shutdown", "hughes")
    assert not table.allows("loglevel", "system")
    assert not table.allows("stats", None)


def test_unlisted_command_and_no_file_allow_nobody():
    """A command absent from the file, or no file at all, is allowed to nobody."""
    table = xtndauth.parse("stats alice\nloglevel\n", "f")
    assert not table.allows("shutdown", "alice")
    assert not table.allows("loglevel", "alice")
    assert xtndauth.load("") is xtndauth.NOBODY
    assert not xtndauth.NOBODY.allows("stats", "alice")


def test_comments_blank_lines_and_repeated_commands():
    """# starts a comment anywhere; a command on several lines gets the union of its users."""
    table = xtndauth.parse("\n  # note\nstats alice # the admin\n\nSTATS Bob\n", "f")
    assert table.grants["stats"] == frozenset({"alice", "bob"})


@pytest.mark.parametrize("text, message", [
    ("stats alice\nstat bob\n", "f line 2: unknown XTND command 'stat'"),
    ("client alice\n", "f line 1: unknown XTND command 'client'"),
    ("# ok\nshutdown al/ice\n", "f line 2: invalid user name 'al/ice'"),
])
def test_bad_lines_are_errors_naming_the_line(text, message):
    """A typo is an error that names the line, never silently ignored."""
    with pytest.raises(XtndAuthError) as info:
        xtndauth.parse(text, "f")
    assert str(info.value).startswith(message)


def test_load_reads_the_file_and_reports_unreadable_ones(tmp_path):
    """load() parses a file; a missing or non-UTF-8 file is a one-line error."""
    path = tmp_path / "pop_xtnd.dat"
    path.write_text("stats alice\n")
    assert xtndauth.load(str(path)).allows("stats", "alice")
    with pytest.raises(XtndAuthError, match="cannot read XTND authorization file"):
        xtndauth.load(str(tmp_path / "missing"))
    path.write_bytes(b"stats alice\nstats \xff\n")
    with pytest.raises(XtndAuthError, match="line 2: not UTF-8"):
        xtndauth.load(str(path))


def test_table_is_immutable():
    """The parsed table cannot be changed in place: a reload swaps a whole new one."""
    table = xtndauth.parse("stats alice\n", "f")
    with pytest.raises(TypeError):
        table.grants["stats"] = frozenset({"mallory"})  # type: ignore[index]


def test_shipped_example_file_parses():
    """etc/pop_xtnd.dat is a valid authorization file."""
    from conftest import ROOT

    table = xtndauth.load(str(ROOT / "etc" / "pop_xtnd.dat"))
    assert table.allows("shutdown", "system")


# -- the commands against the real server ---------------------------------------------------
import itertools  # noqa: E402  (integration tests below; the unit tests above need none of these)
import os  # noqa: E402
import poplib  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from pathlib import Path  # noqa: E402

from conftest import ROOT, USERS  # noqa: E402
from processes import wait_until  # noqa: E402
from shared import refusal, statsreport  # noqa: E402
from test_server_lifecycle import _owns_connection  # noqa: E402
from worker import replies as R  # noqa: E402
from worker import xtnd  # noqa: E402

AUTH = "stats alice\nloglevel alice\nshutdown alice\n"


def _auth_file(tmp_path: Path, text: str = AUTH) -> Path:
    folder = tmp_path / "etc"
    folder.mkdir(exist_ok=True)
    path = folder / "pop_xtnd.dat"
    path.write_text(text)
    return path


def _replace(path: Path, text: str) -> None:
    """Save the way editors do: write a temporary file, rename it over the old one."""
    tmp = path.with_name(path.name + ".tmp~")
    tmp.write_text(text)
    os.replace(tmp, path)


def _session(server, user: str, password: str | None = None):
    client = server.raw()
    assert client.line().startswith(b"+OK IUPOP3")
    assert client.command(f"USER {user}").startswith(b"+OK")
    assert client.command(f"PASS {password or USERS[user]}") == R.LOGIN_OK.encode()
    return client


def _stats(client) -> tuple[dict[str, str], list[str]]:
    assert client.command("XTND STATS") == statsreport.HEADER.encode()
    return statsreport.parse([line.decode() for line in client.multiline()])


def _reloaded(server, why: str, mark: int) -> None:
    for slot in (1, 2):
        server.wait_for(rf"worker-{slot} - XTND authorization loaded \({why}\)", start=mark)


def test_xtnd_client_is_logged_and_needs_no_authorization(server):
    """XTND CLIENT works for any logged-in user, without a -xtnd file, and is logged."""
    bob = _session(server, "bob")
    assert bob.command("XTND CLIENT Eudora 1.4.4 (Macintosh)") == b"+OK"
    server.wait_for(r"client says: Eudora 1\.4\.4 \(Macintosh\)")
    assert bob.command("XTND CLIENT evil\x1b[2J\x0bforged line") == b"+OK"
    server.wait_for(r"client says: evil\\x1b\[2J\\x0bforged line")  # escaped, one line
    bob.send(b"xtnd client nc with bare LF\n")  # telnet/nc style, lower case
    assert bob.line() == b"+OK"
    assert bob.command("XTND CLIENT") == xtnd.BAD_ARGUMENTS.format(command="CLIENT").encode()
    assert bob.command("QUIT").startswith(b"+OK")


def test_without_xtnd_file_privileged_commands_are_allowed_to_nobody(server):
    """No -xtnd file: STATS, LOGLEVEL and SHUTDOWN are refused to everyone, and logged."""
    alice = _session(server, "alice")
    for command in ("STATS", "LOGLEVEL DEBUG", "SHUTDOWN"):
        verb = command.split()[0]
        assert alice.command(f"XTND {command}") == \
            f'-ERR XTND {verb} not allowed for "alice"'.encode()
        server.wait_for(rf'XTND {verb} refused: "alice" is not authorized')
    assert alice.command("NOOP") == b"+OK"


def test_unauthorized_unknown_and_malformed_xtnd(start_server, tmp_path):
    """Unlisted users, unknown sub-commands, bad arguments and XTND before login get -ERR."""
    server = start_server("-xtnd", str(_auth_file(tmp_path)))
    early = server.raw()
    early.line()
    assert early.command("XTND STATS") == R.WRONG_STATE.encode()
    bob = _session(server, "bob")
    assert bob.command("XTND STATS") == b'-ERR XTND STATS not allowed for "bob"'
    assert bob.command("XTND SHUTDOWN") == b'-ERR XTND SHUTDOWN not allowed for "bob"'
    assert bob.command("XTND XMIT") == xtnd.UNKNOWN.encode()
    assert bob.command("XTND") == xtnd.UNKNOWN.encode()
    server.wait_for(r"unknown XTND command 'XMIT'")
    alice = _session(server, "alice")
    assert alice.command("XTND LOGLEVEL loud") == xtnd.BAD_LEVEL.encode()
    assert alice.command("XTND LOGLEVEL") == \
        xtnd.BAD_ARGUMENTS.format(command="LOGLEVEL").encode()
    assert alice.command("XTND STATS now") == xtnd.BAD_ARGUMENTS.format(command="STATS").encode()
    assert alice.command("XTND SHUTDOWN now") == \
        xtnd.BAD_ARGUMENTS.format(command="SHUTDOWN").encode()
    assert server.proc.poll() is None
    for client in (early, bob, alice):
        assert client.command("QUIT").startswith(b"+OK")


LOAD_USERS = {**{f"u{i:02d}": f"load-pw-{i:02d}!" for i in range(40)}, "alice": "wonderland"}


def test_stats_totals_are_exact_under_parallel_load_on_both_workers(start_server, tmp_path):
    """40 sessions with RETRs and 5 failed logins at once over both workers: STATS sums exactly."""
    # No failed-login delay: the five failures come from one address and would queue up.
    server = start_server("-xtnd", str(_auth_file(tmp_path)), "-auth-delay", "0",
                          users=LOAD_USERS)
    admin = _session(server, "alice", LOAD_USERS["alice"])
    before, _ = _stats(admin)
    assert admin.command("QUIT").startswith(b"+OK")
    assert admin.closed()
    good = [u for u in LOAD_USERS if u != "alice"]
    bad = [("u00", "wrong"), ("u01", "wrong"), ("u02", "wrong"), ("nobody", "x"), ("ghost", "y")]
    barrier = threading.Barrier(len(good) + len(bad), timeout=60)
    sizes: list[int] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def run_good(user: str) -> None:
        try:
            client = server.pop(timeout=60)
            client.user(user)
            client.pass_(LOAD_USERS[user])
            barrier.wait()
            for n in (1, 2):
                resp, lines, _ = client.retr(n)
                with lock:
                    sizes.append(int(resp.split()[1]))
            client.quit()
        except BaseException as exc:  # reported below, in the test's own thread
            errors.append(exc)
            barrier.abort()

    def run_bad(user: str, password: str) -> None:
        try:
            client = server.pop(timeout=60)
            client.user(user)
            try:
                client.pass_(password)
                raise AssertionError(f"{user} logged in with a wrong password")
            except poplib.error_proto:
                pass
            barrier.wait()
            client.quit()
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=run_good, args=(u,)) for u in good]
    threads += [threading.Thread(target=run_bad, args=b) for b in bad]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    assert not errors, errors[:3]
    assert len(sizes) == 80
    log = server.output
    assert re.search(r"worker-1 w1\.\d+ connect from", log)
    assert re.search(r"worker-2 w2\.\d+ connect from", log)

    admin = _session(server, "alice", LOAD_USERS["alice"])
    # A session's end is counted just after its QUIT reply leaves.
    wait_until(lambda: _stats(admin)[0]["Normal Disconnects"] == "46", timeout=10)
    values, users = _stats(admin)
    expected = {
        "Version Number": "2.0", "Logging Level": "DEBUG",
        "Current Threads": "1", "Total Threads": "47", "Max Threads": "45",
        "Too Many Threads": "0", "Normal Disconnects": "46", "Abnormal Disconnects": "0",
        "Client Timeouts": "0", "Blocked Socket Count": "0", "Retrieved Messages": "80",
        "Retrieved Octets": str(sum(sizes)), "Average Octets": str(sum(sizes) // 80),
        "Minimum Octets": str(min(sizes)), "Maximum Octets": str(max(sizes)),
        "Auth Failures": "5", "Current Users": "1",
    }
    assert {k: values[k] for k in expected} == expected
    assert users == ["alice"]
    assert re.fullmatch(r"\d+\.\d\d \(\d+ mins, \d+ secs\)", values["CPU Seconds"])
    # What the figure means, not how fast this machine is: it parses and it grew with the load.
    assert float(values["CPU Seconds"].split()[0]) > float(before["CPU Seconds"].split()[0])
    assert admin.command("QUIT").startswith(b"+OK")
    output = server.output
    for password in LOAD_USERS.values():
        assert password not in output  # not even at DEBUG


def test_stats_survive_a_killed_worker(start_server, tmp_path):
    """kill -9 of a worker keeps its sessions and retrievals in the totals; CPU never drops."""
    server = start_server("-xtnd", str(_auth_file(tmp_path)))
    for user in ("alice", "bob", "carol", "alice", "bob", "carol"):
        client = server.login(user)
        client.retr(1)
        client.quit()
    assert re.search(r"worker-1 w1\.\d+ connect from", server.output)
    admin = _session(server, "alice")
    before, _ = _stats(admin)
    assert admin.command("QUIT").startswith(b"+OK")
    assert admin.closed()  # the server counts the disconnect before it closes the socket
    assert before["Total Threads"] == "7" and before["Retrieved Messages"] == "6"
    old_pid = server.worker_pids()[1]
    mark = server.mark()
    os.kill(old_pid, signal.SIGKILL)
    server.wait_for(rf"worker 1 \(pid {old_pid}\) killed by signal 9", start=mark)
    server.wait_for(r"worker 1 ready", start=mark)
    admin = _session(server, "alice")
    after, _ = _stats(admin)
    assert after["Total Threads"] == "8"
    assert after["Normal Disconnects"] == "7"
    assert after["Abnormal Disconnects"] == "0"
    assert after["Retrieved Messages"] == "6"
    assert after["Retrieved Octets"] == before["Retrieved Octets"]
    assert float(after["CPU Seconds"].split()[0]) >= float(before["CPU Seconds"].split()[0])


def _hold_sessions(server, users: list[str]) -> list:
    return [_session(server, user) for user in users]


def _served_by_both(server, clients) -> bool:
    pids = server.worker_pids()
    ports = [c.local_port for c in clients]
    return all(any(_owns_connection(pids[slot], p) for p in ports) for slot in (1, 2))


def test_loglevel_takes_effect_in_every_worker_at_once(start_server, tmp_path):
    """XTND LOGLEVEL ERROR silences THREAD lines in both workers; DEBUG brings them back."""
    server = start_server("-xtnd", str(_auth_file(tmp_path)))
    admin = _session(server, "alice")
    mark = server.mark()
    assert admin.command("XTND LOGLEVEL error") == b"+OK logging level changed to error"
    for slot in (1, 2):
        server.wait_for(rf"worker-{slot} - logging level changed from debug to error", start=mark)
    quiet = server.mark()
    others = _hold_sessions(server, ["bob", "carol"])
    assert _served_by_both(server, [admin, *others])
    for client in others:
        assert client.command("STAT").startswith(b"+OK")
        assert client.command("QUIT").startswith(b"+OK")
    values, _ = _stats(admin)
    assert values["Logging Level"] == "ERROR"

    mark = server.mark()
    assert admin.command("XTND LOGLEVEL DEBUG") == b"+OK logging level changed to debug"
    for slot in (1, 2):
        server.wait_for(rf"worker-{slot} - logging level changed from error to debug", start=mark)
    server.wait_for(r"supervisor - logging level changed to debug", start=mark)
    # One pipe carries every process's lines in order: a stray line of the quiet part would
    # have come before the first line of the change back.
    quiet_part = itertools.takewhile(lambda line: "logging level changed" not in line,
                                     server.lines[quiet:])
    assert [line for line in quiet_part if " ERROR " not in line] == []
    others = _hold_sessions(server, ["bob", "carol"])
    assert _served_by_both(server, [admin, *others])
    for slot in (1, 2):
        server.wait_for(rf"THREAD worker-{slot} w{slot}\.\d+ connect from", start=mark)
    for client in [*others, admin]:
        assert client.command("QUIT").startswith(b"+OK")


def test_a_replacement_worker_starts_at_the_changed_level(start_server, tmp_path):
    """After XTND LOGLEVEL, a worker started later (after a kill -9) logs at the new level."""
    server = start_server("-xtnd", str(_auth_file(tmp_path)))
    admin = _session(server, "alice")
    assert admin.command("XTND LOGLEVEL info") == b"+OK logging level changed to info"
    assert admin.command("QUIT").startswith(b"+OK")
    assert admin.closed()
    mark = server.mark()
    old_pid = server.worker_pids()[1]
    os.kill(old_pid, signal.SIGKILL)
    server.wait_for(r"worker 1 ready", start=mark)
    sessions = _hold_sessions(server, ["bob", "carol"])
    assert _served_by_both(server, sessions)
    for client in sessions:
        assert client.command("QUIT").startswith(b"+OK")
    hup = server.mark()
    server.signal(signal.SIGHUP)  # its line comes after every line of the sessions (one pipe)
    server.wait_for(r"supervisor - SIGHUP: reload", start=hup)
    chatty = [line for line in server.lines[mark:] if " THREAD " in line or " DEBUG " in line]
    assert chatty == []


def test_shutdown_waits_for_open_sessions_then_exits_0(start_server, tmp_path):
    """XTND SHUTDOWN: new connections refused at once, open sessions go on, exit 0 after QUIT."""
    server = start_server("-xtnd", str(_auth_file(tmp_path)))
    bob = _session(server, "bob")
    admin = _session(server, "alice")
    assert admin.command("XTND SHUTDOWN") == xtnd.SHUTDOWN_OK.encode()
    server.wait_for(r"XTND SHUTDOWN: waiting for sessions to end")
    late = server.raw()
    assert late.line() + b"\r\n" == refusal.SHUTTING_DOWN
    assert bob.command("STAT").startswith(b"+OK 3 ")
    bob_slot, admin_slot = server.worker_of(bob.local_port), server.worker_of(admin.local_port)
    assert bob.command("QUIT").startswith(b"+OK")
    if bob_slot != admin_slot:  # bob's worker ends with its last session, and is reaped
        server.wait_for(rf"supervisor - worker {bob_slot} \(pid \d+\) exited")
    assert admin.command("NOOP") == b"+OK"
    assert server.proc.poll() is None  # the admin's own session is still open
    assert admin.command("QUIT").startswith(b"+OK")
    assert server.wait_exit(30) == 0


def test_sighup_reloads_the_authorization_file(start_server, tmp_path):
    """SIGHUP makes every worker re-read the file (here a symlink, whose target no watch sees)."""
    real = tmp_path / "real"
    real.mkdir()
    (real / "auth.dat").write_text("stats alice\n")
    link = tmp_path / "etc" / "pop_xtnd.dat"
    link.parent.mkdir()
    link.symlink_to(real / "auth.dat")
    server = start_server("-xtnd", str(link))
    (real / "auth.dat").write_text("stats bob\n")
    mark = server.mark()
    server.signal(signal.SIGHUP)
    _reloaded(server, "reload request", mark)
    assert "file changed" not in server.output
    bob, alice = _session(server, "bob"), _session(server, "alice")
    assert bob.command("XTND STATS") == statsreport.HEADER.encode()
    bob.multiline()
    assert alice.command("XTND STATS") == b'-ERR XTND STATS not allowed for "alice"'


def test_editing_the_file_reloads_it_in_every_worker(start_server, tmp_path):
    """A save by rename and an in-place rewrite are both picked up by both workers (watchdog)."""
    path = _auth_file(tmp_path, "stats carol\n")
    server = start_server("-xtnd", str(path))
    mark = server.mark()
    _replace(path, "stats alice bob\n")
    _reloaded(server, "file changed", mark)
    alice, bob = _session(server, "alice"), _session(server, "bob")
    assert _served_by_both(server, [alice, bob])
    for client in (alice, bob):
        assert client.command("XTND STATS") == statsreport.HEADER.encode()
        client.multiline()
    mark = server.mark()
    with open(path, "w") as fh:  # in place, as `echo ... > file` does
        fh.write("stats bob\n")
    _reloaded(server, "file changed", mark)
    assert alice.command("XTND STATS") == b'-ERR XTND STATS not allowed for "alice"'
    assert bob.command("XTND STATS") == statsreport.HEADER.encode()


def test_a_bad_file_on_reload_keeps_the_old_table_and_logs_the_line(start_server, tmp_path):
    """A reload that fails to parse logs ERROR with the line number; the old table stays."""
    path = _auth_file(tmp_path, "stats alice\n")
    server = start_server("-xtnd", str(path))
    mark = server.mark()
    _replace(path, "stats alice\nstats bob\nstatz carol\n")
    for slot in (1, 2):
        server.wait_for(rf"ERROR  worker-{slot} - {re.escape(str(path))} line 3: unknown XTND "
                        r"command 'statz'.*keeping the previous", start=mark)
    mark = server.mark()
    server.signal(signal.SIGHUP)  # the same failure through the other trigger
    for slot in (1, 2):
        server.wait_for(rf"ERROR  worker-{slot} - .* line 3: ", start=mark)
    alice, bob = _session(server, "alice"), _session(server, "bob")
    assert alice.command("XTND STATS") == statsreport.HEADER.encode()
    alice.multiline()
    assert bob.command("XTND STATS") == b'-ERR XTND STATS not allowed for "bob"'


@pytest.mark.parametrize("content, message", [
    ("stats alice\nreboot bob\n", r"line 2: unknown XTND command 'reboot'"),
    (None, r"cannot read XTND authorization file"),
])
def test_a_bad_file_at_startup_stops_the_server_with_one_line(tmp_path, content, message):
    """The supervisor validates -xtnd before starting workers: exit 2, one line on stderr."""
    path = tmp_path / "pop_xtnd.dat"
    if content is not None:
        path.write_text(content)
    users = tmp_path / "users"
    users.write_text("alice:{PLAIN}wonderland::::::\n")
    result = subprocess.run(
        [sys.executable, "-m", "supervisor", "-users", str(users), "-listen", "127.0.0.1",
         "-port", "0", "-xtnd", str(path)], capture_output=True, text=True, timeout=30,
        cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert result.returncode == 2
    assert re.fullmatch(rf"iupop3: .*{message}.*\n", result.stderr)
    assert "listening" not in result.stdout
