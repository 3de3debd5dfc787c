"""`make fuzz`: run every atheris harness of fuzz/ for a number of inputs each, starting
from the seed corpus in tests/fuzz_corpus/<kind>/, and report the inputs tried and the
crashes found (a crash's input is kept in build/fuzz/crashes/). Not part of `make test`;
the hypothesis fuzz tests (tests/test_wire_fuzz.py, tests/test_security_fuzz_images.py)
are.

    python fuzz/run.py [--runs N] [--only wire|images] [--max-len BYTES]"""
import argparse
import json
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
HARNESSES = {"wire": 4096, "images": 16384}     # kind -> default max input length


def run_one(kind: str, runs: int, max_len: int, work: str) -> dict:
    corpus = os.path.join(work, "corpus", kind)
    crashes = os.path.join(work, "crashes")
    os.makedirs(corpus, exist_ok=True)
    os.makedirs(crashes, exist_ok=True)
    before = set(os.listdir(crashes))
    cmd = [sys.executable, os.path.join(HERE, f"fuzz_{kind}.py"), f"-runs={runs}",
           f"-max_len={max_len}", "-print_final_stats=1", "-print_pcs=0",
           f"-artifact_prefix={crashes}/{kind}-", corpus,
           os.path.join(REPO, "tests", "fuzz_corpus", kind)]
    t0 = time.monotonic()
    p = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.monotonic() - t0
    out = p.stdout + p.stderr
    stats = dict(re.findall(r"stat::(\w+):\s+(\d+)", out))
    found = sorted(set(os.listdir(crashes)) - before)
    executed = int(stats.get("number_of_executed_units", 0))
    if not executed:
        m = re.search(r"Done (\d+) runs", out)
        executed = int(m.group(1)) if m else 0
    cov = re.findall(r"cov: (\d+) ft: (\d+) corp: (\d+)", out)
    result = {"harness": kind, "inputs": executed, "crashes": len(found),
              "crash_files": found, "exit": p.returncode, "seconds": round(seconds, 1),
              "rate_per_s": round(executed / seconds) if seconds else None,
              "coverage": int(cov[-1][0]) if cov else None,
              "features": int(cov[-1][1]) if cov else None,
              "corpus": int(cov[-1][2]) if cov else None}
    if p.returncode != 0:
        result["tail"] = out[-3000:]
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=600_000, help="inputs per harness")
    ap.add_argument("--only", choices=sorted(HARNESSES))
    ap.add_argument("--max-len", type=int)
    ap.add_argument("--work", default=os.path.join(REPO, "build", "fuzz"))
    args = ap.parse_args()
    results = []
    for kind, max_len in HARNESSES.items():
        if args.only and kind != args.only:
            continue
        r = run_one(kind, args.runs, args.max_len or max_len, args.work)
        results.append(r)
        print(f"fuzz {kind:7s}: {r['inputs']:>10,d} inputs in {r['seconds']:.0f} s "
              f"({r['rate_per_s']}/s), {r['crashes']} crashes, coverage {r['coverage']} "
              f"edges, corpus {r['corpus']}", flush=True)
        if r.get("tail"):
            print(r["tail"], file=sys.stderr)
    total = sum(r["inputs"] for r in results)
    crashes = sum(r["crashes"] for r in results)
    print(f"fuzz total: {total:,d} inputs, {crashes} crashes")
    with open(os.path.join(args.work, "summary.json"), "w") as f:
        json.dump({"results": results, "inputs": total, "crashes": crashes}, f, indent=2)
    return 1 if crashes or any(r["exit"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
