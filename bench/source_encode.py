"""What the source spends reading and encoding a live process's memory, the first round's
work without the link: a memwork of --mib MiB (its page mix: random, zero, text-like,
sparse; not dirtying), snapshotted as `deltaxfer migrate` does (live.snapshot_tree), every
window read (process_vm_readv) and encoded (zero check, XXH3, lz4 frames with the PAGES
index) on the EncoderPool's threads, as many windows in flight as the sender keeps; the
frames are dropped instead of sent. CPU is this process's, per GiB of the workload.

--src alternates this checkout's EncoderPool ("this") with other checkouts' (built
in place: `python setup.py build_ext --inplace` there), as "src:N".

    python bench/source_encode.py --mib 1024 [--reps 5] [--cycles 3] [--threads N]
        [--src OTHER_CHECKOUT/src,...]
    # one JSON line per code and cycle
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import workloads  # noqa: E402  (builds memwork when it is missing)

_CHILD = r"""
import json, os, sys, time
from deltaxfer import _core, live, source
from deltaxfer.core import procmem
pid, reps, mode, threads = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
pool = source.EncoderPool(threads=threads or None)
task = procmem.Task(host_pid=pid, ns_pid=pid)
runs = []
for _ in range(reps):
    snap = live.snapshot_tree([task])
    c0, t0, out, size, futs = time.process_time(), time.perf_counter(), 0, 0, []
    for img in snap.images:
        n, w = len(img.vaddrs), pool.window_pages
        size += n * 4096
        for lo in range(0, n, w):
            futs.append(pool.pool.submit(pool.encode, img, None, lo, min(n, lo + w),
                                         xor=True, compress=True, pages_index=0))
            if len(futs) >= pool.inflight:
                out += len(futs.pop(0).result()[0])
    out += sum(len(f.result()[0]) for f in futs)
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    for img in snap.images:
        img.close()
    runs.append({"cpu_s_per_GiB": round(cpu / (size / 2**30), 3),
                 "GBps": round(size / wall / 1e9, 3), "out_MB": round(out / 1e6, 1)})
pool.close()
print(json.dumps({"mode": mode, "threads": pool.threads, "runs": runs}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=5, help="reads of the whole process per child")
    ap.add_argument("--cycles", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="encoder threads (0: cores)")
    ap.add_argument("--src", default="", help="other checkouts' src dirs (built), alternated")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        result = os.path.join(d, "result")
        work = subprocess.Popen([str(workloads.build("memwork")), "--mib", str(args.mib),
                                 "--result", result, "--dirty-mib-per-s", "0"])
        try:
            deadline = time.monotonic() + 120
            while not (os.path.exists(result) and open(result).read().startswith("READY")):
                if work.poll() is not None or time.monotonic() > deadline:
                    sys.exit("memwork did not become READY")
                time.sleep(0.05)
            runs = [("this", str(ROOT / "src"))]
            runs += [(f"src:{i}", s) for i, s in enumerate(filter(None, args.src.split(",")))]
            for _ in range(args.cycles):
                for mode, src in runs:
                    r = subprocess.run([sys.executable, "-c", _CHILD, str(work.pid),
                                        str(args.reps), mode, str(args.threads)],
                                       capture_output=True, text=True, timeout=600,
                                       env=dict(os.environ, PYTHONPATH=src))
                    if r.returncode:
                        sys.exit(r.stderr)
                    row = json.loads(r.stdout)
                    row.update(mib=args.mib, src=src)
                    print(json.dumps(row), flush=True)
        finally:
            work.kill()
            work.wait()


if __name__ == "__main__":
    main()
