"""Written-page tracking (issue 8): what it buys and what it costs, in the same run.

* **pause**: the pause the workload itself observes (memwork's own clock: the longest
  time between two turns of its main loop, reported as ``maxgap_us`` after the move)
  when a memwork dirtying ~10 MB/s is migrated on loopback (`deltaxfer serve --restore`
  + `deltaxfer migrate`) with ``--tracking on`` and with ``--tracking off`` (content
  hashing of every page, the fallback). Goal: 1 GiB <= 0.3 s (8 GiB <= 1 s).
* **live round vs size**: one live round's read (scan + read of what must be read) on
  an idle memwork and on one dirtying a fixed ~10 MB/s, at several sizes, with and
  without tracking: with tracking it should follow what was written, not the size.
* **slowdown**: mutations per second of a memwork dirtying as fast as it can, untracked
  and while armed and re-protected every 100 ms (each first write per page per round is
  a write-protect fault resolved by the kernel).

Run:   .venv/bin/pytest bench/bench_tracking.py --benchmark-only -p no:cacheprovider -s
Smoke: .venv/bin/pytest bench/bench_tracking.py --benchmark-disable -p no:cacheprovider
Sizes: DX_TRACK_MIB=1024 (pause cells, comma-separated; 8192 on request),
       DX_TRACK_REPS=3, DX_TRACK_ROUND_MIB=256,1024,2048.
The summary is printed at the end and written to .benchmarks/tracking-summary.json.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import workloads  # noqa: E402
from faults import run_migrate  # noqa: E402
from servers import Server, write_key  # noqa: E402

from deltaxfer import _core, tracking  # noqa: E402
from deltaxfer.core import procmem  # noqa: E402
from deltaxfer.live import process_tree, snapshot_tree  # noqa: E402
from deltaxfer.source import Held  # noqa: E402

_RESULTS: dict = {}
DIRTY_MIB_S = 9.5     # ~10 MB/s


def smoke(config) -> bool:
    return bool(config.getoption("benchmark_disable", False))


def _ints(name, default):
    return [int(x) for x in os.environ.get(name, default).split(",") if x]


def pytest_generate_tests(metafunc):
    if "pause_mib" in metafunc.fixturenames:
        sizes = [32] if smoke(metafunc.config) else _ints("DX_TRACK_MIB", "1024")
        metafunc.parametrize("pause_mib", sizes, ids=[f"{m}M" for m in sizes])
    if "round_mib" in metafunc.fixturenames:
        sizes = [16, 32] if smoke(metafunc.config) else _ints("DX_TRACK_ROUND_MIB",
                                                              "256,1024,2048")
        metafunc.parametrize("round_mib", sizes, ids=[f"{m}M" for m in sizes])


@pytest.fixture(scope="module")
def reps(request):
    return 1 if smoke(request.config) else int(os.environ.get("DX_TRACK_REPS", "3"))


@pytest.fixture(scope="module")
def needs_tracking(criu):
    why = tracking.support()
    if why:
        pytest.fail(f"written-page tracking is not available here: {why}")


def migrate_once(tmp: Path, mib: int, mode: str) -> dict:
    tmp.mkdir(parents=True, exist_ok=True)
    with Server(tmp, extra=["--restore"]) as server, \
            workloads.start("memwork", mib=mib, dirty_mib_per_s=DIRTY_MIB_S, tmpdir=tmp) as wl:
        key = write_key(tmp / "client.key")
        m = run_migrate(wl.pid, server.addr, key, tmp / "report.json", "--tracking", mode,
                        timeout=600 + mib // 4)
        r = m.report
        if r and r.get("restored_pid"):
            wl.adopt(r["restored_pid"])
        assert m.rc == 0 and r["outcome"] == "migrated", (m.stderr[-2000:], r and r["error"])
        v = wl.verify(pid=r["restored_pid"], timeout=120)
        assert v["ok"], v
        final = r["rounds"][-1]
        return {"pause_s": v["maxgap_us"] / 1e6, "downtime_s": r["downtime"],
                "total_s": r["total_seconds"], "rounds": len(r["rounds"]),
                "final_read_pages": final.get("read_pages"), "final_pages": final["pages"],
                "final_skipped": final.get("skipped", 0),
                "tracking": r["tracking"].get("mode"),
                **{f"freeze_{k}": v for k, v in r["freeze"].items()
                   if isinstance(v, (int, float))}}


def med(rows, key):
    return statistics.median(r[key] for r in rows)


def bench_pause(benchmark, pause_mib, reps, needs_tracking, tmp_path):
    rows = {"on": [], "off": []}
    counter = iter(range(1000))

    def one():
        i = next(counter)
        for mode in (("on", "off") if i % 2 == 0 else ("off", "on")):
            rows[mode].append(migrate_once(tmp_path / f"{mode}-{i}", pause_mib, mode))

    benchmark.pedantic(one, rounds=reps, iterations=1)
    assert all(r["tracking"] == "uffd-wp" for r in rows["on"]), rows["on"]
    assert all(r["tracking"] == "hashing" for r in rows["off"])
    on, off = (med(rows["on"], "pause_s"), med(rows["off"], "pause_s"))
    goal = 0.3 if pause_mib <= 1024 else 1.0 * pause_mib / 8192
    _RESULTS[f"pause {pause_mib} MiB"] = {
        "mib": pause_mib, "reps": reps, "rows": rows,
        "pause_on_s": on, "pause_off_s": off, "ratio_off_on": off / on,
        "downtime_on_s": med(rows["on"], "downtime_s"),
        "downtime_off_s": med(rows["off"], "downtime_s"),
        "read_memory_on_s": med(rows["on"], "freeze_read_memory"),
        "read_memory_off_s": med(rows["off"], "freeze_read_memory"),
        "goal_s": goal, "goal_met": on <= goal}
    benchmark.extra_info.update({"pause_on_s": on, "pause_off_s": off})


def _read_round(tasks, tr, held):
    """A live round's memory work without the link: the scan (snapshot_tree), then every
    page to be read copied out window by window, as send_round's encoder threads do."""
    snap = snapshot_tree(tasks, tr, held)
    window = 2048
    buf = bytearray(window * 4096)
    for img in snap.images:
        n = len(img.vaddrs)
        for lo in range(0, n, window):
            img.reader(lo, min(lo + window, n), buf)
        close = getattr(img.reader, "close", None)
        if close is not None:
            close()
    return snap


def bench_live_round(benchmark, round_mib, needs_tracking, tmp_path):
    """Scan + read of one live round, 1 s after the previous one, with and without
    tracking, idle and dirtying ~10 MB/s (medians of 3 rounds each)."""
    out = {}
    for dirty in (0, DIRTY_MIB_S):
        with workloads.start("memwork", mib=round_mib, dirty_mib_per_s=dirty,
                             tmpdir=tmp_path) as wl:
            tasks = process_tree(wl.pid)
            for mode in ("off", "on"):
                tr = tracking.Tracking() if mode == "on" else None
                held = {}
                try:
                    snap = _read_round(tasks, tr, held)   # round 1: everything
                    times, reads = [], []
                    for _ in range(3):
                        held = {img.image_id: Held(img.vaddrs, None) for img in snap.images}
                        time.sleep(1.0)
                        t = time.monotonic()
                        snap = _read_round(tasks, tr, held)
                        times.append(time.monotonic() - t)
                        reads.append(snap.pages_read)
                finally:
                    if tr is not None:
                        tr.close()
                out[f"{mode} dirty={dirty:g}"] = {"round_s": statistics.median(times),
                                                  "pages_read": statistics.median(reads),
                                                  "pages": len(snap.images[0].vaddrs)}
    benchmark.pedantic(lambda: None, rounds=1)
    _RESULTS[f"live round {round_mib} MiB"] = {"mib": round_mib, **out}


def bench_slowdown(benchmark, needs_tracking, tmp_path, request):
    """Mutations per second flat out (memwork asked for 100 GB/s of dirtying), untracked
    vs armed with a scan (re-protect) every 100 ms."""
    secs = 1.0 if smoke(request.config) else 3.0

    def rate(wl, window, during=None):
        a = wl.verify()
        t0 = time.monotonic()
        while time.monotonic() - t0 < window:
            if during:
                during()
            time.sleep(0.1)
        b = wl.verify()
        return (b["mutations"] - a["mutations"]) / (time.monotonic() - t0)

    with workloads.start("memwork", mib=256, dirty_mib_per_s=100000, tmpdir=tmp_path) as wl:
        base = rate(wl, secs)
        armed = {}
        for every in (0.1, 1.0):
            tr = tracking.Tracking()
            try:
                tr.scan(wl.pid)
                last = [time.monotonic()]

                def rescan():
                    # what a live round does to the target: scan, then protect again
                    # every page it is about to read (here: all written ones)
                    if time.monotonic() - last[0] >= every:
                        sc = tr.scan(wl.pid)
                        run_v, run_l = procmem.criu_runs(wl.pid)
                        vaddrs = _core.run_page_vaddrs(run_v, run_l)
                        clean = tracking.clean_mask(vaddrs, sc, vaddrs)
                        tr.protect(wl.pid, vaddrs, clean, sc)
                        last[0] = time.monotonic()
                armed[every] = rate(wl, max(secs, 3 * every), rescan)
            finally:
                tr.close()
        after = rate(wl, secs)
        assert wl.verify()["ok"]
    benchmark.pedantic(lambda: None, rounds=1)
    _RESULTS["slowdown"] = {"untracked_mut_s": base, "armed_mut_s": armed,
                            "released_mut_s": after,
                            "armed_over_untracked": {k: v / base for k, v in armed.items()}}


def table() -> list[str]:
    lines = []
    for name, r in _RESULTS.items():
        if name.startswith("pause"):
            lines.append(f"{name}: app-observed pause tracking {r['pause_on_s']:.3f} s vs hashing "
                         f"{r['pause_off_s']:.3f} s ({r['ratio_off_on']:.2f}x); downtime "
                         f"{r['downtime_on_s']:.3f} vs {r['downtime_off_s']:.3f} s; frozen read "
                         f"{r['read_memory_on_s']:.3f} vs {r['read_memory_off_s']:.3f} s; goal "
                         f"<= {r['goal_s']} s: {'met' if r['goal_met'] else 'MISSED'}")
            for mode in ("on", "off"):
                for x in r["rows"][mode]:
                    lines.append(f"    {mode:3} pause {x['pause_s']:.3f} downtime "
                                 f"{x['downtime_s']:.3f} dump {x.get('freeze_dump', 0):.3f} "
                                 f"read {x.get('freeze_read_memory', 0):.3f} residual "
                                 f"{x.get('freeze_residual', 0):.3f} restore+resume "
                                 f"{x.get('freeze_commit_restore', 0) + x.get('freeze_resume', 0):.3f}"
                                 f" final read {x['final_read_pages']}/{x['final_pages']} pages")
        elif name.startswith("live round"):
            cells = "; ".join(f"{k}: {v['round_s'] * 1000:.1f} ms, {v['pages_read']:g} pages read"
                              for k, v in r.items() if isinstance(v, dict))
            lines.append(f"{name}: {cells}")
        else:
            armed = ", ".join(f"re-protected every {k:g} s {v:.0f} "
                              f"({r['armed_over_untracked'][k]:.2f}x)"
                              for k, v in r["armed_mut_s"].items())
            lines.append(f"slowdown: flat-out mutations/s (one new page each) untracked "
                         f"{r['untracked_mut_s']:.0f}; armed: {armed}; released "
                         f"{r['released_mut_s']:.0f}")
    return lines


def bench_tracking_summary(benchmark, request, capsys):
    assert _RESULTS, "no tracking benchmark ran"
    benchmark.pedantic(lambda: None, rounds=1)
    lines = table()
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    if tr is not None:
        with capsys.disabled():
            tr.write_line("")
            tr.section("written-page tracking (same run)")
            for line in lines:
                tr.write_line(line)
    if not smoke(request.config):
        out = ROOT / ".benchmarks" / "tracking-summary.json"
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps(_RESULTS, indent=2, default=str))
