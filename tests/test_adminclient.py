"""iupop3-xtnd, the admin client: node parsing, the summed STATS table, and real runs."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, USERS
from shared import adminclient, statsreport
from shared.adminclient import Answer, Node, UsageError
from worker import replies as R

CLIENT = [sys.executable, "-m", "shared.adminclient"]
ENV = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")


# -- pure parts -------------------------------------------------------------------------------
@pytest.mark.parametrize("text, host, port", [
    ("mail1", "mail1", 110),
    ("mail1:1110", "mail1", 1110),
    ("127.0.0.1:2000", "127.0.0.1", 2000),
    ("[::1]:1110", "::1", 1110),
    ("[::1]", "::1", 110),
    ("::1", "::1", 110),
    ("fe80::1%lo", "fe80::1%lo", 110),
])
def test_parse_node_forms(text, host, port):
    """host, host:port, [v6]:port, [v6] and a bare IPv6 address; the port defaults to 110."""
    assert adminclient.parse_node(text) == Node(text, host, port)


@pytest.mark.parametrize("text", ["mail1:", "mail1:x", "mail1:0", "mail1:70000", "[::1]:y", "[::1"])
def test_parse_node_rejects_bad_ports_and_brackets(text):
    """A bad port or an unclosed bracket is a one-line usage error."""
    with pytest.raises(UsageError):
        adminclient.parse_node(text)


def test_parse_nodes_splits_on_spaces_and_commas():
    """The README's "vax1 vax2 vax3" form, commas allowed too; none at all is an error."""
    assert [n.port for n in adminclient.parse_nodes(" a, b:2  c ")] == [110, 2, 110]
    with pytest.raises(UsageError):
        adminclient.parse_nodes("   ")


def test_command_must_be_one_printable_line():
    """A command with a line break (a second POP3 command smuggled in) is refused."""
    assert adminclient.check_command("  loglevel   debug ") == "loglevel debug"
    for bad in ("", "stats\r\nDELE 1", "x" * 300):
        with pytest.raises(UsageError):
            adminclient.check_command(bad)


def _stats_answer(name: str, **figures) -> Answer:
    base = {"Version Number": "2.0", "Logging Level": "THREAD", "Current Time": "t",
            "Start Time": "s", "CPU Seconds": statsreport.cpu_text(1.25), "Current Threads": "1",
            "Total Threads": "10", "Max Threads": "3", "Too Many Threads": "0",
            "Normal Disconnects": "9", "Abnormal Disconnects": "0", "Client Timeouts": "0",
            "Blocked Socket Count": "0", "Retrieved Messages": "4", "Retrieved Octets": "1000",
            "Average Octets": "250", "Minimum Octets": "100", "Maximum Octets": "400",
            "Auth Failures": "1", "Current Users": "1"}
    base.update({k.replace("_", " "): v for k, v in figures.items()})
    lines = [statsreport.HEADER] + [statsreport.line(k, v) for k, v in base.items()]
    return Answer(Node(name, name, 110), True, lines)


def test_stats_table_sums_numbers_and_keeps_minimum_maximum_and_average_meaningful():
    """The total column sums counts and CPU, takes min/max of octets, recomputes the average."""
    answers = [_stats_answer("a"),
               _stats_answer("b", Logging_Level="DEBUG", Retrieved_Messages="1",
                             Retrieved_Octets="50", Minimum_Octets="50", Maximum_Octets="50",
                             CPU_Seconds=statsreport.cpu_text(60.5))]
    table = adminclient.stats_table(answers)
    rows = {line.split("  ")[0].strip(): line.split()[-1] for line in table[1:]}
    assert table[0].split() == ["a", "b", "total"]
    assert rows["Total Threads"] == "20"
    assert rows["Retrieved Octets"] == "1050"
    assert rows["Average Octets"] == str(1050 // 5)
    assert rows["Minimum Octets"] == "50"
    assert rows["Maximum Octets"] == "400"
    assert rows["Logging Level"] == "mixed"
    assert "61.75 (1 mins, 1 secs)" in next(l for l in table if l.startswith("CPU Seconds"))
    assert next(l for l in table if l.startswith("Current Time")).split()[-1] == "t"


# -- against real servers ---------------------------------------------------------------------
def _two_servers(start_server, tmp_path):
    auth = tmp_path / "pop_xtnd.dat"
    auth.write_text("stats alice\nloglevel alice\nshutdown alice\n")
    return [start_server("-xtnd", str(auth)) for _ in range(2)]


def _no_passwords_in(servers, *extra: str) -> None:
    for server in servers:
        output = server.output
        for password in (*USERS.values(), *extra):
            assert password not in output


def test_positional_form_runs_stats_on_two_servers_with_a_total(start_server, tmp_path):
    """"node1 node2" user password command: each answer under its node, then the summed table."""
    servers = _two_servers(start_server, tmp_path)
    for server in servers:  # give each some history to sum
        client = server.login("bob")
        client.retr(1)
        client.quit()
    nodes = " ".join(f"127.0.0.1:{s.port}" for s in servers)
    result = subprocess.run([*CLIENT, nodes, "alice", USERS["alice"], "stats"], env=ENV,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    out = result.stdout.splitlines()
    for server in servers:
        header = out.index(f"== 127.0.0.1:{server.port} ==")
        assert out[header + 1] == statsreport.HEADER
        assert out[header + 2] == "Version Number       : 2.0"
    table = out[out.index("== 2 nodes ==") + 1:]
    assert table[0].split() == [f"127.0.0.1:{s.port}" for s in servers] + ["total"]
    rows = {line[:statsreport.NAME_WIDTH].strip(): line.split()[-1] for line in table[1:]}
    assert rows["Retrieved Messages"] == "2"
    assert rows["Current Users"] == "2"
    assert rows["Total Threads"] == "4"
    _no_passwords_in(servers)


def test_positional_loglevel_reaches_both_servers(start_server, tmp_path):
    """A command of several words (the README's "loglevel debug") runs on every node."""
    servers = _two_servers(start_server, tmp_path)
    marks = [s.mark() for s in servers]
    nodes = ",".join(f"127.0.0.1:{s.port}" for s in servers)
    result = subprocess.run([*CLIENT, nodes, "alice", USERS["alice"], "loglevel", "info"],
                            env=ENV, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("+OK logging level changed to info") == 2
    for server, mark in zip(servers, marks):
        server.wait_for(r"worker-1 - logging level changed from debug to info", start=mark)
        server.wait_for(r"worker-2 - logging level changed from debug to info", start=mark)


def test_refused_and_unreachable_nodes_exit_1(start_server, tmp_path):
    """An unauthorized user's -ERR and a node that refuses connections are shown; exit 1."""
    server = _two_servers(start_server, tmp_path)[0]
    result = subprocess.run([*CLIENT, f"127.0.0.1:{server.port} 127.0.0.1:1", "bob",
                             USERS["bob"], "stats"], env=ENV, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1
    assert '-ERR XTND STATS not allowed for "bob"' in result.stdout
    assert "== 127.0.0.1:1 ==\ncannot connect: Connection refused" in result.stdout
    wrong = subprocess.run([*CLIENT, f"127.0.0.1:{server.port}", "alice", "not-it", "stats"],
                           env=ENV, capture_output=True, text=True, timeout=60)
    assert wrong.returncode == 1
    assert R.NOT_ACCESSIBLE.format(user="alice") in wrong.stdout
    _no_passwords_in([server], "not-it")


@pytest.mark.parametrize("args, message", [
    (["mail1:x", "alice", "pw", "stats"], "bad port in node 'mail1:x'"),
    (["", "alice", "pw", "stats"], "no node given"),
    (["mail1", "al ice", "pw", "stats"], "the user name must be one word"),
])
def test_bad_input_is_one_line_and_exit_2(args, message):
    """Bad input gets one line on stderr and exit status 2, before any connection."""
    result = subprocess.run([*CLIENT, *args], env=ENV, capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 2
    assert result.stderr == f"iupop3-xtnd: {message}\n"


def test_prompts_through_stdin(start_server, tmp_path):
    """Without arguments it asks, in the README's words, and reads the answers from stdin."""
    servers = _two_servers(start_server, tmp_path)
    answers = f"127.0.0.1:{servers[0].port}\nalice\n{USERS['alice']}\nclient via stdin\n"
    result = subprocess.run(CLIENT, input=answers, env=ENV, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("IUPOP3 Node(s) > Username > XTND command > \n")
    assert "Password > " in result.stderr
    servers[0].wait_for(r"client says: via stdin")


def test_prompts_on_a_terminal_do_not_echo_the_password(start_server, tmp_path):
    """On a pty: the four prompts appear, the typed password is not echoed, the command runs."""
    servers = _two_servers(start_server, tmp_path)
    nodes = " ".join(f"127.0.0.1:{s.port}" for s in servers)
    pid, fd = pty.fork()
    if pid == 0:  # the child: exec at once (no Python code of the test runs here)
        os.execve(sys.executable, CLIENT, ENV)
    seen = b""

    def expect(prompt: bytes) -> None:
        nonlocal seen
        deadline = time.monotonic() + 30
        while prompt not in seen:
            assert time.monotonic() < deadline, f"no {prompt!r} in {seen!r}"
            if select.select([fd], [], [], 0.5)[0]:
                try:
                    data = os.read(fd, 4096)
                except OSError:  # EIO: the child has closed the terminal
                    data = b""
                if not data:
                    return
                seen += data

    try:
        for prompt, answer in ((b"IUPOP3 Node(s) > ", nodes),
                               (b"Username > ", "alice"),
                               (b"Password > ", USERS["alice"]),
                               (b"XTND command > ", "loglevel thread")):
            expect(prompt)
            os.write(fd, answer.encode() + b"\n")
        expect(b"the end of the output")  # reads until the child closes the terminal
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0
    assert seen.count(b"+OK logging level changed to thread") == 2
    assert USERS["alice"].encode() not in seen
    assert b"alice" in seen  # the user name is echoed as typed
    _no_passwords_in(servers)


def test_console_script_is_installed():
    """pyproject's [project.scripts] gives an iupop3-xtnd command beside iupop3."""
    script = Path(sys.executable).parent / "iupop3-xtnd"
    assert script.exists()
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    assert "XTND" in result.stdout


@pytest.mark.skipif(__import__("shutil").which("openssl") is None, reason="no openssl command")
def test_admin_client_uses_stls_and_implicit_tls(start_server, tmp_path):
    """The password travels in TLS: STLS when offered, --tls on the implicit-TLS port."""
    from conftest import make_cert

    cert, key = make_cert(tmp_path)
    auth = tmp_path / "pop_xtnd.dat"
    auth.write_text("stats alice\n")
    server = start_server("-xtnd", str(auth), "-tls-cert", str(cert), "-tls-key", str(key))
    tls_port = int(server.wait_for(r"implicit TLS listening on 127\.0\.0\.1:(\d+)").group(1))
    base = [*CLIENT, "--cafile", str(cert)]
    stls = subprocess.run([*base, f"127.0.0.1:{server.port}", "alice", USERS["alice"], "stats"],
                          env=ENV, capture_output=True, text=True, timeout=60)
    assert stls.returncode == 0, stls.stdout + stls.stderr
    assert statsreport.HEADER in stls.stdout
    implicit = subprocess.run([*base, "--tls", f"127.0.0.1:{tls_port}", "alice",
                               USERS["alice"], "stats"], env=ENV, capture_output=True,
                              text=True, timeout=60)
    assert implicit.returncode == 0, implicit.stdout + implicit.stderr
    assert server.output.count("TLS started") >= 2
    untrusted = subprocess.run([*CLIENT, f"127.0.0.1:{server.port}", "alice", USERS["alice"],
                                "stats"], env=ENV, capture_output=True, text=True, timeout=60)
    assert untrusted.returncode == 1 and "TLS failed" in untrusted.stdout


# -- no password in clear to a stripped server (issue 10) --------------------------------------
@pytest.mark.parametrize("address, plaintext, allowed", [
    ("127.0.0.1", False, True), ("127.3.4.5", False, True), ("::1", False, True),
    ("::ffff:127.0.0.1", False, True), ("192.0.2.1", False, False),
    ("2001:db8::1", False, False), ("::ffff:192.0.2.1", False, False),
    ("fe80::1%eth0", False, False), ("192.0.2.1", True, True),
])
def test_cleartext_decision_by_connected_address(address, plaintext, allowed):
    """In clear only to a loopback peer (mapped IPv4 too) unless --plaintext."""
    tls = adminclient.TlsOptions(plaintext=plaintext)
    assert adminclient.cleartext_allowed(address, tls) is allowed


_NAMESPACE_DRIVER = r"""
import json, subprocess, sys
sys.path.insert(0, sys.argv[1])
from fakepop import FakePop
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
subprocess.run(["ip", "addr", "add", "192.0.2.1/32", "dev", "lo"], check=True)
subprocess.run(["ip", "-6", "addr", "add", "2001:db8::1/128", "dev", "lo", "nodad"], check=True)
client = json.loads(sys.argv[2])
out = []
for host, node in (("192.0.2.1", "192.0.2.1:{port}"), ("2001:db8::1", "[2001:db8::1]:{port}")):
    fake = FakePop(host)
    for extra in ([], ["--plaintext"]):
        before = len(fake.received)
        run = subprocess.run([*client, *extra, node.format(port=fake.port), "alice", "s3cret!",
                              "client hello"], capture_output=True, text=True, timeout=60)
        out.append(dict(node=host, extra=extra, rc=run.returncode, stdout=run.stdout,
                        stderr=run.stderr,
                        received=[l.decode() for l in fake.received[before:]]))
print(json.dumps(out))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="a private network namespace (unshare -n) needs root")
def test_no_password_in_clear_to_a_non_loopback_server_without_stls(tmp_path):
    """A listener that offers no STLS (as after a man in the middle stripped it) on 192.0.2.1
    and 2001:db8::1: the client refuses with one line and exit 2, sending neither USER nor PASS;
    with --plaintext it logs in. Both addresses live on the loopback device of a private network
    namespace made for this test, so nothing leaves the machine, yet they are not loopback
    addresses and the client (which judges the address it is connected to) treats them so."""
    import json

    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"unshare -n is not permitted here: {probe.stderr.strip()}")
    client = [sys.executable, "-m", "shared.adminclient"]
    run = subprocess.run(["unshare", "-n", sys.executable, "-c", _NAMESPACE_DRIVER,
                          str(ROOT / "tests"), json.dumps(client)], env=ENV,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    for result in json.loads(run.stdout):
        if not result["extra"]:
            assert result["rc"] == 2, result
            assert result["stderr"].count("\n") == 1, result
            assert "offers no STLS and is not loopback" in result["stderr"], result
            assert result["received"] == ["CAPA"], result  # hung up before USER and PASS
        else:
            assert result["rc"] == 0, result
            assert "PASS s3cret!" in result["received"], result
            assert "XTND client hello" in result["received"], result


def test_loopback_server_without_stls_gets_the_password_and_its_lines_are_escaped():
    """To a loopback listener without STLS the password goes in clear (nobody is in between);
    control characters in its answer are printed escaped, never passed to the terminal."""
    from fakepop import FakePop

    fake = FakePop("127.0.0.1", xtnd_reply=b"+OK \x1b[2J\x1b]0;owned\x07 done\r== forged ==")
    result = subprocess.run([*CLIENT, f"127.0.0.1:{fake.port}", "alice", "pw", "client x"],
                            env=ENV, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PASS pw" in [line.decode() for line in fake.received]
    assert "\x1b" not in result.stdout and "\x07" not in result.stdout and "\r" not in result.stdout
    assert "+OK \\x1b[2J\\x1b]0;owned\\x07 done\\r== forged ==" in result.stdout.splitlines()
