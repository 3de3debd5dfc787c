"""The streaming source (issue 12): pages read window by window on the encoder threads,
and PROT_NONE pages that hold data (guard pages, GC heaps), which process_vm_readv cannot
read, read through /proc/PID/mem — a real `criu` migration of a process whose memory is
partly PROT_NONE, restored and checked by the process itself."""
import os
from array import array

import pytest

import workloads
from deltaxfer import PAGE_SIZE, _core
from deltaxfer.core import procmem
from faults import agent_env, agent_tmp, run_migrate  # noqa: F401
from servers import Server, write_key


def start_protnone(tmp_path, mib: float = 16) -> workloads.Workload:
    prog = workloads.build("protnone")
    result = tmp_path / "protnone.result"
    w = workloads.Workload("protnone", [str(prog), "--mib", f"{mib:g}", "--seed", "7",
                                        "--result", str(result)], result)
    w._launch(60)
    return w


def none_vmas(pid: int) -> list:
    return [v for v in procmem.read_maps(pid)
            if v.perms.startswith("---p") and v.inode == 0 and not v.path]


def test_protnone_pages_are_read_through_proc_pid_mem(tmp_path):
    """What the old reader did (process_vm_readv only) fails on PROT_NONE pages; the
    streaming reader falls back to /proc/PID/mem and gets their data."""
    with start_protnone(tmp_path, mib=2) as wl:
        vmas = none_vmas(wl.pid)
        assert len(vmas) >= 10, vmas
        vaddrs = array("Q", [a for v in vmas for a in range(v.start, v.end, PAGE_SIZE)])
        # two readable pages around the first PROT_NONE block: one batch, mixed
        vaddrs = array("Q", sorted({vmas[0].start - PAGE_SIZE, vmas[0].end, *vaddrs}))
        buf = bytearray(len(vaddrs) * PAGE_SIZE)
        got, failed = _core.read_pages_masked(wl.pid, vaddrs, None, buf)
        assert failed == len(vaddrs) - 2, (got, failed)
        buf2 = bytearray(len(buf))
        fd = os.open(f"/proc/{wl.pid}/mem", os.O_RDONLY)
        try:
            got, failed, forced = _core.read_pages(wl.pid, vaddrs, None, buf2, fd)
        finally:
            os.close(fd)
        assert (got, failed) == (len(vaddrs), 0) and forced >= len(vaddrs) - 2, (got, forced)
        assert all(buf2[i * PAGE_SIZE:(i + 1) * PAGE_SIZE] != bytes(PAGE_SIZE)
                   for i in range(len(vaddrs)))
        # the live rounds' page set includes them, as CRIU's dump does
        run_v, run_l = procmem.criu_runs(wl.pid)
        pages = set(_core.run_page_vaddrs(run_v, run_l))
        assert set(vaddrs) <= pages
        assert wl.verify()["ok"]


@pytest.mark.criu
@pytest.mark.parametrize("threads,tracking", [(1, "auto"), (2, "off")])
def test_process_with_protnone_pages_migrates(criu, tmp_path, agent_tmp, threads, tracking):
    """Live rounds and the frozen round read PROT_NONE pages; the restored copy finds
    every page (PROT_NONE ones included) as it wrote them. Small windows so that an
    image spans many windows on the encoder threads. Without tracking the final round
    reads every page again from the frozen process, PROT_NONE ones too (the old reader
    failed there: "could not read N pages of frozen pid P's memory")."""
    env = agent_env(agent_tmp)
    env["DELTAXFER_ENCODER_THREADS"] = str(threads)
    env["DELTAXFER_WINDOW_PAGES"] = "256"
    with Server(tmp_path, extra=["--restore"]) as server, start_protnone(tmp_path) as wl:
        assert wl.ready["none_pages"] > 1000, wl.ready
        key = write_key(tmp_path / "client.key")
        m = run_migrate(wl.pid, server.addr, key, tmp_path / "report.json",
                        "--tracking", tracking, env=env, timeout=180)
        r = m.report
        if r and r.get("restored_pid"):
            wl.adopt(r["restored_pid"])
        assert m.rc == 0, (m.rc, m.stderr[-3000:], r and r.get("error"))
        assert r["outcome"] == "migrated", r
        live = [x for x in r["rounds"] if x["live"]]
        # the first round read the PROT_NONE pages too (nothing failed, all sent)
        assert live[0]["failed_pages"] == 0 and live[0]["read_pages"] == live[0]["pages"]
        assert live[0]["pages"] >= wl.ready["pages"], (live[0], wl.ready)
        final = r["rounds"][-1]
        if tracking == "off":
            assert final["read_pages"] >= wl.ready["pages"], final
        got = wl.verify(pid=r["restored_pid"], timeout=60)
        assert got["ok"] and got["none_pages"] == wl.ready["none_pages"], got


def test_clean_window_equals_encoding_it():
    """A window whose pages are all clean is answered without reading or encoding: the
    same hashes and counts as encode_window would give, no frame; a window with one page
    not clean, or whose held pages differ from its own, is encoded."""
    import os
    from array import array

    from deltaxfer import _core
    from deltaxfer.source import Held, SourceImage, clean_window, encode_window

    n = 64
    vaddrs = array("Q", [0x7f0000000000 + i * 4096 for i in range(n)])
    pages = bytearray(os.urandom(4096 * n))
    hashes, _, _ = _core.hash_pages(pages)
    held = Held(array("Q", vaddrs), hashes)
    img = SourceImage("pid-1", None, memoryview(pages), vaddrs, bytearray(b"\x01" * n))
    buf = bytearray(4096 * 16)
    for lo, hi in ((0, 16), (16, 48), (48, 64)):
        fast = clean_window(img, held, lo, hi)
        slow = encode_window(img, held, lo, hi, buf, xor=True, compress=True)
        assert fast is not None and fast[0] == b"" and slow[0] == b""
        assert fast[1] == slow[1] == hashes[lo:hi]
        # the held layout being the image's (the sender checks once per image): the same
        assert clean_window(img, held, lo, hi, aligned=True)[:3] == fast[:3]
        assert {k: v for k, v in fast[2].items() if v} == \
            {k: v for k, v in slow[2].items() if v and k in fast[2]}
    img.clean[20] = 0
    assert clean_window(img, held, 16, 48) is None
    assert clean_window(img, held, 48, 64) is not None
    # held pages that are not exactly the window's (one removed): encoded
    held2 = Held(array("Q", list(vaddrs[:50]) + list(vaddrs[51:])),
                 array("Q", list(hashes[:50]) + list(hashes[51:])))
    assert clean_window(img, held2, 48, 64) is None
    assert clean_window(img, None, 0, 16) is None


def test_window_bounds_bound_pages_to_read_and_span():
    """Windows partition the image; each holds at most window_pages pages to read (zero
    bytes of the clean mask) and spans at most span_pages; a mostly clean image gets few
    windows (a round that reads little costs little, whatever the memory size); without
    a mask, or when every page is to read, the windows are window_pages each."""
    import random

    from deltaxfer.sender import window_bounds

    rnd = random.Random(5)
    for n, dirty_share in ((100_000, 0.001), (100_000, 0.3), (5000, 1.0), (70_001, 0.0)):
        clean = bytearray(b"\x01" * n)
        for i in rnd.sample(range(n), int(n * dirty_share)):
            clean[i] = 0
        got = list(window_bounds(clean, n, 256, 256 * 32))
        assert got[0][0] == 0 and got[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(got, got[1:]))
        assert all(lo < hi and hi - lo <= 256 * 32 for lo, hi in got)
        assert all(clean.count(0, lo, hi) <= 256 for lo, hi in got)
        if dirty_share <= 0.001:
            assert len(got) <= -(-n // (256 * 32)) + 1, len(got)
        if dirty_share == 1.0:
            assert got == [(lo, min(lo + 256, n)) for lo in range(0, n, 256)]
    assert list(window_bounds(None, 1000, 256, 8192)) == \
        [(0, 256), (256, 512), (512, 768), (768, 1000)]


def _resident_kib(buf) -> int:
    """Resident KiB of buf's own pages (mincore(2) over its range: the Rss of its mapping
    in /proc/self/smaps also counts a neighbouring anonymous mapping the kernel merged
    with it, seen in a full suite run)."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    holder = ctypes.c_char.from_buffer(buf)
    try:
        addr, n = ctypes.addressof(holder), len(buf) // PAGE_SIZE
        vec = ctypes.create_string_buffer(n)
        if libc.mincore(addr, n * PAGE_SIZE, vec) != 0:
            raise OSError(ctypes.get_errno(), "mincore")
        return sum(b & 1 for b in vec.raw) * PAGE_SIZE // 1024
    finally:
        del holder


def test_sparse_window_encodes_like_dense_windows_and_gives_its_memory_back():
    """Windows spanning many dense windows' worth of mostly clean pages encode to the
    same hashes and the same page records as dense windows do; the encoder's buffer
    keeps at most one dense window resident across them (without giving the sparse part
    back, the pages read at different offsets by successive windows would add up)."""
    import os
    import random

    from deltaxfer.sender import window_bounds
    from deltaxfer.source import EncoderPool, Held, SourceImage, encode_window

    n, wp, dirty = 32768, 256, 700
    vaddrs = array("Q", [0x7f0000000000 + i * PAGE_SIZE for i in range(n)])
    old = bytearray(os.urandom(PAGE_SIZE * n))
    hashes, _, _ = _core.hash_pages(old)
    held = Held(array("Q", vaddrs), hashes)
    new = bytearray(old)
    clean = bytearray(b"\x01" * n)
    for i in random.Random(3).sample(range(n), dirty):
        clean[i] = 0
        new[i * PAGE_SIZE:i * PAGE_SIZE + 8] = os.urandom(8)

    def reader(lo, hi, buf):
        view = memoryview(buf)[:(hi - lo) * PAGE_SIZE]
        for i in range(lo, hi):
            if not clean[i]:
                view[(i - lo) * PAGE_SIZE:(i - lo + 1) * PAGE_SIZE] = \
                    new[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]
        return view

    img = SourceImage("pid-1", None, None, vaddrs, clean, reader=reader)
    pool = EncoderPool(1, window_pages=wp)
    bounds = list(window_bounds(clean, n, wp, pool.span_pages))
    assert 3 <= len(bounds) <= 8 and max(hi - lo for lo, hi in bounds) > 8 * wp, bounds
    sparse_hashes, sparse_records, sent = array("Q"), [], 0
    try:
        for lo, hi in bounds:
            f, h, st, _, _ = pool.pool.submit(pool.encode, img, held, lo, hi, xor=False,
                                              compress=True).result()
            sparse_hashes.extend(h)
            sparse_records += _records(f)
            sent += st["sent_full"]
        buf = pool.pool.submit(pool.buffer).result()
        assert 0 < _resident_kib(buf) <= wp * PAGE_SIZE // 1024
    finally:
        pool.close()
    dense_hashes, dense_records = array("Q"), []
    for lo in range(0, n, wp):
        f, h, _, _, _ = encode_window(img, held, lo, lo + wp, bytearray(wp * PAGE_SIZE),
                                      xor=False, compress=True)
        dense_hashes.extend(h)
        dense_records += _records(f)
    assert sparse_hashes == dense_hashes
    assert sent == dirty and sparse_records == dense_records and len(dense_records) == dirty


def _records(frames) -> list:
    from deltaxfer.core import pipeline as cp
    out = []
    for f in cp.split_frames(frames) if frames else []:
        recs, _ = cp.native.decode_frame(f)
        out += [(v, k, bytes(p)) for v, k, p in recs]
    return out


def test_a_round_with_the_held_layout_shares_its_vaddrs_array(tmp_path):
    """Per-page metadata is what grows with the process (16 MiB of vaddrs per copy at
    8 GiB): a live round whose layout is the one the destination holds uses the held
    array itself, not a second equal one; a changed layout gets its own."""
    from deltaxfer import live
    from deltaxfer.source import Held
    with start_protnone(tmp_path, mib=2) as wl:
        tasks = live.process_tree(wl.pid)
        first = live.snapshot_tree(tasks)
        img = first.images[0]
        copy = array("Q", img.vaddrs)          # what receive_state would have built
        held = {img.image_id: Held(copy, array("Q", bytes(8 * len(copy))))}
        again = live.snapshot_tree(tasks, None, held)
        assert again.images[0].vaddrs is copy
        other = array("Q", copy[:-1])           # the destination holds one page less
        held = {img.image_id: Held(other, array("Q", bytes(8 * len(other))))}
        third = live.snapshot_tree(tasks, None, held)
        assert third.images[0].vaddrs is not other
        assert third.images[0].vaddrs == copy
        for s in (first, again, third):
            s.close()
        assert wl.verify()["ok"]



def test_encoder_threads_keep_frame_areas_only_within_their_budget():
    """Two encoder threads keep a frame area each (a frame's staging, then room for a
    window's frames: what encode_round needs to write them without growing a buffer);
    sixteen, whose areas would not fit in FRAME_AREA_BUDGET, keep none, and their
    windows encode into buffers of their own — the same frames either way."""
    import random

    from deltaxfer import source

    few, many = source.EncoderPool(threads=2), source.EncoderPool(threads=16)
    try:
        assert few.keep_areas and few.threads * few.area_bytes <= source.FRAME_AREA_BUDGET
        assert few.area_bytes == source.FRAME_SIZE + _core.frames_output_bound(
            few.window_pages, source.FRAME_SIZE, True)
        areas = [few.pool.submit(few.scratch).result() for _ in range(4)]
        assert all(len(a) == few.area_bytes for a in areas)
        assert not many.keep_areas and many.scratch() is None
        rng = random.Random(3)
        pages = bytearray()
        for i in range(few.window_pages):
            pages += rng.randbytes(PAGE_SIZE) if i % 3 else (b"%d " % i * 2048)[:PAGE_SIZE]
        vaddrs = array("Q", [0x7f0000000000 + i * PAGE_SIZE for i in range(few.window_pages)])
        outs = [_core.encode_round(pages, vaddrs, frame_size=source.FRAME_SIZE,
                                   pages_index=0, scratch=s)[0] for s in (areas[0], None)]
        assert outs[0] == outs[1] and len(outs[0]) > few.window_pages * PAGE_SIZE // 2
    finally:
        few.close()
        many.close()
