"""`criu restore` started before its images are complete (criu/early.py): it waits at its
first image (inventory.img, a FIFO) until the commit feeds it, then restores exactly what a
restore started then would; one never fed is killed having made nothing; one gone before
its first image is replaced by a fresh restore; a receiver restarted after a crash kills
one left waiting; and a migration's copy restored this way by `serve` runs and checks out."""
import os
import shutil
import subprocess
import sys
import time

import pytest

import workloads
from deltaxfer.core import procmem
from deltaxfer.criu.early import EarlyRestore
from deltaxfer.receiver import recover_restores
from deltaxfer.store import Store
from faults import agent_tmp, migrate_adopting  # noqa: F401
from servers import Server


def _waiting(early: EarlyRestore, timeout: float = 20.0) -> None:
    """Until criu waits in open(2) on the FIFO (a reader without a writer)."""
    deadline = time.monotonic() + timeout
    while not early.waiting():
        assert early.proc.poll() is None, \
            f"criu restore exited early ({early.proc.returncode})"
        assert time.monotonic() < deadline, "criu restore never reached inventory.img"
        time.sleep(0.01)


def _commit_like(dump, tmp, final) -> None:
    """What the receiver's commit does: every image renamed into the directory the early
    restore works in (inventory.img replacing the FIFO's name), then that directory
    renamed to its final name."""
    for name in os.listdir(dump):
        shutil.copy(os.path.join(dump, name), os.path.join(tmp, name + ".part"))
        os.rename(os.path.join(tmp, name + ".part"), os.path.join(tmp, name))
    os.rename(tmp, final)


@pytest.mark.criu
def test_early_restore_waits_at_its_first_image_then_restores(criu, tmp_path):
    dump, tmp, final = tmp_path / "dump", tmp_path / "images.tmp", tmp_path / "images"
    dump.mkdir()
    tmp.mkdir()
    with workloads.start("memwork", mib=16, dirty_mib_per_s=2, tmpdir=tmp_path) as wl:
        assert wl.verify()["ok"]
        early = EarlyRestore.start(criu, str(tmp), lazy=False, verbosity=4)
        try:
            _waiting(early)
            assert os.path.exists(tmp / "restore.log")
            # it waits, with nothing to read: no task made, no pid file
            time.sleep(0.3)
            assert early.proc.poll() is None and early.waiting()
            assert not (tmp / "restored.pid").exists()
            criu.dump(wl.pid, str(dump), leave="stopped")
            _commit_like(dump, tmp, final)
            assert (final / "inventory.img").is_file()        # the FIFO's name replaced
            pid = criu.restore(str(final), early=early)
        except BaseException:
            early.kill()
            raise
        wl.adopt(pid)
        assert early.fed_s is not None                      # fed, not replaced
        assert early.proc.returncode == 0
        assert int((final / "restored.pid").read_text()) == pid
        log = (final / "restore.log").read_text()
        # one criu did both: probed the kernel before the images existed, then restored
        assert "Running on" in log and "Restore finished successfully" in log, log[-2000:]
        res = wl.verify(pid=pid)
        assert res["ok"], res


@pytest.mark.criu
def test_early_restore_never_fed_is_killed_having_made_nothing(criu, tmp_path):
    tmp = tmp_path / "images.tmp"
    tmp.mkdir()
    early = EarlyRestore.start(criu, str(tmp), lazy=True, extra=["--leave-stopped"])
    pid = early.proc.pid
    _waiting(early)
    assert pid in procmem.lazy_pages_daemons(str(tmp), "restore")
    early.kill()
    assert early.proc.returncode is not None
    assert procmem.start_time(pid) is None
    assert procmem.lazy_pages_daemons(str(tmp), "restore") == []
    # and a second kill (cleanup after a failed commit) is harmless
    early.kill()


@pytest.mark.criu
@pytest.mark.parametrize("after_s", [0.0, 0.005, 0.015, 0.03])
def test_early_restore_killed_while_it_starts_leaves_no_process(criu, tmp_path, after_s):
    """A migration that fails right after its first round began kills a restore still
    probing the kernel: it is let reach the FIFO first, so none of CRIU's probe helpers
    (forked, one in a network namespace of its own) outlives it."""
    tmp = tmp_path / "images.tmp"
    tmp.mkdir()
    early = EarlyRestore.start(criu, str(tmp), lazy=True, extra=["--leave-stopped"])
    time.sleep(after_s)
    early.kill()
    assert early.proc.returncode is not None
    time.sleep(0.2)
    assert procmem.lazy_pages_daemons(str(tmp), "restore") == []


@pytest.mark.criu
def test_the_commit_waits_until_a_slow_starting_restore_holds_its_fifo(criu, tmp_path):
    """A short final connection can commit while its criu still starts (here a wrapper
    holds criu 0.4 s before it runs): ready() waits until criu holds the FIFO, so the
    commit's real inventory.img never reaches criu but through the FIFO, and exactly one
    copy is restored, when fed. (Renamed over the FIFO first, the real file was read by
    criu, which restored on its own; a second restore then failed or made a second
    copy: seen once in a fresh-clone CI run of the stand-alone hook's test.)"""
    from deltaxfer.criu.runner import Criu
    dump, tmp, final = tmp_path / "dump", tmp_path / "images.tmp", tmp_path / "images"
    dump.mkdir()
    tmp.mkdir()
    slow = tmp_path / "criu"          # named criu, so that procmem still finds it
    slow.write_text(f'#!/bin/sh\nsleep 0.4\nexec "{criu.path}" "$@"\n')
    slow.chmod(0o755)
    slow_criu = Criu(str(slow), criu.version, "test")
    with workloads.start("memwork", mib=8, tmpdir=tmp_path) as wl:
        criu.dump(wl.pid, str(dump), leave="stopped")
        early = EarlyRestore.start(slow_criu, str(tmp), lazy=False)
        try:
            t = time.monotonic()
            assert early.ready()
            assert time.monotonic() - t >= 0.3 and early.waiting()
            _commit_like(dump, tmp, final)
            time.sleep(0.2)
            assert early.proc.poll() is None        # not restoring on its own
            pid = criu.restore(str(final), early=early)
        except BaseException:
            early.kill()
            raise
        wl.adopt(pid)
        assert early.fed_s is not None and early.fed_s > 0
        assert wl.verify(pid=pid)["ok"]


@pytest.mark.criu
def test_a_receiver_stopped_by_sigterm_kills_its_unfed_restores(criu, tmp_path):
    """`serve` on SIGTERM kills the early restores it has not fed (kill_unfed): one still
    starting (here held 1 s by a wrapper) would otherwise wait in its open for a writer
    that is gone. A fed one is not in that set: it restores."""
    from deltaxfer.criu import early as early_mod
    from deltaxfer.criu.runner import Criu
    tmp = tmp_path / "images.tmp"
    tmp.mkdir()
    slow = tmp_path / "criu"
    slow.write_text(f'#!/bin/sh\nsleep 1\nexec "{criu.path}" "$@"\n')
    slow.chmod(0o755)
    e = EarlyRestore.start(Criu(str(slow), criu.version, "test"), str(tmp), lazy=True)
    try:
        assert e in early_mod._UNFED
        assert early_mod.kill_unfed() >= 1
        assert e.proc.wait(timeout=10) == -9
    finally:
        e.kill()
    assert e not in early_mod._UNFED


@pytest.mark.criu
def test_early_restore_gone_before_its_first_image_is_replaced(criu, tmp_path):
    """criu died before it read anything (here: killed): the restore starts a fresh criu
    and the copy is restored all the same."""
    dump, tmp, final = tmp_path / "dump", tmp_path / "images.tmp", tmp_path / "images"
    dump.mkdir()
    tmp.mkdir()
    with workloads.start("memwork", mib=8, tmpdir=tmp_path) as wl:
        early = EarlyRestore.start(criu, str(tmp), lazy=False)
        early.proc.kill()
        early.proc.wait()
        criu.dump(wl.pid, str(dump), leave="stopped")
        _commit_like(dump, tmp, final)
        pid = criu.restore(str(final), early=early)
        wl.adopt(pid)
        assert early.fed_s is None                          # not fed: replaced
        res = wl.verify(pid=pid)
        assert res["ok"], res


@pytest.mark.criu
def test_early_restore_started_for_other_options_is_not_used(criu, tmp_path):
    """A restore asked with other options than the waiting one's kills it and starts its
    own (here: the waiting one was lazy, the restore is not)."""
    dump, tmp, final = tmp_path / "dump", tmp_path / "images.tmp", tmp_path / "images"
    dump.mkdir()
    tmp.mkdir()
    with workloads.start("memwork", mib=8, tmpdir=tmp_path) as wl:
        early = EarlyRestore.start(criu, str(tmp), lazy=True)
        _waiting(early)
        criu.dump(wl.pid, str(dump), leave="stopped")
        _commit_like(dump, tmp, final)
        pid = criu.restore(str(final), lazy=False, early=early)
        wl.adopt(pid)
        assert early.fed_s is None and early.proc.returncode is not None
        assert wl.verify(pid=pid)["ok"]


@pytest.mark.criu
def test_a_restarted_receiver_kills_an_early_restore_left_waiting(criu, tmp_path):
    """A receiver that died after the first round (its session prepared, no commit) while
    its `criu restore` was still starting left it waiting in images.tmp (here: this test's
    process lives on, holding the FIFO): the next receiver's start kills it."""
    store = Store(str(tmp_path / "store"))
    session = store.session("s1")
    tmp = session.prepare_images_dir()
    early = EarlyRestore.start(criu, tmp, lazy=True, extra=["--leave-stopped"])
    try:
        _waiting(early)
        done = recover_restores(Store(str(tmp_path / "store")))
        assert any("`criu restore` started early" in d for d in done.get("s1", [])), done
        early.proc.wait(timeout=10)
        assert early.proc.returncode == -9
        assert not os.path.exists(tmp)
    finally:
        early.kill()


@pytest.mark.criu
def test_an_early_restore_exits_having_made_nothing_when_its_receiver_dies(criu, tmp_path):
    """The receiver holds the FIFO's other end: killed, its end closes, and the waiting
    criu reads an empty inventory and exits -- no task made, nothing left waiting."""
    tmp = tmp_path / "images.tmp"
    tmp.mkdir()
    code = ("import sys, time\n"
            "from deltaxfer.criu.runner import find_criu\n"
            "from deltaxfer.criu.early import EarlyRestore\n"
            f"e = EarlyRestore.start(find_criu(), {str(tmp)!r}, lazy=True, "
            "extra=['--leave-stopped'])\n"
            "deadline = time.monotonic() + 20\n"
            "while not e.waiting() and time.monotonic() < deadline:\n"
            "    time.sleep(0.01)\n"
            "print(e.proc.pid, e.waiting(), flush=True)\n"
            "time.sleep(60)\n")
    receiver = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        pid, waiting = receiver.stdout.readline().split()
        pid = int(pid)
        assert waiting == b"True"
        assert pid in procmem.lazy_pages_daemons(str(tmp), "restore")
    finally:
        receiver.kill()
        receiver.wait()
    deadline = time.monotonic() + 10
    while procmem.start_time(pid) is not None and procmem.state(pid) != "Z":
        assert time.monotonic() < deadline, "criu restore outlived its receiver"
        time.sleep(0.05)
    log = (tmp / "restore.log").read_text()
    assert "Error" in log and not (tmp / "restored.pid").exists(), log[-2000:]


@pytest.mark.criu
@pytest.mark.parametrize("early", [True, False], ids=["early", "at-commit"])
def test_migration_restored_by_an_early_restore(criu, tmp_path, agent_tmp, early):
    """serve starts the copy's `criu restore` with the first round (default) or at the
    commit (--no-early-restore): either way the copy runs and checks out, and serve says
    which ran."""
    extra = ["--restore"] + ([] if early else ["--no-early-restore"])
    with Server(tmp_path, extra=extra) as server, \
            workloads.start("memwork", mib=32, dirty_mib_per_s=4, tmpdir=tmp_path) as wl:
        m = migrate_adopting(wl, server.addr, tmp_path, agent_tmp)
        r = m.report
        assert m.rc == 0 and r["outcome"] == "migrated", (m.rc, m.stderr[-3000:],
                                                          server.log()[-3000:])
        res = wl.verify(pid=r["restored_pid"], timeout=60)
        assert res["ok"], res
        log = server.log()
        assert ("restored by the `criu restore` started with the first round" in log) == early, \
            log[-3000:]
        assert "a fresh one is started" not in log, log[-3000:]
        # no criu restore is left in the session, early or not
        assert procmem.lazy_pages_daemons(r["destination_path"], "restore") == []
