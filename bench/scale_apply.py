"""How the destination's apply scales with threads: a first round's frames (memwork's page
mix, encoded once) applied to a preallocated pages file by _core.ApplyPool with N C
threads (1 = PageApplier.apply on the caller's thread, as a 2-core serve does), the
frames submitted as the receiver submits them, at most --inflight-mib in flight.
Reports GB/s of process memory and CPU seconds per GiB, with a 1-thread pwritev of the
same bytes' non-zero pages in the same run as the baseline (the page cache's own speed).

    python bench/scale_apply.py --mib 2048 --threads 1,2,4,8 [--dir /tmp] [--json OUT]

Not a pytest benchmark: the scale run for a machine with many cores (device-scale.sh).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import select
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale_pipeline import make_memory  # noqa: E402  (memwork's page mix)

from deltaxfer import _core  # noqa: E402
from deltaxfer.core.pipeline import split_frames  # noqa: E402

PAGE = 4096


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def apply_once(directory: str, vaddrs, frames: list, threads: int, inflight: int) -> dict:
    fd, path = tempfile.mkstemp(dir=directory, prefix="dx-apply-")
    try:
        os.posix_fallocate(fd, 0, len(vaddrs) * PAGE)
        applier = _core.PageApplier(vaddrs, fd, _core.APPLY_AT_INDEX)
        c0, t0 = _cpu(), time.monotonic()
        if threads == 1:
            for f in frames:
                applier.apply(f)
        else:
            pool = _core.ApplyPool(threads)
            held = 0
            sizes = {}
            for f in frames:
                while held + len(f) > inflight and sizes:
                    select.select([pool.fd], [], [])
                    for token, res in pool.done():
                        if isinstance(res, BaseException):
                            raise res
                        held -= sizes.pop(token)
                token = pool.submit(applier, f)
                sizes[token] = len(f)
                held += len(f)
            while sizes:
                select.select([pool.fd], [], [])
                for token, res in pool.done():
                    if isinstance(res, BaseException):
                        raise res
                    sizes.pop(token)
            pool.close()
        hashes, missing = applier.finish()
        wall, cpu = time.monotonic() - t0, _cpu() - c0
        applier.close()
        assert missing == 0, missing
    finally:
        os.close(fd)
        os.unlink(path)
    gib = len(vaddrs) * PAGE / 2**30
    return {"threads": threads, "GBps": round(len(vaddrs) * PAGE / wall / 1e9, 3),
            "cpu_s_per_GiB": round(cpu / gib, 3), "wall_s": round(wall, 3)}


def pwritev_baseline(directory: str, pages: bytes, n_pages: int) -> dict:
    """The same number of bytes written with one thread, 1 MiB per pwritev."""
    fd, path = tempfile.mkstemp(dir=directory, prefix="dx-apply-base-")
    try:
        os.posix_fallocate(fd, 0, n_pages * PAGE)
        mv = memoryview(pages)
        t0 = time.monotonic()
        for off in range(0, n_pages * PAGE, 1 << 20):
            os.pwrite(fd, mv[off:off + (1 << 20)], off)
        wall = time.monotonic() - t0
    finally:
        os.close(fd)
        os.unlink(path)
    return {"GBps": round(n_pages * PAGE / wall / 1e9, 3), "wall_s": round(wall, 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--threads", default="1,2,4,8")
    ap.add_argument("--inflight-mib", type=int, default=16)
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--json")
    args = ap.parse_args()
    old, _, vaddrs = make_memory(args.mib)
    frames, _, stats = _core.encode_round(old, vaddrs)
    parts = split_frames(frames)
    out = {"mib": args.mib, "frames": len(parts), "wire_bytes": len(frames), "runs": []}
    # (once first: the memory a page cache takes may be cold on a VM whose host takes
    # freed memory back; the runs then reuse what this one freed)
    pwritev_baseline(args.dir, old, len(vaddrs))
    out["pwritev_1_thread"] = pwritev_baseline(args.dir, old, len(vaddrs))
    print(json.dumps(out["pwritev_1_thread"]), flush=True)
    for t in (int(x) for x in args.threads.split(",")):
        r = apply_once(args.dir, vaddrs, parts, t, args.inflight_mib << 20)
        r["x_pwritev"] = round(r["GBps"] / out["pwritev_1_thread"]["GBps"], 3)
        out["runs"].append(r)
        print(json.dumps(r), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
