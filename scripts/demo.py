#!/usr/bin/env python3
"""`make demo`: checkpoint a running workload with CRIU, rebuild its image directory with
deltaxfer, restore it from the rebuilt directory, and have the restored process verify
every page of its own memory.

The workload runs in its own PID namespace, so the restored copy can coexist with the
frozen original (one machine plays both hosts, as DESIGN.md describes). Later issues turn
this into a live migration between two network-namespace hosts.
"""
import argparse
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

import workloads  # noqa: E402  (the self-checking workloads of the test suite)

from deltaxfer.criu.dumpdir import rewrite  # noqa: E402
from deltaxfer.criu.runner import CriuError, find_criu  # noqa: E402
from deltaxfer.inspection import inspect_dump, render_inspect  # noqa: E402


def step(msg):
    print(f"\n== {msg}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=256, help="workload memory (default 256 MiB)")
    ap.add_argument("--keep", action="store_true", help="keep the image directories")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("demo: run as root (criu dump/restore need it)", file=sys.stderr)
        return 2
    try:
        criu = find_criu()
    except CriuError as e:
        print(f"demo: {e}", file=sys.stderr)
        return 2
    print(f"criu {criu.version_str} ({criu.origin}: {criu.path})")

    work = tempfile.mkdtemp(prefix="deltaxfer-demo-")
    dump_dir, rebuilt = os.path.join(work, "dump"), os.path.join(work, "rebuilt")
    os.mkdir(dump_dir)
    wl = workloads.start("memwork", mib=args.mib, dirty_mib_per_s=4, tmpdir=work)
    try:
        step(f"workload: memwork, {args.mib} MiB of mixed pages, dirtying 4 MiB/s, pid {wl.pid}")
        first = wl.verify()
        print(f"self-check before checkpoint: {'OK' if first['ok'] else 'BAD'} {first}")

        step("criu dump --leave-stopped (the original stays frozen, as a migration source would)")
        t0 = time.monotonic()
        criu.dump(wl.pid, dump_dir, leave="stopped")
        t_dump = time.monotonic() - t0
        print(f"dumped in {t_dump:.2f} s into {dump_dir}")

        step("deltaxfer inspect")
        sys.stdout.write(render_inspect(inspect_dump(dump_dir)))

        step("deltaxfer rewrite: new pagemaps (coalesced, fresh pages_id) and pages files")
        t0 = time.monotonic()
        rep = rewrite(dump_dir, rebuilt)
        print(f"{rep.pagemaps} pagemap(s): {rep.entries_before} -> {rep.entries_after} entries, "
              f"{rep.pages} pages ({rep.bytes / 2**20:.1f} MiB) in {time.monotonic() - t0:.2f} s")

        step("criu restore -d from the rebuilt directory (a new PID namespace)")
        t0 = time.monotonic()
        pid = criu.restore(rebuilt)
        wl.adopt(pid)
        print(f"restored as pid {pid} in {time.monotonic() - t0:.2f} s")

        step("the restored process verifies every page of its memory")
        time.sleep(0.5)  # let it dirty some pages after the restore
        res = wl.verify(pid=pid)
        print(f"self-check after restore: {'OK' if res['ok'] else 'BAD'} {res}")
        if not res["ok"]:
            return 1
        print("\ndemo: the process was checkpointed, rebuilt by deltaxfer and restored intact")
        return 0
    finally:
        wl.kill()
        if args.keep:
            print(f"(kept {work})")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
