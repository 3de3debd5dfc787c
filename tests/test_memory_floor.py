"""bench/memory_floor.py, the destination's memory floor the migration benchmark runs
beside the methods (`memory-floor`): it writes and fills what it says, reports both
halves, and leaves nothing behind."""
import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "memory_floor.py"


def test_memory_floor_reports_both_halves_and_cleans_up(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), "--mib", "8", "--dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["mib"] == 8
    for k in ("page_cache_cpu_s", "page_cache_s", "anon_cpu_s", "anon_s"):
        assert r[k] >= 0, r
    assert r["page_cache_s"] > 0 and r["anon_s"] > 0, r
    assert os.listdir(tmp_path) == []          # its file is removed


def test_memory_floor_refuses_a_missing_directory(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), "--mib", "1", "--dir",
                          str(tmp_path / "none")], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "No such file or directory" in out.stderr
