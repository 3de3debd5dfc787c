"""Auto-converge on real migrations (issue 17), over two network namespaces joined by a
veth shaped to 50 Mbit/s (tests/lab.py), where sending a fast writer's residual — not the
freeze's fixed cost — is what misses the downtime target: the duty cycle slows the tree
until the rounds converge or the top level is reached; the freeze then finds every task
running (a stopped task would be restored stopped); and a migration that ends any other
way — the agent killed while the tree is stopped — leaves the source running with its
memory intact."""
import signal
import subprocess
import time

import pytest

import workloads
from faults import (agent_env, agent_tmp, copies_of, finish_migrate,  # noqa: F401
                    migrate_cmd, wait_gone, wait_not_frozen)
from servers import served_hosts
from test_migrate_criu import verify_running

pytestmark = pytest.mark.criu

MIB = 24
FAST = 400          # MiB/s of page mutations, each a whole page of fresh random words
RATE = "50mbit"


@pytest.fixture
def slow_link(tmp_path):
    with served_hosts(tmp_path, RATE) as hosts:
        yield hosts


def _writer(lab, tmp_path):
    """The fast writer, in the source host's network namespace (and its own PID one):
    whole pages of fresh random words, which neither XOR nor lz4 shrink, so that its
    residual (its whole working set: it rewrites 24 MiB many times a second) takes
    seconds at 50 Mbit/s. (Word mutations would not do: their XOR deltas shrink ~40x,
    and such a writer's residual fits the target at this rate.)"""
    return workloads.start("memwork", mib=MIB, dirty_mib_per_s=FAST, tmpdir=tmp_path,
                           prefix=tuple(lab.source.command([])), whole_pages=True)


def _start(lab, server, key, wl, report, agent_dir, *extra):
    argv = lab.source.command(migrate_cmd(wl.pid, f"{server.host}:{server.port}", key,
                                          report, *extra))
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=agent_env(agent_dir))


def _migrate(lab, server, key, wl, tmp_path, agent_dir, *extra):
    t0 = time.monotonic()
    p = _start(lab, server, key, wl, tmp_path / "r.json", agent_dir, *extra)
    m = finish_migrate(p, tmp_path / "r.json", t0, timeout=240)
    r = m.report
    if r and r.get("restored_pid"):
        wl.adopt(r["restored_pid"])
    assert m.rc == 0 and r["outcome"] == "migrated", (m.rc, m.stderr[-3000:], r and r.get("error"),
                                                      server.log()[-2000:])
    assert wait_gone(wl.pid), workloads.proc_state(wl.pid)
    return r


def test_fast_writer_is_throttled_then_migrates(criu, tmp_path, agent_tmp, slow_link):
    lab, server, key = slow_link
    with _writer(lab, tmp_path) as wl:
        r = _migrate(lab, server, key, wl, tmp_path, agent_tmp, "--max-rounds", "3")
        levels = [x.get("throttle", 0) for x in r["rounds"] if x["live"]]
        assert max(levels) > 0, [(x["round"], x.get("decision"), x.get("predicted_downtime"),
                                  x.get("wire_bytes"), x.get("seconds"))
                                 for x in r["rounds"]]
        assert levels == sorted(levels), levels            # the levels only climb
        c = r["converge"]
        assert c["mode"] == "auto" and c["max_level"] == max(levels), c
        assert c["throttled_seconds"] > 0 and c["stopped_seconds"] > 0, c
        pid = r["restored_pid"]
        verify_running(wl, pid)
        # the restored copy runs (it was not dumped in a stopped state)
        assert workloads.proc_state(pid) not in ("T", "t"), workloads.proc_state(pid)


def test_converge_off_never_throttles(criu, tmp_path, agent_tmp, slow_link):
    lab, server, key = slow_link
    with _writer(lab, tmp_path) as wl:
        r = _migrate(lab, server, key, wl, tmp_path, agent_tmp, "--max-rounds", "3",
                     "--converge", "off")
        assert all(x.get("throttle", 0) == 0 for x in r["rounds"] if x["live"]), r["rounds"]
        assert r["converge"]["max_level"] == 0 and r["converge"]["mode"] == "off"
        verify_running(wl, r["restored_pid"])


def test_agent_killed_while_throttled_leaves_the_source_running(criu, tmp_path, agent_tmp,
                                                                 slow_link):
    """SIGKILL to `deltaxfer migrate` while the duty cycle stops the tree 30-95 % of the
    time: the guardian sees its pipe close and continues the tree."""
    lab, server, key = slow_link
    with _writer(lab, tmp_path) as wl:
        before = wl.verify()
        t0 = time.monotonic()
        proc = _start(lab, server, key, wl, tmp_path / "r.json", agent_tmp,
                      "--max-rounds", "30")
        try:
            # wait until the duty cycle has stopped the tree at least once: SIGSTOP, "T"
            # (not "t", a tracing stop: CRIU seizing the tree for the final dump, after
            # which a killed migrate may already have committed and killed the source)
            deadline = time.monotonic() + 180
            seen_stopped = False
            while time.monotonic() < deadline and proc.poll() is None:
                if workloads.proc_state(wl.pid) == "T":
                    seen_stopped = True
                    break
                time.sleep(0.005)
            assert seen_stopped, "the tree was never throttled"
            proc.send_signal(signal.SIGKILL)
        finally:
            finish_migrate(proc, tmp_path / "r.json", t0, timeout=30)
        state = wait_not_frozen(wl.pid, timeout=15)
        assert state in ("R", "S"), f"source left in state {state}"
        time.sleep(0.6)     # two duty-cycle periods: nothing stops it again
        assert workloads.proc_state(wl.pid) in ("R", "S")
        after = wl.verify()
        assert after["ok"] and after["mutations"] > before["mutations"], (before, after)
        assert copies_of(wl) == []
