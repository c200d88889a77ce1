"""The store's pure parts: the -mail spec parsed once, where the trusted part of a maildrop ends,
the interface both stores offer, and a bad -mail or -wastebasket refused at start."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT
from shared import maillocation
from shared import settings as settings_mod
from shared.users import Account
from worker import store
from worker.maildir import Maildir
from worker.mbox import Mbox


@pytest.mark.parametrize("spec, user, home, fixed, below", [
    ("maildir:~/Maildir", "alice", "/home/alice", "/home/alice", ("Maildir",)),
    ("maildir:/var/mail/%u/Maildir", "bob", "", "/var/mail", ("bob", "Maildir")),
    ("maildir:/srv/mail/%u", "bob", "", "/srv/mail", ("bob",)),
    ("maildir:/%u", "bob", "", "/", ("bob",)),
    ("maildir:/srv/u-%u/x", "bob", "", "/srv", ("u-bob", "x")),
    ("mbox:/var/mail/%u", "carol", "", "/var/mail", ("carol",)),
    ("maildir:/srv/shared", "carol", "", "/srv/shared", ()),
    ("maildir:~/", "alice", "/home/alice/", "/home/alice", ()),
])
def test_split_puts_the_administrators_part_above_what_a_user_controls(spec, user, home, fixed,
                                                                      below):
    """The fixed part is the admin's prefix before %u or the users-file home; the rest is walked."""
    assert maillocation.parse(spec).split_for(user, home) == (fixed, below)


@pytest.mark.parametrize("spec", ["", "maildir", "maildir:", "imap:/x", "mbox:/var/mail/",
                                  "maildir:~alice/Maildir", "maildir:/a/../b", "maildir:~"])
def test_bad_mail_specs_are_refused(spec):
    """Unknown kinds, empty paths, ~user, .. components and a directory as mbox are errors."""
    with pytest.raises(ValueError):
        maillocation.parse(spec)


def test_relative_mail_path_is_made_absolute_once():
    """A relative path means the one of the start (the daemon later runs in /)."""
    assert maillocation.normalized("maildir:mail/%u") == f"maildir:{os.getcwd()}/mail/%u"


def test_home_template_needs_a_home():
    """~/ without a home in the users file is the store's error, not a path under /."""
    with pytest.raises(ValueError):
        maillocation.parse("maildir:~/Maildir").split_for("alice", "")


@pytest.mark.parametrize("args, words", [
    (["-mail", "maildir"], "-mail must be maildir:PATH"),
    (["-mail", "mbox:/var/mail/"], "names a spool file"),
    (["-wastebasket", "../x"], "-wastebasket must be one folder name"),
    (["-wastebasket", "new"], "-wastebasket may not be a Maildir's own 'new'"),
    (["-wastebasket", "cur"], "-wastebasket may not be a Maildir's own 'cur'"),
    (["-wastebasket", "tmp"], "-wastebasket may not be a Maildir's own 'tmp'"),
])
def test_bad_store_settings_stop_the_start_with_one_line(tmp_path, args, words):
    """A bad -mail or -wastebasket: one line on stderr and exit 2, before any worker starts."""
    users = tmp_path / "users"
    users.write_text("alice:{PLAIN}x::::::\n")
    out = subprocess.run([sys.executable, "-m", "supervisor", "-users", str(users), *args],
                         cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 2, out
    assert out.stderr.strip().count("\n") == 0 and words in out.stderr, out.stderr


def test_both_stores_offer_the_maildrop_interface():
    """Maildir and Mbox have every method of worker.store.Maildrop."""
    wanted = {name for name in vars(store.Maildrop) if not name.startswith("_")}
    assert wanted == {"lock", "unlock", "close_directory", "scan", "open_message", "commit",
                      "save_ledger"}
    for cls in (Maildir, Mbox):
        assert wanted <= set(dir(cls)), cls


def test_factory_picks_the_store_and_the_owner(tmp_path):
    """open_maildrop: the kind from -mail, the owner from the users file's uid when there is one."""
    class Settings:
        mail = f"maildir:{tmp_path}/%u"
        wastebasket = store.WASTEBASKET
        purge_reclaim = False
        uidl_format = "%08Xu%08Xv"
        mbox_ledger_dir = ""

    drop = store.open_maildrop(Settings, Account("alice", "x", uid="1234"), store.PLAIN)
    assert isinstance(drop, Maildir) and drop.owner == 1234
    assert drop.path == f"{tmp_path}/alice"
    Settings.mail = f"mbox:{tmp_path}/%u"
    assert isinstance(store.open_maildrop(Settings, Account("bob", "x"), store.PLAIN), Mbox)
    Settings.mail = "maildir:~/Maildir"
    with pytest.raises(store.MaildropError):
        store.open_maildrop(Settings, Account("carol", "x"), store.PLAIN)


# -- mbox: the same rules for the spool's siblings and locks -------------------------------------
def _spool(tmp_path):
    from worker.mboxformat import format_record

    spool = tmp_path / "alice"
    spool.write_bytes(b"".join(format_record(b"Subject: %d\n\nbody %d\n" % (n, n))
                               for n in (1, 2)))
    return spool


def test_mbox_commit_never_writes_through_a_planted_temp_name(tmp_path):
    """.alice.iupop3.new -> a victim: commit makes a fresh file (O_EXCL); the victim is intact."""
    spool = _spool(tmp_path)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    box = Mbox(str(spool))
    box.lock()
    messages = box.scan()
    (tmp_path / ".alice.iupop3.new").symlink_to(victim)
    box.commit(messages[:1])
    box.unlock()
    assert victim.read_bytes() == b"precious\n"
    assert b"body 2" in spool.read_bytes() and b"body 1" not in spool.read_bytes()


@pytest.mark.parametrize("kind", ["symlink", "hardlink"])
def test_mbox_never_appends_to_a_planted_wastebasket(tmp_path, kind):
    """alice.Trash as a symlink or hard link to a victim: commit fails, nothing is lost or
    written to the victim."""
    spool = _spool(tmp_path)
    before = spool.read_bytes()
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    trash = tmp_path / "alice.Trash"
    trash.symlink_to(victim) if kind == "symlink" else os.link(victim, trash)
    box = Mbox(str(spool))
    box.lock()
    with pytest.raises(OSError):
        box.commit(box.scan()[:1])
    box.unlock()
    assert victim.read_bytes() == b"precious\n" and spool.read_bytes() == before


def test_mbox_dot_lock_as_a_fifo_or_huge_file_is_judged_by_age(tmp_path):
    """A FIFO or a huge digit run as alice.lock: no blocked read, no int() of megabytes; it is
    not a live pid, so it waits for the staleness time like an empty lock."""
    from worker import mboxlock

    lock = tmp_path / "alice.lock"
    os.mkfifo(lock)
    assert mboxlock.read_lock(str(lock))[1] == b""
    lock.unlink()
    lock.write_bytes(b"9" * 5_000_000)
    st, content = mboxlock.read_lock(str(lock))
    assert len(content) == mboxlock.LOCK_READ_MAX and mboxlock.lock_owner(content) == (0, "")
    assert mboxlock.lock_owner(b"1234 host\n") == (1234, "host")
    assert mboxlock.lock_owner(b"12\n") == (12, "")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give files to another uid")
@pytest.mark.parametrize("link_uid, target_uid, accepted", [
    (65534, 65534, True), (0, 65534, False), (65534, 0, False)])
def test_symlinked_home_maildir_only_when_link_and_target_are_the_accounts(tmp_path, link_uid,
                                                                         target_uid, accepted):
    """~/Maildir -> /elsewhere/Maildir is followed only when the link and the directory it
    leads to both belong to the account (uid from the users file)."""
    home, target = tmp_path / "home", tmp_path / "elsewhere"
    home.mkdir()
    target.mkdir()
    (home / "Maildir").symlink_to(target)
    os.chown(home, 65534, 65534)
    os.chown(target, target_uid, 0)
    os.chown(home / "Maildir", link_uid, 0, follow_symlinks=False)
    drop = Maildir((str(home), ("Maildir",)), owner=65534)
    if not accepted:
        with pytest.raises(store.MaildropError, match="symlink"):
            drop.lock()
        assert sorted(os.listdir(target)) == []
        return
    drop.lock()
    assert drop.scan() == []
    drop.unlock()
    assert sorted(os.listdir(target)) == [".iupop3.lock", "cur", "new", "tmp"]


# -- what the server makes belongs to the account (issue 12) -----------------------------------
def test_factory_passes_the_accounts_uid_and_gid(tmp_path):
    """open_maildrop gives the Maildir the account's uid and gid; none given: None (the
    Maildir's own then)."""
    class Settings:
        mail = f"maildir:{tmp_path}/%u"
        wastebasket = store.WASTEBASKET
        purge_reclaim = False
        uidl_format = settings_mod.BY_NAME["uidl_format"].default
        mbox_ledger_dir = ""

    drop = store.open_maildrop(Settings, Account("alice", "x", uid="1234", gid="5678"),
                               store.PLAIN)
    assert (drop.owner, drop.group) == (1234, 5678)
    drop = store.open_maildrop(Settings, Account("bob", "x"), store.PLAIN)
    assert (drop.owner, drop.group) == (None, None)


@pytest.mark.parametrize("uid", ["1234", ""])
def test_a_missing_home_is_made_only_for_accounts_without_a_uid(tmp_path, uid):
    """A users-file account with a uid whose home is missing is refused and no home is made (it
    would be root's); one without a uid (the one mail user owns everything) gets it made."""
    class Settings:
        mail = "maildir:~/Maildir"
        wastebasket = store.WASTEBASKET
        purge_reclaim = False
        uidl_format = settings_mod.BY_NAME["uidl_format"].default
        mbox_ledger_dir = ""

    home = tmp_path / "home" / "alice"
    drop = store.open_maildrop(Settings, Account("alice", "x", uid=uid, home=str(home)),
                               store.PLAIN)
    if uid:
        with pytest.raises(store.MaildropError, match="does not exist: not made"):
            drop.lock()
        assert not home.exists() and not (tmp_path / "home").exists()
    else:
        drop.lock()
        drop.unlock()
        assert (home / "Maildir" / "cur").is_dir()


def _ids(path) -> tuple[int, int, int]:
    st = os.lstat(path)
    return st.st_uid, st.st_gid, st.st_mode & 0o7777


def _delete_one(drop: Maildir, maildir, uid: int) -> None:
    """Log in (the Maildir is made if missing), deliver one message of ``uid``, delete it."""
    from conftest import sample, write_message

    drop.lock()
    drop.unlock()
    message = write_message(maildir, "1700000001.M1.test", sample(1))
    os.chown(message, uid, -1)
    drop.lock()
    try:
        drop.commit(drop.scan())
    finally:
        drop.unlock()


@pytest.mark.skipif(os.geteuid() != 0, reason="giving files to another owner needs root")
def test_maildir_made_at_first_login_and_trash_belong_to_the_account(tmp_path):
    """A Maildir made at first login, its cur/new/tmp, the lock, and the wastebasket with its
    marker get the account's uid and gid, 0700 and 0600."""
    home = tmp_path / "home"
    home.mkdir()
    os.chown(home, 4321, 8765)
    drop = Maildir((str(home), ("Maildir",)), owner=4321, group=8765)
    _delete_one(drop, home / "Maildir", 4321)
    maildir = home / "Maildir"
    for path in (maildir, maildir / "cur", maildir / "new", maildir / "tmp",
                 maildir / ".Trash", maildir / ".Trash" / "cur", maildir / ".Trash" / "tmp"):
        assert _ids(path) == (4321, 8765, 0o700), path
    assert _ids(maildir / ".iupop3.lock") == (4321, 8765, 0o600)
    assert _ids(maildir / ".Trash" / "maildirfolder") == (4321, 8765, 0o600)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving files to another owner needs root")
def test_without_ids_the_maildirs_own_owner_and_mode_are_used(tmp_path):
    """An account without uid/gid: what the server makes gets the Maildir's owner, group and
    mode (files without the execute bits)."""
    maildir = tmp_path / "Maildir"
    maildir.mkdir()
    os.chown(maildir, 4321, 8765)
    maildir.chmod(0o750)
    drop = Maildir(str(maildir))
    _delete_one(drop, maildir, 4321)
    assert _ids(maildir / ".Trash") == (4321, 8765, 0o750)
    assert _ids(maildir / ".Trash" / "new") == (4321, 8765, 0o750)
    assert _ids(maildir / ".Trash" / "maildirfolder") == (4321, 8765, 0o640)
    assert _ids(maildir / ".iupop3.lock") == (4321, 8765, 0o640)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving files to another owner needs root")
def test_a_folder_someone_else_made_is_never_taken_over(tmp_path):
    """open_dir(create=True) gives away only a directory it made itself."""
    from worker import safefs

    (tmp_path / ".Trash").mkdir()
    os.chown(tmp_path / ".Trash", 4000, 4000)
    parent = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.close(safefs.open_dir(parent, ".Trash", create=True,
                                 owner=safefs.Owner(4321, 8765, 0o700)))
    finally:
        os.close(parent)
    assert _ids(tmp_path / ".Trash")[:2] == (4000, 4000)


def test_created_files_never_follow_a_planted_symlink(tmp_path):
    """create_file, open_or_create and ensure_file refuse a symlink at the name and leave its
    target alone."""
    import errno

    from worker import safefs

    target = tmp_path / "target"
    target.write_text("keep")
    (tmp_path / "name").symlink_to(target)
    parent = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    owner = safefs.Owner(os.getuid(), os.getgid(), 0o700)
    try:
        with pytest.raises(FileExistsError):
            safefs.create_file(parent, "name", owner)
        with pytest.raises(OSError) as caught:
            safefs.open_or_create(parent, "name", owner)
        assert caught.value.errno == errno.ELOOP
        with pytest.raises(safefs.UnsafeEntry):
            safefs.ensure_file(parent, "name", owner)
        fd = safefs.open_or_create(parent, "fresh", owner)
        os.close(fd)
    finally:
        os.close(parent)
    assert target.read_text() == "keep"
    assert _ids(tmp_path / "fresh") == (os.getuid(), os.getgid(), 0o600)
