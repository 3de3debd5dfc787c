#!/usr/bin/env python3
"""`make demo`: live-migrate a running process between two hosts on this machine.

Two network namespaces joined by a veth pair (shaped to 1 Gbit/s with tc tbf) play the
source and the destination host. A self-checking workload (256 MiB of mixed pages,
dirtying 4 MiB/s, in its own PID namespace) runs on the source; `deltaxfer serve`
runs on the destination; `deltaxfer migrate` moves the workload live, and the restored
process verifies every page of its memory. The migration report prints at the end.
"""
import argparse
import json
import os
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

import workloads  # noqa: E402  (the self-checking workloads of the test suite)

from deltaxfer.criu.runner import CriuError, find_criu  # noqa: E402
from lab import TwoHosts  # noqa: E402  (tests/lab.py)

PORT = 7411


def step(msg):
    print(f"\n== {msg}", flush=True)


def wait_listening(proc, timeout=30):
    buf, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        r, _, _ = select.select([proc.stderr], [], [], 0.2)
        if r:
            chunk = os.read(proc.stderr.fileno(), 65536)
            if not chunk:
                break
            buf += chunk
            if re.search(rb"listening on", buf):
                return
    raise RuntimeError(f"deltaxfer serve did not start: {buf.decode(errors='replace')}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=256, help="workload memory (default 256 MiB)")
    ap.add_argument("--dirty", type=float, default=4, help="dirty rate, MiB/s (default 4)")
    ap.add_argument("--rate", default="1gbit", help="tc tbf rate of the link ('' = unshaped)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("demo: run as root (network namespaces and criu need it)", file=sys.stderr)
        return 2
    try:
        criu = find_criu()
    except CriuError as e:
        print(f"demo: {e}", file=sys.stderr)
        return 2
    print(f"criu {criu.version_str} ({criu.origin})")
    work = tempfile.mkdtemp(prefix="deltaxfer-demo-")
    key = os.path.join(work, "key")
    with open(key, "wb") as f:
        f.write(os.urandom(32))
    os.chmod(key, 0o600)
    server = wl = None
    try:
        with TwoHosts(rate=args.rate or None) as lab:
            step(f"two hosts: {lab.source.name} ({lab.source.addr}) and {lab.dest.name} "
                 f"({lab.dest.addr}), veth {'shaped to ' + args.rate if args.rate else 'unshaped'}")
            server = subprocess.Popen(lab.dest.command(
                [sys.executable, "-m", "deltaxfer", "serve", "--listen",
                 f"{lab.dest.addr}:{PORT}", "--key-file", key, "--dir",
                 os.path.join(work, "dest"), "--restore"]),
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            wait_listening(server)
            print(f"destination: deltaxfer serve on {lab.dest.addr}:{PORT} (pid {server.pid})")

            wl = workloads.start("memwork", mib=args.mib, dirty_mib_per_s=args.dirty,
                                 tmpdir=work, prefix=lab.source.command([]))
            first = wl.verify()
            step(f"source: memwork pid {wl.pid}, {args.mib} MiB of mixed pages, dirtying "
                 f"{args.dirty:g} MiB/s; self-check: {'OK' if first['ok'] else 'BAD'}")

            step(f"deltaxfer migrate {wl.pid} --to {lab.dest.addr}:{PORT}")
            report_path = os.path.join(work, "report.json")
            proc = subprocess.run(lab.source.command(
                [sys.executable, "-m", "deltaxfer", "migrate", str(wl.pid), "--to",
                 f"{lab.dest.addr}:{PORT}", "--key-file", key, "--progress",
                 "--report", report_path]), text=True, stdout=subprocess.PIPE)
            print(proc.stdout, end="")
            with open(report_path) as f:
                report = json.load(f)
            if report["outcome"] != "migrated":
                print(f"demo: not migrated: {report['error']}")
                return 1
            pid = report["restored_pid"]
            wl.adopt(pid)
            # a zombie is gone too (its parent reaps it, not deltaxfer)
            source_gone = workloads.proc_state(wl.pid) in (None, "Z", "X")
            time.sleep(0.5)
            res = wl.verify(pid=pid)
            step("on the destination, the restored process verifies every page of its memory")
            print(f"self-check: {'OK' if res['ok'] else 'BAD'} {res['line']}; "
                  f"source process {'gone' if source_gone else 'STILL THERE'}")
            shutil.copy(report_path, os.path.join(ROOT, "demo-report.json"))
            print("\nfull JSON report: demo-report.json")
            return 0 if res["ok"] and source_gone else 1
    finally:
        if wl is not None:
            wl.kill()
        if server is not None:
            server.terminate()
            server.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
