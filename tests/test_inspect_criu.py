"""`deltaxfer inspect` and `deltaxfer diff` on real dumps of a running workload."""
import json
import time

import pytest

import workloads
from deltaxfer import PAGE_SIZE
from deltaxfer.cli import main

MIB = 64


@pytest.fixture(scope="module")
def dump_pair(criu, tmp_path_factory):
    """Two dumps of one memwork process, taken ~2 s apart while it dirties 4 MiB/s."""
    base = tmp_path_factory.mktemp("pair")
    old, new = base / "old", base / "new"
    old.mkdir()
    new.mkdir()
    with workloads.start("memwork", mib=MIB, dirty_mib_per_s=4, tmpdir=base) as wl:
        criu.dump(wl.pid, str(old), leave="running")
        before = wl.verify()["mutations"]
        time.sleep(2)
        after = wl.verify()["mutations"]
        criu.dump(wl.pid, str(new), leave="running")
    return old, new, after - before


def run_json(capsys, *argv):
    assert main(list(argv) + ["--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.criu
def test_inspect(dump_pair, capsys):
    old, _, _ = dump_pair
    info = run_json(capsys, "inspect", str(old))
    proc = info["processes"][0]
    assert proc["comm"] == "memwork" and proc["pid"] == 1
    assert proc["vmas_by_kind"]["anon-private"]["bytes"] >= MIB << 20
    pages = MIB * 256
    assert proc["present_pages"] >= 0.9 * pages
    # memwork writes 20% of its pages as zeros; its other kinds are never all-zero
    assert 0.18 * pages <= proc["zero_pages"] <= 0.3 * pages
    assert info["totals"]["pages_bytes"] == proc["present_pages"] * PAGE_SIZE
    assert main(["inspect", str(old)]) == 0
    text = capsys.readouterr().out
    assert "pid 1 (memwork)" in text and "zero" in text


@pytest.mark.criu
def test_diff_of_a_dump_with_itself(dump_pair, capsys):
    old, _, _ = dump_pair
    d = run_json(capsys, "diff", str(old), str(old))["totals"]
    assert d["changed"] == d["added"] == d["removed"] == d["bytes_differing"] == 0
    assert d["unchanged"] == d["new_pages"]
    assert d["sent_full_pages"] == d["sent_xor_pages"] == 0


@pytest.mark.criu
def test_diff_of_two_dumps(dump_pair, capsys):
    old, new, mutations = dump_pair
    assert mutations > 0
    t = run_json(capsys, "diff", str(old), str(new))["totals"]
    # every mutation rewrites a few words of one page: at least that many pages changed
    # (the stride walk gives distinct pages), and not much more (stack, libc data).
    assert min(mutations, MIB * 256) <= t["changed"] + t["added"] <= mutations * 1.2 + 64
    assert t["changed"] + t["unchanged"] + t["added"] == t["new_pages"]
    # changed pages differ in a few words each: far fewer bytes than the pages hold
    assert 0 < t["bytes_differing"] < 0.1 * t["changed_bytes"]
    # what deltaxfer saves: XOR deltas beat full pages, and both beat the whole image
    assert t["send_delta_xor_lz4"] < t["send_delta_full_pages_lz4"] < t["send_full_image_lz4"]
    assert t["sent_xor_pages"] > 0.9 * t["changed"]
    assert main(["diff", str(old), str(new)]) == 0
    assert "with XOR deltas" in capsys.readouterr().out


def test_diff_refuses_unrelated_dumps(tmp_path, capsys):
    from test_criu_images import write_dump

    write_dump(tmp_path / "a", [(0x10000, 1, 4)], pid=1)
    write_dump(tmp_path / "b", [(0x10000, 1, 4)], pid=2)
    assert main(["diff", str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    assert "shares no process" in capsys.readouterr().err
