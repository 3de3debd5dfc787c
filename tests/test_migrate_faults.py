"""`deltaxfer migrate` when things go wrong, with the real CRIU and real processes: a wrong
key, the destination dying during the live rounds, the link cut or silent during the
freeze, the destination's restore failing, the agent dying inside the freeze, the source
exiting during the live rounds.

Each test checks the invariants of a failed migration: the source runs on (not stopped,
not gone) with its memory intact and still working; the destination runs no copy of it
and keeps no unfinished (*.tmp) state; `deltaxfer migrate` exits 1 without a traceback
and its report says why; the receiver's log says what it saw.

The link faults go through tests/faults.py's LinkProxy, which parses the frames passing
by and cuts (both ends reset) or stalls (both ends held open, nothing forwarded) the
connection before a chosen frame."""
import json
import os
import signal
import threading
import time

import pytest

import workloads
from deltaxfer import migrate as mig, transport
from deltaxfer.core import procmem
from deltaxfer.wire import MsgType
from faults import (Held, LinkProxy, agent_env, agent_leftovers, agent_tmp,  # noqa: F401
                    copies_of, descendants, finish_migrate, freeze_watcher, run_migrate,
                    start_migrate, tmp_leftovers, wait_gone, wait_log, wait_not_frozen)
from servers import KEY, Server, write_key

pytestmark = pytest.mark.criu

MIB = 32
DIRTY = 4


def fake_criu(tmp_path, real: str) -> str:
    """A criu whose `restore` fails (everything else is the real one)."""
    path = tmp_path / "fake-criu"
    path.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = restore ]; then\n'
        '  echo "Error (criu/cr-restore.c:0): restore refused by the test (fake criu)" >&2\n'
        "  exit 1\n"
        "fi\n"
        f'exec "{real}" "$@"\n')
    path.chmod(0o755)
    return str(path)


def tracking_left(pid: int) -> list[str]:
    """What written-page tracking could leave in a process: VMAs still registered with a
    userfaultfd (smaps flag "uw") or a userfaultfd in its fd table."""
    left = []
    with open(f"/proc/{pid}/smaps") as f:
        left += [line.strip() for line in f if line.startswith("VmFlags:") and " uw" in line]
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if "userfaultfd" in os.readlink(f"/proc/{pid}/fd/{fd}"):
                left.append(f"fd {fd}")
        except FileNotFoundError:
            pass
    return left


def assert_source_runs_on(wl, before: dict | None = None):
    """Not frozen, not gone, memory intact, still dirtying it, no tracking left in it."""
    state = wait_not_frozen(wl.pid, timeout=15)
    assert state in ("R", "S"), f"source pid {wl.pid} left in state {state}"
    deadline = time.monotonic() + 10
    while tracking_left(wl.pid) and time.monotonic() < deadline:
        time.sleep(0.1)   # the agent's fds close as it exits
    assert tracking_left(wl.pid) == []
    first = wl.verify(timeout=30)
    assert first["ok"], first
    time.sleep(0.3)
    again = wl.verify(timeout=30)
    assert again["ok"] and again["mutations"] > first["mutations"], (first, again)
    if before is not None:
        assert again["mutations"] > before["mutations"]


def lazy_daemons_under(root) -> list[int]:
    """`criu lazy-pages` processes, and `criu restore` processes started early for a
    restore (criu/early.py), whose -D is under root."""
    root = os.path.realpath(root) + os.sep
    return [pid for verb in ("lazy-pages", "restore")
            for pid, d, _ in procmem.lazy_pages_processes(verb)
            if os.path.realpath(d).startswith(root)]


def assert_destination_clean(wl, server, settle: float = 5.0, link=None):
    """No restored copy of the workload runs (given the receiver `settle` seconds to act),
    and no unfinished state is kept. ``link``: a LinkProxy still holding a silent
    connection open; it is closed first, as the link's end would (until then the receiver
    keeps the session, and the dump's files it got before the final round, until its idle
    timeout)."""
    if link is not None:
        link.close()
    deadline = time.monotonic() + settle
    while copies_of(wl) and time.monotonic() < deadline:
        time.sleep(0.1)
    copies = copies_of(wl)
    for pid in copies:           # a leaked copy is killed with the workload
        wl.adopt(pid)
    assert copies == [], f"the destination runs restored copies {copies}"
    # the receiver cleans a broken session up when it sees its connection end
    deadline = time.monotonic() + 30
    while tmp_leftovers(server.dir) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert tmp_leftovers(server.dir) == []
    # and a lazy-pages daemon or a `criu restore` it started early for the restore is gone
    assert lazy_daemons_under(server.dir) == []


def assert_failed_cleanly(m, *, outcome: str, error_has: tuple[str, ...]):
    r = m.report
    assert m.rc == 1, (m.rc, m.stderr[-3000:])
    assert "Traceback" not in m.stderr, m.stderr
    assert r is not None and json.loads(m.stdout) == r
    assert r["outcome"].startswith(outcome), r
    assert r["restored_pid"] is None and r["downtime"] is None, r
    err = (r["error"] or "").lower()
    assert any(s in err for s in error_has), r["error"]


@pytest.fixture
def key_file(tmp_path):
    return write_key(tmp_path / "client.key")


# -- 1. wrong key ---------------------------------------------------------------------------

def test_wrong_key_is_refused_at_once(criu, tmp_path, agent_tmp):
    bad = write_key(tmp_path / "bad.key", b"not-the-key-the-server-has" + bytes(6))
    with Server(tmp_path, extra=["--restore"]) as server, \
            workloads.start("memwork", mib=8, dirty_mib_per_s=DIRTY, tmpdir=tmp_path) as wl:
        m = run_migrate(wl.pid, server.addr, bad, tmp_path / "r.json", env=agent_env(agent_tmp),
                        timeout=60)
        assert_failed_cleanly(m, outcome="aborted before the freeze", error_has=("auth",))
        assert "key" in m.report["error"], m.report["error"]
        assert m.report["rounds"] == [] and m.report["freeze"] == {}
        assert m.seconds < 20
        assert_source_runs_on(wl)
        assert "failed authentication" in wait_log(server, "failed authentication")
        assert not server.dir.exists() or os.listdir(server.dir) == []
        assert_destination_clean(wl, server, settle=0)
        assert server.alive() and agent_leftovers(agent_tmp) == []


# -- 2. the destination dies during the live rounds ------------------------------------------

@pytest.mark.slow
def test_destination_killed_during_live_rounds(criu, tmp_path, agent_tmp, key_file):
    """The receiver is killed (SIGKILL) right after the first round: the next round fails,
    the migration ends before any freeze. A receiver restarted over the same directory
    then takes the same session to the end (a killed receiver's leftovers do not block it)."""
    with workloads.start("memwork", mib=MIB, dirty_mib_per_s=DIRTY, tmpdir=tmp_path) as wl:
        server = Server(tmp_path, extra=["--restore"])
        try:
            killed = []

            def progress(line):
                if not killed:
                    server.proc.kill()
                    server.proc.wait(10)
                    killed.append(line)

            opts = mig.Options(session="app", max_rounds=50, downtime_target=0.0,
                               progress=progress, work_dir=agent_tmp)
            t0 = time.monotonic()
            report = transport.run(mig.migrate(wl.pid, "127.0.0.1", server.port, KEY, criu,
                                               opts)).as_dict()
            assert time.monotonic() - t0 < 60
            assert killed and killed[0].startswith("round  1")
            assert report["outcome"].startswith("aborted before the freeze"), report
            assert report["freeze"] == {} and report["restored_pid"] is None, report
            assert len(report["rounds"]) == 1, report["rounds"]
            assert "connection" in (report["error"] or "").lower(), report["error"]
            assert_source_runs_on(wl)
            assert copies_of(wl) == []
            assert agent_leftovers(agent_tmp) == []
            assert "round 1 complete" in wait_log(server, "round 1 complete")
        finally:
            server.stop()

        # the destination comes back: the same session migrates to the end
        with Server(tmp_path, extra=["--restore"]) as server:
            m = run_migrate(wl.pid, server.addr, key_file, tmp_path / "r.json", "--session",
                            "app", env=agent_env(agent_tmp), timeout=120)
            r = m.report
            if r and r.get("restored_pid"):
                wl.adopt(r["restored_pid"])
            assert m.rc == 0 and r["outcome"] == "migrated", (m.stderr[-2000:], r)
            assert r["rounds"][0]["round"] >= 2, r["rounds"]    # it went on from round 1
            assert wl.verify(pid=r["restored_pid"], timeout=60)["ok"]
            assert wait_gone(wl.pid)
            assert tmp_leftovers(server.dir) == []


# -- 3. the link fails during the freeze -----------------------------------------------------

def _is_final_round(payload) -> bool:
    return payload is not None and json.loads(payload).get("final") is True


CUT_POINTS = {
    # CRIU froze the tree (seen by polling the source's state), the agent waits for post-dump
    "frozen": None,
    # the final round begins (post-dump hook: the residual is about to go)
    "final-round": lambda d, t, p: d == "c2s" and t == MsgType.ROUND and _is_final_round(p),
    # the residual went through; the image files are about to go
    "image-files": lambda d, t, p: d == "c2s" and t == MsgType.FILE,
    # everything went through but the COMMIT
    "commit": lambda d, t, p: d == "c2s" and t == MsgType.COMMIT,
}


@pytest.mark.slow
@pytest.mark.parametrize("where", list(CUT_POINTS))
def test_link_cut_during_the_freeze_rolls_back(criu, tmp_path, agent_tmp, key_file, where):
    rule = CUT_POINTS[where]
    with Server(tmp_path, extra=["--restore"]) as server, \
            workloads.start("memwork", mib=MIB, dirty_mib_per_s=DIRTY, tmpdir=tmp_path) as wl, \
            LinkProxy(server.port, rule=(lambda d, t, p: "cut" if rule(d, t, p) else None)
                      if rule else None) as proxy:
        before = wl.verify()
        stop = threading.Event()
        if rule is None:
            freeze_watcher(wl.pid, proxy.cut, stop)
        try:
            m = run_migrate(wl.pid, proxy.addr, key_file, tmp_path / "r.json",
                            env=agent_env(agent_tmp), timeout=120)
        finally:
            stop.set()
        assert proxy.triggered.is_set(), "the link was never cut"
        assert_failed_cleanly(m, outcome="rolled back",
                              error_has=("connection", "reset", "closed", "lost"))
        r = m.report
        assert "final round failed" in r["error"], r["error"]
        # CRIU got the hook's refusal: the dump failed and the tree was resumed
        assert r["freeze"].get("criu_exit") not in (None, 0), r["freeze"]
        assert_source_runs_on(wl, before)
        assert_destination_clean(wl, server)
        log = wait_log(server, "connection to")
        assert "committed" not in log
        assert "connection to" in log and ("lost" in log or "closed" in log), log[-2000:]
        assert server.alive() and agent_leftovers(agent_tmp) == []


@pytest.mark.slow
def test_committed_lost_leaves_exactly_one_copy(criu, tmp_path, agent_tmp, key_file):
    """The link is cut after the destination restored the process, before its COMMITTED
    reaches the source. Whatever the outcome, exactly one of the two may run on."""
    cut = lambda d, t, p: "cut" if d == "s2c" and t == MsgType.COMMITTED else None  # noqa
    with Server(tmp_path, extra=["--restore"]) as server, \
            workloads.start("memwork", mib=MIB, dirty_mib_per_s=DIRTY, tmpdir=tmp_path) as wl, \
            LinkProxy(server.port, rule=cut) as proxy:
        m = run_migrate(wl.pid, proxy.addr, key_file, tmp_path / "r.json",
                        env=agent_env(agent_tmp), timeout=120)
        assert proxy.triggered.is_set()
        assert "Traceback" not in m.stderr
        # give the receiver up to 5 s to act on the cut
        deadline = time.monotonic() + 5
        while True:
            copies = copies_of(wl)
            source = wait_not_frozen(wl.pid) not in (None, "Z", "X")
            if source + len(copies) == 1 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        for pid in copies:
            wl.adopt(pid)
        assert source + len(copies) == 1, (f"source running: {source}, restored copies "
                                           f"running: {copies}; report: {m.report}")
        if source:
            assert m.report["outcome"].startswith("rolled back")
            assert_source_runs_on(wl)
        else:
            assert m.report["outcome"] == "migrated"


@pytest.mark.slow
def test_resumed_lost_leaves_the_source_stopped_not_running(criu, tmp_path, agent_tmp,
                                                            key_file):
    """The link is cut after the source sent RESUME, before RESUMED comes back: the
    destination's copy may run, so the source must not resume by itself — it is left
    stopped (never killed: the operator decides) and the report says the outcome is
    uncertain."""
    cut = lambda d, t, p: "cut" if d == "s2c" and t == MsgType.RESUMED else None  # noqa
    with Server(tmp_path, extra=["--restore"]) as server, \
            workloads.start("memwork", mib=MIB, dirty_mib_per_s=DIRTY, tmpdir=tmp_path) as wl, \
            LinkProxy(server.port, rule=cut) as proxy:
        m = run_migrate(wl.pid, proxy.addr, key_file, tmp_path / "r.json",
                        env=agent_env(agent_tmp), timeout=120)
        assert proxy.triggered.is_set()
        assert m.rc == 1 and "Traceback" not in m.stderr
        assert m.report["outcome"].startswith("uncertain"), m.report
        assert "left stopped" in m.report["outcome"]
        copies = copies_of(wl)
        for pid in copies:
            wl.adopt(pid)
        assert len(copies) == 1, copies                    # the destination's copy runs...
        assert workloads.proc_state(wl.pid) in ("T", "t")   # ...and the source waits, stopped
        assert wl.verify(pid=copies[0])["ok"]


@pytest.mark.slow
def test_link_silent_during_the_freeze_rolls_back_in_bounded_time(criu, tmp_path, agent_tmp,
                                                                  key_file):
    """The link goes silent (nothing forwarded, nothing closed) as the final round begins.
    The source must not stay frozen: the migration rolls back within 20 s."""
    stall = lambda d, t, p: "stall" if CUT_POINTS["final-round"](d, t, p) else None  # noqa
    with Server(tmp_path, extra=["--restore"]) as server, \
            workloads.start("memwork", mib=MIB, dirty_mib_per_s=DIRTY, tmpdir=tmp_path) as wl, \
            LinkProxy(server.port, rule=stall) as proxy:
        t0 = time.monotonic()
        proc = start_migrate(wl.pid, proxy.addr, key_file, tmp_path / "r.json",
                             env=agent_env(agent_tmp))
        assert proxy.triggered.wait(60), "the final round never began"
        stalled = time.monotonic() - t0
        m = finish_migrate(proc, tmp_path / "r.json", t0, timeout=stalled + 20,
                           watch_pid=wl.pid)
        assert m.rc is not None, (f"migrate did not end {m.seconds - stalled:.0f} s after the "
                                  f"link went silent; the source was in state "
                                  f"{m.state_at_timeout} (t/T: frozen); migrate was killed")
        assert_failed_cleanly(m, outcome="rolled back", error_has=("timeout", "timed out"))
        assert_source_runs_on(wl)
        assert_destination_clean(wl, server, link=proxy)


@pytest.mark.slow
@pytest.mark.parametrize("freeze", ["lazy", "page-server"])
def test_agent_killed_during_the_freeze_source_resumes(criu, tmp_path, agent_tmp, key_file,
                                                       freeze):
    """`deltaxfer migrate` is SIGKILLed while the post-dump hook waits for it (the link is
    held silent so that the agent is inside the final round). CRIU must resume the
    source: the hook's fallback has to end the lazy dump (with the page sink, CRIU has
    already closed its page stream and only needs the hook's failure)."""
    stall = lambda d, t, p: "stall" if CUT_POINTS["final-round"](d, t, p) else None  # noqa
    with Server(tmp_path, extra=["--restore"]) as server, \
            workloads.start("memwork", mib=MIB, dirty_mib_per_s=DIRTY, tmpdir=tmp_path) as wl, \
            LinkProxy(server.port, rule=stall) as proxy:
        proc = start_migrate(wl.pid, proxy.addr, key_file, tmp_path / "r.json",
                             "--freeze", freeze, env=agent_env(agent_tmp))
        left = Held()
        try:
            assert proxy.triggered.wait(60), "the final round never began"
            time.sleep(0.3)
            assert workloads.proc_state(wl.pid) in ("T", "t"), "the source is not frozen"
            left = Held(descendants(proc.pid))      # criu dump and its hook
            proc.kill()
            proc.communicate()
            state = wait_not_frozen(wl.pid, timeout=10)
            assert state in ("R", "S"), (f"source still in state {state} 10 s after the "
                                         "agent died")
            assert_source_runs_on(wl)
            assert_destination_clean(wl, server, link=proxy)
            deadline = time.monotonic() + 10
            while left.alive() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert left.alive() == [], "criu dump did not exit"
        finally:
            left.kill()          # criu dump, when it waits for a lazy-pages client forever


# -- 4. the destination cannot restore -------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("freeze", ["lazy", "page-server"])
def test_destination_restore_fails_rolls_back(criu, tmp_path, agent_tmp, key_file, freeze):
    """Both freezes: after the lazy dump and after the plain dump into the page sink, a
    failed restore on the destination has CRIU resume the source."""
    fake = fake_criu(tmp_path, criu.path)
    with Server(tmp_path, extra=["--restore", "--criu", fake]) as server, \
            workloads.start("memwork", mib=MIB, dirty_mib_per_s=DIRTY, tmpdir=tmp_path) as wl:
        before = wl.verify()
        m = run_migrate(wl.pid, server.addr, key_file, tmp_path / "r.json",
                        "--freeze", freeze, env=agent_env(agent_tmp), timeout=120)
        assert m.report["freeze"].get("mode") == freeze, m.report["freeze"]
        assert_failed_cleanly(m, outcome="rolled back", error_has=("restore",))
        err = m.report["error"]
        assert "restore refused by the test" in err, err
        assert m.report["freeze"].get("criu_exit") not in (None, 0), m.report["freeze"]
        assert_source_runs_on(wl, before)
        assert_destination_clean(wl, server)
        log = wait_log(server, "restore refused by the test", "(restore)")
        assert "restore refused by the test" in log and "(restore)" in log, log[-2000:]
        assert "committed:" not in log
        # the lazy-pages daemon started for the restore is gone too
        assert not [p for p in descendants(server.proc.pid)], descendants(server.proc.pid)
        assert server.alive() and agent_leftovers(agent_tmp) == []


# -- 5. the source exits during the live rounds ----------------------------------------------

def _migrate_killing_source_after_round_1(criu, agent_tmp, server, wl, *, zombie: bool):
    """In-process migrate (the kill lands between two rounds, every time): the source is
    SIGKILLed when round 1 is reported; with ``zombie`` its parent (unshare) is stopped
    first, so the source is left exited but not yet reaped."""
    killed = []

    def progress(line):
        if killed:
            return
        killed.append(line)
        if zombie:
            os.kill(wl.unshare_pid, signal.SIGSTOP)
        os.kill(wl.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        if zombie:
            while workloads.proc_state(wl.pid) != "Z" and time.monotonic() < deadline:
                time.sleep(0.001)
        else:
            while os.path.exists(f"/proc/{wl.pid}") and time.monotonic() < deadline:
                time.sleep(0.001)

    opts = mig.Options(max_rounds=50, downtime_target=0.0, progress=progress,
                       work_dir=agent_tmp)
    try:
        report = transport.run(mig.migrate(wl.pid, "127.0.0.1", server.port, KEY, criu,
                                           opts)).as_dict()
    finally:
        if zombie:
            os.kill(wl.unshare_pid, signal.SIGCONT)
    assert killed and killed[0].startswith("round  1"), killed
    return report


@pytest.mark.parametrize("zombie", [
    pytest.param(False, id="reaped"),
    pytest.param(True, id="not-yet-reaped"),
])
def test_source_exits_during_live_rounds(criu, tmp_path, agent_tmp, zombie):
    with Server(tmp_path, extra=["--restore"]) as server, \
            workloads.start("memwork", mib=MIB, dirty_mib_per_s=DIRTY, tmpdir=tmp_path) as wl:
        r = _migrate_killing_source_after_round_1(criu, agent_tmp, server, wl, zombie=zombie)
        # the source is gone: the report must not say it runs on
        assert r["outcome"] == "aborted: the source process exited", r
        assert r["freeze"] == {} and r["restored_pid"] is None, r
        assert len(r["rounds"]) == 1, r["rounds"]
        err = r["error"] or ""
        assert str(wl.pid) in err and any(
            s in err.lower() for s in ("does not exist", "exited", "no longer exists")), err
        if zombie:
            # the source is gone: the outcome must not claim it runs on
            assert "runs on" not in r["outcome"], r["outcome"]
        assert wait_gone(wl.pid)
        time.sleep(0.3)
        assert_destination_clean(wl, server)
        # the receiver saw the session end without a commit, and why
        log = wait_log(server, "round 1 complete", "the source gave up")
        assert "round 1 complete" in log and "committed" not in log
        assert "the source gave up: the process to migrate" in log, log[-1500:]
        assert server.alive() and agent_leftovers(agent_tmp) == []


# -- a destination that stops reading in the first round ------------------------------------

@pytest.mark.slow
def test_destination_stops_reading_in_the_first_round(criu, tmp_path, agent_tmp, key_file):
    """The link stops forwarding (both ends held open: to the source, a destination that
    stopped reading) a few PAGES frames into the first round of a 512 MiB process. The
    source's memory stays bounded while it waits (its windows and socket buffers, not
    the process), the round gives up after --round-timeout with an error that says so,
    the source runs on untouched, and the destination keeps nothing of the round."""
    frames = []

    def stall_in_round_1(d, t, p):
        if d == "c2s" and t == MsgType.PAGES:
            frames.append(t)
            if len(frames) == 4:
                return "stall"
        return None
    mib = 512
    with Server(tmp_path, extra=["--restore"]) as server, \
            workloads.start("memwork", mib=mib, dirty_mib_per_s=DIRTY, tmpdir=tmp_path) as wl, \
            LinkProxy(server.port, rule=stall_in_round_1) as proxy:
        before = wl.verify(timeout=30)
        assert before["ok"], before
        t0 = time.monotonic()
        proc = start_migrate(wl.pid, proxy.addr, key_file, tmp_path / "r.json",
                             "--round-timeout", "3", env=agent_env(agent_tmp))
        peak = 0.0
        while proc.poll() is None and time.monotonic() - t0 < 60:
            peak = max(peak, workloads.peak_rss_mib(proc.pid) or 0.0)
            time.sleep(0.05)
        assert proxy.triggered.is_set(), "the link never stalled"
        m = finish_migrate(proc, tmp_path / "r.json", t0, timeout=60, watch_pid=wl.pid)
        assert m.rc is not None, f"migrate did not give up; source state {m.state_at_timeout}"
        assert_failed_cleanly(m, outcome="aborted before the freeze",
                              error_has=("live round 1 stalled: ",))
        assert "(--round-timeout 3: a destination that stopped reading" in m.report["error"]
        # waited on a full socket with the rest of the process unread: far below its size
        assert 0 < peak < mib * 0.5, f"migrate's peak RSS {peak:.0f} MiB for a {mib} MiB process"
        assert_source_runs_on(wl, before)
        assert_destination_clean(wl, server, link=proxy)


def test_a_slow_link_that_keeps_moving_is_not_a_stall(criu, tmp_path, agent_tmp):
    """--round-timeout bounds how long a round may go without carrying anything, not how
    long it may take: over a veth shaped to 8 Mbit/s the first round of a 32 MiB process
    takes several times the 2 s limit and the migration completes, saying how the round
    goes while it lasts; the stall test above shows the same limit ending a round that
    carries nothing."""
    import subprocess
    from faults import migrate_cmd
    from servers import served_hosts
    with served_hosts(tmp_path, "8mbit") as (lab, server, key), \
            workloads.start("memwork", mib=32, dirty_mib_per_s=1, tmpdir=tmp_path,
                            prefix=tuple(lab.source.command([]))) as wl:
        t0 = time.monotonic()
        p = subprocess.Popen(lab.source.command(migrate_cmd(
            wl.pid, f"{server.host}:{server.port}", key, tmp_path / "r.json",
            "--round-timeout", "2", "--progress")), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, env=agent_env(agent_tmp))
        m = finish_migrate(p, tmp_path / "r.json", t0, timeout=120)
        r = m.report
        if r and r.get("restored_pid"):
            wl.adopt(r["restored_pid"])
        assert m.rc == 0 and r["outcome"] == "migrated", (
            m.rc, r and r.get("error"), m.stderr[-2000:], server.log()[-2000:])
        first = r["rounds"][0]
        assert first["seconds"] > 3 * 2, first      # far past the 2 s limit
        # a round past PROGRESS_EVERY reports while it goes, then when it is done
        assert "round  1: " in m.stderr and " MiB delivered in " in m.stderr, m.stderr
        assert wl.verify(pid=r["restored_pid"])["ok"]
