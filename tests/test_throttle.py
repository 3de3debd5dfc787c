"""Auto-converge (deltaxfer.throttle): the duty cycle slows a real process tree, and
every stopped task is continued on release, when the agent dies (SIGKILL), and when the
guardian is told to stop."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from deltaxfer.policy import Convergence, RoundMeasure
from deltaxfer.throttle import LEVELS, Throttle

SPIN = textwrap.dedent("""
    import os, sys, time
    n = 0
    path = sys.argv[1]
    last = time.monotonic()
    while True:
        n += 1
        if n % 20000 == 0 and time.monotonic() - last > 0.05:
            last = time.monotonic()
            with open(path + ".tmp", "w") as f:
                f.write(str(n))
            os.replace(path + ".tmp", path)
""")


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def _count(path) -> int:
    for _ in range(100):
        try:
            return int(open(path).read())
        except (FileNotFoundError, ValueError):
            time.sleep(0.02)
    raise AssertionError("the spinner wrote nothing")


@pytest.fixture
def spinner(tmp_path):
    out = tmp_path / "count"
    p = subprocess.Popen([sys.executable, "-c", SPIN, str(out)])
    _count(out)
    yield p, out
    p.kill()
    p.wait()


def _progress(out, seconds: float) -> int:
    a = _count(out)
    time.sleep(seconds)
    return _count(out) - a


def _wait_running(pid: int, timeout: float = 5.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = _state(pid)
        if st != "T":
            # a task can be between phases: look twice
            time.sleep(0.3)
            st = _state(pid)
            if st != "T":
                return st
        time.sleep(0.05)
    return _state(pid)


def test_duty_cycle_slows_the_tree_and_release_continues_it(spinner):
    p, out = spinner
    free = _progress(out, 1.5)
    t = Throttle()
    try:
        t.set(0.85, [p.pid])
        slowed = _progress(out, 1.5)
    finally:
        t.release()
    assert slowed < 0.5 * free, (free, slowed)
    assert _wait_running(p.pid) != "T"
    after = _progress(out, 1.0)
    assert after > 0.3 * free, (free, after)
    s = t.summary()
    assert s["max_level"] == 0.85 and s["throttled_seconds"] > 1.0
    assert s["stopped_seconds"] > 0.5


def test_agent_killed_leaves_no_task_stopped(spinner, tmp_path):
    """The agent dies with SIGKILL while the tree is 95 % stopped: the guardian sees its
    pipe close and continues the tree."""
    p, out = spinner
    agent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from deltaxfer.throttle import Throttle
        t = Throttle()
        t.set(0.95, [{p.pid}])
        print("set", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert agent.stdout.readline().strip() == "set"
        time.sleep(0.6)
        agent.kill()
        agent.wait()
        assert _wait_running(p.pid) != "T"
        assert _progress(out, 1.0) > 0
    finally:
        agent.kill()


def test_guardian_terminated_continues_the_tree(spinner):
    p, out = spinner
    t = Throttle()
    t.set(0.95, [p.pid])
    time.sleep(0.4)
    t.proc.send_signal(signal.SIGTERM)
    t.proc.wait(timeout=5)
    assert _wait_running(p.pid) != "T"
    t.release()   # the guardian is gone: release still returns


def test_exited_task_is_forgotten(tmp_path):
    """A task that exits while throttled is not signalled again (its PID may be reused)."""
    short = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"])
    t = Throttle()
    try:
        t.set(0.5, [short.pid])
        short.wait(timeout=10)
        time.sleep(0.6)
    finally:
        t.release()
    assert short.returncode is not None


def _m(rnd, changed, pages=100_000, seconds=1.0):
    return RoundMeasure(rnd, pages, changed, changed * 4096, seconds, 0.05, seconds)


def test_policy_climbs_throttle_levels_when_rounds_stall_then_stops():
    c = Convergence(downtime_target=0.01, max_rounds=10, throttle_levels=LEVELS)
    d = c.observe(_m(1, 100_000))
    assert not d.stop and d.throttle == 0
    d = c.observe(_m(2, 40_000))
    assert not d.stop and d.throttle == 0            # still shrinking
    seen = []
    for r in range(3, 3 + len(LEVELS)):
        d = c.observe(_m(r, 40_000))                  # stalled each time
        assert not d.stop, d.reason
        seen.append(d.throttle)
        assert "throttling" in d.reason
    assert seen == list(LEVELS)
    d = c.observe(_m(3 + len(LEVELS), 40_000))
    assert d.stop and "throttle" in d.reason


def test_policy_without_levels_stops_on_stall():
    c = Convergence(downtime_target=0.01)
    c.observe(_m(1, 100_000))
    c.observe(_m(2, 40_000))
    d = c.observe(_m(3, 40_000))
    assert d.stop and d.throttle == 0 and "stopped shrinking" in d.reason


def test_policy_throttle_that_helps_converges():
    c = Convergence(downtime_target=0.3, freeze_overhead=0.1, throttle_levels=LEVELS)
    c.observe(_m(1, 100_000))
    c.observe(_m(2, 40_000))
    d = c.observe(_m(3, 40_000))
    assert d.throttle == LEVELS[0]
    d = c.observe(_m(4, 200, seconds=0.1))
    assert d.stop and d.reason.startswith("converged") and d.throttle == LEVELS[0]


def test_policy_does_not_throttle_for_a_small_residual():
    """Rounds that stall at a few pages: the prediction misses the target because of the
    freeze's fixed cost, which slowing the tree does not change: freeze, no throttle."""
    c = Convergence(downtime_target=0.3, freeze_overhead=0.35, throttle_levels=LEVELS)
    c.observe(_m(1, 100_000))
    c.observe(_m(2, 100, seconds=0.1))
    d = c.observe(_m(3, 100, seconds=0.1))
    assert d.stop and d.throttle == 0 and "stopped shrinking" in d.reason, d


def test_policy_judges_a_small_stalled_round_by_the_link_not_its_latency():
    """A stalled round of a few KB that took 0.2 s (a loaded machine, a round trip) does
    not mean a slow link: round 1 measured the link at ~400 MB/s, so sending such a
    residual takes well under the budget and the tree is not throttled."""
    c = Convergence(downtime_target=0.3, freeze_overhead=0.35, throttle_levels=LEVELS)
    c.observe(RoundMeasure(1, 100_000, 100_000, 400 << 20, 1.0, 0.05, float("inf")))
    c.observe(RoundMeasure(2, 100_000, 50, 20_000, 0.2, 0.01, 1.0))
    d = c.observe(RoundMeasure(3, 100_000, 50, 20_000, 0.2, 0.01, 0.2))
    assert d.stop and d.throttle == 0, d
