"""The self-checking workloads themselves, without CRIU: they start, report OK,
catch corruption written into them from outside, keep OK while they mutate,
stay idle when idle, and die completely when killed (also when stopped)."""

import os
import signal
import struct
import time

import pytest

import workloads  # tests/ is on sys.path (pytest's prepend import mode)
from workloads import WorkloadError, poke, proc_state

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="workloads run under `unshare --pid`, which needs root")

PAGE = os.sysconf("SC_PAGE_SIZE")


def peek(pid, vaddr, n):
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        return os.pread(fd, n, vaddr)
    finally:
        os.close(fd)


def flip_word(pid, vaddr):
    """Replace the 8 bytes at vaddr by their complement: always a change."""
    (v,) = struct.unpack("<Q", peek(pid, vaddr, 8))
    poke(pid, vaddr, struct.pack("<Q", v ^ 0xFFFFFFFFFFFFFFFF))


def gone(pid, timeout=5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc_state(pid) in (None, "Z", "X"):
            return True
        time.sleep(0.01)
    return False


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_build_is_cached_by_source_mtime():
    a = workloads.build("memwork")
    m = a.stat().st_mtime_ns
    assert workloads.build("memwork") == a and a.stat().st_mtime_ns == m
    assert os.access(a, os.X_OK)
    assert workloads.build("pyheap").name == "pyheap.py"
    with pytest.raises(ValueError):
        workloads.build("nope")


@pytest.mark.parametrize("kind", workloads.KINDS)
def test_starts_in_own_pid_namespace_and_verifies_ok(kind, tmp_path):
    with workloads.start(kind, mib=8, objects=2000, tmpdir=tmp_path) as w:
        assert w.ready["status"] == "READY"
        assert w.ready["pid"] == 1  # PID 1 of its own namespace
        assert os.readlink(f"/proc/{w.pid}/ns/pid") != os.readlink("/proc/self/ns/pid")
        assert w.pid in workloads._children(w.unshare_pid)
        r = w.verify()
        assert r["ok"], r["line"]
        assert r["checked"] > 0 and r["pid"] == 1
        if kind == "memwork":
            assert r["pages"] == r["checked"] == 8 * 2**20 // PAGE
            assert r["mutations"] == 0
        elif kind == "shmwork":
            assert r["pages"] == r["checked"]
            assert r["child_counter"] > 0 and r["thread_ticks"] > 0
            assert len(os.listdir(f"/proc/{w.pid}/task")) == 2  # multi-threaded
        elif kind == "scanwork":
            assert r["pages"] == r["checked"] == 8 * 2**20 // PAGE
        else:
            assert r["objects"] == r["checked"] == 2000
        assert w.verify()["ok"]  # repeatable
    assert gone(w.pid) and gone(w.unshare_pid)


def test_scanwork_logs_its_passes_and_sees_a_freeze(tmp_path):
    """scanwork reads all its memory over and over and logs each pass; a stop inside a
    pass (as a checkpoint's freeze) is that pass's longest gap, and the check still
    finds every page as written."""
    with workloads.start("scanwork", mib=32, mix=2, tmpdir=tmp_path) as w:
        deadline = time.monotonic() + 60
        while len(workloads.scan_passes(w)) < 3:
            assert time.monotonic() < deadline, workloads.scan_passes(w)
            time.sleep(0.02)
        passes = workloads.scan_passes(w)
        assert all(0 < p["seconds"] < 30 and 0 <= p["maxgap"] <= p["seconds"]
                   for p in passes), passes
        n = len(passes)
        os.kill(w.pid, signal.SIGSTOP)
        time.sleep(0.4)
        os.kill(w.pid, signal.SIGCONT)
        while len(workloads.scan_passes(w)) < n + 2:
            assert time.monotonic() < deadline, workloads.scan_passes(w)
            time.sleep(0.02)
        later = workloads.scan_passes(w)[n - 1:]
        stopped = max(later, key=lambda p: p["maxgap"])
        assert 0.35 < stopped["maxgap"] < 10 and stopped["seconds"] > stopped["maxgap"], later
        r = w.verify()
        assert r["ok"] and r["passes"] >= n + 1, r


def test_memwork_detects_a_corrupted_page(tmp_path):
    with workloads.start("memwork", mib=4, seed=7, tmpdir=tmp_path) as w:
        reg = w.region()
        assert reg["status"] == "REGION" and reg["pages"] == 4 * 2**20 // PAGE
        assert reg["seed"] == 7 and reg["page_size"] == PAGE
        assert w.verify()["ok"]
        # One word in the middle of page 300, then a later page too.
        vaddr = reg["start"] + 300 * PAGE + 17 * 8
        flip_word(w.pid, vaddr)
        r = w.verify()
        assert not r["ok"] and r["status"] == "BAD", r["line"]
        assert r["page"] == 300 and r["vaddr"] == reg["start"] + 300 * PAGE
        assert r["word"] == 17 and r["bad_pages"] == 1 and r["first"] == [300]
        flip_word(w.pid, reg["start"] + 901 * PAGE)
        r = w.verify()
        assert r["first"] == [300, 901] and r["bad_pages"] == 2
        # Repairing the page makes it OK again: the check is exact, not sticky.
        flip_word(w.pid, vaddr)
        flip_word(w.pid, reg["start"] + 901 * PAGE)
        assert w.verify()["ok"]


def test_memwork_page_mix(tmp_path):
    """Untouched pages stay absent and written-zero pages are present: the
    resident size is ~95% of the region (the rest never faulted in)."""
    with workloads.start("memwork", mib=16, tmpdir=tmp_path) as w:
        reg = w.region()
        first = reg["start"] // PAGE
        present = 0
        with open(f"/proc/{w.pid}/pagemap", "rb") as f:
            f.seek(first * 8)
            data = f.read(reg["pages"] * 8)
        for (e,) in struct.iter_unpack("<Q", data):
            present += bool(e >> 63)
        frac = present / reg["pages"]
        assert 0.90 < frac < 0.99, frac
        # Pages of zeros that are present (explicitly written): ~20%.
        zero_present = 0
        mem = peek(w.pid, reg["start"], reg["pages"] * PAGE)
        for i, (e,) in enumerate(struct.iter_unpack("<Q", data)):
            if e >> 63 and not any(mem[i * PAGE:(i + 1) * PAGE]):
                zero_present += 1
        assert 0.15 < zero_present / reg["pages"] < 0.25


def test_memwork_dirtying_keeps_ok(tmp_path):
    rate = 16  # MiB/s
    with workloads.start("memwork", mib=8, dirty_mib_per_s=rate, tmpdir=tmp_path) as w:
        t0 = time.monotonic()
        r1 = w.verify()
        time.sleep(0.5)
        r2 = w.verify()
        elapsed = time.monotonic() - t0
        assert r1["ok"] and r2["ok"], (r1["line"], r2["line"])
        grown = r2["mutations"] - r1["mutations"]
        expected = rate * 2**20 / PAGE * elapsed
        # Paced, not burst: roughly the asked rate.
        assert 0.4 * expected < grown < 1.3 * expected, (grown, expected)
        # More mutations than pages: every page went through new versions.
        time.sleep(0.3)
        r3 = w.verify()
        assert r3["ok"] and r3["mutations"] > r3["pages"], r3["line"]


def test_idle_workloads_do_not_spin(tmp_path):
    kinds = [k for k in workloads.KINDS if k != "scanwork"]   # reading is its work
    ws = [workloads.start(k, mib=4, objects=500, tmpdir=tmp_path) for k in kinds]
    try:
        before = [cpu_seconds(w.pid) for w in ws]
        time.sleep(1.0)
        used = [cpu_seconds(w.pid) - b for w, b in zip(ws, before)]
        assert all(u < 0.1 for u in used), dict(zip(kinds, used))
    finally:
        for w in ws:
            w.kill()


def test_shmwork_detects_corruption_of_shared_and_private_memory(tmp_path):
    with workloads.start("shmwork", mib=2, private_mib=1, tmpdir=tmp_path) as w:
        reg = w.region()
        assert reg["pages"] == 2 * 2**20 // PAGE + 1 and reg["private_pages"] == 2**20 // PAGE
        child = w.verify()["child"]
        # The child sees the same pages: corrupt through the child's mapping.
        vaddr = reg["start"] + 5 * PAGE + 64
        child_host_pid = workloads._children(w.pid)[0]
        flip_word(child_host_pid, vaddr)
        r = w.verify()
        assert not r["ok"] and r["region"] == "shared" and r["page"] == 5, r["line"]
        flip_word(child_host_pid, vaddr)
        assert w.verify()["ok"]
        flip_word(w.pid, reg["private_start"] + 9 * PAGE)
        r = w.verify()
        assert not r["ok"] and r["region"] == "private" and r["page"] == 9, r["line"]
        flip_word(w.pid, reg["private_start"] + 9 * PAGE)
        assert w.verify()["ok"]
        # A dead child is noticed.
        os.kill(child_host_pid, signal.SIGKILL)
        assert gone(child_host_pid)
        r = w.verify()
        assert not r["ok"] and r["reason"] == "child_dead" and r["child"] == child, r["line"]


def test_pyheap_detects_heap_corruption(tmp_path):
    with workloads.start("pyheap", objects=3000, seed=3, tmpdir=tmp_path) as w:
        reg = w.region()
        assert reg["obj"] >= 0 and reg["len"] >= 64
        assert w.verify()["ok"]
        flip_word(w.pid, reg["addr"] + 8)  # inside a bytes object's payload
        r = w.verify()
        assert not r["ok"] and r["index"] == reg["obj"] and r["type"] == "bytes", r["line"]
        assert r["bad_objects"] == 1


def test_pyheap_mutates_and_stays_ok(tmp_path):
    with workloads.start("pyheap", objects=2000, mutate_per_s=400, seed=5,
                         tmpdir=tmp_path) as w:
        r1 = w.verify()
        time.sleep(0.4)
        r2 = w.verify()
        assert r1["ok"] and r2["ok"], (r1["line"], r2["line"])
        assert r2["mutations"] > r1["mutations"] + 50
        assert r2["digest"] != r1["digest"]


def test_same_seed_same_heap(tmp_path):
    digests = []
    for _ in range(2):
        with workloads.start("pyheap", objects=500, seed=11, tmpdir=tmp_path) as w:
            digests.append(w.verify()["digest"])
    assert digests[0] == digests[1]


def test_kill_works_on_stopped_tree_and_adopted_pids(tmp_path):
    w = workloads.start("shmwork", mib=1, tmpdir=tmp_path)
    other = workloads.start("memwork", mib=1, tmpdir=tmp_path)
    child = workloads._children(w.pid)[0]
    # Stand-ins for `criu dump --leave-stopped` (the original is stopped) and
    # a restored copy (a process in another PID namespace we were told about).
    os.kill(w.pid, signal.SIGSTOP)
    os.kill(child, signal.SIGSTOP)
    deadline = time.monotonic() + 5
    while proc_state(w.pid) != "T" and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(WorkloadError, match="stopped"):
        w.verify(timeout=0.3)
    w.adopt(other.pid)
    assert other.verify()["ok"]
    w.kill()
    w.kill()  # idempotent
    for pid in (w.pid, child, w.unshare_pid, other.pid):
        assert gone(pid), (pid, proc_state(pid))
    other.kill()  # its unshare parent exits by itself; still fine to call


def test_verify_of_missing_process_and_failed_start(tmp_path):
    with workloads.start("memwork", mib=1, tmpdir=tmp_path) as w:
        pid = w.pid
    with pytest.raises(WorkloadError, match="does not exist|died"):
        w.verify(pid=pid, timeout=1)
    with pytest.raises(WorkloadError, match="exited with status"):
        workloads.start("memwork", mib=-1, tmpdir=tmp_path, ready_timeout=10)
    with pytest.raises(ValueError):
        workloads.start("shmwork", dirty_mib_per_s=1, tmpdir=tmp_path)


def test_memwork_whole_pages_rewrites_pages_and_still_detects_corruption(tmp_path):
    """--whole-pages (issue 17's fast writer): a mutated page is fresh random words all
    through, not a few changed slots, and the check still finds a flipped word in it."""
    with workloads.start("memwork", mib=4, dirty_mib_per_s=64, tmpdir=tmp_path,
                         whole_pages=True) as w:
        reg = w.region()
        before = peek(w.pid, reg["start"], reg["pages"] * PAGE)
        time.sleep(0.3)
        r = w.verify()
        assert r["ok"] and r["mutations"] > reg["pages"] // 4, r["line"]
        after = peek(w.pid, reg["start"], reg["pages"] * PAGE)
        # among the pages that changed, most words changed (a slot mutation changes 8 of 512)
        changed = [i for i in range(reg["pages"])
                   if before[i * PAGE:(i + 1) * PAGE] != after[i * PAGE:(i + 1) * PAGE]]
        assert changed
        i = changed[0]
        a = struct.unpack(f"<{PAGE // 8}Q", before[i * PAGE:(i + 1) * PAGE])
        b = struct.unpack(f"<{PAGE // 8}Q", after[i * PAGE:(i + 1) * PAGE])
        assert sum(x != y for x, y in zip(a, b)) > PAGE // 8 // 2
    with workloads.start("memwork", mib=4, tmpdir=tmp_path, whole_pages=True) as w:
        reg = w.region()
        flip_word(w.pid, reg["start"] + 10 * PAGE + 5 * 8)
        r = w.verify()
        assert not r["ok"] and r["page"] == 10, r["line"]
