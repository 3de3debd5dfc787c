"""Transport throughput on loopback: 1 MiB PAGES frames through deltaxfer.transport (uvloop
and asyncio) against a raw blocking-socket pair (sendall / recv_into of the same bytes)
measured in the same run. Sender and receiver run in separate processes so that each
side's CPU time is its own; CPU is reported in seconds per GB moved.

Under --benchmark-disable (the smoke run of the test suite) each transfer is 16 MiB; in a
benchmark run it is 1 GiB. The summary table is printed at the end of the session and
written to .benchmarks/transport-summary.json.
"""
import asyncio
import json
import multiprocessing
import os
import socket
import statistics
import time
from pathlib import Path

import pytest

from deltaxfer import transport
from deltaxfer.wire import MsgType, encode_pages

MiB = 1 << 20
FRAME = MiB                          # PAGES payload: u32 index + a 1 MiB - 4 frame
KEY = b"bench key " * 4
TARGET_RATIO = 0.9                   # transport GB/s >= 0.9 x raw
_RESULTS: dict[str, dict] = {}
_CTX = multiprocessing.get_context("fork")


def _cpu() -> float:
    return time.process_time()


# -- raw blocking sockets --------------------------------------------------------------------

def _raw_receiver(listener: socket.socket, total: int, out):
    conn, _ = listener.accept()
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, transport.SOCKET_BUFFER)
    buf = bytearray(FRAME)
    view = memoryview(buf)
    got = 0
    cpu0 = None
    while got < total:
        n = conn.recv_into(view)
        if not n:
            raise RuntimeError("raw sender closed early")
        if cpu0 is None:
            cpu0 = _cpu()
        got += n
    cpu = _cpu() - cpu0
    conn.sendall(b"k")
    conn.close()
    out.send({"cpu": cpu})


def _raw_sender(port: int, total: int, out):
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, transport.SOCKET_BUFFER)
    block = os.urandom(FRAME)
    t0, cpu0 = time.perf_counter(), _cpu()
    for _ in range(total // FRAME):
        s.sendall(block)
    if s.recv(1) != b"k":
        raise RuntimeError("raw receiver did not acknowledge")
    out.send({"wall": time.perf_counter() - t0, "cpu": _cpu() - cpu0})
    s.close()


def raw_transfer(total: int) -> dict:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    rx_r, rx_w = _CTX.Pipe(False)
    tx_r, tx_w = _CTX.Pipe(False)
    receiver = _CTX.Process(target=_raw_receiver, args=(listener, total, rx_w))
    receiver.start()
    sender = _CTX.Process(target=_raw_sender, args=(port, total, tx_w))
    sender.start()
    result = _collect(sender, receiver, tx_r, rx_r)
    listener.close()
    return result


# -- deltaxfer.transport -------------------------------------------------------------------------

def _tx_receiver(kind: str, total: int, port_out, out):
    async def main():
        done = asyncio.get_running_loop().create_future()

        async def handler(conn):
            got, cpu0 = 0, None
            while got < total:
                m = await conn.recv()                   # decoded and checksum-verified
                if cpu0 is None:
                    cpu0 = _cpu()
                got += len(m.payload)
            cpu = _cpu() - cpu0
            await conn.send_control(MsgType.ROUND_OK, {"round": 0, "pages": 0, "bytes": got})
            await conn.recv()                           # CLOSE
            done.set_result({"cpu": cpu})

        server = await transport.serve("127.0.0.1", 0, key=KEY, handler=handler)
        port_out.send(server.sockets[0].getsockname()[1])
        result = await done
        server.close()
        return result
    out.send(transport.run(main(), loop=kind))


def _tx_sender(kind: str, port: int, total: int, out, offload):
    transport.HASH_OFFLOAD = offload          # this process only (forked)

    async def main():
        conn = await transport.connect("127.0.0.1", port, key=KEY)
        payload = bytes(encode_pages(0, os.urandom(FRAME - 4)))
        t0, cpu0 = time.perf_counter(), _cpu()
        for _ in range(total // FRAME):
            await conn.send(MsgType.PAGES, payload)
        ok = await conn.recv_control(MsgType.ROUND_OK)
        wall, cpu = time.perf_counter() - t0, _cpu() - cpu0
        if ok["bytes"] != total:
            raise RuntimeError(f"receiver got {ok['bytes']} of {total} bytes")
        await conn.goodbye()
        return {"wall": wall, "cpu": cpu}
    out.send(transport.run(main(), loop=kind))


def transport_transfer(kind: str, total: int, offload=None) -> dict:
    port_r, port_w = _CTX.Pipe(False)
    rx_r, rx_w = _CTX.Pipe(False)
    tx_r, tx_w = _CTX.Pipe(False)
    receiver = _CTX.Process(target=_tx_receiver, args=(kind, total, port_w, rx_w))
    receiver.start()
    if not port_r.poll(30):
        receiver.kill()
        raise RuntimeError("transport receiver did not start")
    port = port_r.recv()
    sender = _CTX.Process(target=_tx_sender, args=(kind, port, total, tx_w, offload))
    sender.start()
    return _collect(sender, receiver, tx_r, rx_r)


def _collect(sender, receiver, tx_r, rx_r) -> dict:
    try:
        for pipe, proc in ((tx_r, sender), (rx_r, receiver)):
            if not pipe.poll(120):
                raise RuntimeError(f"{proc.name} gave no result (exit code {proc.exitcode})")
        tx, rx = tx_r.recv(), rx_r.recv()
    finally:
        for p in (sender, receiver):
            p.join(10)
            if p.is_alive():
                p.kill()
    return {"wall": tx["wall"], "tx_cpu": tx["cpu"], "rx_cpu": rx["cpu"]}


# -- the benchmarks ----------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def transfer_bytes(request) -> int:
    return 16 * MiB if request.config.getoption("benchmark_disable") else 1024 * MiB


class _Summary:
    """Registered as a plugin for the session: prints the table at the end."""

    def pytest_terminal_summary(self, terminalreporter):
        if not _RESULTS:
            return
        tr = terminalreporter
        tr.section("deltaxfer transport: loopback, 1 MiB frames, separate sender/receiver "
                   "processes (median of rounds)")
        tr.write_line(f"{'variant':26} {'GB/s':>7} {'x raw':>7} {'tx CPU s/GB':>12} "
                      f"{'rx CPU s/GB':>12}  target")
        raw = _RESULTS.get("raw sockets")
        for name, r in _RESULTS.items():
            ratio = r["gbps"] / raw["gbps"] if raw else float("nan")
            r["ratio_to_raw"] = ratio
            target = "" if name == "raw sockets" else (
                f">= {TARGET_RATIO} x raw: {'yes' if ratio >= TARGET_RATIO else 'NO'}")
            tr.write_line(f"{name:26} {r['gbps']:7.2f} {ratio:7.2f} {r['tx_cpu_s_per_gb']:12.3f} "
                          f"{r['rx_cpu_s_per_gb']:12.3f}  {target}")
        out = Path(tr.config.rootpath) / ".benchmarks" / "transport-summary.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"results": _RESULTS, "cpus": os.cpu_count(),
                                   "hash_offload_default": transport.HASH_OFFLOAD}, indent=2))
        tr.write_line(f"summary written to {out}")


@pytest.fixture(scope="session", autouse=True)
def _summary_plugin(request):
    plugin = _Summary()
    request.config.pluginmanager.register(plugin, "deltaxfer-transport-summary")
    yield


def _measure(benchmark, name, total, fn):
    runs = []

    def one():
        runs.append(fn())
    disabled = benchmark.disabled
    benchmark.pedantic(one, rounds=1 if disabled else 3, iterations=1, warmup_rounds=0)
    if disabled:
        return runs[0]
    wall = statistics.median(r["wall"] for r in runs)
    gb = total / 1e9
    _RESULTS[name] = {
        "bytes": total, "median_s": wall, "gbps": gb / wall,
        "tx_cpu_s_per_gb": statistics.median(r["tx_cpu"] for r in runs) / gb,
        "rx_cpu_s_per_gb": statistics.median(r["rx_cpu"] for r in runs) / gb,
        "rounds": len(runs)}
    return runs[0]


def bench_raw_sockets(benchmark, transfer_bytes):
    r = _measure(benchmark, "raw sockets", transfer_bytes, lambda: raw_transfer(transfer_bytes))
    assert r["wall"] > 0


@pytest.mark.parametrize("check", ["inline", "thread"])
@pytest.mark.parametrize("kind", ["uvloop", "asyncio"])
def bench_transport(benchmark, transfer_bytes, kind, check):
    """check: the sender's frame checksums on the event loop's thread, or on worker threads
    (transport.HASH_OFFLOAD; its default depends on the number of CPUs)."""
    offload = None if check == "inline" else 512 << 10
    r = _measure(benchmark, f"transport {kind} {check}", transfer_bytes,
                 lambda: transport_transfer(kind, transfer_bytes, offload))
    assert r["wall"] > 0
