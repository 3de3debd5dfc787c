"""How the page pipeline scales with cores: one live round's encode (hash, compare with
what the destination holds, XOR delta against the previous version, lz4 frames) over a
mixed-page memory image, split into N disjoint slices encoded by N threads at once (the
core releases the GIL). Reports GB/s of memory scanned and the ratio to 1 thread, with a
memcpy of the same buffer in the same run as the baseline.

    python bench/scale_pipeline.py --mib 4096 --threads 1,2,4,8 [--json OUT]

The memory: per page, like memwork's mix: ~40 % random, ~20 % zero, ~25 % text-like,
~10 % sparse, ~5 % absent; 12 % of the pages changed since the previous version (a few
words rewritten each), so that about 1/8 of the pages go out as XOR deltas.
Not a pytest benchmark: it is the scale run for a machine with many cores (issue 6).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from array import array
from concurrent.futures import ThreadPoolExecutor

from deltaxfer import _core

PAGE = 4096


def make_memory(mib: int, seed: int = 1) -> tuple[bytearray, bytearray, array]:
    n = mib * 256
    rng = random.Random(seed)
    old = bytearray(n * PAGE)
    rand_block = rng.randbytes(64 * PAGE)
    text = (b"deltaxfer page %08d: the quick brown fox jumps over the lazy dog\n" * 64)
    for i in range(n):
        k = rng.random()
        at = i * PAGE
        if k < 0.40:
            j = (i * 7919) % 63
            old[at:at + PAGE] = rand_block[j * PAGE:(j + 1) * PAGE]
            old[at:at + 8] = i.to_bytes(8, "little")
        elif k < 0.60:
            pass                                   # zero
        elif k < 0.85:
            old[at:at + PAGE] = (text % tuple([i] * 64))[:PAGE]
        else:
            old[at + (i % 500) * 8:at + (i % 500) * 8 + 8] = (i | 1).to_bytes(8, "little")
    new = bytearray(old)
    for i in rng.sample(range(n), n * 12 // 100):
        for w in range(8):
            off = i * PAGE + ((w * 509 + i) % 512) * 8
            new[off:off + 8] = rng.getrandbits(64).to_bytes(8, "little")
    vaddrs = array("Q", range(0x7f0000000000, 0x7f0000000000 + n * PAGE, PAGE))
    return old, new, vaddrs


def encode_slices(new, vaddrs, prev_hashes, old, threads: int) -> float:
    n = len(vaddrs)
    cuts = [n * k // threads for k in range(threads + 1)]
    mv_new, mv_old = memoryview(new), memoryview(old)

    def one(a, b):
        return _core.encode_round(mv_new[a * PAGE:b * PAGE], vaddrs[a:b], vaddrs[a:b],
                                  prev_hashes[a:b], mv_old[a * PAGE:b * PAGE])[2]

    with ThreadPoolExecutor(threads) as pool:
        t = time.perf_counter()
        stats = list(pool.map(lambda ab: one(*ab), zip(cuts, cuts[1:])))
        dt = time.perf_counter() - t
    assert sum(s["scanned"] for s in stats) == n
    return dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--threads", default="1,2,4,8")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()
    t0 = time.perf_counter()
    old, new, vaddrs = make_memory(args.mib)
    prev_hashes, _, _ = _core.hash_pages(old)
    built = time.perf_counter() - t0
    nbytes = len(new)
    dst = bytearray(nbytes)
    memcpy = []
    for _ in range(args.reps):
        t = time.perf_counter()
        dst[:] = new
        memcpy.append(time.perf_counter() - t)
    out = {"mib": args.mib, "cpus": os.cpu_count(), "build_s": round(built, 2),
           "memcpy_GBps": nbytes / statistics.median(memcpy) / 1e9, "threads": {}}
    for th in [int(x) for x in args.threads.split(",")]:
        times = [encode_slices(new, vaddrs, prev_hashes, old, th) for _ in range(args.reps)]
        gbps = nbytes / statistics.median(times) / 1e9
        out["threads"][th] = {"GBps": gbps, "runs_s": [round(x, 4) for x in times]}
    base = out["threads"][min(out["threads"])]["GBps"]
    for th, r in out["threads"].items():
        r["x_1_thread"] = r["GBps"] / base
        r["x_memcpy_1core"] = r["GBps"] / out["memcpy_GBps"]
    print(json.dumps(out, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
