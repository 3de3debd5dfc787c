"""Fault injection beyond tests/test_migrate_faults.py, with the real CRIU and real
processes: the stream truncated or corrupted at chosen points (tests/faults.py's
LinkProxy), the destination killed in the handshake, the final push and the restore,
the source's agent killed in the handshake, a live round and the restore, and the
destination's disk full (a small tmpfs) from the start or at the final push.

Every case checks: the source runs on with its memory intact (or was never frozen);
the destination runs no copy and keeps no unfinished session state (after a restart,
where it was killed: a restarted receiver cleans what the killed one left); both sides
say why (migrate's report, the receiver's log)."""
import json
import os
import subprocess
import time

import pytest

import workloads
from deltaxfer.wire import MsgType
from faults import (Held, LinkProxy, agent_env, agent_leftovers, agent_tmp,  # noqa: F401
                    copies_of, descendants, finish_migrate, host_pipe_max, run_migrate,
                    start_migrate, tmp_leftovers, wait_log)
from servers import Server, write_key
from test_migrate_faults import (MIB, DIRTY, _is_final_round, assert_destination_clean,
                                 assert_failed_cleanly, assert_source_runs_on)

pytestmark = pytest.mark.criu


@pytest.fixture
def key_file(tmp_path):
    return write_key(tmp_path / "client.key")


def first(pred):
    """A proxy rule firing ``action`` once, on the first frame matching pred."""
    fired = []

    def rule_for(action):
        def rule(d, t, p):
            if not fired and pred(d, t, p):
                fired.append((d, t))
                return action() if callable(action) else action
            return None
        return rule
    return rule_for


POINTS = {
    "handshake": lambda d, t, p: d == "c2s" and t == MsgType.AUTH,
    "live-round": lambda d, t, p: d == "c2s" and t == MsgType.PAGES,
    "final-push": lambda d, t, p: d == "c2s" and t == MsgType.FILE,
    "commit": lambda d, t, p: d == "c2s" and t == MsgType.COMMIT,
}


# -- the stream truncated or corrupted -----------------------------------------------------

@pytest.mark.parametrize("mode, point, client_says, server_says", [
    pytest.param("truncate", "handshake", ("truncated", "connection"), "truncated",
                 id="truncate-handshake"),
    pytest.param("corrupt", "live-round", ("bad-check",), "bad-check", id="corrupt-live-round"),
    pytest.param("truncate", "final-push", ("truncated", "connection"), "truncated",
                 id="truncate-final-push", marks=pytest.mark.slow),
    pytest.param("corrupt", "commit", ("bad-check",), "bad-check", id="corrupt-commit",
                 marks=pytest.mark.slow),
])
def test_stream_truncated_or_corrupted(criu, tmp_path, agent_tmp, key_file, mode, point,
                                       client_says, server_says):
    rule = first(POINTS[point])(mode)
    with Server(tmp_path, extra=["--restore"]) as server, \
            workloads.start("memwork", mib=MIB, dirty_mib_per_s=DIRTY, tmpdir=tmp_path) as wl, \
            LinkProxy(server.port, rule=rule) as proxy:
        before = wl.verify()
        m = run_migrate(wl.pid, proxy.addr, key_file, tmp_path / "r.json",
                        env=agent_env(agent_tmp), timeout=120)
        assert proxy.triggered.is_set() and proxy.actions[-1][1] == mode, proxy.actions
        frozen = point in ("final-push", "commit")
        assert_failed_cleanly(m, outcome="rolled back" if frozen else "aborted before the freeze",
                              error_has=client_says)
        assert_source_runs_on(wl, before)
        assert_destination_clean(wl, server)
        log = wait_log(server, server_says)
        assert server_says in log, log[-2000:]
        assert "committed:" not in log and server.alive()
        assert agent_leftovers(agent_tmp) == []


# -- the destination killed ------------------------------------------------------------------

KILL_DESTINATION = {
    # the server answered HELLO; it dies before the client's AUTH reaches it
    "handshake": lambda: lambda d, t, p: d == "c2s" and t == MsgType.AUTH,
    # the source is frozen, the final round went through, the image files are on their
    # way: the receiver dies with files.tmp half written
    "final-push": lambda: nth(3, lambda d, t, p: d == "c2s" and t == MsgType.FILE),
    # the copy is restored (stopped) and COMMITTED is on its way: the receiver dies
    # before the source hears it, holding a stopped copy that waits for RESUME
    "restore": lambda: lambda d, t, p: d == "s2c" and t == MsgType.COMMITTED,
}


def nth(n, pred):
    seen = []

    def match(d, t, p):
        if pred(d, t, p):
            seen.append(t)
            return len(seen) == n
        return False
    return match


@pytest.mark.parametrize("phase", [
    "handshake",
    pytest.param("final-push", marks=pytest.mark.slow),
    "restore",
])
def test_destination_killed(criu, tmp_path, agent_tmp, key_file, phase):
    server = Server(tmp_path, extra=["--restore"])
    try:
        def kill_then_cut():
            deadline = time.monotonic() + 5
            while phase == "final-push" and not list(server.dir.glob("*/files.tmp")) \
                    and time.monotonic() < deadline:
                time.sleep(0.01)      # the frames already forwarded reach the receiver
            server.proc.kill()
            server.proc.wait(10)
            return "cut"
        rule = first(KILL_DESTINATION[phase]())(kill_then_cut)
        with workloads.start("memwork", mib=MIB, dirty_mib_per_s=DIRTY, tmpdir=tmp_path) as wl, \
                LinkProxy(server.port, rule=rule) as proxy:
            before = wl.verify()
            m = run_migrate(wl.pid, proxy.addr, key_file, tmp_path / "r.json",
                            env=agent_env(agent_tmp), timeout=120)
            assert proxy.triggered.is_set() and not server.alive()
            frozen = phase != "handshake"
            assert_failed_cleanly(
                m, outcome="rolled back" if frozen else "aborted before the freeze",
                error_has=("connection", "closed", "reset"))
            assert_source_runs_on(wl, before)
            if phase == "restore":
                # the killed receiver left its stopped copy behind: it does not run...
                stopped = copies_of(wl)
                for pid in stopped:
                    wl.adopt(pid)
                assert len(stopped) == 1 and workloads.proc_state(stopped[0]) in ("T", "t")
            # ...and a receiver started again over the same directory cleans up
            server.stop()
            server = Server(tmp_path, extra=["--restore"])
            assert_destination_clean(wl, server)
            log = server.log()
            if phase == "restore":
                assert "killed the stopped restored copy" in log, log[-2000:]
            if phase != "handshake":
                assert "recovered after an unclean stop" in log, log[-2000:]
                if phase == "final-push":
                    assert "removed files.tmp" in log, log[-2000:]
            assert agent_leftovers(agent_tmp) == []
    finally:
        server.stop()


@pytest.mark.slow
def _kill_receiver_inside_restore(criu, tmp_path, agent_tmp, key_file, lazy_server: str,
                                  after) -> None:
    """Migrate to a receiver whose criu is a wrapper that holds a restore 1 s before it
    runs the real one; SIGKILL the receiver once the restore began. The migration must
    roll back and the source run on; then ``after(wl)`` checks the destination and
    returns the receiver's log line to expect from a receiver started again (or None).
    The receiver starts its restore at the commit (--no-early-restore): started with the
    first round (the default), the wrapper would hold it there, before any freeze; a
    receiver killed while that one waits is test_early_restore's and the live-round
    kills' (assert_destination_clean finds no `criu restore` left)."""
    mark = tmp_path / "restore-started"
    slow = tmp_path / "slow-criu"
    slow.write_text("#!/bin/sh\n"
                    f'if [ "$1" = restore ]; then touch "{mark}"; sleep 1; fi\n'
                    f'exec "{criu.path}" "$@"\n')
    slow.chmod(0o755)
    server = Server(tmp_path, extra=["--restore", "--criu", str(slow), "--no-early-restore",
                                     "--lazy-pages-server", lazy_server])
    left = Held()
    try:
        with workloads.start("memwork", mib=MIB, dirty_mib_per_s=DIRTY, tmpdir=tmp_path) as wl:
            before = wl.verify()
            t0 = time.monotonic()
            proc = start_migrate(wl.pid, server.addr, key_file, tmp_path / "r.json",
                                 env=agent_env(agent_tmp))
            deadline = time.monotonic() + 90
            while not mark.exists() and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.01)
            assert mark.exists(), "the restore never began"
            left = Held(descendants(server.proc.pid))   # the criu wrapper, lazy-pages
            server.proc.kill()
            server.proc.wait(10)
            m = finish_migrate(proc, tmp_path / "r.json", t0, timeout=120)
            assert_failed_cleanly(m, outcome="rolled back",
                                  error_has=("connection", "closed", "reset"))
            assert_source_runs_on(wl, before)
            expect = after(wl)
            server.stop()
            server = Server(tmp_path, extra=["--restore"])
            assert_destination_clean(wl, server)
            if expect:
                log = server.log()
                assert expect in log, log[-2000:]
    finally:
        server.stop()
        left.kill()


def test_destination_killed_inside_criu_restore_before_lazy_server(criu, tmp_path,
                                                                   agent_tmp, key_file):
    """The receiver is SIGKILLed while its `criu restore` is held before it starts: the
    lazy-pages server it had started for that restore (deltaxfer's, the default) sees its
    receiver gone before any restore connected and exits, so the restore that comes late
    finds no server and fails: no restored copy, no daemon is left, the source rolls
    back, and a receiver started again finds a clean destination."""
    def after(wl):
        time.sleep(3)                                   # the held restore ran and failed
        assert copies_of(wl) == []
        return None

    _kill_receiver_inside_restore(criu, tmp_path, agent_tmp, key_file, "deltaxfer", after)


def test_destination_killed_inside_criu_restore(criu, tmp_path, agent_tmp, key_file):
    """The receiver is SIGKILLed while its `criu restore` runs (a criu wrapper holds the
    restore 1 s, then runs the real one; `criu lazy-pages`, which outlives its receiver,
    serves it): criu finishes on its own and leaves a stopped copy that no receiver
    watches; the source rolls back. A receiver started again finds the copy through the
    pidfile of the restore it had recorded, and kills it."""
    def after(wl):
        deadline = time.monotonic() + 30        # criu restore finishes without us
        while time.monotonic() < deadline and not copies_of(wl):
            time.sleep(0.1)
        stopped = copies_of(wl)
        for pid in stopped:
            wl.adopt(pid)
        assert len(stopped) == 1 and workloads.proc_state(stopped[0]) in ("T", "t"), stopped
        return f"killed the stopped restored copy {stopped[0]}"

    _kill_receiver_inside_restore(criu, tmp_path, agent_tmp, key_file, "criu", after)


# -- the source's agent killed --------------------------------------------------------------

KILL_SOURCE = {
    # the agent has the server's proof; it dies before authenticating
    "handshake": lambda d, t, p: d == "s2c" and t == MsgType.WELCOME,
    # pages of the first live round are on their way
    "live-round": lambda d, t, p: d == "c2s" and t == MsgType.PAGES,
    # the destination restored the copy (stopped) and answers COMMITTED
    "restore": lambda d, t, p: d == "s2c" and t == MsgType.COMMITTED,
}


@pytest.mark.parametrize("phase", ["handshake", "live-round",
                                   pytest.param("restore", marks=pytest.mark.slow)])
def test_source_agent_killed(criu, tmp_path, agent_tmp, key_file, phase):
    """`deltaxfer migrate` is SIGKILLed (with the link held silent at that point): the
    receiver drops the session (killing a stopped copy that will never get RESUME) and
    CRIU, where it was dumping, resumes the source."""
    holder = {}

    def kill_agent():
        proc = holder["proc"]
        holder["left"] = Held(descendants(proc.pid))     # criu dump and its hook, if any
        proc.kill()
        return "cut"

    rule = first(KILL_SOURCE[phase])(kill_agent)
    pipe_max, _ = host_pipe_max()
    with Server(tmp_path, extra=["--restore"]) as server, \
            workloads.start("memwork", mib=MIB, dirty_mib_per_s=DIRTY, tmpdir=tmp_path) as wl, \
            LinkProxy(server.port, rule=rule) as proxy:
        before = wl.verify()
        t0 = time.monotonic()
        holder["proc"] = start_migrate(wl.pid, proxy.addr, key_file, tmp_path / "r.json",
                                       env=agent_env(agent_tmp))
        try:
            assert proxy.triggered.wait(90), f"the {phase} never came"
            m = finish_migrate(holder["proc"], tmp_path / "r.json", t0, timeout=30)
            assert m.rc == -9, m.rc
            assert_source_runs_on(wl, before)
            assert_destination_clean(wl, server, settle=10)
            expect = {"handshake": ("handshake with",),
                      "live-round": ("closed the connection", "lost"),
                      "restore": ("killed the restored copy",)}[phase]
            log = wait_log(server, expect[0])
            assert any(e in log for e in expect), log[-2000:]
            assert "committed:" not in log or phase == "restore"
            left = holder.get("left", Held())
            deadline = time.monotonic() + 15
            while left.alive() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert left.alive() == [], "criu dump did not exit"
            if phase == "restore":
                # the agent had raised fs.pipe-max-size for the dump (criu/pipes.py); the
                # hook that found it dead put the host's value back
                assert host_pipe_max() == (pipe_max, False)
        finally:
            holder.get("left", Held()).kill()
            if holder["proc"].poll() is None:
                holder["proc"].kill()
                holder["proc"].wait()


# -- the destination's disk is full ----------------------------------------------------------

@pytest.fixture
def small_tmpfs(tmp_path):
    """tmp_path/serve as a tmpfs of 48 MiB (unmounted afterwards, whatever happens)."""
    mnt = tmp_path / "serve"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m,mode=0700", "dxtest-full",
                    str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(path) -> int:
    """Write a file until the file system is full; returns bytes written."""
    n = 0
    fd = os.open(os.path.join(path, "filler"), os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 20, 4096):          # big writes, then the last pages one by one
            try:
                while True:
                    n += os.write(fd, b"\xff" * size)
            except OSError:
                pass
    finally:
        os.close(fd)
    return n


def used_bytes(path, but=("filler",)) -> int:
    total = 0
    for d, _, files in os.walk(path):
        total += sum(os.lstat(os.path.join(d, f)).st_blocks * 512 for f in files if f not in but)
    return total


@pytest.mark.parametrize("when", ["first-round", pytest.param("final-push",
                                                              marks=pytest.mark.slow)])
def test_destination_disk_full(criu, tmp_path, agent_tmp, key_file, small_tmpfs, when):
    """first-round: 64 MiB of pages do not fit in 48 MiB: the first round fails to
    allocate, before any freeze. final-push: the disk fills up when the final round
    begins (a 24 MiB workload's first round fitted)."""
    mib = 64 if when == "first-round" else 24
    rule = None
    if when == "final-push":
        filled = []

        def fill_then_forward():
            filled.append(fill(small_tmpfs))
            return None
        rule = first(lambda d, t, p: d == "c2s" and t == MsgType.ROUND
                     and _is_final_round(p))(fill_then_forward)
    with Server(tmp_path, extra=["--restore"]) as server, \
            workloads.start("memwork", mib=mib, dirty_mib_per_s=DIRTY, tmpdir=tmp_path) as wl, \
            LinkProxy(server.port, rule=rule) as proxy:
        before = wl.verify()
        m = run_migrate(wl.pid, proxy.addr, key_file, tmp_path / "r.json",
                        env=agent_env(agent_tmp), timeout=120)
        assert_failed_cleanly(
            m, outcome="aborted before the freeze" if when == "first-round" else "rolled back",
            error_has=("no space left", "quota"))
        assert "No space left on device" in m.report["error"], m.report["error"]
        assert_source_runs_on(wl, before)
        assert_destination_clean(wl, server)
        log = wait_log(server, "No space left on device")
        assert "No space left on device" in log and server.alive(), log[-2000:]
        if when == "first-round":
            # nothing of the refused round is left on the small disk
            assert used_bytes(small_tmpfs) < 1 << 20, used_bytes(small_tmpfs)
        else:
            assert filled and filled[0] > 0
            os.unlink(small_tmpfs / "filler")
            # the session keeps only what it held before the final round
            assert json.loads(next(small_tmpfs.glob("*/meta.json")).read_text())["round"] >= 1
        assert agent_leftovers(agent_tmp) == []
