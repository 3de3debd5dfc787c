"""The least a destination spends on memory for a process of --mib MiB: its pages written
into a new file's page cache (what every method's destination does with the pages it
receives: CRIU's page-server and deltaxfer's serve alike) and the same amount of fresh
anonymous memory filled (the restored copy's memory, whoever fills it). Nothing is read
from a network, decoded or checked: a floor, not a migration.

On these VMs the floor is not small: the guest reports free memory to its host
(virtio-balloon free page reporting), and the first write to a page the host took back
costs a host fault, paid as CPU time by whoever writes it. `method memory-floor` of the
migration benchmark runs this in the destination's namespace in the same run as the
migrations, so their destination CPU can be read against it.

    python bench/memory_floor.py --mib 4096 --dir DIR     # prints one JSON line
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import resource
import time

CHUNK = 1 << 20


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, required=True)
    ap.add_argument("--dir", required=True, help="where the file is written (then removed)")
    args = ap.parse_args()
    buf = os.urandom(CHUNK)
    path = os.path.join(args.dir, f"memory-floor-{os.getpid()}.img")
    out = {"mib": args.mib}
    c0, t0 = _cpu(), time.monotonic()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for i in range(args.mib):
            os.pwrite(fd, buf, i * CHUNK)
        c1, t1 = _cpu(), time.monotonic()
        m = mmap.mmap(-1, args.mib * CHUNK, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        for i in range(args.mib):
            m[i * CHUNK:(i + 1) * CHUNK] = buf
        c2, t2 = _cpu(), time.monotonic()
        m.close()
    finally:
        os.close(fd)
        os.unlink(path)
    out.update(page_cache_cpu_s=round(c1 - c0, 4), page_cache_s=round(t1 - t0, 4),
               anon_cpu_s=round(c2 - c1, 4), anon_s=round(t2 - t1, 4))
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
