"""deltaxfer's own lazy-pages server (deltaxfer.lazyserve, ext/c/lazy.c), which fills a
lazily restored tree's memory in place of `criu lazy-pages`: real migrations whose
restored process forks, mremaps, discards (MADV_DONTNEED) and unmaps memory while its
pages are still arriving, checked by the process itself (and by its forked children);
the CRIU daemon kept as an option; the daemon's life cycle (it dies with the receiver
before a restore connects, exits on a restore that fails) and its protocol end."""
import os
import socket
import struct
import subprocess
import sys
import time

import pytest

import workloads
from deltaxfer import lazyserve
from deltaxfer.core import procmem
from faults import agent_tmp, migrate_adopting  # noqa: F401
from servers import Server

LAZYSERVE = [sys.executable, "-m", "deltaxfer.lazyserve", "lazy-pages"]


def start_lazyops(tmp_path, mib: float = 128) -> workloads.Workload:
    prog = workloads.build("lazyops")
    result = tmp_path / "lazyops.result"
    w = workloads.Workload("lazyops", [str(prog), "--mib", f"{mib:g}", "--seed", "5",
                                       "--result", str(result)], result)
    w._launch(60)
    return w


def done_stats(images_dir) -> dict:
    """The statistics line the daemon writes when it is done (waits for it)."""
    deadline = time.monotonic() + 60
    while (stats := lazyserve.done_stats(images_dir)) is None:
        path = os.path.join(images_dir, "lazy-pages.log")
        assert time.monotonic() < deadline, \
            f"no 'done' line in {path}: " \
            f"{open(path).read() if os.path.exists(path) else 'no log'}"
        time.sleep(0.05)
    return stats


def migrate(tmp_path, agent_tmp, server, wl, *extra) -> dict:
    m = migrate_adopting(wl, server.addr, tmp_path, agent_tmp, *extra)
    r = m.report
    assert m.rc == 0 and r["outcome"] == "migrated", (m.rc, m.stderr[-3000:],
                                                      server.log()[-3000:])
    return r


def check_lazyops_runs_on(wl, pid: int, before: dict) -> None:
    """The restored lazyops checks out twice, 0.3 s apart: its cycles went on and it
    forked more children (which read its memory) than before the move."""
    first = wl.verify(pid=pid, timeout=60)
    assert first["ok"], first
    time.sleep(0.3)
    again = wl.verify(pid=pid, timeout=60)
    assert again["ok"] and again["cycles"] > first["cycles"], (first, again)
    assert again["forks"] > before["forks"], (before, again)


def migrated(tmp_path, agent_tmp, server, wl) -> tuple[int, str, dict]:
    """migrate, then the restored pid, its images directory and the lazy-pages server's
    statistics once it is done (which must report no error)."""
    r = migrate(tmp_path, agent_tmp, server, wl)
    stats = done_stats(r["destination_path"])
    assert stats["error"] == 0, stats
    return r["restored_pid"], r["destination_path"], stats


@pytest.mark.criu
def test_restored_tree_changes_its_memory_while_pages_arrive(criu, tmp_path, agent_tmp):
    """lazyops forks children that read its memory, moves a region with mremap, discards
    pages with MADV_DONTNEED and unmaps others, about every millisecond: right after the
    restore these hit pages the server has not placed yet. Every page ends up right (the
    children's reads, the zeros after a discard, the full check), the server followed the
    events, and it exited once everything was in place."""
    with Server(tmp_path, extra=["--restore"]) as server, start_lazyops(tmp_path) as wl:
        before = wl.verify(timeout=60)
        assert before["ok"], before
        pid, images, stats = migrated(tmp_path, agent_tmp, server, wl)
        assert stats["tasks"] >= 1 and stats["pages_total"] > 0, stats
        # every page was placed, found present, dropped with what the process discarded,
        # or never needed by a forked child that exited first
        placed = (stats["pages_faulted"] + stats["pages_prefetched"] + stats["pages_present"]
                  + stats["pages_dropped"] + stats["pages_abandoned"]
                  + stats["pages_postcopied"])
        assert placed == stats["pages_total"], stats
        # the workload's fork/mremap/madvise/munmap reached the server during the restore
        assert stats["events"] > 0, stats
        assert stats["pages_prefetched"] > 0, stats
        check_lazyops_runs_on(wl, pid, before)
        # the daemon is gone: no process serves this directory any more
        deadline = time.monotonic() + 10
        while procmem.lazy_pages_daemons(images) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not procmem.lazy_pages_daemons(images)


@pytest.mark.criu
def test_memwork_with_criu_lazy_pages_server(criu, tmp_path, agent_tmp):
    """serve --lazy-pages-server criu: CRIU's own daemon fills the pages."""
    with Server(tmp_path, extra=["--restore", "--lazy-pages-server", "criu"]) as server, \
            workloads.start("memwork", mib=32, dirty_mib_per_s=2, tmpdir=tmp_path) as wl:
        r = migrate(tmp_path, agent_tmp, server, wl)
        assert "lazy-pages server (criu)" in server.log(), server.log()[-2000:]
        res = wl.verify(pid=r["restored_pid"], timeout=60)
        assert res["ok"], res
        with open(os.path.join(r["destination_path"], "lazy-pages.log")) as f:
            assert " done {" not in f.read()      # criu's log, not deltaxfer's


def _start_daemon(d, *extra) -> subprocess.Popen:
    p = subprocess.Popen([*LAZYSERVE, "-D", str(d), *extra])
    deadline = time.monotonic() + 10
    while not (d / "lazy-pages.socket").exists():
        assert p.poll() is None and time.monotonic() < deadline, p.poll()
        time.sleep(0.01)
    return p


def _log(d) -> str:
    return (d / "lazy-pages.log").read_text()


def test_daemon_exits_with_its_receiver_before_a_restore_connects(tmp_path):
    """Started by a receiver that dies before any restore connects: it exits (a killed
    `serve` leaves no lazy-pages daemon behind)."""
    code = ("import subprocess, sys, os, time\n"
            f"p = subprocess.Popen({LAZYSERVE!r} + ['-D', {str(tmp_path)!r}, '--parent', "
            "str(os.getpid())])\n"
            "print(p.pid, flush=True)\n"
            "time.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    daemon = int(parent.stdout.readline())
    deadline = time.monotonic() + 10
    while not (tmp_path / "lazy-pages.socket").exists():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert daemon in procmem.lazy_pages_daemons(str(tmp_path))
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 5
    while procmem.start_time(daemon) is not None and procmem.state(daemon) != "Z" \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    assert procmem.start_time(daemon) is None or procmem.state(daemon) == "Z", \
        "the daemon outlived the receiver that started it"
    assert "gone before any restore connected" in _log(tmp_path)


def test_daemon_exits_on_a_restore_that_fails(tmp_path):
    """The restore's side closes the socket before its end mark (criu restore failed):
    the daemon says so and exits 1."""
    p = _start_daemon(tmp_path)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(tmp_path / "lazy-pages.socket"))
    s.sendall(struct.pack("<i", -7))      # a zombie: no userfaultfd follows
    s.close()
    assert p.wait(10) == 1
    assert "closed the lazy-pages socket before it finished" in _log(tmp_path)
    assert "Error (" in _log(tmp_path)


def test_daemon_with_nothing_to_serve_exits_at_once(tmp_path):
    """A restore whose tasks have no lazy memory (zombies only) ends with its end mark:
    the daemon is done at once, with nothing placed."""
    p = _start_daemon(tmp_path)
    # only root (the restore) may connect
    assert os.stat(tmp_path / "lazy-pages.socket").st_mode & 0o077 == 0
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(tmp_path / "lazy-pages.socket"))
    s.sendall(struct.pack("<i", -3) + struct.pack("<I", 0x52535446))
    assert p.wait(10) == 0
    s.close()
    stats = done_stats(tmp_path)
    assert stats["tasks"] == 0 and stats["pages_total"] == 0 and stats["error"] == 0, stats


def test_daemon_refuses_a_task_without_images(tmp_path):
    """A pid whose images are missing: a clear error, exit 1, the fd closed."""
    p = _start_daemon(tmp_path)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(tmp_path / "lazy-pages.socket"))
    r, w = os.pipe()
    s.sendall(struct.pack("<i", 42))
    socket.send_fds(s, [b"\0"], [r])
    os.close(r)
    assert p.wait(10) == 1
    s.close()
    os.close(w)
    assert "pagemap-42.img" in _log(tmp_path), _log(tmp_path)


@pytest.mark.criu
def test_serve_killed_while_pages_arrive(criu, tmp_path, agent_tmp):
    """`serve` is SIGKILLed right after the migration, while its lazy-pages server still
    places the restored copy's pages: the server finishes that work (the copy's memory
    checks out), then exits — no daemon is left behind, and none stops half-way."""
    with Server(tmp_path, extra=["--restore"]) as server, \
            workloads.start("memwork", mib=768, dirty_mib_per_s=4, tmpdir=tmp_path) as wl:
        r = migrate(tmp_path, agent_tmp, server, wl)
        images = r["destination_path"]
        serving = procmem.lazy_pages_daemons(images)
        server.proc.kill()
        server.proc.wait(10)
        assert serving, "the lazy phase was over before serve was killed"
        res = wl.verify(pid=r["restored_pid"], timeout=120)
        assert res["ok"], res
        stats = done_stats(images)
        assert stats["error"] == 0 and stats["pages_total"] > 0, stats
        deadline = time.monotonic() + 30
        while procmem.lazy_pages_daemons(images) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not procmem.lazy_pages_daemons(images)


@pytest.mark.criu
def test_zero_pages_and_holes_are_mapped_without_copies(criu, tmp_path, agent_tmp):
    """memwork's pages that are all zeros (written so: in the dump) and its pages never
    written (not in the dump: holes between the image's runs) reach the restored process
    as the zero page -- no copy, no memory until written -- the holes by the workers as
    they pass them, not by one fault each. The restored copy reads them as zeros, writes
    over them (its mutations), and checks out every time."""
    with Server(tmp_path, extra=["--restore"]) as server, \
            workloads.start("memwork", mib=64, dirty_mib_per_s=1, tmpdir=tmp_path) as wl:
        pid, images, stats = migrated(tmp_path, agent_tmp, server, wl)
        pages = 64 * 256
        # ~20 % of memwork's pages are zeros, ~5 % untouched (memwork.c)
        assert stats["pages_zero_image"] > pages // 10, stats
        assert stats["pages_zero"] > pages // 50, stats
        # holes were mapped in runs: fewer faults (the mutations' included) than hole
        # pages, each of which used to take one (measured: ~40 faults for ~840 holes)
        assert stats["faults"] < stats["pages_zero"], stats
        first = wl.verify(pid=pid, timeout=60)
        assert first["ok"], first
        time.sleep(1.0)                  # ~250 mutations, some on zero-mapped pages
        again = wl.verify(pid=pid, timeout=60)
        assert again["ok"] and again["mutations"] > first["mutations"], (first, again)


def test_page_hashes_beside_a_pages_file(tmp_path, monkeypatch):
    """The hashes the commit puts beside pages-ID.img are taken only when there is one per
    page of the file; otherwise the server finds the zero pages by reading them."""
    from array import array

    monkeypatch.chdir(tmp_path)
    want = array("Q", [0, 1, 2**64 - 1, 12345])
    (tmp_path / lazyserve.page_hashes_name(7)).write_bytes(want.tobytes())
    assert lazyserve.page_hashes(7, 4) == want
    assert lazyserve.page_hashes(7, 5) is None      # another length
    assert lazyserve.page_hashes(7, 3) is None
    assert lazyserve.page_hashes(8, 4) is None      # none for this file


@pytest.mark.criu
def test_a_reader_racing_the_workers(criu, tmp_path, agent_tmp):
    """scanwork reads all its memory over and over at full speed: after the restore it
    catches up with the workers at once and faults on pages they are placing. It goes on
    through the move -- the pass that spans it sees the freeze, and later passes follow --
    and every page checks out."""
    with Server(tmp_path, extra=["--restore"]) as server, \
            workloads.start("scanwork", mib=96, mix=0, tmpdir=tmp_path) as wl:
        n = len(workloads.scan_passes(wl))
        r = migrate(tmp_path, agent_tmp, server, wl)
        pid, images = r["restored_pid"], r["destination_path"]
        stats = done_stats(images)
        assert stats["error"] == 0 and stats["pages_zero_image"] > 0, stats
        deadline = time.monotonic() + 60
        while True:
            passes = workloads.scan_passes(wl)[n:]
            frozen = [i for i, p in enumerate(passes) if p["maxgap"] >= r["downtime"] / 2]
            if frozen and len(passes) >= frozen[0] + 3:
                break
            assert time.monotonic() < deadline, (r["downtime"], passes)
            time.sleep(0.05)
        res = wl.verify(pid=pid, timeout=60)
        assert res["ok"] and res["pid"] == 1, res


def _session_files(server_dir, sub: str) -> list[str]:
    """Names under every session's ``sub`` directory of a serve directory."""
    out = []
    for s in os.listdir(server_dir):
        d = os.path.join(server_dir, s, sub)
        if os.path.isdir(d):
            out += os.listdir(d)
    return out


@pytest.mark.criu
def test_memory_images_given_to_the_running_copy(criu, tmp_path, agent_tmp):
    """Once the copy runs (RESUMED), serve removes the session's memory images (held/ and
    images/'s pages files: no later round diffs against them, no restore brings back a
    stale copy) and its lazy-pages server, still placing pages, punches each placed
    2 MiB block out of the pages file: the copy's memory checks out, every page was
    placed, blocks were given back, none refused."""
    with Server(tmp_path, extra=["--restore"]) as server, \
            workloads.start("memwork", mib=768, dirty_mib_per_s=4, tmpdir=tmp_path) as wl:
        pid, images, stats = migrated(tmp_path, agent_tmp, server, wl)
        assert stats["pages_recycled"] > 0 and stats["pages_recycle_failed"] == 0, stats
        assert stats["punches"] > 0, stats
        placed = (stats["pages_faulted"] + stats["pages_prefetched"] + stats["pages_present"]
                  + stats["pages_dropped"] + stats["pages_abandoned"])
        assert placed == stats["pages_total"], stats
        res = wl.verify(pid=pid, timeout=120)
        assert res["ok"], res
        assert not [n for n in os.listdir(images) if n.startswith("pages-")]
        assert [n for n in os.listdir(images) if n.startswith("pagemap-")]
        assert not _session_files(server.dir, "held")
        assert "given to the restored copy" in server.log()


@pytest.mark.criu
def test_keep_pages_keeps_the_memory_images(criu, tmp_path, agent_tmp):
    """serve --keep-pages: the session keeps held/ and images/'s pages files after the
    copy runs, and its lazy-pages server gives nothing back."""
    with Server(tmp_path, extra=["--restore", "--keep-pages"]) as server, \
            workloads.start("memwork", mib=64, dirty_mib_per_s=1, tmpdir=tmp_path) as wl:
        pid, images, stats = migrated(tmp_path, agent_tmp, server, wl)
        assert stats["pages_recycled"] == 0, stats
        res = wl.verify(pid=pid, timeout=60)
        assert res["ok"], res
        assert [n for n in os.listdir(images) if n.startswith("pages-")]
        assert [n for n in _session_files(server.dir, "held") if n.startswith("pages-")]
        assert "given to the restored copy" not in server.log()


@pytest.mark.criu
def test_blocks_given_back_from_the_restore_on_while_the_copy_forks(criu, tmp_path,
                                                                    agent_tmp):
    """The lazy-pages server told to give blocks back from its start (SIGUSR1 as soon as
    it is up: every block is punched the moment its last page is placed, during the
    restore too) while lazyops forks children that read its memory, moves, discards and
    unmaps memory: a fork stops the punching of every block not complete by then, the
    children's reads and the full checks come out right, and blocks were given back."""
    import signal
    import threading

    told, stop = set(), threading.Event()

    def tell():
        while not stop.is_set():
            for pid, d, _cwd in procmem.lazy_pages_processes():
                # its socket is there once its SIGUSR1 handler is (before: the signal's
                # default action, which ends it)
                if pid not in told and os.path.exists(os.path.join(d, "lazy-pages.socket")):
                    try:
                        os.kill(pid, signal.SIGUSR1)
                        told.add(pid)
                    except ProcessLookupError:
                        pass
            time.sleep(0.005)

    with Server(tmp_path, extra=["--restore"]) as server, start_lazyops(tmp_path) as wl:
        before = wl.verify(timeout=60)
        assert before["ok"], before
        # the daemon starts with the first round and listens until the commit's restore
        # connects: told before any page is placed
        t = threading.Thread(target=tell, daemon=True)
        t.start()
        try:
            pid, images, stats = migrated(tmp_path, agent_tmp, server, wl)
        finally:
            stop.set()
            t.join()
        assert told, "no lazy-pages server was seen"
        assert stats["pages_recycled"] > 0 and stats["pages_recycle_failed"] == 0, stats
        check_lazyops_runs_on(wl, pid, before)
