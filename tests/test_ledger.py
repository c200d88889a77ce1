"""The maildrop ledger, LOGIN-DELAY and EXPIRE against the real server (issue 13 items 2-4).

Each test starts the real supervisor and workers on a loopback port and talks POP3 with
poplib or a raw socket; ledgers, Maildirs and log lines are checked on disk and in the log.
"""

from __future__ import annotations

import os
import poplib
import subprocess
import time

import pytest

from conftest import USERS, write_message
from processes import wait_until
from worker import replies as R
from worker.ledger import HEADER, MAX_BYTES

LEDGER = ".iupop3.ledger"


def uidls(client: poplib.POP3) -> list[str]:
    return [line.decode().split(" ", 1)[1] for line in client.uidl()[1]]


def sizes(client: poplib.POP3) -> list[int]:
    return [int(line.split()[1]) for line in client.list()[1]]


def login_when_free(server, user: str = "alice") -> poplib.POP3:
    """Log in once the worker has seen the previous connection of ``user`` close."""
    result = []

    def attempt() -> bool:
        try:
            result.append(server.login(user))
            return True
        except poplib.error_proto as exc:
            assert b"[IN-USE]" in exc.args[0], exc
            return False

    assert wait_until(attempt, timeout=10)
    return result[0]


def restart(server):
    """Stop the server and start it again on the same files (a new port)."""
    server.stop()
    server.lines.clear()
    return server.start()


def test_restart_reads_no_message_it_measured_before(start_server):
    """After a restart, LIST comes from the ledger: a message rewritten in place with the same
    length but other line ends (so another wire size) still lists its first size, which
    only a server that did not read the file can answer."""
    server = start_server("-maxmsg", "0")
    box = server.maildir("alice")
    target = write_message(box, "1700000010.M10.test", b"Subject: x\n\n" + b"a\n" * 50)
    client = server.login()
    first = sizes(client)
    ids = uidls(client)
    client.quit()
    ledger = (box / LEDGER).read_text()
    assert ledger.startswith(HEADER + "\n") and "1700000010.M10.test" in ledger
    assert oct((box / LEDGER).stat().st_mode & 0o777) == "0o600"
    target.write_bytes(b"Subject: x\n\n" + b"a" * 75 + b"\n" * 25)  # same length, fewer LFs
    server = restart(server)
    client = server.login()
    assert sizes(client) == first and uidls(client) == ids
    client.quit()


def test_corrupt_ledger_is_rebuilt_with_the_same_uidls(start_server):
    """A ledger the user scribbled over: the login works, the UIDLs are the same (they come
    from the file names), the log says it was rebuilt, and a good ledger is written."""
    server = start_server("-maxmsg", "0")
    box = server.maildir("alice")
    client = server.login()
    ids, listed = uidls(client), sizes(client)
    client.quit()
    (box / LEDGER).write_bytes(b"iupop3-ledger 1\nsizing x\nlogin 0\nm a b c d e f\n")
    server = restart(server)
    client = server.login()
    assert uidls(client) == ids and sizes(client) == listed
    client.quit()
    server.wait_for(r"ledger of \S+alice is corrupt .*rebuilding it")
    assert (box / LEDGER).read_text().count("\nm ") == 3


def test_ledger_symlink_is_not_followed(start_server, tmp_path):
    """A ledger replaced by a symlink to a file outside: never read through, never written
    through (the rename replaces the link), the login works."""
    server = start_server()
    box = server.maildir("alice")
    outside = tmp_path / "outside"
    outside.write_text("precious\n")
    (box / LEDGER).symlink_to(outside)
    client = server.login()
    assert len(uidls(client)) == 3
    client.quit()
    assert outside.read_text() == "precious\n"
    assert not (box / LEDGER).is_symlink()


def test_oversized_ledger_is_refused_not_read(start_server):
    """A ledger beyond the size bound (the user can write it) is ignored and rebuilt."""
    server = start_server()
    box = server.maildir("alice")
    with open(box / LEDGER, "wb") as fh:
        fh.write(HEADER.encode() + b"\n")
        fh.truncate(MAX_BYTES + 1)  # sparse: costs no disk
    client = server.login()
    assert len(uidls(client)) == 3
    client.quit()
    server.wait_for(r"ledger of \S+alice is corrupt \(empty or larger than")
    assert (box / LEDGER).stat().st_size < 4096


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tiny tmpfs needs root")
def test_full_disk_never_stops_a_login(start_server, tmp_path):
    """A Maildir on a full file system: the ledger cannot be written (logged), the login
    and the listing still work."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        box = mount / "mail" / "alice"
        write_message(box, "1700000001.M1.test", b"Subject: s\n\nbody\n")
        (mount / "users").write_text(f"alice:{{PLAIN}}{USERS['alice']}::::::\n")
        with open(mount / "filler", "wb", buffering=0) as fh:  # fill the rest of the disk
            try:
                for _ in range(100_000):
                    fh.write(b"\0" * 1024)
            except OSError:
                pass
        server = start_server("-maxmsg", "0", root=mount, deliver=False)
        client = server.login()
        assert len(uidls(client)) == 1
        client.quit()
        server.wait_for(r"\.iupop3\.ledger of \S+alice not written: No space left")
        server.stop()
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_login_delay_after_correct_password_only_and_across_restarts(start_server, tmp_path):
    """-login-delay: CAPA announces it; a second login gets [LOGIN-DELAY] only with the right
    password (a wrong one is an ordinary [AUTH] failure: no probing), also after a restart;
    an account with login_delay=0 in the users file logs in again at once."""
    root = tmp_path / "srv"
    root.mkdir()
    (root / "users").write_text(f"alice:{{PLAIN}}{USERS['alice']}::::::\n"
                                f"bob:{{PLAIN}}{USERS['bob']}:::::: login_delay=0\n")
    server = start_server("-login-delay", "3600", "-auth-delay", "0", root=root)
    raw = server.raw()
    raw.line()
    assert raw.command("CAPA") == R.CAPA.encode()
    assert b"LOGIN-DELAY 3600 USER" in raw.multiline()
    raw.close()
    client = server.login("alice")
    client.quit()
    server = restart(server)
    for _ in range(2):  # each worker may take the next connection: both must refuse
        raw = server.raw()
        raw.line()
        raw.command("USER alice")
        assert raw.command("PASS wrong").startswith(b"-ERR [AUTH]")
        raw.command("USER alice")
        assert raw.command(f"PASS {USERS['alice']}").startswith(b"-ERR [LOGIN-DELAY]")
        raw.close()
    for _ in range(2):
        client = server.login("bob")
        assert "LOGIN-DELAY" not in client.capa()
        client.quit()


def test_expire_zero_removes_what_was_retrieved_in_a_session_that_quit(start_server):
    """EXPIRE 0: a message RETRieved in full in a session that QUIT goes to the wastebasket
    without DELE; one only TOPped, or RETRieved in a session that dropped, stays."""
    server = start_server("-expire", "0")
    box = server.maildir("alice")
    client = server.login()
    assert "EXPIRE" in client.capa() and client.capa()["EXPIRE"] == ["0"]
    client.retr(1)
    client.top(2, 0)
    client.close()  # dropped: nothing is learned, nothing applied
    client = login_when_free(server)
    assert len(uidls(client)) == 3
    client.retr(1)
    client.top(2, 0)
    client.quit()
    server.wait_for(r"update: 1 retrieved messages expired")
    assert sorted(p.name for p in (box / ".Trash" / "cur").iterdir()) == [
        "1700000001.M1.test:2,"]
    assert len(list((box / "new").iterdir()) + list((box / "cur").iterdir())) == 2


def test_expire_days_counts_from_the_first_retrieval_in_the_ledger(start_server):
    """EXPIRE 2: a message first retrieved now stays; once the ledger says that was three
    days ago, the next session's UPDATE removes it (first retrieval held across sessions)."""
    server = start_server("-expire", "2", "-maxmsg", "0")
    box = server.maildir("alice")
    client = server.login()
    client.retr(2)
    client.quit()
    client = server.login()
    assert len(uidls(client)) == 3
    client.quit()
    text = (box / LEDGER).read_text().splitlines()
    then = int(time.time()) - 3 * 86400
    for i, line in enumerate(text):
        if line.startswith("m 1700000002.M2.test "):
            words = line.split(" ")
            assert words[6] != "-"
            words[6] = str(then)
            text[i] = " ".join(words)
    (box / LEDGER).write_text("\n".join(text) + "\n")
    client = server.login()
    assert len(uidls(client)) == 3
    client.quit()
    server.wait_for(r"update: 1 retrieved messages expired")
    client = server.login()
    assert len(uidls(client)) == 2
    client.quit()


def test_maildirsize_is_updated_when_the_server_deletes(start_server):
    """Maildir++: with -purge_reclaim an existing maildirsize gets one line for the removed
    messages (their ,S= size or file size); without the file none is made."""
    server = start_server("-purge_reclaim")
    box = server.maildir("alice")
    (box / "maildirsize").write_text("1000000S,1000C\n0 3\n")
    name = "1700000005.M5.test,S=123"
    write_message(box, name, b"Subject: q\n\nquota\n")
    client = server.login()
    count = len(uidls(client))
    client.dele(1)
    client.dele(count)
    client.quit()
    server.wait_for(r"update: 2 messages deleted")
    size1 = len(
        b"From: sender1@example.org\nTo: you@example.org\nSubject: message 1\n"
        b"Message-ID: <1@example.org>\n\nBody of message 1.\n")
    assert (box / "maildirsize").read_text().splitlines()[-1] == f"{-(size1 + 123)} -2"
    assert not (server.maildir("bob") / "maildirsize").exists()


def test_mbox_ledger_beside_the_spool_holds_login_delay_and_expire(start_server, tmp_path):
    """An mbox maildrop: the ledger lives beside the spool; EXPIRE 0 removes the retrieved
    message at QUIT, and LOGIN-DELAY refuses the next login after a restart."""
    root = tmp_path / "srv"
    spool = root / "spool"
    spool.mkdir(parents=True)
    text = b"".join(b"From a@example.org Thu Jan  1 00:00:00 2026\n" + m + b"\n"
                    for m in (b"Subject: one\n\nBody 1.\n", b"Subject: two\n\nBody 2.\n"))
    (spool / "alice").write_bytes(text)
    args = ("-mail", f"mbox:{spool}/%u", "-expire", "0", "-login-delay", "3600")
    server = start_server(*args, root=root, deliver=False)
    client = server.login()
    assert client.stat()[0] == 2
    client.retr(1)
    client.quit()
    server.wait_for(r"update: 1 retrieved messages expired")
    assert b"Subject: one" not in (spool / "alice").read_bytes()
    assert b"Subject: one" in (spool / "alice.Trash").read_bytes()
    assert (spool / ".alice.iupop3.ledger").read_text().startswith(HEADER)
    server = restart(server)
    with pytest.raises(poplib.error_proto, match=r"\[LOGIN-DELAY\]"):
        server.login()


def test_courier_uidls_are_kept_and_stay_unique(start_server, tmp_path):
    """A Maildir Courier served: its courierpop3dsizelist UIDLs (UID<n>-<uidv>) are listed in
    Courier's order; a file that gives two messages one UIDL (the user can write it) does not
    make the listing ambiguous: the second gets its own name."""
    box = tmp_path / "srv" / "mail" / "alice"
    for n in (1, 2, 3):
        write_message(box, f"{1700000000 + n}.M{n}.host", f"Subject: {n}\n\nbody\n")
    (box / "courierpop3dsizelist").write_text(
        "/3 4 1690000000\n1700000002.M2.host 120 2:1690000000:0\n"
        "1700000001.M1.host 120 1:1690000000:0\n1700000003.M3.host 120 2:1690000000:0\n")
    server = start_server("-maxmsg", "0", root=tmp_path / "srv", deliver=False)
    client = server.login()
    assert uidls(client) == ["UID1-1690000000", "UID2-1690000000", "1700000003.M3.host"]
    client.quit()


def test_mbox_ledger_in_a_state_folder(start_server, tmp_path):
    """-mbox-ledger-dir: the spool's ledger is kept there (made if missing), nothing is added
    beside the spool, and LOGIN-DELAY reads it back."""
    root = tmp_path / "srv"
    spool = root / "spool"
    spool.mkdir(parents=True)
    (spool / "alice").write_bytes(b"From a@example.org Thu Jan  1 00:00:00 2026\n"
                                  b"Subject: one\n\nBody 1.\n\n")
    state = tmp_path / "state" / "ledgers"
    server = start_server("-mail", f"mbox:{spool}/%u", "-mbox-ledger-dir", str(state),
                          "-login-delay", "3600", "-auth-delay", "0", root=root, deliver=False)
    server.login().quit()
    [ledger_file] = list(state.iterdir())
    assert ledger_file.name.startswith("alice.") and ledger_file.read_text().startswith(HEADER)
    assert not [p for p in spool.iterdir() if p.name.endswith(".ledger")]
    with pytest.raises(poplib.error_proto, match=r"\[LOGIN-DELAY\]"):
        server.login()


def test_expire_keeps_the_foreign_rule_and_honours_purge(start_server):
    """EXPIRE 0 with -purge_reclaim: a retrieved message is removed for good at QUIT, a
    retrieved foreign one (served as a notice) is moved to .MAIL, never removed."""
    server = start_server("-expire", "0", "-purge_reclaim")
    box = server.maildir("alice")
    write_message(box, "1700000004.M4.test", b"Subject: binary\n\n\0\1\2 not text\n")
    client = server.login()
    assert len(uidls(client)) == 4
    client.retr(1)
    client.retr(4)
    client.quit()
    server.wait_for(r"update: 2 retrieved messages expired")
    assert [p.name for p in (box / ".MAIL" / "cur").iterdir()] == ["1700000004.M4.test:2,"]
    left = sorted(p.name for sub in ("new", "cur") for p in (box / sub).iterdir())
    assert left == ["1700000002.M2.test", "1700000003.M3.test"]
    assert not (box / ".Trash").exists() or not list((box / ".Trash" / "cur").iterdir())
