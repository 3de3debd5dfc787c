"""`deltaxfer send` end to end on real CRIU dumps, against baselines measured in the same run.

1. Loopback: a 1 GiB memwork dump sent to `deltaxfer serve` (a fresh session: a full send),
   then a second dump of the same process taken after it dirtied ~10 % of its pages (sent
   in the session that holds the first: a delta against it). Baseline: `tar -cf - DIR`
   writing straight into a TCP socket, `tar -xf -` reading straight from the other end
   (tar | socket with no relay in between), for each of the two dumps.
2. Two hosts: network namespaces joined by a veth pair shaped with `tc ... tbf rate 1gbit`
   both ways; `deltaxfer serve` in the destination namespace, `deltaxfer send --no-lz4` of
   the first dump in the source namespace. Baseline: a raw TCP stream (sendall -> recv_into)
   over the same link.

Targets (ratios of the same run, asserted only in a benchmark run, not in the smoke run):
  second send's wire bytes <= image / 20;  page-round throughput on the shaped link
  >= 0.9 x the shaped rate.  The times against tar | socket are reported.

Run:   .venv/bin/pytest bench/bench_send.py --benchmark-only -p no:cacheprovider -s
Smoke: .venv/bin/pytest bench/bench_send.py --benchmark-disable -p no:cacheprovider
The summary is printed at the end and written to .benchmarks/send-summary.json.
Needs root and a working criu (fails, not skips, without them, like tests/conftest.py).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import workloads  # noqa: E402
from servers import ServeProcess, write_key  # noqa: E402

from deltaxfer import transport  # noqa: E402
from deltaxfer.keys import load_key  # noqa: E402
from deltaxfer.send import send_dump  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHAPED_RATE = "1gbit"
SHAPED_BPS = 1e9            # tc's "gbit" is 10^9 bit/s
_RESULTS: dict = {}


def smoke(config) -> bool:
    return bool(config.getoption("benchmark_disable", False))


@pytest.fixture(scope="module")
def params(request):
    if smoke(request.config):
        return {"mib": 32, "dirty_mib_per_s": 4, "dirty_s": 0.8, "reps": 1,
                "raw_bytes": 16 << 20}
    # 20 MiB/s for ~5 s after the first dump: ~100 MiB = ~10 % of the 1 GiB dirtied
    return {"mib": 1024, "dirty_mib_per_s": 20, "dirty_s": 5.0, "reps": 3,
            "raw_bytes": 512 << 20}


@pytest.fixture(scope="module")
def work(params, criu):
    """Two dumps of one memwork process, ~10 % of its pages dirtied in between."""
    tmp = Path(tempfile.mkdtemp(prefix="dx-bench-send-"))
    try:
        d1, d2 = tmp / "dump1", tmp / "dump2"
        d1.mkdir()
        d2.mkdir()
        with workloads.start("memwork", mib=params["mib"],
                             dirty_mib_per_s=params["dirty_mib_per_s"], tmpdir=tmp) as wl:
            criu.dump(wl.pid, str(d1), leave="running")
            time.sleep(params["dirty_s"])
            criu.dump(wl.pid, str(d2), leave="running")
        key_file = write_key(tmp / "bench.key")
        yield {"tmp": tmp, "dump1": d1, "dump2": d2, "key_file": key_file,
               "key": load_key(key_file)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def sync() -> None:
    """Start every timed repetition with no dirty pages of the previous one to write back."""
    os.sync()


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# -- a `deltaxfer serve` on any address, optionally inside a network namespace -------------

@pytest.fixture
def servers(work):
    """fresh(prefix=(), host=...) -> a new ServeProcess with an empty store; all stopped at
    the end."""
    started = []

    def fresh(**kw):
        for s in started:
            s.stop()
        s = ServeProcess(work["tmp"] / f"serve{len(started)}", work["key_file"], **kw)
        started.append(s)
        return s

    yield fresh
    for s in started:
        s.stop()


def dx_send(work, server, image_dir, session, **kw) -> dict:
    t0 = time.perf_counter()
    report = transport.run(send_dump(str(image_dir), server.host, server.port, work["key"],
                                     session, **kw), loop="uvloop")
    report["wall_s"] = time.perf_counter() - t0
    return report


def tar_socket(src: Path, dst: Path) -> dict:
    """`tar -cf - .` writing into a TCP socket, `tar -xf -` reading from its other end."""
    dst.mkdir()
    with socket.create_server(("127.0.0.1", 0)) as lsock:
        t0 = time.perf_counter()
        cli = socket.create_connection(lsock.getsockname())
        conn, _ = lsock.accept()
        try:
            sender = subprocess.Popen(["tar", "--totals", "-C", str(src), "-cf", "-", "."],
                                      stdout=cli.fileno(), stderr=subprocess.PIPE)
            receiver = subprocess.Popen(["tar", "-C", str(dst), "-xf", "-"],
                                        stdin=conn.fileno(), stderr=subprocess.PIPE)
        finally:
            cli.close()
            conn.close()
        _, err = sender.communicate()
        _, rerr = receiver.communicate()
        seconds = time.perf_counter() - t0
    assert sender.returncode == 0 and receiver.returncode == 0, (err, rerr)
    m = re.search(rb"Total bytes written: (\d+)", err)
    return {"wire_bytes": int(m.group(1)), "seconds": seconds}


def record(name: str, reps: list[dict]) -> dict:
    """Medians over the repetitions of every numeric field; the repetitions kept too."""
    keys = [k for k, v in reps[0].items() if isinstance(v, (int, float))]
    med = {k: statistics.median(r[k] for r in reps) for k in keys}
    _RESULTS[name] = {"median": med, "reps": reps}
    return med


def dx_summary(report: dict) -> dict:
    p = report["pages"]
    return {"seconds": report["seconds"], "wall_s": report["wall_s"],
            "cpu_s": report["cpu_seconds"],
            "wire_bytes": report["wire_bytes_sent"], "image_bytes": report["image_bytes"],
            "file_bytes": report["file_bytes"],
            **{f"phase_{k}": v for k, v in report["phases"].items()},
            **{f"pages_{k}": p[k] for k in ("pages", "changed", "unchanged", "sent_full",
                                            "sent_xor", "sent_zero")}}


# -- 1. loopback: full send, delta send, tar | socket --------------------------------------

def bench_send_first_loopback(benchmark, work, params, servers):
    """A full send of the 1 GiB dump (a fresh receiver each repetition)."""
    reps, n = [], iter(range(1000))

    def setup():
        server = servers()
        sync()
        return (server, f"first{next(n)}"), {}

    def run(server, session):
        report = dx_send(work, server, work["dump1"], session)
        report["dest_ok"] = os.path.isdir(report["destination_path"])   # gone with its server
        reps.append(report)

    benchmark.pedantic(run, setup=setup, rounds=params["reps"])
    for r in reps:
        assert r["round"] == 1 and r["pages"]["sent_xor"] == 0 and r["pages"]["unchanged"] == 0
        assert r["dest_ok"], r
    record("dx first", [dx_summary(r) for r in reps])


def bench_send_second_loopback(benchmark, work, params, servers):
    """The second dump sent to a receiver holding the first: only the delta travels."""
    reps, n = [], iter(range(1000))

    def setup():
        server = servers()
        session = f"second{next(n)}"
        dx_send(work, server, work["dump1"], session)       # untimed: what the receiver holds
        sync()
        return (server, session), {}

    def run(server, session):
        report = dx_send(work, server, work["dump2"], session)
        report["dest_ok"] = os.path.isdir(report["destination_path"])   # gone with its server
        reps.append(report)

    benchmark.pedantic(run, setup=setup, rounds=params["reps"])
    for r in reps:
        p = r["pages"]
        assert r["round"] == 2 and r["base"] == str(work["dump1"]), r
        assert p["sent_xor"] > 0 and p["unchanged"] > 0, p
        assert r["dest_ok"], r
    record("dx second", [dx_summary(r) for r in reps])


@pytest.mark.parametrize("which", ["dump1", "dump2"])
def bench_tar_socket_loopback(benchmark, work, params, which):
    reps, out = [], work["tmp"] / f"untar-{which}"

    def setup():
        shutil.rmtree(out, ignore_errors=True)
        sync()
        return (), {}

    def run():
        reps.append(tar_socket(work[which], out))

    try:
        benchmark.pedantic(run, setup=setup, rounds=params["reps"])
        assert dir_bytes(out) == dir_bytes(work[which])
    finally:
        shutil.rmtree(out, ignore_errors=True)
    record(f"tar {which}", reps)


# -- 2. two hosts over a veth pair shaped with tbf 1gbit -----------------------------------

RAW_RECV = r"""
import json, socket, sys, time
ls = socket.create_server((sys.argv[1], 0))
print(ls.getsockname()[1], flush=True)
conn, _ = ls.accept()
buf = bytearray(1 << 20); n = 0; t0 = None
while True:
    k = conn.recv_into(buf)
    if t0 is None: t0 = time.perf_counter()
    if not k: break
    n += k
print(json.dumps({"wire_bytes": n, "seconds": time.perf_counter() - t0}), flush=True)
"""

RAW_SEND = r"""
import os, socket, sys
host, port, total = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
chunk = memoryview(os.urandom(4 << 20))
s = socket.create_connection((host, port))
while total > 0:
    k = min(total, len(chunk)); s.sendall(chunk[:k]); total -= k
s.shutdown(socket.SHUT_WR); s.recv(1); s.close()
"""


@pytest.fixture(scope="module")
def lab():
    from lab import TwoHosts  # tests/lab.py

    with TwoHosts(rate=SHAPED_RATE) as lab:
        yield lab


def bench_send_shaped_veth(benchmark, work, params, servers, lab):
    """`deltaxfer send --no-lz4` of the first dump from the source namespace to a server in
    the destination namespace; throughput = page-round wire bytes / round time."""
    reps, n = [], iter(range(1000))

    def setup():
        server = servers(host=lab.dest.addr, prefix=lab.dest.command([]))
        sync()
        return (server, f"veth{next(n)}"), {}

    def run(server, session):
        proc = subprocess.run(lab.source.command(
            [sys.executable, "-m", "deltaxfer", "send", str(work["dump1"]),
             "--to", f"{server.host}:{server.port}", "--key-file", work["key_file"],
             "--session", session, "--json", "--no-lz4"]), capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        reps.append(json.loads(proc.stdout))

    benchmark.pedantic(run, setup=setup, rounds=params["reps"])
    rows = []
    for r in reps:
        assert r["round"] == 1 and r["pages"]["sent_full"] > 0
        round_bytes = r["wire_bytes_sent"] - r["file_bytes"]   # control frames: negligible
        rows.append({"seconds": r["seconds"], "wire_bytes": r["wire_bytes_sent"],
                     "round_bytes": round_bytes, "round_s": r["phases"]["round"],
                     "round_bps": round_bytes * 8 / r["phases"]["round"],
                     "send_bps": r["wire_bytes_sent"] * 8 / r["seconds"],
                     "cpu_s": r["cpu_seconds"],
                     **{f"phase_{k}": v for k, v in r["phases"].items()}})
    record("dx veth", rows)


def bench_raw_tcp_shaped_veth(benchmark, params, lab):
    """The baseline: one TCP stream, sendall -> recv_into, over the same shaped link."""
    reps = []

    def run():
        recv = subprocess.Popen(lab.dest.command([sys.executable, "-c", RAW_RECV, lab.dest.addr]),
                                stdout=subprocess.PIPE, text=True)
        try:
            port = int(recv.stdout.readline())
            subprocess.run(lab.source.command([sys.executable, "-c", RAW_SEND, lab.dest.addr,
                                               str(port), str(params["raw_bytes"])]),
                           check=True, timeout=120)
            out = json.loads(recv.stdout.readline())
            recv.wait(10)
        finally:
            if recv.poll() is None:
                recv.kill()
                recv.wait()
        out["bps"] = out["wire_bytes"] * 8 / out["seconds"]
        reps.append(out)

    benchmark.pedantic(run, rounds=params["reps"])
    for r in reps:
        assert r["wire_bytes"] == params["raw_bytes"]
    record("raw tcp veth", reps)


# -- targets and the summary ---------------------------------------------------------------

def ratios() -> dict:
    R = {k: v["median"] for k, v in _RESULTS.items()}
    f, s, t1, t2 = R["dx first"], R["dx second"], R["tar dump1"], R["tar dump2"]
    v, raw = R["dx veth"], R["raw tcp veth"]
    return {
        "second_wire_over_image": s["wire_bytes"] / s["image_bytes"],
        "second_wire_over_first_wire": s["wire_bytes"] / f["wire_bytes"],
        "second_changed_fraction": s["pages_changed"] / s["pages_pages"],
        "first_time_over_tar": f["seconds"] / t1["seconds"],
        "first_wire_over_tar": f["wire_bytes"] / t1["wire_bytes"],
        "second_time_over_tar": s["seconds"] / t2["seconds"],
        "second_wire_over_tar": s["wire_bytes"] / t2["wire_bytes"],
        "veth_round_over_shaped_rate": v["round_bps"] / SHAPED_BPS,
        "veth_send_over_shaped_rate": v["send_bps"] / SHAPED_BPS,
        "veth_round_over_raw_tcp": v["round_bps"] / raw["bps"],
        "raw_tcp_over_shaped_rate": raw["bps"] / SHAPED_BPS,
    }


TARGETS = {   # ratio -> (maximum or minimum, bound)
    "second_wire_over_image": ("<=", 1 / 20),
    "veth_round_over_shaped_rate": (">=", 0.9),
}


def met(name: str, value: float) -> bool:
    op, bound = TARGETS[name]
    return value <= bound if op == "<=" else value >= bound


def table() -> list[str]:
    R = {k: v["median"] for k, v in _RESULTS.items()}
    mb = 1e6
    lines = [f"{'measurement (median)':34} {'seconds':>8} {'wire MB':>9} {'image MB':>9}  note"]
    for name, note in (("dx first", "full send, fresh session"),
                       ("tar dump1", "tar | socket | tar -x"),
                       ("dx second", "delta vs the first dump"),
                       ("tar dump2", "tar | socket | tar -x")):
        r = R[name]
        image = f"{r['image_bytes'] / mb:9.1f}" if "image_bytes" in r else " " * 9
        lines.append(f"{name:34} {r['seconds']:8.3f} {r['wire_bytes'] / mb:9.1f} {image}  {note}")
    v, raw = R["dx veth"], R["raw tcp veth"]
    lines.append(f"{'dx veth (--no-lz4), page round':34} {v['round_s']:8.3f} "
                 f"{v['round_bytes'] / mb:9.1f} {'':9}  {v['round_bps'] / 1e6:.0f} Mbit/s")
    lines.append(f"{'raw tcp veth':34} {raw['seconds']:8.3f} {raw['wire_bytes'] / mb:9.1f} "
                 f"{'':9}  {raw['bps'] / 1e6:.0f} Mbit/s")
    lines.append("")
    lines.append(f"{'ratio':34} {'value':>8}  target")
    for name, value in ratios().items():
        t = ""
        if name in TARGETS:
            op, bound = TARGETS[name]
            t = f"{op} {bound:.3g}  {'met' if met(name, value) else 'MISSED'}"
        lines.append(f"{name:34} {value:8.3f}  {t}")
    for name in ("dx first", "dx second", "dx veth"):
        ph = {k[6:]: v for k, v in R[name].items() if k.startswith("phase_")}
        lines.append(f"phases {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in ph.items()))
    return lines


def bench_summary_and_targets(benchmark, request, capsys):
    """Runs last in this file (a benchmark so that --benchmark-only keeps it): prints the
    table, writes the JSON, checks the targets."""
    needed = {"dx first", "dx second", "tar dump1", "tar dump2", "dx veth", "raw tcp veth"}
    assert needed <= set(_RESULTS), f"missing measurements: {needed - set(_RESULTS)}"
    r = benchmark.pedantic(ratios, rounds=1)
    benchmark.extra_info.update(r)
    assert all(v > 0 for v in r.values()), r
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    lines = table()
    if tr is not None:
        with capsys.disabled():
            tr.write_line("")
            tr.section("deltaxfer send: end to end (medians, same run)")
            if smoke(request.config):
                tr.write_line("(smoke run: small sizes, one repetition; targets not checked)")
            for line in lines:
                tr.write_line(line)
    if smoke(request.config):
        return
    out = ROOT / ".benchmarks" / "send-summary.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"results": _RESULTS, "ratios": r,
                               "targets": {k: {"op": op, "bound": b, "value": r[k],
                                               "met": met(k, r[k])}
                                           for k, (op, b) in TARGETS.items()},
                               "cpus": os.cpu_count(), "shaped_rate": SHAPED_RATE},
                              indent=2, sort_keys=True))
    missed = {k: r[k] for k in TARGETS if not met(k, r[k])}
    assert not missed, f"targets missed: {missed}"
