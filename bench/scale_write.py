"""How fast pages reach a file's page cache, and whether threads help: the destination's
ceiling for applying a first round (its frames are decoded on threads, but they all land
in one pages file per memory image). Writes --mib MiB of random pages with pwritev, in
runs of --run pages, into a preallocated file (as store.Round does) on --dir:

  1 thread; N threads on the same file; N threads with a lock around pwritev (as the
  core's applier does), with and without making each run's page-cache pages first
  (posix_fadvise WILLNEED, outside the lock); N threads on N files; 1 / N threads on
  /dev/shm.

Prints GB/s and CPU seconds per GiB for each (JSON with --json). Not a pytest benchmark:
the scale run for a machine with many cores (bench/device-scale.sh).

    python bench/scale_write.py --mib 4096 --threads 8 [--run 256] [--dir /tmp]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

PAGE = 4096


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def one(directory: str, mib: int, threads: int, run_pages: int, files: int, lock: bool,
        buf: bytes, prefault: bool = False) -> dict:
    n_pages = mib * 256
    paths, fds = [], []
    per_file = n_pages // files
    for i in range(files):
        fd, path = tempfile.mkstemp(dir=directory, prefix="dx-write-")
        os.posix_fallocate(fd, 0, per_file * PAGE)
        paths.append(path)
        fds.append(fd)
    views = [memoryview(buf)[i * PAGE:(i + 1) * PAGE] for i in range(run_pages)]
    guard = threading.Lock() if lock else None
    runs_per_file = per_file // run_pages

    def work(t: int) -> None:
        # thread t writes every threads-th run (interleaved, as frames arrive)
        for f, fd in enumerate(fds):
            if files > 1 and f % threads != t:
                continue
            step = threads if files == 1 else 1
            start = t if files == 1 else 0
            for r in range(start, runs_per_file, step):
                if prefault:    # the page cache's pages made outside the lock
                    os.posix_fadvise(fd, r * run_pages * PAGE, run_pages * PAGE,
                                     os.POSIX_FADV_WILLNEED)
                if guard is not None:
                    with guard:
                        os.pwritev(fd, views, r * run_pages * PAGE)
                else:
                    os.pwritev(fd, views, r * run_pages * PAGE)

    c0, t0 = _cpu(), time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(work, range(threads)))
    wall, cpu = time.monotonic() - t0, _cpu() - c0
    for fd, path in zip(fds, paths):
        os.close(fd)
        os.unlink(path)
    gib = runs_per_file * files * run_pages * PAGE / 2**30
    return {"threads": threads, "files": files, "lock": lock, "prefault": prefault,
            "run_pages": run_pages,
            "dir": directory, "GBps": round(gib * 2**30 / wall / 1e9, 3),
            "cpu_s_per_GiB": round(cpu / gib, 3), "wall_s": round(wall, 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--run", type=int, default=256)
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--json")
    args = ap.parse_args()
    buf = os.urandom(args.run * PAGE)
    n = args.threads
    # (dir, threads, run, files, lock, prefault); memory freed by a case may be cold for
    # the next (a VM whose host takes freed memory back), so the order alternates
    cases = [(args.dir, 1, args.run, 1, False, False), (args.dir, 1, args.run, 1, False, True),
             (args.dir, n, args.run, 1, False, False), (args.dir, n, args.run, 1, True, True),
             (args.dir, n, args.run, 1, True, False), (args.dir, 1, 4, 1, False, False),
             (args.dir, n, args.run, n, False, False)]
    if os.path.isdir("/dev/shm"):
        cases += [("/dev/shm", 1, args.run, 1, False, False),
                  ("/dev/shm", n, args.run, 1, False, False)]
    out = []
    for d, threads, run, files, lock, prefault in cases:
        os.sync()
        r = one(d, args.mib, threads, run, files, lock, buf, prefault)
        out.append(r)
        print(json.dumps(r), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
