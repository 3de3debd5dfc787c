"""One large migration on loopback for the scale runs (issue 6 item 4, issue 8's 8 GiB
goal): a memwork of --mib MiB dirtying ~10 MB/s, `deltaxfer migrate --tracking MODE` to a
`deltaxfer serve --restore`, the restored copy verifying all of its memory; prints (and
writes) the app-observed pause, downtime, the freeze's steps and the rounds.

    python bench/scale_migrate.py --mib 16384 --modes on[,off] [--json OUT] [--tmp DIR]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_tracking import migrate_once  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, required=True)
    ap.add_argument("--modes", default="on")
    ap.add_argument("--json")
    ap.add_argument("--tmp", default=None)
    args = ap.parse_args()
    out = {"mib": args.mib, "runs": []}
    for mode in args.modes.split(","):
        t = time.monotonic()
        with tempfile.TemporaryDirectory(dir=args.tmp) as d:
            try:
                r = migrate_once(Path(d), args.mib, mode)
                r["mode"] = mode
            except BaseException as e:   # report and go on to the next mode
                r = {"mode": mode, "error": f"{type(e).__name__}: {e}"[:3000]}
        r["wall_s"] = round(time.monotonic() - t, 1)
        out["runs"].append(r)
        print(json.dumps(r), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
