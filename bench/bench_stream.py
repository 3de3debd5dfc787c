"""First-round throughput of `deltaxfer migrate` with the streaming source (issue 12),
with 1 and 2 encoder threads, beside two baselines measured in the same run: a raw
process_vm_readv + copy of the same memory, and a raw loopback socket. Also the peak RSS
of the migrate process (VmHWM sampled until it exits) and its CPU seconds per GiB.

    .venv/bin/pytest bench/bench_stream.py --benchmark-enable -s      (MIB=1024 default)
    DXB_STREAM_MIB=256 .venv/bin/python bench/bench_stream.py
"""
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import pytest  # noqa: E402

import workloads  # noqa: E402
from deltaxfer import PAGE_SIZE, _core  # noqa: E402
from deltaxfer.core import procmem  # noqa: E402
from faults import agent_env, finish_migrate, start_migrate  # noqa: E402
from servers import Server, write_key  # noqa: E402

MIB = int(os.environ.get("DXB_STREAM_MIB", "1024"))


def raw_read_MBps(pid: int) -> float:
    """process_vm_readv of the process's pages into one reused 8 MiB buffer."""
    run_v, run_l = procmem.criu_runs(pid)
    vaddrs = _core.run_page_vaddrs(run_v, run_l)
    w = 2048
    buf = bytearray(w * PAGE_SIZE)
    t = time.perf_counter()
    for lo in range(0, len(vaddrs), w):
        hi = min(lo + w, len(vaddrs))
        _core.read_pages(pid, vaddrs[lo:hi], None, memoryview(buf)[:(hi - lo) * PAGE_SIZE])
    return len(vaddrs) * PAGE_SIZE / (time.perf_counter() - t) / 1e6


def raw_socket_MBps(nbytes: int) -> float:
    """One loopback TCP connection, 1 MiB sends, a reader thread."""
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]

    def sink():
        c, _ = srv.accept()
        buf = bytearray(1 << 20)
        while c.recv_into(buf):
            pass
        c.close()
    th = threading.Thread(target=sink)
    th.start()
    s = socket.create_connection(("127.0.0.1", port))
    chunk = os.urandom(1 << 20)
    t = time.perf_counter()
    for _ in range(nbytes >> 20):
        s.sendall(chunk)
    s.close()
    th.join()
    srv.close()
    return nbytes / (time.perf_counter() - t) / 1e6


def migrate_once(tmp: Path, threads: int, mib: int = MIB) -> dict:
    tmp.mkdir(parents=True, exist_ok=True)
    agent = tmp / "agent"
    agent.mkdir(exist_ok=True)
    with Server(tmp, extra=["--restore"]) as server, \
            workloads.start("memwork", mib=mib, dirty_mib_per_s=0, tmpdir=tmp) as wl:
        raw_read = raw_read_MBps(wl.pid)
        key = write_key(tmp / "client.key")
        env = agent_env(str(agent))
        env["DELTAXFER_ENCODER_THREADS"] = str(threads)
        t0 = time.monotonic()
        proc = start_migrate(wl.pid, server.addr, key, tmp / "report.json", env=env)
        hwm, cpu = 0, 0.0
        while proc.poll() is None:
            try:
                hwm = max(hwm, workloads.peak_rss_mib(proc.pid) or 0)
                st = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
                cpu = (int(st[11]) + int(st[12])) / os.sysconf("SC_CLK_TCK")
            except (OSError, IndexError):
                pass
            time.sleep(0.05)
        m = finish_migrate(proc, tmp / "report.json", t0, 300)
        r = m.report
        if r and r.get("restored_pid"):
            wl.adopt(r["restored_pid"])
        assert m.rc == 0 and r["outcome"] == "migrated", (m.stderr[-2000:], r)
        assert wl.verify(pid=r["restored_pid"], timeout=120)["ok"]
        first = r["rounds"][0]
        gib = first["pages"] * PAGE_SIZE / 2**30
        return {"threads": threads, "mib": mib,
                "round1_MBps": round(first["pages"] * PAGE_SIZE / first["seconds"] / 1e6, 1),
                "raw_read_MBps": round(raw_read, 1),
                "peak_rss_MiB": round(hwm, 1),
                "cpu_s_per_GiB": round(cpu / max(gib, 1e-9), 2),   # whole migration / round 1 size
                "cpu_s": round(cpu, 2), "rounds": len(r["rounds"]),
                "round1_read_thread_s": first.get("read_thread_seconds"),
                "round1_s": first["seconds"], "downtime": r["downtime"]}


def measure(tmp: Path) -> dict:
    out = {"raw_socket_MBps": round(raw_socket_MBps(2 << 30), 1)}
    for threads in (1, 2):
        out[f"threads={threads}"] = migrate_once(tmp / f"t{threads}", threads)
    return out


@pytest.mark.criu
@pytest.mark.parametrize("threads", [1, 2])
def bench_first_round(benchmark, tmp_path, threads):
    res = {}
    benchmark.pedantic(lambda: res.update(migrate_once(tmp_path, threads)), rounds=1)
    benchmark.extra_info.update(res)
    print(json.dumps(res))


if __name__ == "__main__":
    import tempfile
    with tempfile.TemporaryDirectory(prefix="dxb-stream-") as d:
        print(json.dumps(measure(Path(d)), indent=1))
