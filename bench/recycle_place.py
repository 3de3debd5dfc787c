"""What deltaxfer's lazy-pages server spends placing a process's pages from the pages
file's page cache into fresh memory, with the file kept (`serve --keep-pages`) and with
each placed 2 MiB block given back (LazyServer.recycle, what serve asks once the copy
runs): the destination of a migration between two hosts, where the copy's memory is
fresh memory. On one VM a migration cannot show it: the source, killed at RESUMED, frees
as much memory a moment before the copy's pages are placed, and the copy reuses that.

Each run, after `drop_caches` and --settle seconds (time for the guest to report the
freed memory to its host, as on a destination whose memory has long been free): a new
file of --mib MiB is written (each page's first 8 bytes its index, the rest a random
MiB), this process maps a fresh anonymous region of that size and registers it with a
userfaultfd, and the compiled lazy-pages server (_core.LazyServer, ext/c/lazy.c) places
every page into it with its background workers, as after a restore's end. CPU is this
process's (the server's threads) from the start of the placement until every page is
in; the region is then checked page by page. Modes alternate (keep, recycle, keep, ...).

    python bench/recycle_place.py --mib 4096 --dir DIR [--reps 2] [--settle 10] [--written-back]
    # one JSON line per run
"""
from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import resource
import struct
import time
from array import array

PAGE = 4096
CHUNK = 1 << 20
PE_LAZY, PE_PRESENT = 1 << 1, 1 << 2
UFFDIO_REGISTER_MODE_MISSING = 1
# _IOWR(0xAA, 0x00, struct uffdio_register {start, len, mode, ioctls}): _core registers
# ranges for write-protect only (tracking); the lazy restore's are for missing pages
UFFDIO_REGISTER = (3 << 30) | (32 << 16) | (0xAA << 8) | 0x00

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _check(rc: int, what: str) -> None:
    if rc < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def userfaultfd_for(addr: int, length: int) -> int:
    """A userfaultfd with [addr, addr+length) of this process registered for missing
    pages (what `criu restore --lazy-pages` hands over for each restored process)."""
    from deltaxfer import _core

    fd = _core.uffd_create(os.O_CLOEXEC | os.O_NONBLOCK)
    _core.uffd_api(fd, 0)
    reg = (ctypes.c_uint64 * 4)(addr, length, UFFDIO_REGISTER_MODE_MISSING, 0)
    _check(_libc.ioctl(fd, UFFDIO_REGISTER, ctypes.byref(reg)), "UFFDIO_REGISTER")
    return fd


def write_pages_file(path: str, mib: int, rnd: bytes) -> None:
    chunk = bytearray(rnd)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for i in range(mib):
            for k in range(CHUNK // PAGE):
                struct.pack_into("<Q", chunk, k * PAGE, i * (CHUNK // PAGE) + k)
            os.pwrite(fd, chunk, i * CHUNK)
    finally:
        os.close(fd)


def drop_caches() -> None:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass                               # not root: the runs are then only warmer


def run(mode: str, mib: int, directory: str, workers: int, settle: float,
        written_back: bool = False) -> dict:
    from deltaxfer import _core

    drop_caches()
    time.sleep(settle)
    size, npages = mib * CHUNK, mib * (CHUNK // PAGE)
    rnd = os.urandom(CHUNK)
    path = os.path.join(directory, f"recycle-place-{os.getpid()}.img")
    c0 = _cpu()
    write_pages_file(path, mib, rnd)
    write_cpu = _cpu() - c0
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    if written_back:                       # as after a slow link: on disk, and clean
        os.fsync(fd)
    region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    anchor = ctypes.c_char.from_buffer(region)
    try:
        addr = ctypes.addressof(anchor)
        with mmap.mmap(fd, size, prot=mmap.PROT_READ) as m:
            hashes, _zero, _ = _core.hash_pages(m)
        uffd = userfaultfd_for(addr, size)
        server = _core.LazyServer(workers, 64, 64)
        try:
            q = lambda *v: array("Q", v)     # noqa: E731
            server.add(uffd, os.getpid(), fd, size, q(addr), q(npages),
                       q(PE_PRESENT | PE_LAZY), q(addr), q(addr + size), None, hashes)
            if mode == "recycle":
                server.recycle()
            c1, t1 = _cpu(), time.monotonic()
            server.prefetch()
            while not server.wait(1.0):
                pass
            c2, t2 = _cpu(), time.monotonic()
            stats = server.stats()
        finally:
            server.close()
        words = memoryview(region).cast("Q")
        bad = sum(1 for p in range(npages) if words[p * (PAGE // 8)] != p)
        step = max(1, npages // 64)
        for p in range(0, npages, step):
            off = (p % (CHUNK // PAGE)) * PAGE
            if region[p * PAGE + 8:(p + 1) * PAGE] != rnd[off + 8:off + PAGE]:
                bad += 1
        del words
    finally:
        del anchor
        region.close()
        os.close(fd)
        os.unlink(path)
    return {"mode": mode, "mib": mib, "workers": workers, "settle_s": settle,
            "written_back": written_back,
            "write_cpu_s": round(write_cpu, 3), "place_cpu_s": round(c2 - c1, 3),
            "place_s": round(t2 - t1, 3),
            "place_cpu_s_per_gib": round((c2 - c1) / (mib / 1024), 3),
            "pages": npages, "pages_recycled": stats["pages_recycled"],
            "pages_recycle_failed": stats["pages_recycle_failed"],
            "punches": stats["punches"], "error": stats["error_what"] or None,
            "bad_pages": bad, "ok": bad == 0 and not stats["error"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, required=True)
    ap.add_argument("--dir", required=True, help="where the pages file is written (removed)")
    ap.add_argument("--reps", type=int, default=2, help="runs of each mode (default 2)")
    ap.add_argument("--settle", type=float, default=10.0,
                    help="seconds after drop_caches before a run (default 10)")
    ap.add_argument("--written-back", action="store_true",
                    help="fsync the file before the placement (its pages on disk and "
                         "clean, as after a slow link; punching them frees disk blocks)")
    ap.add_argument("--workers", type=int, default=0,
                    help="copy threads (0: one per core, at most 8, as the daemon)")
    args = ap.parse_args(argv)
    workers = args.workers or max(1, min(os.cpu_count() or 1, 8))
    ok = True
    for _ in range(args.reps):
        for mode in ("keep", "recycle"):
            res = run(mode, args.mib, args.dir, workers, args.settle, args.written_back)
            ok &= res["ok"]
            print(json.dumps(res), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
