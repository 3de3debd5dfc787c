"""Throughput of the page core against memcpy of the same buffers, in the same run.

Run:   .venv/bin/pytest bench -p no:cacheprovider --benchmark-only
Smoke: .venv/bin/pytest bench --benchmark-disable   (small sizes, each case once)
The summary table (GB/s, ratio to memcpy, targets) is printed at the end and written to
.benchmarks/core-summary.json.
"""
import bisect
import os
import random
import resource
import subprocess
import sys
import time
from array import array
from concurrent.futures import ThreadPoolExecutor

import pytest

from deltaxfer import _core
from deltaxfer.core import RoundState, encode_round

PAGE = 4096
ROUNDS = 7


def pedantic(benchmark, fn, *args, setup=None, rounds=ROUNDS):
    if setup is not None:
        return benchmark.pedantic(fn, setup=setup, rounds=rounds, warmup_rounds=1)
    return benchmark.pedantic(fn, args=args, rounds=rounds, warmup_rounds=1)


@pytest.fixture(scope="session")
def synthetic(sizes):
    n = sizes["synthetic"]
    zero = bytearray(n)
    _core.memcpy_bench(zero, bytes(n))     # written zeros, as CRIU finds them, not calloc's
    return {"zero": zero, "random": bytearray(os.urandom(n))}


def source(kind, synthetic, request):
    if kind == "real":
        return request.getfixturevalue("real_dumps").new_pages
    return synthetic[kind]


# -- hashing ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["zero", "random", "real"])
def bench_memcpy(benchmark, report, synthetic, request, kind):
    src = source(kind, synthetic, request)
    dst = bytearray(len(src))
    _core.memcpy_bench(dst, src)
    pedantic(benchmark, _core.memcpy_bench, dst, src)
    assert dst == src
    report(f"memcpy {kind}", len(src))


@pytest.mark.parametrize("kind", ["zero", "random", "real"])
def bench_hash_zero_compare(benchmark, report, synthetic, request, kind):
    """One pass: XXH3 of every page, zero flag, compare with the previous hashes."""
    pages = source(kind, synthetic, request)
    n = len(pages) // PAGE
    prev = array("Q", bytes(8 * n))
    if kind == "real":
        d = request.getfixturevalue("real_dumps")
        old_hashes = dict(zip(d.old_vaddrs, _core.hash_pages(d.old_pages)[0]))
        prev = array("Q", (old_hashes.get(v, 0) for v in d.new_vaddrs))
    hashes, zero, changed = pedantic(benchmark, _core.hash_pages, pages, prev)
    assert len(hashes) == n
    if kind == "zero":
        assert sum(zero) == n
    report(f"hash+zero+compare {kind}", len(pages), changed_fraction=len(changed) / n)


# -- xor deltas ---------------------------------------------------------------------------

@pytest.fixture(scope="session")
def changed_real_pages(real_dumps):
    """(old, new) versions of the pages that differ between the two dumps, back to back."""
    d = real_dumps
    old_index = {v: i for i, v in enumerate(d.old_vaddrs)}
    old_mv, new_mv = memoryview(d.old_pages), memoryview(d.new_pages)
    old, new = bytearray(), bytearray()
    for j, v in enumerate(d.new_vaddrs):
        i = old_index.get(v)
        if i is None:
            continue
        a, b = old_mv[i * PAGE:(i + 1) * PAGE], new_mv[j * PAGE:(j + 1) * PAGE]
        if a != b:
            old += a
            new += b
    return old, new


@pytest.fixture(scope="session")
def sparse_synthetic_pages(sizes):
    rng = random.Random(7)
    n = max(16, sizes["synthetic"] // 4 // PAGE)
    old = bytearray(rng.randbytes(n * PAGE))
    new = bytearray(old)
    for i in range(n):                      # a few words change, as in a struct update
        for _ in range(4):
            off = i * PAGE + rng.randrange(0, PAGE - 8, 8)
            new[off:off + 8] = rng.randbytes(8)
    return old, new


def _xor_pair(kind, request):
    fixture = "changed_real_pages" if kind == "real" else "sparse_synthetic_pages"
    return request.getfixturevalue(fixture)


NAMES = {"real": "real changed pages", "sparse": "sparse synthetic"}


@pytest.mark.parametrize("kind", ["real", "sparse"])
def bench_xor_encode(benchmark, report, request, kind):
    old, new = _xor_pair(kind, request)
    deltas, lengths = pedantic(benchmark, _core.xor_encode_pages, old, new)
    n = len(lengths)
    fits = [x for x in lengths if x > 0]
    assert n == len(new) // PAGE
    report(f"xor encode {NAMES[kind]}", len(new), pages=n,
           fit_fraction=len(fits) / max(n, 1),
           mean_delta_bytes=sum(fits) / max(len(fits), 1))


@pytest.mark.parametrize("kind", ["real", "sparse"])
def bench_xor_decode(benchmark, report, request, kind):
    old, new = _xor_pair(kind, request)
    deltas, lengths = _core.xor_encode_pages(old, new)

    def setup():
        return (bytearray(old), deltas, lengths), {}

    benchmark.pedantic(_core.xor_decode_pages, setup=setup, rounds=ROUNDS, warmup_rounds=1)
    check = bytearray(old)
    _core.xor_decode_pages(check, deltas, lengths)
    decoded = [i for i, x in enumerate(lengths) if x > 0]
    assert all(check[i * PAGE:(i + 1) * PAGE] == new[i * PAGE:(i + 1) * PAGE] for i in decoded)
    report(f"xor decode {NAMES[kind]}", len(decoded) * PAGE, pages=len(decoded))


# -- the round pipeline over two real dumps ---------------------------------------------

@pytest.fixture(scope="session")
def real_round(real_dumps):
    d = real_dumps
    return d, RoundState.of(d.old_pages, d.old_vaddrs)


def bench_pipeline_real_1_thread(benchmark, report, real_round):
    d, prev = real_round
    r = pedantic(benchmark, lambda: encode_round(d.new_pages, d.new_vaddrs, prev,
                                                 base_pages=d.old_pages))
    whole = encode_round(d.new_pages, d.new_vaddrs, prev, base_pages=d.old_pages, xor=False)
    dest = bytearray(len(d.new_pages))
    s = r.stats
    changed_bytes = (s.changed + s.added) * PAGE
    assert s.scanned == len(d.new_vaddrs)
    report("pipeline real 1 thread", len(d.new_pages),
           pages=s.scanned, changed_fraction=(s.changed + s.added) / s.scanned,
           zero_fraction=s.zero / s.scanned, sent_xor=s.sent_xor, sent_full=s.sent_full,
           sent_zero=s.sent_zero, wire_bytes=s.stored_bytes,
           wire_bytes_without_xor=whole.stats.stored_bytes,
           changed_over_wire=changed_bytes / s.stored_bytes,
           image_over_wire=len(d.new_pages) / s.stored_bytes)
    del dest


def _halves(d, prev):
    n = len(d.new_vaddrs)
    mid = d.new_vaddrs[n // 2]
    k = bisect.bisect_left(prev.vaddrs, mid)
    new_mv, old_mv = memoryview(d.new_pages), memoryview(d.old_pages)
    nv = memoryview(d.new_vaddrs)
    out = []
    for (a, b), (c, e) in (((0, n // 2), (0, k)), ((n // 2, n), (k, len(prev.vaddrs)))):
        out.append((new_mv[a * PAGE:b * PAGE], nv[a:b],
                    RoundState(prev.vaddrs[c:e], prev.hashes[c:e]), old_mv[c * PAGE:e * PAGE]))
    return out


def bench_pipeline_real_2_threads(benchmark, report, real_round):
    d, prev = real_round
    halves = _halves(d, prev)
    with ThreadPoolExecutor(2) as pool:
        def run():
            futures = [pool.submit(encode_round, p, v, s, base_pages=b) for p, v, s, b in halves]
            return [f.result() for f in futures]

        results = pedantic(benchmark, run)
        # CPU seconds per wall second over a few more runs: near 2 when both threads run
        # at once (the GIL is released), at most 1 if they were serialized
        cpu0, wall0 = _cpu_seconds(), time.perf_counter()
        for _ in range(5):
            run()
        overlap = (_cpu_seconds() - cpu0) / (time.perf_counter() - wall0)
    one = encode_round(d.new_pages, d.new_vaddrs, prev, base_pages=d.old_pages)
    assert sum(r.stats.changed for r in results) == one.stats.changed
    report("pipeline real 2 threads", len(d.new_pages), cpu_per_wall=overlap)


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def bench_pipeline_round_trip_check(real_round):
    """Not timed: the frames of the real round rebuild the new dump from the old one."""
    from deltaxfer.core import apply_to_dict

    d, prev = real_round
    r = encode_round(d.new_pages, d.new_vaddrs, prev, base_pages=d.old_pages)
    store = {v: bytearray(d.old_pages[i * PAGE:(i + 1) * PAGE])
             for i, v in enumerate(d.old_vaddrs)}
    apply_to_dict(r.frames, store)
    new_mv = memoryview(d.new_pages)
    assert all(store[v] == new_mv[j * PAGE:(j + 1) * PAGE] for j, v in enumerate(d.new_vaddrs))


# -- process_vm_readv --------------------------------------------------------------------

CHILD = r"""
import ctypes, mmap, os, sys
n = int(sys.argv[1])
m = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
chunk = os.urandom(1 << 20)
for off in range(0, n, 1 << 20):
    m[off:off + (1 << 20)] = chunk[:n - off]
print(ctypes.addressof(ctypes.c_char.from_buffer(m)), flush=True)
sys.stdin.read()
"""


@pytest.fixture(scope="module")
def memory_child(sizes):
    n = sizes["procmem"]
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(n)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    addr = int(proc.stdout.readline())
    yield proc.pid, addr, n
    proc.kill()
    proc.wait()


def bench_memcpy_procmem(benchmark, report, memory_child):
    _, _, n = memory_child
    src, dst = bytearray(os.urandom(n)), bytearray(n)
    pedantic(benchmark, _core.memcpy_bench, dst, src)
    report("memcpy procmem", n)


def bench_process_vm_readv(benchmark, report, memory_child):
    pid, addr, n = memory_child
    run = 64 * PAGE                          # 256 KiB runs, as pagemap runs come
    run_v = array("Q", range(addr, addr + n, run))
    run_l = array("Q", [run] * len(run_v))
    buf = bytearray(n)
    failed, nfailed = pedantic(benchmark, _core.read_process_memory, pid, run_v, run_l, buf)
    assert failed == [] and nfailed == 0
    report("process_vm_readv", n, runs=len(run_v))


def bench_process_vm_readv_2_threads(benchmark, report, memory_child):
    """Two threads, each reading half of the runs into its half of the buffer."""
    pid, addr, n = memory_child
    run = 64 * PAGE
    buf = bytearray(n)
    half = n // 2
    parts = [(array("Q", range(addr + k * half, addr + (k + 1) * half, run)),
              memoryview(buf)[k * half:(k + 1) * half]) for k in (0, 1)]
    with ThreadPoolExecutor(2) as pool:
        def run_both():
            futures = [pool.submit(_core.read_process_memory, pid, v, array("Q", [run] * len(v)), b)
                       for v, b in parts]
            return [f.result() for f in futures]

        results = pedantic(benchmark, run_both)
    assert all(r == ([], 0) for r in results)
    report("process_vm_readv 2 threads", n)
