"""Shared fixtures of the page-core benchmarks, and the summary table.

Sizes are small under --benchmark-disable (the smoke run of the normal test suite) and
large enough to leave the CPU caches in a benchmark run.  Real process memory comes from
two CRIU dumps of bench/heap_workload.py taken a few seconds apart, cached under
.benchmarks/dumps/<DUMP_VERSION>-<size>/ between runs.
"""
import glob
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from deltaxfer import _core

DUMP_VERSION = "heap-v1"
PAGE = 4096
_RESULTS: dict = {}


def smoke(config) -> bool:
    return bool(config.getoption("benchmark_disable", False))


@pytest.fixture(scope="session")
def sizes(request):
    if smoke(request.config):
        return {"synthetic": 4 << 20, "heap_mib": 50, "procmem": 8 << 20}
    return {"synthetic": 256 << 20, "heap_mib": 300, "procmem": 256 << 20}


# -- results and the summary --------------------------------------------------------------

@pytest.fixture
def report(benchmark):
    """report(name, nbytes, **extra): remember the benchmark's median as GB/s."""
    def record(name, nbytes, **extra):
        stats = getattr(benchmark, "stats", None)
        if stats is None or benchmark.disabled:
            return
        median = stats.stats.median
        _RESULTS[name] = {"bytes": nbytes, "median_s": median, "gbps": nbytes / median / 1e9,
                          **extra}
    return record


TARGETS = {   # name -> (baseline for the ratio, minimum ratio or GB/s, what)
    "hash+zero+compare random": ("memcpy random", 0.9, "x memcpy"),
    "hash+zero+compare zero": ("memcpy zero", 0.9, "x memcpy"),
    "hash+zero+compare real": ("memcpy real", 0.9, "x memcpy"),
    "xor encode real changed pages": (None, 3.0, "GB/s"),
    "xor decode real changed pages": (None, 3.0, "GB/s"),
    "xor encode sparse synthetic": (None, 3.0, "GB/s"),
    "xor decode sparse synthetic": (None, 3.0, "GB/s"),
    "pipeline real 1 thread": (None, 3.0, "GB/s"),
    "pipeline real 2 threads": ("pipeline real 1 thread", 1.0, "x 1 thread"),
    "process_vm_readv": ("memcpy procmem", 0.5, "x memcpy"),
    "process_vm_readv 2 threads": ("memcpy procmem", 0.5, "x memcpy"),
}


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _RESULTS:
        return
    tr = terminalreporter
    tr.section("deltaxfer core: throughput (median of rounds, same run)")
    tr.write_line(f"{'benchmark':36} {'GB/s':>7} {'ratio':>8}  {'target':>16}  met")
    summary = {"results": _RESULTS, "targets": {}, "lib_versions": _core.lib_versions(),
               "cpus": os.cpu_count()}
    for name, r in sorted(_RESULTS.items()):
        ratio_s, target_s, met_s = "", "", ""
        if name in TARGETS:
            base, minimum, what = TARGETS[name]
            if base is None:
                value = r["gbps"]
            elif base in _RESULTS:
                value = r["gbps"] / _RESULTS[base]["gbps"]
                ratio_s = f"{value:.2f}x"
            else:
                value = None
            if value is not None:
                met = value >= minimum if what != "x 1 thread" else value > minimum
                target_s = f">= {minimum} {what}" if what != "x 1 thread" else "> 1 thread"
                met_s = "yes" if met else "NO"
                summary["targets"][name] = {"value": value, "target": minimum, "unit": what,
                                            "met": met}
        elif name.startswith("memcpy"):
            ratio_s = "1.00x"
        tr.write_line(f"{name:36} {r['gbps']:7.2f} {ratio_s:>8}  {target_s:>16}  {met_s}")
    for name, r in sorted(_RESULTS.items()):
        extra = {k: v for k, v in r.items() if k not in ("bytes", "median_s", "gbps")}
        if extra:
            tr.write_line(f"  {name}: " + ", ".join(
                f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in extra.items()))
    out = Path(config.rootpath) / ".benchmarks" / "core-summary.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2, sort_keys=True))
    tr.write_line(f"summary written to {out}")


# -- real process memory: two CRIU dumps of a Python heap ---------------------------------

@dataclass
class DumpPair:
    old_pages: bytearray
    old_vaddrs: object
    new_pages: bytearray
    new_vaddrs: object
    directory: Path


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except FileNotFoundError:
        return []


def _wait_for(path: Path, proc, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"heap workload exited ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"heap workload not {what} after {timeout} s")
        time.sleep(0.05)


def _make_dumps(root: Path, size_mib: int, criu) -> None:
    state = root / "state"
    for d in (state, root / "old", root / "new"):
        d.mkdir(parents=True, exist_ok=True)
    log = open(root / "workload.log", "w")
    workload = Path(__file__).with_name("heap_workload.py")
    # PID 1 of its own namespace, its own session: what `criu dump --shell-job` expects
    proc = subprocess.Popen(["unshare", "--pid", "--fork", "setsid", sys.executable,
                             str(workload), str(size_mib), str(state)],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        _wait_for(state / "ready", proc, "ready")
        (pid,) = _children(proc.pid)
        criu.dump(pid, str(root / "old"), leave="running")
        time.sleep(2)
        os.kill(pid, signal.SIGUSR1)
        _wait_for(state / "mutated", proc, "mutated")
        criu.dump(pid, str(root / "new"), leave="running")
    finally:
        for pid in _children(proc.pid):
            os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=30)
        log.close()
    (root / "complete").write_text(DUMP_VERSION)


def _load(directory: Path):
    from deltaxfer.criu.images import MemoryImage

    pagemaps = [p for p in glob.glob(str(directory / "pagemap-*.img")) if "shmem" not in p]
    images = [MemoryImage(p) for p in pagemaps]
    image = max(images, key=lambda m: m.nr_pages)      # the workload's own memory
    # copied out of the mmapped image so that timings measure memory, not page faults
    pages, vaddrs = bytearray(image.pages), image.vaddrs()
    for m in images:
        m.close()
    return pages, vaddrs


@pytest.fixture(scope="session")
def criu():
    """The criu that the end-to-end benchmarks (send, migrate) run: they fail, not skip,
    without root or a working criu, as the real-CRIU tests do."""
    from deltaxfer.criu.runner import CriuError, find_criu

    if os.geteuid() != 0:
        pytest.fail("this benchmark dumps real processes with criu: run it as root")
    try:
        return find_criu()
    except CriuError as e:
        pytest.fail(str(e))


@pytest.fixture(scope="session")
def real_dumps(request, sizes) -> DumpPair:
    from deltaxfer.criu.runner import CriuError, find_criu

    try:
        criu = find_criu()
    except CriuError as e:
        pytest.skip(f"real-memory benchmarks need a working criu: {e}")
    if os.geteuid() != 0:
        pytest.skip("real-memory benchmarks dump a process with criu, which needs root")
    root = Path(request.config.rootpath) / ".benchmarks" / "dumps" / \
        f"{DUMP_VERSION}-{sizes['heap_mib']}mib"
    if not (root / "complete").exists():
        _make_dumps(root, sizes["heap_mib"], criu)
    old_pages, old_vaddrs = _load(root / "old")
    new_pages, new_vaddrs = _load(root / "new")
    return DumpPair(old_pages, old_vaddrs, new_pages, new_vaddrs, root)
