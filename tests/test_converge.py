"""Auto-converge on real migrations (issue 17): a process that writes faster than the
rounds shrink is slowed by the duty cycle until it converges or the top level is reached;
the freeze then finds every task running (a stopped task would be restored stopped), and
a migration that ends any other way — the agent killed while the tree is stopped — leaves
the source running with its memory intact."""
import signal
import time

import pytest

import workloads
from faults import (agent_env, agent_tmp, start_migrate, finish_migrate,  # noqa: F401
                    wait_not_frozen)
from servers import Server, write_key
from test_migrate_criu import migrate_ok, verify_running

pytestmark = pytest.mark.criu

MIB = 48
FAST = 400          # MiB/s of page mutations: more than a round here can send


def test_fast_writer_is_throttled_then_migrates(criu, tmp_path, agent_tmp):
    with Server(tmp_path, extra=["--restore"]) as server, \
            workloads.start("memwork", mib=MIB, dirty_mib_per_s=FAST, tmpdir=tmp_path) as wl:
        # a target no round can meet: only auto-converge can change what the rounds send
        r, pid = migrate_ok(tmp_path, agent_tmp, server, wl, "--downtime-target", "1",
                            "--max-rounds", "3")
        levels = [x.get("throttle", 0) for x in r["rounds"] if x["live"]]
        assert max(levels) > 0, r["rounds"]
        assert levels == sorted(levels), levels            # the levels only climb
        c = r["converge"]
        assert c["mode"] == "auto" and c["max_level"] == max(levels), c
        assert c["throttled_seconds"] > 0 and c["stopped_seconds"] > 0, c
        verify_running(wl, pid)
        # the restored copy runs (it was not dumped in a stopped state)
        assert workloads.proc_state(pid) not in ("T", "t"), workloads.proc_state(pid)


def test_converge_off_never_throttles(criu, tmp_path, agent_tmp):
    with Server(tmp_path, extra=["--restore"]) as server, \
            workloads.start("memwork", mib=MIB, dirty_mib_per_s=FAST, tmpdir=tmp_path) as wl:
        r, pid = migrate_ok(tmp_path, agent_tmp, server, wl, "--downtime-target", "1",
                            "--max-rounds", "3", "--converge", "off")
        assert all(x.get("throttle", 0) == 0 for x in r["rounds"] if x["live"]), r["rounds"]
        assert r["converge"]["max_level"] == 0 and r["converge"]["mode"] == "off"
        verify_running(wl, pid)


def test_agent_killed_while_throttled_leaves_the_source_running(criu, tmp_path, agent_tmp):
    """SIGKILL to `deltaxfer migrate` while the duty cycle stops the tree 30-95 % of the
    time: the guardian sees its pipe close and continues the tree."""
    key = write_key(tmp_path / "client.key")
    with Server(tmp_path, extra=["--restore"]) as server, \
            workloads.start("memwork", mib=MIB, dirty_mib_per_s=FAST, tmpdir=tmp_path) as wl:
        before = wl.verify()
        t0 = time.monotonic()
        proc = start_migrate(wl.pid, server.addr, key, tmp_path / "r.json",
                             "--downtime-target", "1", "--max-rounds", "30",
                             env=agent_env(agent_tmp))
        try:
            # wait until the duty cycle has stopped the tree at least once
            deadline = time.monotonic() + 120
            seen_stopped = False
            while time.monotonic() < deadline and proc.poll() is None:
                if workloads.proc_state(wl.pid) in ("T", "t"):
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
