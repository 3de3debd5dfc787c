#!/usr/bin/env python3
"""Soak: one memwork process migrated back and forth between two hosts N times.

The two hosts are two network namespaces joined by a veth pair (tests/lab.py's
TwoHosts, as bench/migration_lab.py's Veth), each running `deltaxfer serve --restore`.
Each hop runs `deltaxfer migrate PID --to OTHER` inside the host the process is on, then
checks: the report says migrated, the restored process passes memwork's own check of
every page (SIGUSR1: its checksummed memory and its clock), and the original is gone.
A hop that fails is recorded; the soak goes on from wherever the process is (the source
resumes when a migration rolls back), and stops only when the process is lost.

Prints the downtime percentiles (nearest rank), the failures and a JSON summary
(--json FILE too). `make soak` (SOAK_N, default 50; SOAK_MIB, default 32). Root, criu.

Usage: scripts/soak.py [--n N] [--mib MIB] [--dirty-mib-per-s R] [--rate RATE] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import workloads  # noqa: E402  (tests/workloads: memwork and its check)
from lab import TwoHosts  # noqa: E402  (tests/lab.py)
from servers import ServeProcess  # noqa: E402  (tests/servers.py)


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100) of values; None for none."""
    if not values:
        return None
    s = sorted(values)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]


def wait_gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if workloads.proc_state(pid) in (None, "Z", "X"):
            return True
        time.sleep(0.02)
    return False


def hop(i: int, wl, pid: int, here, there, serve, key_file: str, tmp: Path) -> dict:
    """One migration of pid from host `here` to `there` (serve: there's server)."""
    report_path, err_path = tmp / f"report-{i}.json", tmp / f"migrate-{i}.err"
    t0 = time.monotonic()
    with open(err_path, "wb") as err:
        proc = subprocess.run(here.command(
            [sys.executable, "-m", "deltaxfer", "migrate", str(pid), "--to",
             f"{serve.host}:{serve.port}", "--key-file", key_file, "--report", str(report_path)]),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, timeout=900)
    out = {"hop": i, "from": here.addr, "to": there.addr, "pid": pid, "exit": proc.returncode,
           "wall_s": round(time.monotonic() - t0, 3)}
    if not report_path.exists():
        return {**out, "ok": False, "error": f"no report: {err_path.read_text()[-800:]}",
                "source_alive": workloads.proc_state(pid) not in (None, "Z", "X")}
    report = json.loads(report_path.read_text())
    out.update(outcome=report["outcome"], downtime_s=report.get("downtime"),
               rounds=len(report.get("rounds", [])))
    if report["outcome"] != "migrated":
        return {**out, "ok": False, "error": f"{report['outcome']}: {report.get('error')}",
                "source_alive": workloads.proc_state(pid) not in (None, "Z", "X")}
    restored = report["restored_pid"]
    wl.adopt(restored)
    res = wl.verify(pid=restored, timeout=300)
    out.update(restored_pid=restored, verified=bool(res.get("ok")))
    if not res.get("ok"):
        return {**out, "ok": False, "error": f"check failed: {res.get('line', res)}"}
    if not wait_gone(pid):
        return {**out, "ok": False, "error": f"the source {pid} is still there"}
    return {**out, "ok": True}


def soak(n: int, mib: float, dirty: float, rate: str | None) -> dict:
    if os.geteuid() != 0:
        sys.exit("soak: needs root (network namespaces, criu)")
    from deltaxfer.criu.runner import find_criu
    criu = find_criu()
    tmp = Path(tempfile.mkdtemp(prefix="deltaxfer-soak."))
    key_file = tmp / "soak.key"
    key_file.write_bytes(os.urandom(32))
    key_file.chmod(0o600)
    hops: list[dict] = []
    t0 = time.monotonic()
    with TwoHosts(rate=rate) as lab:
        hosts = (lab.source, lab.dest)
        serves = [ServeProcess(tmp / f"serve-{k}", str(key_file), host=h.addr,
                               prefix=h.command([]), extra=["--restore"])
                  for k, h in enumerate(hosts)]
        try:
            with workloads.start("memwork", mib=mib, dirty_mib_per_s=dirty, tmpdir=tmp,
                                 prefix=tuple(lab.source.command([]))) as wl:
                at, pid = 0, wl.pid
                for i in range(1, n + 1):
                    h = hop(i, wl, pid, hosts[at], hosts[1 - at], serves[1 - at],
                            str(key_file), tmp)
                    hops.append(h)
                    print(f"soak: hop {i}/{n} {h['from']} -> {h['to']}: "
                          + (f"ok, downtime {h['downtime_s'] * 1000:.0f} ms, {h['rounds']} rounds"
                             if h["ok"] else f"FAILED: {h['error']}"), file=sys.stderr, flush=True)
                    if h["ok"]:
                        at, pid = 1 - at, h["restored_pid"]
                    elif not h.get("source_alive"):
                        print("soak: the process is lost; stopping", file=sys.stderr)
                        break
        finally:
            for s in serves:
                s.stop()
    down = [h["downtime_s"] * 1000 for h in hops if h["ok"]]
    summary = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.node()}, {os.cpu_count()} CPUs, kernel {platform.release()}",
        "criu": ".".join(map(str, criu.version)),
        "workload": f"memwork {mib:g} MiB, dirtying {dirty:g} MiB/s",
        "link": f"veth, tbf {rate}" if rate else "veth, unshaped",
        "hops_asked": n, "hops_run": len(hops), "migrated_and_verified": len(down),
        "failures": [{k: h.get(k) for k in ("hop", "from", "to", "error")}
                     for h in hops if not h["ok"]],
        "downtime_ms": {name: (round(percentile(down, p), 1) if down else None)
                        for name, p in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))},
        "mean_rounds": round(sum(h["rounds"] for h in hops if h["ok"]) / len(down), 2)
        if down else None,
        "seconds": round(time.monotonic() - t0, 1),
        "hops": hops,
    }
    subprocess.run(["rm", "-rf", str(tmp)])
    return summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=int(os.environ.get("SOAK_N", 50)),
                    help="hops (default $SOAK_N or 50)")
    ap.add_argument("--mib", type=float, default=float(os.environ.get("SOAK_MIB", 32)),
                    help="memwork's memory (default $SOAK_MIB or 32)")
    ap.add_argument("--dirty-mib-per-s", type=float, default=4)
    ap.add_argument("--rate", help="shape the veth with tbf (e.g. 1gbit); default unshaped")
    ap.add_argument("--json", metavar="FILE", help="also write the summary here")
    args = ap.parse_args()
    s = soak(args.n, args.mib, args.dirty_mib_per_s, args.rate)
    d = s["downtime_ms"]
    print(f"soak {s['date']} on {s['machine']}, criu {s['criu']}: {s['workload']}, {s['link']}")
    print(f"  {s['migrated_and_verified']}/{s['hops_asked']} hops migrated and verified "
          f"({s['hops_run']} run) in {s['seconds']} s; mean live rounds {s['mean_rounds']}")
    print(f"  downtime ms: p50 {d['p50']}, p90 {d['p90']}, p99 {d['p99']}, max {d['max']}")
    for f in s["failures"]:
        print(f"  FAILED hop {f['hop']} {f['from']} -> {f['to']}: {f['error']}")
    if args.json:
        Path(args.json).write_text(json.dumps(s, indent=1) + "\n")
    return 0 if s["migrated_and_verified"] == s["hops_asked"] else 1


if __name__ == "__main__":
    sys.exit(main())
