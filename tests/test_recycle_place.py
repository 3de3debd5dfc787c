"""bench/recycle_place.py: deltaxfer's compiled lazy-pages server placing a pages file's
pages into a userfaultfd-registered region of fresh memory, with the file kept and with
each placed 2 MiB block given back (LazyServer.recycle) -- every page lands right in
both (checked page by page by the script), blocks are punched out of the file only when
asked, and the file is removed afterwards."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "recycle_place.py"


@pytest.mark.parametrize("written_back", [False, True])
def test_pages_placed_right_with_and_without_giving_blocks_back(tmp_path, written_back):
    if os.geteuid() != 0:
        pytest.fail("userfaultfd of a whole region needs root here; run `sudo make test`")
    out = subprocess.run([sys.executable, str(SCRIPT), "--mib", "48", "--dir", str(tmp_path),
                          "--reps", "1", "--settle", "0"]
                         + (["--written-back"] if written_back else []),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, (out.stdout, out.stderr)
    runs = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["mode"] for r in runs] == ["keep", "recycle"], runs
    for r in runs:
        assert r["ok"] and r["bad_pages"] == 0 and r["error"] is None, r
        assert r["pages"] == 48 * 256 and r["written_back"] == written_back, r
        assert r["pages_recycle_failed"] == 0, r
    keep, recycle = runs
    assert keep["pages_recycled"] == 0 and keep["punches"] == 0, keep
    assert recycle["pages_recycled"] > 0 and recycle["punches"] > 0, recycle
    assert recycle["pages_recycled"] % 512 == 0, recycle      # whole 2 MiB blocks
    assert os.listdir(tmp_path) == []
