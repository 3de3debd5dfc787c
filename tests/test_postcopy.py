"""Post-copy of the residual (issue 17, deliverable 3b; deltaxfer/postcopy.py): real
migrations whose final round leaves the pages written since the last round on the frozen
source; the copy resumes at once and deltaxfer's lazy-pages server places those pages as
they arrive, asking for the ones the copy faults on first. Checked by the workloads
themselves (every page's content), by both sides' statistics, and on the failure path:
the link lost while pages are still on the source kills the destination's copy and
leaves the source stopped with its memory whole."""
import contextlib
import json
import os
import signal
import subprocess
import time
from array import array

import pytest

import workloads
from deltaxfer import lazyserve
from deltaxfer.core import procmem
from deltaxfer.postcopy import page_runs
from deltaxfer.wire import (MsgType, ProtocolError, decode_postcopy_pages, decode_runs,
                            encode_postcopy_pages, iter_runs)
from faults import agent_env, agent_tmp, migrate_adopting, migrate_cmd, run_migrate  # noqa: F401
from servers import Server, served_hosts, write_key


# -- the wire and the runs ------------------------------------------------------------------

def test_page_runs_cut_at_gaps_and_at_the_batch_size():
    v = array("Q", [0x1000, 0x2000, 0x3000, 0x5000] + [0x10000 + i * 4096 for i in range(5)])
    starts, counts = page_runs(v, limit=3)
    assert list(starts) == [0x1000, 0x5000, 0x10000, 0x13000]
    assert list(counts) == [3, 1, 3, 2]


def test_postcopy_pages_round_trip_and_refusals():
    data = bytes(range(256)) * 16 * 3
    p = encode_postcopy_pages(7, [0x1000, 0x8000], [1, 2], data, False)
    index, v, n, flags, raw, got = decode_postcopy_pages(p)
    assert (index, list(v), list(n), flags, raw, bytes(got)) == (7, [0x1000, 0x8000], [1, 2],
                                                                False, 3 * 4096, data)
    with pytest.raises(ProtocolError):          # the runs say 3 pages, 2 came
        decode_postcopy_pages(p[:-4096])
    bad = bytearray(p)
    bad[16] = 1                                 # a vaddr that is not page-aligned
    with pytest.raises(ProtocolError):
        decode_postcopy_pages(bad)
    with pytest.raises(ProtocolError):
        decode_postcopy_pages(p[:10])
    (table,) = list(iter_runs(2, [0x4000], [3], "FETCH"))
    assert [list(x) if not isinstance(x, int) else x for x in decode_runs(table, "FETCH")] \
        == [2, [0x4000], [3]]
    (zero,) = list(iter_runs(2, [0x4000], [0], "FETCH"))
    with pytest.raises(ProtocolError):
        decode_runs(zero, "FETCH")
    assert MsgType.POSTCOPY_PAGES in (MsgType.PENDING, MsgType.POSTCOPY_PAGES)


def test_postcopy_xor_body_is_checked_against_the_destinations_copy(tmp_path):
    """The destination applies an XOR body only to the copy the source named: pages
    whose copy here has another hash are refused (digest), never patched."""
    from array import array as arr

    from deltaxfer import _core
    from deltaxfer.postcopy import PostcopyReceiver, _Image
    from deltaxfer.store import StoreError

    old = bytes([7]) * 4096 + bytes([9]) * 4096
    new = bytes([7]) * 4000 + bytes(96) + bytes([9]) * 4096
    path = tmp_path / "pages.img"
    path.write_bytes(old)
    fd = os.open(path, os.O_RDWR)
    try:
        hashes, _, _ = _core.hash_pages(old)
        img = _Image(0, "pid-1", arr("Q", [0x1000, 0x2000]), arr("Q", hashes), fd)
        img.mask[:] = b"\x01\x01"
        deltas, lengths = _core.xor_encode_pages(old, new)
        body = arr("q", lengths).tobytes() + deltas
        rcv = PostcopyReceiver.__new__(PostcopyReceiver)
        got = rcv._undelta(img, [0], [2], memoryview(body))
        assert bytes(got) == new
        img.hashes[1] ^= 1                     # the copy here is not the one named
        with pytest.raises(StoreError, match="not the one"):
            rcv._undelta(img, [0], [2], memoryview(body))
    finally:
        os.close(fd)


# -- real migrations ------------------------------------------------------------------------

def _migrate(tmp_path, agent_tmp, server, wl, *extra, timeout=240) -> dict:
    m = migrate_adopting(wl, server.addr, tmp_path, agent_tmp, *extra, timeout=timeout)
    r = m.report
    assert m.rc == 0 and r["outcome"] == "migrated", (m.rc, m.stderr[-3000:], r and r.get(
        "error"), server.log()[-3000:])
    return r


def _lazy_stats(images) -> dict:
    deadline = time.monotonic() + 60
    while (stats := lazyserve.done_stats(images)) is None:
        assert time.monotonic() < deadline, open(os.path.join(images, "lazy-pages.log")).read()
        time.sleep(0.05)
    return stats


@pytest.mark.criu
@pytest.mark.parametrize("whole_pages", [True, False], ids=["whole-pages", "words"])
def test_fast_writer_migrates_in_postcopy(criu, tmp_path, agent_tmp, whole_pages):
    """A writer rewriting pages as fast as it can (whole random pages; single words):
    `--converge postcopy` leaves what it wrote since the last round on the source; the
    copy runs at once, every page ends up right (memwork checks all of them, twice), the
    destination's server held those pages back until they arrived and placed them, and
    both sides account for every one."""
    with Server(tmp_path, extra=["--restore"]) as server, \
            workloads.start("memwork", mib=96 if whole_pages else 48, dirty_mib_per_s=200,
                            tmpdir=tmp_path, whole_pages=whole_pages) as wl:
        # (48 MiB: inside the 64 MiB XOR cache, the source has every page's base)
        r = _migrate(tmp_path, agent_tmp, server, wl, "--converge", "postcopy",
                     "--max-rounds", "3")
        pc = r["converge"]["postcopy"]
        assert r["converge"]["postcopy_reason"] == "--converge postcopy"
        assert pc["pages"] > 0 and pc["pages"] == r["freeze"]["postcopy_pages"], r["converge"]
        assert "source_ran" not in pc, pc      # CRIU's own stop is not "the source ran"
        res = wl.verify(pid=r["restored_pid"], timeout=120)
        assert res["ok"], res
        stats = _lazy_stats(r["destination_path"])
        assert stats["error"] == 0, stats
        assert stats["pages_pending"] == pc["pages"], (stats, pc)
        assert stats["postcopy"] == {"connected": True, "ended": True,
                                     "arrived": pc["pages"]}, stats
        # how long the copy's faults waited on pending pages, as the server timed them,
        # reaches the source's report (QEMU's post-copy "blocktime")
        assert pc["fault_waits"] == stats["fault_waits"] >= 1, (pc, stats)
        assert 0 < pc["fault_wait_max_s"] <= pc["fault_wait_s"] < pc["seconds"] + 30, pc
        placed = (stats["pages_faulted"] + stats["pages_prefetched"] + stats["pages_present"]
                  + stats["pages_dropped"] + stats["pages_abandoned"]
                  + stats["pages_postcopied"])
        assert placed == stats["pages_total"], stats
        if not whole_pages:
            # single words changed: the pages went as XOR deltas against the copy the
            # destination held (its hash checked on both sides), a fraction of their size
            assert pc["xor_pages"] > 0 and pc["bytes"] < pc["pages"] * 4096 / 4, pc
        time.sleep(0.3)
        again = wl.verify(pid=r["restored_pid"], timeout=120)
        assert again["ok"] and again["mutations"] > res["mutations"], (res, again)
        # the source is gone (killed once every page had arrived)
        assert not procmem.exists(r["pid"]) or procmem.state(r["pid"]) == "Z"


@pytest.mark.criu
def test_postcopy_while_the_copy_forks_moves_and_discards(criu, tmp_path, agent_tmp):
    """lazyops (forks children that read its memory, mremaps, discards and unmaps pages,
    rewriting them, every millisecond) moved in post-copy: its pending pages are the ones
    it rewrote last; the copy's children share the parent's pending pages, a moved run
    gets its pages where it went, a discarded or unmapped one reads as zeros -- and every
    check of the workload (its children's included) holds."""
    from test_lazy_restore import start_lazyops
    for attempt in range(4):
        # whether the last interval wrote held pages is the workload's timing: in about
        # one run in ten here it did not (the final round then has nothing to postpone)
        d = tmp_path / f"try{attempt}"
        d.mkdir()
        with Server(d, extra=["--restore"]) as server, start_lazyops(d) as wl:
            assert wl.verify(timeout=60)["ok"]
            r = _migrate(d, agent_tmp, server, wl, "--converge", "postcopy",
                         "--max-rounds", "3")
            if "postcopy" not in r["converge"]:
                assert "no page to follow" in r["converge"]["postcopy_reason"], r["converge"]
                assert wl.verify(pid=r["restored_pid"], timeout=60)["ok"]
                continue
            _check_lazyops_postcopy(wl, r)
            return
    pytest.fail("no post-copy in four migrations of lazyops")


def _check_lazyops_postcopy(wl, r):
    """The post-copy of lazyops: both sides' accounting and the workload's checks."""
    pc = r["converge"]["postcopy"]
    assert pc["pages"] > 0, r["converge"]
    stats = _lazy_stats(r["destination_path"])
    assert stats["error"] == 0 and stats["pages_pending"] == pc["pages"], stats
    placed = (stats["pages_faulted"] + stats["pages_prefetched"] + stats["pages_present"]
              + stats["pages_dropped"] + stats["pages_abandoned"]
              + stats["pages_postcopied"])
    assert placed == stats["pages_total"], stats
    first = wl.verify(pid=r["restored_pid"], timeout=60)
    assert first["ok"], first
    time.sleep(0.3)
    again = wl.verify(pid=r["restored_pid"], timeout=60)
    assert again["ok"] and again["cycles"] > first["cycles"], (first, again)


@pytest.mark.criu
def test_postcopy_refused_where_it_cannot_run(criu, tmp_path, agent_tmp):
    """--converge postcopy without a restore, or without written-page tracking, is
    refused before anything is frozen; the source runs on."""
    with Server(tmp_path, extra=["--restore"]) as server, \
            workloads.start("memwork", mib=16, dirty_mib_per_s=2, tmpdir=tmp_path) as wl:
        key = write_key(tmp_path / "client.key")
        for extra, why in ((["--no-restore"], "--no-restore"),
                           (["--tracking", "off"], "tracking")):
            m = run_migrate(wl.pid, server.addr, key, tmp_path / "r.json", "--converge",
                            "postcopy", *extra, env=agent_env(agent_tmp))
            assert m.rc != 0 and "postcopy" in m.report["error"] and why in \
                m.report["error"], m.report
            assert "source runs on" in m.report["outcome"], m.report
        assert wl.verify(timeout=60)["ok"]


@contextlib.contextmanager
def _postcopy_running(tmp_path, agent_tmp):
    """A whole-page writer being migrated in post-copy between two hosts joined by a veth
    shaped to 200 Mbit/s, so that the pages after the resume take seconds: yields
    (workload, migrate process, server, report path, restored pid) as soon as the copy
    runs and RESUMED is on its way to the source."""
    with served_hosts(tmp_path, "200mbit") as (lab, server, key):
        with workloads.start("memwork", mib=64, dirty_mib_per_s=400, tmpdir=tmp_path,
                             whole_pages=True,
                             prefix=tuple(lab.source.command([]))) as wl:
            report = tmp_path / "r.json"
            argv = lab.source.command(migrate_cmd(
                wl.pid, f"{server.host}:{server.port}", key, report,
                "--converge", "postcopy", "--max-rounds", "2"))
            p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True,
                                 env=agent_env(agent_tmp))
            try:
                deadline = time.monotonic() + 180
                while "the restored process" not in server.log():
                    assert p.poll() is None, (p.communicate(), server.log()[-3000:])
                    assert time.monotonic() < deadline, server.log()[-3000:]
                    time.sleep(0.01)
                restored = int(server.log().split("the restored process ")[-1].split()[0])
                time.sleep(0.3)
                yield wl, p, server, report, restored
            finally:
                if p.poll() is None:
                    p.communicate(timeout=120)


def _lazy_daemons(tmp_path) -> list[int]:
    """Lazy-pages servers (deltaxfer's or criu's) serving a directory under tmp_path."""
    return [pid for pid, d, _ in procmem.lazy_pages_processes() if d.startswith(str(tmp_path))]


def _postcopy_on_a_slow_link(tmp_path, agent_tmp, interrupt):
    """_postcopy_running, then ``interrupt(migrate process, server)``: the copy must be
    killed and the source stay stopped, its memory whole (resumed and verified here).
    Returns (source pid, server log, migrate's report or None)."""
    with _postcopy_running(tmp_path, agent_tmp) as (wl, p, server, report, restored):
        source = wl.pid
        interrupt(p, server)
        p.communicate(timeout=60)
        deadline = time.monotonic() + 60
        while procmem.exists(restored) and procmem.state(restored) != "Z":
            assert time.monotonic() < deadline, f"the copy {restored} still runs"
            time.sleep(0.05)
        time.sleep(0.5)       # the receiver's last words
        # and the copy's lazy-pages server ends with it (it used to stay, waiting on the
        # pending pages forever)
        while _lazy_daemons(tmp_path):
            assert time.monotonic() < deadline, f"lazy-pages server left: {_lazy_daemons(tmp_path)}"
            time.sleep(0.05)
        log = server.log()
        assert "post-copy done" not in log, "the post-copy was over before it was interrupted"
        # the source: stopped, whole; resumed by hand, it checks out
        assert procmem.state(source) in ("T", "t"), procmem.state(source)
        os.kill(source, signal.SIGCONT)
        res = wl.verify(timeout=120)
        assert res["ok"], res
        return source, log, json.loads(report.read_text()) if report.exists() else None


@pytest.mark.criu
def test_link_lost_in_postcopy_kills_the_copy_and_keeps_the_source(criu, tmp_path, agent_tmp):
    """The agent is SIGKILLed while pages are still on the source (the link goes with
    it): the destination kills its copy, which cannot run without them; the source stays
    stopped -- not killed, not resumed by deltaxfer -- and its memory is whole."""
    _, log, _ = _postcopy_on_a_slow_link(tmp_path, agent_tmp, lambda p, server: p.kill())
    assert "post-copy failed" in log, log[log.find("the restored process"):]


@pytest.mark.criu
def test_serve_killed_in_postcopy_kills_the_copy_and_keeps_the_source(criu, tmp_path,
                                                                      agent_tmp):
    """`serve` is SIGKILLed while pages are still on the source: its lazy-pages server,
    told which tree it serves, kills that tree when the receiver's socket closes; the
    agent reports the post-copy failed and leaves the source stopped, with the operator's
    way on in the report."""
    def kill_serve(p, server):
        server.proc.kill()

    source, _, r = _postcopy_on_a_slow_link(tmp_path, agent_tmp, kill_serve)
    assert r is not None and r["outcome"].startswith("post-copy failed"), r
    assert "post-copy failed" in r["error"] and f"kill -CONT {source}" in r["hint"], r


def test_hook_refuses_postcopy(tmp_path, capsys):
    """The stand-alone hook ends when post-dump returns: nothing would send the pages
    after the resume, so converge=postcopy is refused there (post-dump fails: criu
    resumes the tree)."""
    from deltaxfer.migrate import run_standalone_hook
    key = write_key(tmp_path / "k.key")
    config = {"to": "127.0.0.1:9", "key_file": str(key), "converge": "postcopy"}
    assert run_standalone_hook("post-dump", config, {}) == 1
    assert "postcopy" in capsys.readouterr().err


@pytest.mark.criu
def test_source_continued_during_postcopy_is_reported(criu, tmp_path, agent_tmp):
    """CRIU leaves the source SIGSTOPped; something else continuing it while its pages are
    still being read means the copy may hold pages of two moments. deltaxfer cannot undo
    that, but it sees it (the tasks' run time grew after post-dump) and says so."""
    with _postcopy_running(tmp_path, agent_tmp) as (wl, p, server, report, restored):
        source = wl.pid
        os.kill(source, signal.SIGCONT)
        p.communicate(timeout=120)
        r = json.loads(report.read_text())
        wl.adopt(restored)
        assert r["outcome"] == "migrated", r
        assert source in r["converge"]["postcopy"]["source_ran"], r["converge"]
        assert "ran during the post-copy" in r["hint"], r
