"""`deltaxfer diff`'s whole-image transfer size: estimated from a sample by default, exact
with --exact; on real dumps of a running workload both agree within the stated error,
and the estimate costs less."""
import json
import time

import pytest

import workloads
from deltaxfer import inspection
from deltaxfer.cli import main
from deltaxfer.criu.dumpdir import DumpDir

MIB = 48
SAMPLE_CHUNKS = 48          # of ~190 chunks: a quarter of the image is compressed


@pytest.fixture(scope="module")
def dumps(criu, tmp_path_factory):
    base = tmp_path_factory.mktemp("diffest")
    old, new = base / "old", base / "new"
    old.mkdir()
    new.mkdir()
    with workloads.start("memwork", mib=MIB, dirty_mib_per_s=4, tmpdir=base) as wl:
        criu.dump(wl.pid, str(old), leave="running")
        time.sleep(1)
        criu.dump(wl.pid, str(new), leave="running")
    return old, new


@pytest.fixture
def small_sample(monkeypatch):
    monkeypatch.setattr(inspection, "SAMPLE_CHUNKS", SAMPLE_CHUNKS)


def run_json(capsys, *argv):
    assert main(list(argv) + ["--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.criu
def test_estimate_and_exact_agree_within_the_stated_error(dumps, small_sample, capsys):
    old, new = dumps
    est = run_json(capsys, "diff", str(old), str(new))
    exact = run_json(capsys, "diff", str(old), str(new), "--exact")
    e, x = est["totals"], exact["totals"]
    assert est["full_image_estimated"] and not exact["full_image_estimated"]
    assert x["send_full_image_lz4_error"] == 0 and x["full_image_sampled_pages"] == x["new_pages"]
    assert e["full_image_sampled_pages"] < x["new_pages"] / 3
    assert 0 < e["send_full_image_lz4_error"] < 0.25 * e["send_full_image_lz4"]
    assert abs(e["send_full_image_lz4"] - x["send_full_image_lz4"]) <= e["send_full_image_lz4_error"]
    # everything else is computed on every page in both modes
    for k in ("changed", "added", "removed", "unchanged", "bytes_differing",
              "send_delta_full_pages_lz4", "send_delta_xor_lz4"):
        assert e[k] == x[k], k
    assert main(["diff", str(old), str(new)]) == 0
    text = capsys.readouterr().out
    assert "estimated from" in text and "--exact" in text
    assert main(["diff", str(old), str(new), "--exact"]) == 0
    assert "estimated" not in capsys.readouterr().out


@pytest.mark.criu
def test_the_estimate_is_faster(dumps, small_sample):
    _, new = dumps
    d = DumpDir.open(str(new))
    pid = d.processes[0].pid
    with d.memory(pid) as mem:
        v = mem.vaddrs()
        inspection._full_image_size(mem, v, exact=True)            # pages in the page cache

        def best(exact):
            times = []
            for _ in range(3):
                t = time.perf_counter()
                inspection._full_image_size(mem, v, exact=exact)
                times.append(time.perf_counter() - t)
            return min(times)
        # a quarter of the pages compressed: well under half the time, even on a busy machine
        assert best(False) < 0.5 * best(True)


def test_small_images_are_always_exact(tmp_path):
    from test_criu_images import write_dump
    import os
    pages = os.urandom(4096) * 3 + bytes(4096)
    write_dump(tmp_path, [(0x10000, 4, 4)], pages=pages)
    d = DumpDir.open(str(tmp_path))
    with d.memory(d.processes[0].pid) as mem:
        full, error, sampled = inspection._full_image_size(mem, mem.vaddrs(), exact=False)
    assert (error, sampled) == (0, 4) and full > 4096
