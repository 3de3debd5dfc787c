"""bench/source_encode.py, the source's read and encode of a live process without the
link: each code it alternates (here this checkout twice) reads and encodes the whole
workload into the same frames, reports per-GiB CPU and throughput, and leaves no
workload behind."""
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "source_encode.py"
MEMWORK = Path(__file__).resolve().parent / "workloads" / "bin" / "memwork"


def test_source_encode_reads_the_whole_workload_for_each_code():
    src = str(Path(__file__).resolve().parents[1] / "src")
    out = subprocess.run([sys.executable, str(SCRIPT), "--mib", "32", "--reps", "2",
                          "--cycles", "1", "--threads", "2", "--src", src],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["mode"] for r in rows] == ["this", "src:0"]
    assert rows[0]["src"] == rows[1]["src"] == src
    sizes = set()
    for r in rows:
        assert r["mib"] == 32 and r["threads"] == 2 and len(r["runs"]) == 2
        for run in r["runs"]:
            assert run["cpu_s_per_GiB"] > 0 and run["GBps"] > 0, run
            sizes.add(run["out_MB"])
    # memwork's 32 MiB (~5 % never touched, ~20 % zero, ~40 % random) in frames: one size
    (size,) = sizes
    assert 8 < size < 32 * 1.05 * 1.048576, size
    ps = subprocess.run(["pgrep", "-f", f"{MEMWORK} --mib 32 "], capture_output=True)
    assert ps.returncode == 1, ps.stdout          # the workload was killed
