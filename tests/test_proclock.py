"""Dumps of tasks in their own pid namespace that share a working directory are
serialized (criu/proclock.py): CRIU's parasite makes proc.crtools there, and a second
concurrent dump failed on that mkdir (EEXIST) and rolled back -- seen in CI."""
import asyncio
import os
import subprocess
import sys
import time

import pytest

import workloads
from deltaxfer.criu import proclock
from faults import agent_env, agent_tmp, finish_migrate, start_migrate  # noqa: F401
from servers import Server, write_key


def run(coro):
    return asyncio.run(coro)


def test_keys_only_for_tasks_in_another_pid_namespace(tmp_path):
    """A workload started in its own pid namespace needs its cwd locked; a plain child
    of ours (same pid namespace: CRIU opens /proc directly) needs nothing."""
    (tmp_path / "here").mkdir()
    with workloads.start("memwork", mib=1, tmpdir=tmp_path,
                         prefix=("env", "-C", str(tmp_path / "here"))) as wl:
        keys = proclock.cwd_keys(wl.pid)
        st = os.stat(tmp_path / "here")
        assert [(d, i) for d, i, _ in keys] == [(st.st_dev, st.st_ino)], keys
        assert keys[0][2] == str(tmp_path / "here")
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"],
                             cwd=tmp_path)
    try:
        assert proclock.cwd_keys(child.pid) == []
    finally:
        child.kill()
        child.wait()


def test_second_holder_waits_then_times_out_naming_the_directory(tmp_path):
    keys = [(1, 2, "/some/dir")]

    async def main():
        a = proclock.CwdLocks(keys, str(tmp_path))
        b = proclock.CwdLocks(keys, str(tmp_path))
        await a.acquire()
        t0 = time.monotonic()
        with pytest.raises(proclock.CwdLockTimeout, match="/some/dir"):
            await b.acquire(timeout=0.3)
        assert time.monotonic() - t0 >= 0.3
        assert b.fds == []                   # nothing kept after the failure
        # released: the other one gets it at once, and after waiting for it
        waiter = asyncio.ensure_future(b.acquire(timeout=5))
        await asyncio.sleep(0.2)
        assert not waiter.done()
        a.release()
        await waiter
        assert b.waited >= 0.2
        b.release()
        a.release()                          # idempotent
    run(main())


def test_lock_files_are_root_only_directory():
    if os.geteuid() != 0:
        pytest.skip("the host-wide lock directory is root's")
    d = proclock.lock_dir()
    st = os.stat(d)
    assert d == proclock.LOCK_DIR and st.st_uid == 0 and st.st_mode & 0o077 == 0


@pytest.mark.criu
@pytest.mark.slow
def test_migration_waits_for_a_dump_in_the_same_directory_unfrozen(criu, tmp_path, agent_tmp):
    """While another holder has the lock of the workload's working directory, migrate
    finishes its live rounds and waits -- the workload keeps running (not stopped) --
    then migrates once the lock is free, reporting the wait."""
    key_file = write_key(tmp_path / "client.key")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    with Server(tmp_path, extra=["--restore"]) as server, \
            workloads.start("memwork", mib=8, dirty_mib_per_s=1, tmpdir=tmp_path,
                            prefix=("env", "-C", str(cwd))) as wl:
        holder = proclock.CwdLocks(proclock.cwd_keys(wl.pid))
        run(holder.acquire(timeout=5))
        try:
            t0 = time.monotonic()
            proc = start_migrate(wl.pid, server.addr, key_file, tmp_path / "r.json",
                                 "--max-rounds", "2", "--converge", "off",
                                 env=agent_env(agent_tmp))
            # the live rounds end (the receiver logs round 2), then the agent waits on
            # the lock before it starts criu
            deadline = time.monotonic() + 120
            while "round 2 complete" not in server.log() and time.monotonic() < deadline \
                    and proc.poll() is None:
                time.sleep(0.05)
            assert "round 2 complete" in server.log(), server.log()[-2000:]
            time.sleep(1.5)
            assert proc.poll() is None
            assert workloads.proc_state(wl.pid) in ("R", "S"), workloads.proc_state(wl.pid)
            assert not (cwd / proclock.DIRNAME).exists()
        finally:
            holder.release()
        m = finish_migrate(proc, tmp_path / "r.json", t0, timeout=120)
        r = m.report
        if r and r.get("restored_pid"):
            wl.adopt(r["restored_pid"])
        assert m.rc == 0 and r["outcome"] == "migrated", (m.stderr[-2000:], r)
        assert r["freeze"]["cwd_lock_wait"] >= 1.4, r["freeze"]
        assert wl.verify(pid=r["restored_pid"], timeout=60)["ok"]
        assert not (cwd / proclock.DIRNAME).exists()


@pytest.mark.criu
@pytest.mark.slow
def test_left_over_proc_crtools_rolls_back_with_a_hint(criu, tmp_path, agent_tmp):
    """A proc.crtools left in the working directory (by a killed criu) makes CRIU's dump
    fail: the source runs on and the report says which directory to remove."""
    key_file = write_key(tmp_path / "client.key")
    cwd = tmp_path / "cwd"
    (cwd / proclock.DIRNAME).mkdir(parents=True)
    with Server(tmp_path, extra=["--restore"]) as server, \
            workloads.start("memwork", mib=4, dirty_mib_per_s=1, tmpdir=tmp_path,
                            prefix=("env", "-C", str(cwd))) as wl:
        t0 = time.monotonic()
        proc = start_migrate(wl.pid, server.addr, key_file, tmp_path / "r.json",
                             "--max-rounds", "2", env=agent_env(agent_tmp))
        m = finish_migrate(proc, tmp_path / "r.json", t0, timeout=120)
        r = m.report
        assert m.rc != 0 and r["outcome"] == "rolled back: the source runs on", r
        assert str(cwd) in r["hint"] and proclock.DIRNAME in r["hint"], r
        assert workloads.proc_state(wl.pid) in ("R", "S")
        assert wl.verify(timeout=60)["ok"]
