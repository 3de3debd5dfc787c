"""A runc container migrated by `deltaxfer migrate --runc` beside the same workload
migrated as a plain process tree (`deltaxfer migrate PID`), both to a `deltaxfer serve
--restore` on loopback on this machine.

The pause is the workload's own: memwork records the longest gap between two turns of
its dirtying loop (maxgap_us, CLOCK_MONOTONIC), and the freeze is that gap; the total is
the agent's report (connect to done). Each run also checks the moved memory (OK).

    .venv/bin/pytest -p no:cacheprovider bench/bench_runc.py --benchmark-only -s
Under --benchmark-disable it runs once, small, as a smoke test (8 MiB).
Needs root, runc, criu and a static busybox (make runc).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import containers  # noqa: E402
import workloads  # noqa: E402
from servers import Server, write_key  # noqa: E402

from deltaxfer import runc as rc  # noqa: E402
from deltaxfer.criu.runner import CriuError, find_criu  # noqa: E402

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="runc and criu need root")
DIRTY_MIB_PER_S = 4
_ROWS: list[dict] = []


@pytest.fixture(scope="module")
def tools():
    try:
        runc, criu = rc.find_runc(), find_criu()
    except (rc.RuncNotFound, CriuError) as e:
        pytest.skip(f"{e}")
    if containers.busybox() is None:
        pytest.skip("no static busybox (make runc)")
    return runc, criu


def _migrate(args, tmp_path, env=None) -> dict:
    out = tmp_path / "report.json"
    p = subprocess.run([sys.executable, "-m", "deltaxfer", "migrate", *args, "--report",
                        str(out), "--quiet"], capture_output=True, text=True, timeout=600,
                       env=env)
    report = json.loads(out.read_text()) if out.exists() else {}
    assert p.returncode == 0 and report.get("outcome") == "migrated", (
        p.returncode, p.stderr[-2000:], report.get("error"))
    return report


def _process(tools, tmp_path, mib) -> dict:
    key = write_key(tmp_path / "client.key")
    # a short work directory: the agent's unix socket path must fit in 108 bytes
    work = tempfile.mkdtemp(prefix="dxb-", dir="/tmp")
    env = dict(os.environ, TMPDIR=work)
    with Server(tmp_path, extra=["--restore"]) as server, \
            workloads.start("memwork", tmpdir=tmp_path / "wl", mib=mib,
                            dirty_mib_per_s=DIRTY_MIB_PER_S) as wl:
        r = _migrate([str(wl.pid), "--to", server.addr, "--key-file", key], tmp_path, env)
        wl.adopt(r["restored_pid"])
        check = wl.verify(r["restored_pid"])
    os.rmdir(work) if not os.listdir(work) else None
    return {"report": r, "check": check}


def _container(tools, tmp_path, mib) -> dict:
    runc, criu = tools
    key = write_key(tmp_path / "client.key")
    b = containers.make_bundle(tmp_path / "bundle", mib=mib, dirty_mib_per_s=DIRTY_MIB_PER_S)
    r1, r2 = tmp_path / "root1", tmp_path / "root2"
    with Server(tmp_path, extra=["--restore", "--runc-root", str(r2)]) as server, \
            containers.RuncContainer.run(runc.path, criu.path, str(r1), "bench", b) as c:
        try:
            r = _migrate(["--runc", "bench", "--runc-root", str(r1), "--runc-dest-id", "copy",
                          "--to", server.addr, "--key-file", key], tmp_path)
            check = c.verify(rc.container("copy", str(r2), runc).pid)
        finally:
            rc.remove_container(runc, str(r2), "copy")
    return {"report": r, "check": check}


@pytest.mark.parametrize("kind", ["process", "runc"])
def test_migrate_runc_vs_process(benchmark, tools, tmp_path, kind, request):
    smoke = request.config.getoption("benchmark_disable", False)
    mib = 8 if smoke else 256
    run = _process if kind == "process" else _container
    result = benchmark.pedantic(run, args=(tools, tmp_path, mib), rounds=1, iterations=1)
    r, check = result["report"], result["check"]
    assert check["ok"], check
    row = {"kind": kind, "mib": mib, "pause_ms": check["maxgap_us"] / 1000,
           "downtime_ms": r["downtime"] * 1000, "total_s": r["total_seconds"],
           "rounds": len(r["rounds"]), "freeze": r["freeze"].get("mode")}
    benchmark.extra_info.update(row)
    _ROWS.append(row)
    print(f"\n{kind:8} {mib} MiB at {DIRTY_MIB_PER_S} MiB/s: pause {row['pause_ms']:.0f} ms "
          f"(agent's downtime {row['downtime_ms']:.0f} ms), total {row['total_s']:.2f} s, "
          f"{row['rounds']} rounds; freeze steps: " + ", ".join(
              f"{k} {v * 1000:.0f} ms" for k, v in r["freeze"].items() if isinstance(v, float)))
