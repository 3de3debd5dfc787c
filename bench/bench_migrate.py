"""`deltaxfer migrate` against CRIU's own disk-less migration, in the same run (issue 5).

Two hosts on this machine: `deltaxfer.lab.TwoHosts(rate="1gbit")` (two network
namespaces, a veth pair shaped with `tc ... tbf rate 1gbit` both ways). A memwork workload
(its own PID namespace, in the source namespace) keeps dirtying distinct pages at a set
rate; each repetition starts a fresh workload for each method and moves it to the
destination namespace, where the restored copy verifies every page of its memory.

* **deltaxfer**: `python -m deltaxfer serve --listen DEST:0 --key-file K --dir D --restore`
  in the destination namespace (a fresh one per repetition),
  `python -m deltaxfer migrate PID --to DEST:PORT --key-file K --report R` in the source
  namespace. Downtime, total time, the freeze breakdown and the wire bytes come from the
  report; the source must be gone afterwards.
* **criu page-server** (the baseline, CRIU's own disk-less path):
  `criu page-server -D DST --port P --address DEST --status-fd FD` in the destination
  namespace (started, and ready, before the clock starts), then, timed from outside with
  monotonic timestamps: `criu dump -t PID -D SRC --page-server --address DEST --port P
  --leave-stopped --shell-job` in the source namespace; the page-server exiting; the
  remaining images of SRC (everything but logs) copied over the veth as one tar stream
  (a Python tarfile writer on an already connected TCP socket in the source namespace,
  a tarfile reader in the destination namespace that acknowledges after extracting); and
  `criu restore -D DST -d --shell-job` in the destination namespace. Downtime = dump start
  (a plain dump freezes the tree right away) -> restore returned. The frozen original is
  killed afterwards.

Both restored processes must verify (asserted). The issue's goal (deltaxfer downtime
<= 0.3 s and >= 30x below the baseline) is reported, not asserted: the summary prints the
ratio and "goal missed" where it is.

Run:   .venv/bin/pytest bench/bench_migrate.py --benchmark-only -p no:cacheprovider -s
Smoke: .venv/bin/pytest bench/bench_migrate.py --benchmark-disable -p no:cacheprovider
       (32 MiB, one repetition, same shaped link; both migrations still verified)
Cells: DX_MIGRATE_CELLS=256M-10,1G-10,256M-idle,256M-100 (the default; 4G-10 on request),
       DX_MIGRATE_REPS=3 (default).
The summary is printed at the end and written to .benchmarks/migrate-summary.json (real
runs only). Needs root and a working criu (fails, not skips, without them).
"""
from __future__ import annotations

import itertools
import json
import os
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import workloads  # noqa: E402
from servers import ServeProcess  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHAPED_RATE = "1gbit"
GOAL_DOWNTIME_S = 0.3
GOAL_RATIO = 30.0
SETTLE_S = 0.5              # the workload dirties for this long before a migration starts
# name -> (MiB of memwork, dirty MiB/s)
CELLS = {"256M-10": (256, 10), "1G-10": (1024, 10), "256M-idle": (256, 0),
         "256M-100": (256, 100), "4G-10": (4096, 10)}
DEFAULT_CELLS = "256M-10,1G-10,256M-idle,256M-100"
SMOKE_CELLS = {"smoke-32M-10": (32, 10)}
_RESULTS: dict = {}
_PORTS = itertools.count(7700)
_T_START: list[float] = []     # when the first cell started


def smoke(config) -> bool:
    return bool(config.getoption("benchmark_disable", False))


def pytest_generate_tests(metafunc):
    if "cell" not in metafunc.fixturenames:
        return
    if smoke(metafunc.config):
        names, table = list(SMOKE_CELLS), SMOKE_CELLS
    else:
        names = [c for c in os.environ.get("DX_MIGRATE_CELLS", DEFAULT_CELLS).split(",") if c]
        table = CELLS
        unknown = [c for c in names if c not in table]
        if unknown:
            raise pytest.UsageError(f"DX_MIGRATE_CELLS: unknown {unknown}; known {list(CELLS)}")
    metafunc.parametrize("cell", [(n, *table[n]) for n in names], ids=names)


@pytest.fixture(scope="module")
def reps(request) -> int:
    if smoke(request.config):
        return 1
    return int(os.environ.get("DX_MIGRATE_REPS", "3"))


@pytest.fixture(scope="module")
def work(criu):
    tmp = Path(tempfile.mkdtemp(prefix="dx-bench-migrate-"))
    key_file = tmp / "bench.key"
    with open(key_file, "wb") as f:
        f.write(os.urandom(32))
    os.chmod(key_file, 0o600)
    try:
        yield {"tmp": tmp, "key_file": str(key_file)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def lab():
    from deltaxfer.lab import TwoHosts

    with TwoHosts(rate=SHAPED_RATE) as lab:
        yield lab


# -- helpers ---------------------------------------------------------------------------------

def link_tx_bytes(host) -> int:
    """Bytes sent by the host's non-loopback interfaces (its end of the veth)."""
    out = subprocess.run(host.command(["cat", "/proc/net/dev"]), capture_output=True,
                         text=True, check=True).stdout
    total = 0
    for line in out.splitlines()[2:]:
        name, _, fields = line.partition(":")
        if name.strip() != "lo":
            total += int(fields.split()[8])
    return total


def wait_gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if workloads.proc_state(pid) in (None, "Z", "X"):
            return True
        time.sleep(0.02)
    return False


def stop(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait()


def start_workload(lab, work, mib, dirty):
    wl = workloads.start("memwork", mib=mib, dirty_mib_per_s=dirty, tmpdir=work["tmp"],
                         prefix=lab.source.command([]))
    try:
        first = wl.verify(timeout=120)
        assert first["ok"], first
        time.sleep(SETTLE_S)
    except BaseException:
        wl.kill()
        raise
    return wl


def log_tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


# -- deltaxfer ---------------------------------------------------------------------------------

def run_deltaxfer(lab, work, mib, dirty, tag) -> dict:
    server = wl = None
    try:
        server = ServeProcess(work["tmp"] / f"serve-{tag}", work["key_file"],
                              host=lab.dest.addr, prefix=lab.dest.command([]),
                              extra=["--restore"])
        wl = start_workload(lab, work, mib, dirty)
        report_path = work["tmp"] / f"report-{tag}.json"
        tx0 = link_tx_bytes(lab.source)
        t0 = time.monotonic()
        proc = subprocess.run(lab.source.command(
            [sys.executable, "-m", "deltaxfer", "migrate", str(wl.pid),
             "--to", f"{server.host}:{server.port}", "--key-file", work["key_file"],
             "--report", str(report_path)]),
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=900)
        wall = time.monotonic() - t0
        link = link_tx_bytes(lab.source) - tx0
        assert report_path.exists(), (proc.returncode, proc.stderr[-3000:], server.log())
        report = json.loads(report_path.read_text())
        assert report["outcome"] == "migrated", (report.get("error"), proc.stderr[-3000:],
                                                 server.log())
        restored = report["restored_pid"]
        wl.adopt(restored)
        source_gone = wait_gone(wl.pid)
        res = wl.verify(pid=restored, timeout=120)
        assert res["ok"], f"deltaxfer: restored process {restored} failed its check: {res}"
        assert source_gone, f"deltaxfer: source {wl.pid} still there after the migration"
        f = report["freeze"]
        live = [r for r in report["rounds"] if r.get("live")]
        final = [r for r in report["rounds"] if not r.get("live")]
        return {
            "downtime_s": report["downtime"], "total_s": report["total_seconds"],
            "cmd_wall_s": wall, "predicted_downtime_s": report["predicted_downtime"],
            **{f"freeze_{k}": f[k] for k in ("dump", "read_memory", "residual", "files",
                                             "commit_restore")},
            "read_bytes": f.get("read_bytes", 0),
            "wire_bytes": report["wire_bytes_sent"], "link_bytes": link,
            "live_rounds": len(live),
            "final_pages": final[-1]["changed"] if final else 0,
            "final_wire_bytes": final[-1]["wire_bytes"] if final else 0,
            "cpu_s": report["cpu_seconds"],
            "stop_reason": report["stop_reason"], "verified": res["ok"],
            "source_gone": source_gone,
        }
    finally:
        if wl is not None:
            wl.kill()
        if server is not None:
            server.stop()


# -- the baseline: criu page-server + criu dump --page-server + image copy + criu restore ----

RECV = r"""
import os, socket, sys, tarfile
host, port, dst = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ls = socket.create_server((host, port))
print("ready", flush=True)
conn, _ = ls.accept()
with conn.makefile("rb") as f, tarfile.open(fileobj=f, mode="r|") as t:
    for m in t:
        t.extract(m, dst, set_attrs=False, filter="fully_trusted")
conn.sendall(b"k")
conn.close()
print("done", flush=True)
"""

SEND = r"""
import os, socket, sys, tarfile
host, port, src = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.create_connection((host, port))
print("ready", flush=True)
sys.stdin.readline()
names = [n for n in sorted(os.listdir(src)) if not n.endswith(".log")]
with s.makefile("wb") as f:
    with tarfile.open(fileobj=f, mode="w|") as t:
        for n in names:
            t.add(os.path.join(src, n), arcname=n)
s.shutdown(socket.SHUT_WR)
assert s.recv(1) == b"k"
print("done", len(names), sum(os.path.getsize(os.path.join(src, n)) for n in names), flush=True)
"""


def _readline(proc: subprocess.Popen, what: str, timeout: float = 30) -> str:
    r, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if r else ""
    if not line:
        stop(proc)
        raise RuntimeError(f"{what}: no answer (exit {proc.poll()}): "
                           f"{proc.stderr.read() if proc.stderr else ''}")
    return line.strip()


def run_criu_baseline(lab, work, criu, mib, dirty, tag) -> dict:
    from deltaxfer.criu.runner import log_errors

    src, dst = work["tmp"] / f"ps-src-{tag}", work["tmp"] / f"ps-dst-{tag}"
    src.mkdir()
    dst.mkdir()
    wl = ps = recv = send = None
    try:
        wl = start_workload(lab, work, mib, dirty)
        ps_port, cp_port = next(_PORTS), next(_PORTS)
        # the destination side is started and ready before the clock starts
        t_setup = time.monotonic()
        rfd, wfd = os.pipe()
        try:
            ps = subprocess.Popen(lab.dest.command(
                [criu.path, "page-server", "-D", str(dst), "--port", str(ps_port),
                 "--address", lab.dest.addr, "--status-fd", str(wfd), "-o", "page-server.log"]),
                pass_fds=[wfd], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE)
            os.close(wfd)
            wfd = -1
            r, _, _ = select.select([rfd], [], [], 30)
            assert r and os.read(rfd, 1) == b"\0", \
                f"criu page-server not ready: {log_tail(dst / 'page-server.log')}"
        finally:
            os.close(rfd)
            if wfd >= 0:
                os.close(wfd)
        recv = subprocess.Popen(lab.dest.command([sys.executable, "-c", RECV, lab.dest.addr,
                                                  str(cp_port), str(dst)]),
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        assert _readline(recv, "image receiver") == "ready"
        send = subprocess.Popen(lab.source.command([sys.executable, "-c", SEND, lab.dest.addr,
                                                    str(cp_port), str(src)]),
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        assert _readline(send, "image sender") == "ready"
        setup_s = time.monotonic() - t_setup
        tx0 = link_tx_bytes(lab.source)

        t0 = time.monotonic()                 # a plain dump freezes the tree at its start
        dump = subprocess.run(lab.source.command(
            [criu.path, "dump", "-t", str(wl.pid), "-D", str(src), "--page-server",
             "--address", lab.dest.addr, "--port", str(ps_port), "--leave-stopped",
             "--shell-job", "-o", "dump.log"]),
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=900)
        t_dump = time.monotonic()
        assert dump.returncode == 0, \
            f"criu dump --page-server: {log_errors(str(src / 'dump.log')) or dump.stderr}"
        ps.wait(timeout=120)
        t_ps = time.monotonic()
        assert ps.returncode == 0, \
            f"criu page-server exit {ps.returncode}: {log_errors(str(dst / 'page-server.log'))}"
        send.stdin.write("go\n")
        send.stdin.flush()
        done = _readline(send, "image sender", timeout=120).split()
        t_copy = time.monotonic()
        assert done[0] == "done", done
        pidfile = dst / "restored.pid"
        restore = subprocess.run(lab.dest.command(
            [criu.path, "restore", "-D", str(dst), "-d", "--shell-job", "--pidfile",
             str(pidfile), "-o", "restore.log"]),
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=900)
        t_restore = time.monotonic()
        assert restore.returncode == 0, \
            f"criu restore: {log_errors(str(dst / 'restore.log')) or restore.stderr}"
        link = link_tx_bytes(lab.source) - tx0
        restored = int(pidfile.read_text().strip())
        wl.adopt(restored)
        res = wl.verify(pid=restored, timeout=120)
        assert res["ok"], f"criu baseline: restored process {restored} failed its check: {res}"
        stopped = workloads.proc_state(wl.pid)
        assert stopped in ("T", "t"), f"criu baseline: source state {stopped}, not stopped"
        page_bytes = sum(p.stat().st_size for p in dst.glob("pages-*.img"))
        return {
            "downtime_s": t_restore - t0, "total_s": t_restore - t_setup,
            "setup_s": setup_s, "dump_s": t_dump - t0, "page_server_exit_s": t_ps - t_dump,
            "copy_s": t_copy - t_ps, "restore_s": t_restore - t_copy,
            "copied_files": int(done[1]), "copied_bytes": int(done[2]),
            "page_bytes": page_bytes, "link_bytes": link, "verified": res["ok"],
        }
    finally:
        for p in (send, recv, ps):
            stop(p)
        if wl is not None:
            wl.kill()           # the frozen original and the restored copy
        shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(dst, ignore_errors=True)


# -- the benchmark -------------------------------------------------------------------------------

def medians(rows: list[dict]) -> dict:
    keys = [k for k, v in rows[0].items() if isinstance(v, (int, float)) and
            not isinstance(v, bool)]
    return {k: statistics.median(r[k] for r in rows) for k in keys}


def bench_migrate(benchmark, cell, reps, lab, work, criu, request):
    """One cell: `reps` repetitions, each a deltaxfer migration and a CRIU page-server
    migration of fresh workloads (the order alternates between repetitions)."""
    name, mib, dirty = cell
    if not _T_START:
        _T_START.append(time.monotonic())
    dx, base = [], []
    counter = itertools.count()

    def one():
        i = next(counter)
        order = ("dx", "criu") if i % 2 == 0 else ("criu", "dx")
        for method in order:
            tag = f"{name}-{i}-{method}"
            if method == "dx":
                dx.append(run_deltaxfer(lab, work, mib, dirty, tag))
            else:
                base.append(run_criu_baseline(lab, work, criu, mib, dirty, tag))

    benchmark.pedantic(one, rounds=reps, iterations=1)
    assert len(dx) == len(base) == reps
    assert all(r["verified"] and r["source_gone"] for r in dx)
    assert all(r["verified"] for r in base)
    d, b = medians(dx), medians(base)
    ratio = b["downtime_s"] / d["downtime_s"]
    _RESULTS[name] = {"mib": mib, "dirty_mib_per_s": dirty, "reps": reps,
                      "deltaxfer": {"median": d, "reps": dx},
                      "criu_page_server": {"median": b, "reps": base},
                      "downtime_ratio": ratio,
                      "paired_ratios": [x["downtime_s"] / y["downtime_s"]
                                        for x, y in zip(base, dx)],
                      "goal_met": d["downtime_s"] <= GOAL_DOWNTIME_S and ratio >= GOAL_RATIO}
    benchmark.extra_info.update({"dx_downtime_s": d["downtime_s"],
                                 "criu_downtime_s": b["downtime_s"], "ratio": ratio})


def table() -> list[str]:
    lines = [f"{'cell':13} {'method':10} {'downtime s':>10} {'(min-max)':>13} {'total s':>8} "
             f"{'link MB':>8} {'wire MB':>8}  rounds"]
    for name, r in _RESULTS.items():
        for method, key in (("deltaxfer", "deltaxfer"), ("criu p-s", "criu_page_server")):
            m, rows = r[key]["median"], r[key]["reps"]
            dts = [x["downtime_s"] for x in rows]
            wire = f"{m['wire_bytes'] / 1e6:8.1f}" if "wire_bytes" in m else f"{'':8}"
            rounds = f"{m['live_rounds']:g}+1" if "live_rounds" in m else ""
            lines.append(f"{name:13} {method:10} {m['downtime_s']:10.3f} "
                         f"{min(dts):6.2f}-{max(dts):<6.2f} {m['total_s']:8.2f} "
                         f"{m['link_bytes'] / 1e6:8.1f} {wire}  {rounds}")
    lines.append("")
    lines.append(f"{'cell':13} {'criu/dx downtime':>16} {'paired':>18}  goal (dx <= "
                 f"{GOAL_DOWNTIME_S} s and >= {GOAL_RATIO:g}x)")
    for name, r in _RESULTS.items():
        paired = ",".join(f"{x:.2f}" for x in r["paired_ratios"])
        d = r["deltaxfer"]["median"]["downtime_s"]
        verdict = "met" if r["goal_met"] else (
            f"GOAL MISSED (dx {d:.3f} s {'<=' if d <= GOAL_DOWNTIME_S else '>'} "
            f"{GOAL_DOWNTIME_S} s; ratio {r['downtime_ratio']:.2f}x "
            f"{'>=' if r['downtime_ratio'] >= GOAL_RATIO else '<'} {GOAL_RATIO:g}x)")
        lines.append(f"{name:13} {r['downtime_ratio']:15.2f}x {paired:>18}  {verdict}")
    lines.append("")
    lines.append("deltaxfer freeze breakdown (medians, s): "
                 "dump / read_memory / residual / files / commit_restore; final round")
    for name, r in _RESULTS.items():
        m = r["deltaxfer"]["median"]
        reasons = sorted({x["stop_reason"] for x in r["deltaxfer"]["reps"]})
        lines.append(f"  {name:13} {m['freeze_dump']:.3f} / {m['freeze_read_memory']:.3f} / "
                     f"{m['freeze_residual']:.3f} / {m['freeze_files']:.3f} / "
                     f"{m['freeze_commit_restore']:.3f}; final {m['final_pages']:g} pages, "
                     f"{m['final_wire_bytes'] / 1e6:.2f} MB; predicted "
                     f"{m['predicted_downtime_s']:.3f} s; stop: {'; '.join(reasons)}")
    lines.append("criu page-server breakdown (medians, s): dump(+pages) / page-server exit / "
                 "copy images / restore")
    for name, r in _RESULTS.items():
        m = r["criu_page_server"]["median"]
        lines.append(f"  {name:13} {m['dump_s']:.3f} / {m['page_server_exit_s']:.3f} / "
                     f"{m['copy_s']:.3f} / {m['restore_s']:.3f}; pages "
                     f"{m['page_bytes'] / 1e6:.1f} MB, other images {m['copied_bytes'] / 1e3:.0f}"
                     f" kB in {m['copied_files']:g} files")
    return lines


def bench_migrate_summary(benchmark, request, capsys):
    """Runs last in this file (a benchmark so that --benchmark-only keeps it): prints the
    table and writes the JSON. The goal is reported, not asserted."""
    assert _RESULTS, "no migration cell ran"
    benchmark.pedantic(lambda: None, rounds=1)
    lines = table()
    elapsed = time.monotonic() - _T_START[0]
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    if tr is not None:
        with capsys.disabled():
            tr.write_line("")
            tr.section("deltaxfer migrate vs criu page-server (medians, same run)")
            if smoke(request.config):
                tr.write_line("(smoke run: 32 MiB, one repetition)")
            for line in lines:
                tr.write_line(line)
            tr.write_line(f"(the migration cells took {elapsed:.0f} s)")
    if smoke(request.config):
        return
    out = ROOT / ".benchmarks" / "migrate-summary.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"results": _RESULTS, "shaped_rate": SHAPED_RATE,
                               "goal": {"downtime_s": GOAL_DOWNTIME_S, "ratio": GOAL_RATIO},
                               "cpus": os.cpu_count(), "criu": request.getfixturevalue(
                                   "criu").version_str, "elapsed_s": elapsed},
                              indent=2, sort_keys=True))
