"""deltaxfer against what users would pick instead, measured in one harness and one run
(issue 6): the same fresh workloads, over the same links, moved by

  deltaxfer | dx-noxor | dx-nolz4 | rsync (criu dump + rsync + restore) |
  page-server (CRIU's disk-less migration) | tar-lz4 (criu dump + tar | lz4 | socket + restore)

Each workload runs in its own PID namespace in the link's source network namespace and
checks its own memory (memwork, pyheap) or answers a full dataset check (redis) on the
destination after the move; a failed check fails the run. What is measured and how:
bench/migration_lab.py and bench/migration_methods.py; which cells run:
bench/migration_matrix.py.

Run the default matrix (writes docs/results/matrix.json, docs/RESULTS.md and the plots):
    make bench-migrate                     # = DX_MATRIX=default DX_MATRIX_OUT=docs ...
    make bench-migrate MATRIX=smoke        # every method, link and workload, tiny, ~4 min
By hand:
    DX_MATRIX=default DX_MATRIX_OUT=docs .venv/bin/pytest -p no:cacheprovider \
        bench/bench_migrate.py --benchmark-only -s
    DX_MATRIX='mem1G-d10@1gbit:deltaxfer+page-server' DX_MATRIX_REPS=1 ...   # some cells
Regenerate the page from the JSON: .venv/bin/python bench/matrix_report.py docs/results/matrix.json
Under --benchmark-disable (``make test``) the ``ci`` matrix runs once and nothing is written.
"""
from __future__ import annotations

import datetime
import itertools
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import migration_matrix
from migration_lab import LINKS
from migration_methods import Ctx, migrate

ROOT = Path(__file__).resolve().parents[1]
_RUNS: list[dict] = []
_FAILED: list[str] = []
_T0: list[float] = []
_PORTS = itertools.count(7700 + (os.getpid() % 500) * 40)


def matrix_name(config) -> str:
    if "DX_MATRIX" in os.environ:
        return os.environ["DX_MATRIX"]
    return "ci" if config.getoption("benchmark_disable", False) else "default"


def pytest_generate_tests(metafunc):
    if "group" not in metafunc.fixturenames:
        return
    try:
        groups, _ = migration_matrix.select(matrix_name(metafunc.config))
    except ValueError as e:
        raise pytest.UsageError(f"DX_MATRIX: {e}") from None
    metafunc.parametrize("group", groups,
                         ids=[f"{w.name}@{link}" for w, link, _ in groups])


@pytest.fixture(scope="module")
def reps(request) -> int:
    _, default = migration_matrix.select(matrix_name(request.config))
    if request.config.getoption("benchmark_disable", False):
        return 1
    return int(os.environ.get("DX_MATRIX_REPS", default))


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
        keep = os.environ.get("DX_BENCH_LOGS")    # a folder for the servers' logs
        if keep:
            os.makedirs(keep, exist_ok=True)
            for log in tmp.glob("serve-*.log"):
                shutil.copy(log, keep)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def links():
    """The links, each set up on first use and kept until the module ends."""
    up: dict = {}

    def get(kind):
        if kind not in up:
            up[kind] = LINKS[kind]().__enter__()
        return up[kind]
    try:
        yield get
    finally:
        for link in up.values():
            link.__exit__(None, None, None)


def bench_migrate(benchmark, group, reps, links, work, criu):
    """One workload on one link: `reps` repetitions, each moving a fresh workload with
    every method of the group (the order rotates between repetitions)."""
    spec, link_kind, methods = group
    if not _T0:
        _T0.append(time.monotonic())
    link = links(link_kind)
    ctx = Ctx(link, work["tmp"], work["key_file"], criu, _PORTS)
    counter = itertools.count()

    def one():
        i = next(counter)
        k = i % len(methods)
        for method in methods[k:] + methods[:k]:
            tag = f"{spec.name}-{link_kind}-{method}-{i}"
            cell = {"workload": spec.name, "kind": spec.kind, "mib": spec.mib,
                    "dirty": spec.dirty, "objects": spec.objects, "keys": spec.keys,
                    "link": link_kind, "method": method, "rep": i}
            try:
                r = migrate(method, ctx, spec, tag)
            except BaseException as e:
                _FAILED.append(f"{tag}: {type(e).__name__}: {str(e)[:2000]}")
                _RUNS.append({**cell, "error": f"{type(e).__name__}: {str(e)[:2000]}"})
                raise
            _RUNS.append({**cell, **r})
            print(f"{tag}: downtime {r['downtime_s']:.3f} s, total {r['total_s']:.2f} s, "
                  f"wire {r['wire_bytes'] / 1e6:.1f} MB, cpu {r['cpu_src_s']:.2f}+"
                  f"{r['cpu_dst_s']:.2f} s (restored tree {r.get('cpu_restored_s') or 0:.2f} s), "
                  f"rounds {r['rounds']}", flush=True)

    benchmark.pedantic(one, rounds=reps, iterations=1)


def _machine() -> dict:
    def first(path, key):
        try:
            for line in open(path):
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return None
    mem_kb = first("/proc/meminfo", "MemTotal")
    os_name = None
    try:
        os_name = dict(line.rstrip().split("=", 1) for line in open("/etc/os-release")
                       if "=" in line).get("PRETTY_NAME", "").strip('"')
    except OSError:
        pass
    return {"cpu": first("/proc/cpuinfo", "model name"), "cpus": os.cpu_count(),
            "mem_gib": round(int(mem_kb.split()[0]) / 2**20, 1) if mem_kb else None,
            "kernel": platform.release(), "os": os_name, "python": platform.python_version(),
            "hostname": platform.node()}


def bench_migrate_summary(benchmark, request, criu):
    """Runs last (a benchmark so that --benchmark-only keeps it): writes the JSON of every
    run and, with DX_MATRIX_OUT, the results page; fails when a migration failed."""
    benchmark.pedantic(lambda: None, rounds=1)
    assert _RUNS, "no migration ran"
    name = matrix_name(request.config)
    data = {"meta": {"matrix": name, "cells": migration_matrix.NAMED.get(name, name),
                     "smoke": name in ("smoke", "ci"),
                     "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                     "elapsed_s": round(time.monotonic() - _T0[0], 1),
                     "criu": criu.version_str, "machine": _machine(),
                     "command": "make bench-migrate" + ("" if name == "default"
                                                        else f" MATRIX={name}")},
            "runs": _RUNS, "failures": _FAILED}
    out_dir = os.environ.get("DX_MATRIX_OUT")
    if request.config.getoption("benchmark_disable", False) and not out_dir:
        assert not _FAILED, _FAILED
        return
    if out_dir:
        out = ROOT / out_dir / "results" / "matrix.json"
    else:
        out = ROOT / ".benchmarks" / f"migrate-matrix-{name if name in migration_matrix.NAMED else 'cells'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1, sort_keys=True))
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    cmd = [sys.executable, str(ROOT / "bench" / "matrix_report.py"), str(out)]
    if out_dir:
        cmd += ["--page", str(ROOT / out_dir / "RESULTS.md"), "--readme", str(ROOT / "README.md")]
    page = subprocess.run(cmd, capture_output=True, text=True)
    if tr is not None:
        tr.write_line("")
        tr.write_line(page.stdout)
        tr.write_line(f"runs written to {out} ({data['meta']['elapsed_s']:.0f} s)")
    assert page.returncode == 0, page.stderr
    assert not _FAILED, _FAILED
