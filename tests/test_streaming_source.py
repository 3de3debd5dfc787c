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
