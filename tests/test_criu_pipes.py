"""criu/pipes.py: fs.pipe-max-size raised for a freeze and put back after, with several
migrations on one host coordinating through the lock file. A stand-in sysctl file and
state directory (the same code writes /proc/sys/fs/pipe-max-size in a migration:
tests/test_migrate_criu.py checks the real one is back afterwards)."""
import os

import pytest

from deltaxfer.criu import pipes

MIB = 1 << 20


@pytest.fixture
def host(tmp_path):
    sysctl = tmp_path / "pipe-max-size"
    sysctl.write_text(f"{MIB}\n")
    state = tmp_path / "run"

    def raiser():
        return pipes.PipeSizeRaise(str(sysctl), str(state))
    return sysctl, state, raiser


def value(p) -> int:
    return int(p.read_text())


def test_raised_for_the_freeze_and_put_back(host):
    sysctl, state, raiser = host
    r = raiser()
    note = r.raise_(needed=True)
    assert note == f"fs.pipe-max-size raised from {MIB} to {4 * MIB} for the freeze"
    assert value(sysctl) == 4 * MIB
    assert r.release() == f"fs.pipe-max-size back to {MIB}"
    assert value(sysctl) == MIB and not (state / "pipe-max-size.saved").exists()
    assert r.release() == ""                  # idempotent


def test_not_touched_where_criu_may_grow_pipes_or_it_is_large_enough(host):
    sysctl, state, raiser = host
    r = raiser()
    assert r.raise_(needed=False) == "" and value(sysctl) == MIB and r.release() == ""
    sysctl.write_text(str(8 * MIB))
    r = raiser()
    assert r.raise_(needed=True) == "" and r.release() == "" and value(sysctl) == 8 * MIB


def test_two_migrations_the_last_one_out_restores(host):
    sysctl, state, raiser = host
    a, b = raiser(), raiser()
    assert a.raise_(needed=True)
    assert b.raise_(needed=True) == ""        # already raised: nothing to note, but held
    assert "another migration" in a.release()
    assert value(sysctl) == 4 * MIB           # b's freeze still needs it
    assert b.release() == f"fs.pipe-max-size back to {MIB}"
    assert value(sysctl) == MIB


def test_an_operator_change_meanwhile_is_kept(host):
    sysctl, state, raiser = host
    a = raiser()
    a.raise_(needed=True)
    sysctl.write_text(str(16 * MIB))
    assert a.release() == ""
    assert value(sysctl) == 16 * MIB and not (state / "pipe-max-size.saved").exists()


def test_a_killed_migrations_raise_is_undone_by_the_next(host):
    sysctl, state, raiser = host
    a = raiser()
    a.raise_(needed=True)
    os.close(a.fd)                            # killed: its lock goes, its saved value stays
    a.fd = -1
    assert value(sysctl) == 4 * MIB
    c = raiser()
    c.raise_(needed=True)
    assert c.release() == f"fs.pipe-max-size back to {MIB}"
    assert value(sysctl) == MIB


def test_a_sysctl_that_cannot_be_written_leaves_the_dump_as_it_was(tmp_path):
    sysctl = tmp_path / "pipe-max-size"
    sysctl.write_text(str(MIB))
    state = tmp_path / "run"
    state.write_text("not a directory")       # the state cannot be kept: no raise
    r = pipes.PipeSizeRaise(str(sysctl), str(state))
    note = r.raise_(needed=True)
    assert note.startswith(f"fs.pipe-max-size left at {MIB}: "), note
    assert value(sysctl) == MIB and r.fd == -1 and r.release() == ""


def test_the_estimate_of_open_files_follows_the_pipe_size(monkeypatch):
    monkeypatch.setattr(pipes, "has_cap_sys_resource", lambda: False)
    monkeypatch.setattr(pipes, "_read", lambda path: MIB)
    assert pipes.lazy_dump_fds_per_gib() == pipes.FDS_PER_GIB_SMALL_PIPES
    monkeypatch.setattr(pipes, "_read", lambda path: 4 * MIB)
    assert pipes.lazy_dump_fds_per_gib() == pipes.FDS_PER_GIB_LARGE_PIPES


def test_a_read_only_sysctl_leaves_nothing_saved(tmp_path, monkeypatch):
    """/proc/sys read-only (a container): the raise fails, says why, and leaves no saved
    value that a later release would act on."""
    sysctl = tmp_path / "sysctl"
    sysctl.mkdir()                  # reads as 1 MiB (below); writing it fails, as EROFS would
    orig = pipes._read
    monkeypatch.setattr(pipes, "_read", lambda path: MIB if path == str(sysctl) else orig(path))
    state = tmp_path / "run"
    r = pipes.PipeSizeRaise(str(sysctl), str(state))
    note = r.raise_(needed=True)
    assert note.startswith(f"fs.pipe-max-size left at {MIB}: "), note
    assert not (state / "pipe-max-size.saved").exists() and r.fd == -1 and r.release() == ""


def test_a_state_directory_others_may_write_is_refused(host):
    """The saved value is written as root: a directory another user could plant a link
    in is not used (and nothing is raised)."""
    sysctl, state, raiser = host
    state.mkdir(mode=0o777)
    os.chmod(state, 0o777)
    r = raiser()
    note = r.raise_(needed=True)
    assert note.startswith(f"fs.pipe-max-size left at {MIB}: ") and "closed to others" in note
    assert value(sysctl) == MIB and r.fd == -1


def test_links_in_the_state_directory_are_not_followed(host, tmp_path):
    sysctl, state, raiser = host
    state.mkdir(mode=0o700)
    target = tmp_path / "precious"
    target.write_text("keep me")
    (state / "pipe-max-size.saved").symlink_to(target)
    r = raiser()
    note = r.raise_(needed=True)               # the saved value cannot be read or written
    assert target.read_text() == "keep me"
    r.release()
    assert target.read_text() == "keep me", note
