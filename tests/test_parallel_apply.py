"""A whole image's frames applied on several threads at once (serve --apply-threads): the
pages file and the hashes are the same as applied one by one in order, in any frame order;
a page sent twice in a round and records out of order inside a frame are refused; and a
real migration restores through the parallel path."""
import asyncio
import random
import re
from array import array

import pytest

from deltaxfer import PAGE_SIZE, _core, transport
from deltaxfer.receiver import Receiver
from deltaxfer.serve import default_apply_threads
from deltaxfer.store import Store, StoreError, image_digest
from deltaxfer.transport import PeerError
from deltaxfer.wire import MsgType, encode_pages, iter_pagemap

import workloads
from faults import agent_tmp  # noqa: F401 (fixture)
from servers import Server
from test_migrate_criu import migrate_ok, verify_running
from test_serve_refusals import KEY, commit_files, good_transfer, leftovers, run
from test_store import held_pages, pagemap_of, split

# three runs of pages, 40 % random, 20 % zero, the rest repeated text: many frames
VADDRS = array("Q", [0x400000 + i * PAGE_SIZE for i in range(1500)]
               + [0x7f0000000000 + i * PAGE_SIZE for i in range(900)]
               + [0x7ffff0000000 + i * PAGE_SIZE for i in range(100)])


def mixed_pages(vaddrs, seed=7):
    rnd = random.Random(seed)
    out = bytearray()
    for i, _ in enumerate(vaddrs):
        k = rnd.random()
        if k < 0.4:
            out += rnd.randbytes(PAGE_SIZE)
        elif k < 0.6:
            out += bytes(PAGE_SIZE)
        else:
            out += (b"page %06d of the parallel apply test; " % i) * 100 + bytes(
                PAGE_SIZE - 100 * len(b"page %06d of the parallel apply test; " % i))
    return out


PAGES = mixed_pages(VADDRS)


def encoded(frame_size=64 << 10):
    frames, hashes, _ = _core.encode_round(PAGES, VADDRS, frame_size=frame_size)
    parts = split(frames)
    assert len(parts) >= 20, len(parts)
    return parts, hashes


def open_round(tmp_path, name="s"):
    s = Store(str(tmp_path / "serve")).session(name)
    rnd = s.begin_round(1, source="test")
    pm = pagemap_of(VADDRS)
    rnd.begin_image(0, "pid-1", len(pm.entries), len(VADDRS))
    rnd.add_pagemap(0, [(e.vaddr, e.nr_pages, e.flags) for e in pm.entries])
    return s, rnd


@pytest.mark.parametrize("order", ["shuffled", "reversed"])
def test_threads_write_what_one_thread_writes(tmp_path, order):
    parts, hashes = encoded()
    s, rnd = open_round(tmp_path)
    assert not rnd.applies_unordered(0)         # the first frame opens the pages file
    rnd.add_pages(0, parts[0])
    assert rnd.applies_unordered(0)
    rest = parts[1:]
    if order == "shuffled":
        random.Random(3).shuffle(rest)
    else:
        rest.reverse()
    pool = _core.ApplyPool(4)
    try:
        applier = rnd.unordered_applier(0)
        got = _drain(pool, [pool.submit(applier, f) for f in rest])
    finally:
        pool.close()
    assert all(isinstance(v, tuple) for v in got.values()), got
    rnd.end_image(0, image_digest(hashes))      # the digest of every page, as the source's
    rnd.finish()
    assert held_pages(s) == (list(VADDRS), bytes(PAGES))
    total = sum(sum(v) for v in got.values())
    assert 0 < total <= len(VADDRS)


def test_a_page_sent_twice_is_refused(tmp_path):
    parts, _ = encoded()
    s, rnd = open_round(tmp_path)
    rnd.add_pages(0, parts[0])
    rnd.add_pages(0, parts[5])
    with pytest.raises(StoreError) as e:
        rnd.add_pages(0, parts[5])
    assert e.value.code == "bad-payload"
    assert "already received in this round" in e.value.reason, e.value.reason
    rnd.abort()
    assert leftovers(tmp_path) == []


def test_records_out_of_order_inside_a_frame_are_refused(tmp_path):
    parts, _ = encoded()
    s, rnd = open_round(tmp_path)
    rnd.add_pages(0, parts[0])
    w = _core.FrameWriter()
    w.add_full(VADDRS[2000], bytes([1]) * PAGE_SIZE)
    w.add_full(VADDRS[1999], bytes([2]) * PAGE_SIZE)
    with pytest.raises(StoreError, match="out of order"):
        rnd.add_pages(0, w.finish())
    rnd.abort()


def test_abort_waits_for_the_pools_jobs(tmp_path):
    """abort() (the receiver's cleanup) returns only once no pool job works on the
    round's appliers: it closes the file they write to. Every job queued when it was
    called ends having written (none meets a closed file), and nothing is left."""
    parts, _ = encoded()
    s, rnd = open_round(tmp_path)
    rnd.add_pages(0, parts[0])
    pool = _core.ApplyPool(1)                   # one thread: most jobs still queued
    try:
        tokens = [pool.submit(rnd.unordered_applier(0), f) for f in parts[1:]]
        rnd.abort()
        got = _drain(pool, tokens)
    finally:
        pool.close()
    assert all(isinstance(v, tuple) for v in got.values()), got
    assert leftovers(tmp_path) == []


def test_default_threads():
    assert default_apply_threads(1) == 1 and default_apply_threads(2) == 1
    assert default_apply_threads(4) == 2 and default_apply_threads(16) == 8
    assert default_apply_threads(128) == 8


async def _start(tmp_path, threads):
    receiver = Receiver(Store(str(tmp_path / "serve")), apply_threads=threads)
    server = await transport.serve("127.0.0.1", 0, key=KEY, handler=receiver.handle)
    return receiver, server, server.sockets[0].getsockname()[1]


async def _begin(port, session):
    """A send session of one image (pid-1), begun: the conn, past STATE."""
    conn = await transport.connect("127.0.0.1", port, key=KEY)
    await conn.send_control(MsgType.BEGIN, {"session": session, "mode": "send",
                                            "source": "t", "images": [{"id": "pid-1"}]})
    await conn.recv_control(MsgType.STATE)
    while (await conn.recv()).type != MsgType.STATE_END:
        pass
    return conn


async def _round_image(conn, round_no=1, final=True):
    """ROUND, then its one image's IMAGE and pagemap (VADDRS)."""
    pm = pagemap_of(VADDRS)
    await conn.send_control(MsgType.ROUND, {"round": round_no, "final": final})
    await conn.send_control(MsgType.IMAGE, {"index": 0, "id": "pid-1",
                                            "entries": len(pm.entries), "pages": len(VADDRS)})
    pairs = array("Q")
    for e in pm.entries:
        pairs += array("Q", [e.vaddr, e.nr_pages | e.flags << 32])
    for p in iter_pagemap(0, pairs):
        await conn.send(MsgType.PAGEMAP, p)


async def _open_image(port, session):
    """A send session's first round, up to its one image's pagemap (VADDRS): the conn."""
    conn = await _begin(port, session)
    await _round_image(conn)
    return conn


async def _send(port, parts, hashes, *, twice=None):
    conn = await _open_image(port, "p")
    for i, f in enumerate(parts):
        await conn.send(MsgType.PAGES, encode_pages(0, f))
        if i == twice:
            await conn.send(MsgType.PAGES, encode_pages(0, f))
    await conn.send_control(MsgType.IMAGE_END, {"index": 0,
                                                "digest": f"{image_digest(hashes):016x}"})
    await conn.send_control(MsgType.ROUND_END, {"round": 1})
    ok = await conn.recv_control(MsgType.ROUND_OK)
    return ok, await commit_files(conn)


def _send_reported(loop_kind, tmp_path, parts, hashes):
    """_send to a receiver asked for 4 apply threads; the pages held checked, (COMMITTED's
    body, the commit's report)."""
    reports = []

    async def main():
        receiver, server, port = await _start(tmp_path, 4)
        receiver.on_commit = reports.append
        async with server:
            return await _send(port, parts, hashes)
    ok, done = run(loop_kind, main())
    assert ok["pages"] == len(VADDRS)
    s = Store(str(tmp_path / "serve")).session("p")
    assert held_pages(s) == (list(VADDRS), bytes(PAGES))
    (report,) = reports
    return done, report


def test_receiver_applies_on_threads(loop_kind, tmp_path):
    parts, hashes = encoded(frame_size=32 << 10)
    done, report = _send_reported(loop_kind, tmp_path, parts, hashes)
    assert report["apply_threads"] == 4
    # every frame after the image's first went to the apply threads (in batches)
    assert 1 <= report["parallel_batches"] <= len(parts) - 1, report
    assert sum(report["records"].values()) > 0 and done["path"].endswith("/p/images")


def test_receiver_refuses_a_page_sent_twice_and_keeps_serving(loop_kind, tmp_path):
    parts, hashes = encoded(frame_size=32 << 10)

    async def main():
        _, server, port = await _start(tmp_path, 3)
        async with server:
            with pytest.raises(PeerError) as e:
                await _send(port, parts, hashes, twice=len(parts) // 2)
            assert e.value.code == "bad-payload", e.value
            assert "already received in this round" in e.value.reason, e.value.reason
            await asyncio.sleep(0.05)
            assert leftovers(tmp_path) == []
            ok, done = await good_transfer(port)
            assert ok["pages"] == 32
    run(loop_kind, main())


@pytest.mark.slow
def test_migration_restores_through_apply_threads(criu, tmp_path, agent_tmp):
    mib = 96
    with Server(tmp_path, extra=["--restore", "--apply-threads", "3"]) as server, \
            workloads.start("memwork", mib=mib, dirty_mib_per_s=4, tmpdir=tmp_path) as wl:
        r, pid = migrate_ok(tmp_path, agent_tmp, server, wl)
        verify_running(wl, pid, expect_pages=mib * 2**20 // 4096)
        m = re.search(r"(\d+) batches on 3 apply threads", server.log())
        assert m and int(m.group(1)) > 0, server.log()[-3000:]


# -- _core.ApplyPool directly --------------------------------------------------------------

def _drain(pool, tokens, timeout=10.0):
    import select
    out = {}
    while len(out) < len(tokens):
        r, _, _ = select.select([pool.fd], [], [], timeout)
        assert r, "the pool's eventfd stayed silent"
        out.update(pool.done())
    return out


def _check_applied(a, fd, got, hashes):
    """Every job applied; the applier's hashes are the source's and the file holds PAGES."""
    import os
    assert all(isinstance(v, tuple) for v in got.values()), got
    h, missing = a.finish()
    assert missing == 0 and image_digest(h) == image_digest(hashes)
    assert os.pread(fd, len(PAGES), 0) == bytes(PAGES)


def _applier(tmp_path, name="pages"):
    import os
    fd = os.open(tmp_path / name, os.O_RDWR | os.O_CREAT, 0o600)
    os.posix_fallocate(fd, 0, len(VADDRS) * PAGE_SIZE)
    return fd, _core.PageApplier(VADDRS, fd, _core.APPLY_AT_INDEX)


def test_pool_applies_and_reports_each_job(tmp_path):
    import os
    parts, hashes = encoded()
    fd, a = _applier(tmp_path)
    pool = _core.ApplyPool(3)
    try:
        tokens = [pool.submit(a, f) for f in parts]
        assert pool.inflight == len(parts)
        got = _drain(pool, tokens)
        assert set(got) == set(tokens) and pool.inflight == 0
        _check_applied(a, fd, got, hashes)
    finally:
        pool.close()
        a.close()
        os.close(fd)


def test_pool_returns_the_errors_of_its_jobs(tmp_path):
    """A corrupt frame and a write that fails come back as the job's exception (the
    applier's own: FrameError, OSError with the errno); the other jobs still apply."""
    import errno
    import os
    parts, _ = encoded()
    fd, a = _applier(tmp_path)
    rfd = os.open(tmp_path / "pages", os.O_RDONLY)          # pwritev: EBADF
    ro = _core.PageApplier(VADDRS, rfd, _core.APPLY_AT_INDEX)
    bad = bytearray(parts[2])
    bad[-5] ^= 0xFF
    pool = _core.ApplyPool(2)
    try:
        t_ok = pool.submit(a, parts[1])
        t_bad = pool.submit(a, bad)
        t_io = pool.submit(ro, parts[3])
        got = _drain(pool, [t_ok, t_bad, t_io])
        assert isinstance(got[t_ok], tuple)
        assert isinstance(got[t_bad], ValueError) and "frame at byte 0" in str(got[t_bad])
        assert isinstance(got[t_io], OSError) and got[t_io].errno == errno.EBADF, got[t_io]
    finally:
        pool.close()
        for x in (a, ro):
            x.close()
        os.close(fd)
        os.close(rfd)


def test_pool_close_cancels_what_has_not_started_and_frees_a_closed_applier(tmp_path):
    """close() with jobs queued: the one running finishes, the rest come back cancelled;
    an applier closed while its jobs were out is freed once they are back."""
    import os
    parts, _ = encoded(frame_size=8 << 10)
    fd, a = _applier(tmp_path)
    pool = _core.ApplyPool(1)
    tokens = [pool.submit(a, f) for f in parts]
    a.close()                                   # deferred: jobs are out
    with pytest.raises(ValueError, match="only an open at-index applier"):
        pool.submit(a, parts[0])
    got = dict(pool.close())
    assert set(got) == set(tokens)
    cancelled = [v for v in got.values() if isinstance(v, ValueError)
                 and "stopped before this frame was applied" in str(v)]
    done = [v for v in got.values() if isinstance(v, tuple)]
    assert len(cancelled) + len(done) == len(tokens), got   # (how many ran: a race)
    with pytest.raises(ValueError, match="closed"):
        a.apply(parts[0])
    os.close(fd)
    with pytest.raises(ValueError, match="ApplyPool is closed"):
        pool.submit(a, parts[0])


def test_receiver_without_threads_applies_in_order(loop_kind, tmp_path, monkeypatch, caplog):
    """Threads that cannot be started (a limit on them): the session applies on its
    worker, in order, and says so."""
    import logging

    def refuse(threads):
        raise MemoryError(f"ApplyPool: {threads} threads could not be started")
    monkeypatch.setattr(_core, "ApplyPool", refuse)
    caplog.set_level(logging.WARNING)
    parts, hashes = encoded(frame_size=32 << 10)
    _, report = _send_reported(loop_kind, tmp_path, parts, hashes)
    assert report["apply_threads"] == 1 and report["parallel_batches"] == 0, report
    assert "could not be started; its frames are applied by one thread" in caplog.text


def test_receiver_cleans_up_a_round_cut_while_applies_run(loop_kind, tmp_path):
    """The client goes away in the middle of a whole image's frames (applies in flight):
    the session's pool is closed, the round discarded, nothing left; the server serves."""
    parts, _ = encoded(frame_size=16 << 10)

    async def main():
        _, server, port = await _start(tmp_path, 3)
        async with server:
            conn = await _open_image(port, "cut")
            for f in parts[:len(parts) // 2]:
                await conn.send(MsgType.PAGES, encode_pages(0, f))
            conn.close()
            for _ in range(200):
                await asyncio.sleep(0.02)
                if not leftovers(tmp_path):
                    break
            assert leftovers(tmp_path) == []
            ok, done = await good_transfer(port)
            assert ok["pages"] == 32
    run(loop_kind, main())


_TRIM_CHILD = r"""
import os, select, sys, time
from array import array
from deltaxfer import PAGE_SIZE, _core
from deltaxfer.core import procmem
from deltaxfer.core.pipeline import split_frames

def rss():
    return int(procmem.status(os.getpid())["VmRSS"].split()[0]) * 1024

n = 4096                                    # 16 MiB of random pages: 4 MiB frames
vaddrs = array("Q", [0x400000 + i * PAGE_SIZE for i in range(n)])
pages = os.urandom(n * PAGE_SIZE)
frames, hashes, _ = _core.encode_round(pages, vaddrs, frame_size=4 << 20)
parts = [bytes(f) for f in split_frames(frames)]
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
os.posix_fallocate(fd, 0, n * PAGE_SIZE)
a = _core.PageApplier(vaddrs, fd, _core.APPLY_AT_INDEX)
pool = _core.ApplyPool(4)

def drain(count):
    got = {}
    while len(got) < count:
        r, _, _ = select.select([pool.fd], [], [], 10)
        assert r
        got.update(pool.done())
    assert all(isinstance(v, tuple) for v in got.values()), got

first, rest = parts[:2], parts[2:]
for f in first:
    pool.submit(a, f)
drain(len(first))
before = rss()
pool.trim()
time.sleep(0.3)                             # the idle threads wake and free
after = rss()
for f in rest:                              # and apply again, allocating anew
    pool.submit(a, f)
drain(len(rest))
h, missing = a.finish()
assert missing == 0 and bytes(h) == bytes(hashes)
assert os.pread(fd, len(pages), 0) == pages
pool.close()
print(len(parts), before - after)
"""


def test_pool_trim_frees_the_threads_work_areas_and_applies_again(tmp_path):
    """After trim() the idle threads give back their work areas (each holds a decoded
    frame: 4 MiB here), and the next jobs allocate again and apply correctly. In a fresh
    process, where glibc maps a 4 MiB block of its own and unmaps it when freed."""
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", _TRIM_CHILD, str(tmp_path / "pages")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    nparts, freed = map(int, out.stdout.split())
    assert nparts >= 4
    # at least one thread held a frame's 4 MiB of raw records (a busy machine may give
    # both jobs to one thread; the process's own RSS moves by a few hundred KiB besides)
    assert freed >= 3 << 20, freed


def test_receiver_trims_its_buffers_after_a_live_round_only(loop_kind, tmp_path,
                                                           monkeypatch):
    """The receive buffers and the apply threads' work areas go back after a live round
    (the first round's bulk needed them), not after the final one (inside the freeze)."""
    from deltaxfer import receiver as receiver_mod
    trims, pool_trims = [], []
    real_trim = transport.Connection.trim_buffers
    monkeypatch.setattr(transport.Connection, "trim_buffers",
                        lambda self, keep: (trims.append(keep), real_trim(self, keep)))
    real_pool = _core.ApplyPool

    class CountingPool:
        def __init__(self, n):
            self._p = real_pool(n)

        def __getattr__(self, name):
            return getattr(self._p, name)

        def trim(self):
            pool_trims.append(1)
            return self._p.trim()
    monkeypatch.setattr(receiver_mod._core, "ApplyPool", CountingPool)
    parts, hashes = encoded(frame_size=32 << 10)

    async def main():
        _, server, port = await _start(tmp_path, 2)
        async with server:
            conn = await _begin(port, "t")
            for round_no, final in ((1, False), (2, True)):
                await _round_image(conn, round_no, final)
                if round_no == 1:
                    for f in parts:
                        await conn.send(MsgType.PAGES, encode_pages(0, f))
                await conn.send_control(MsgType.IMAGE_END, {
                    "index": 0, "digest": f"{image_digest(hashes):016x}"})
                await conn.send_control(MsgType.ROUND_END, {"round": round_no})
                await conn.recv_control(MsgType.ROUND_OK)
                if round_no == 1:
                    assert trims == [receiver_mod.ROUND_KEEP_BYTES] and pool_trims == [1]
            return await commit_files(conn)
    done = run(loop_kind, main())
    assert trims == [receiver_mod.ROUND_KEEP_BYTES] and pool_trims == [1]
    assert done["path"].endswith("/t/images")


def test_pool_trim_while_jobs_run_loses_nothing(tmp_path):
    """trim() called again and again while jobs are queued and running: a thread frees
    its work area only when idle, so every job applies, and the file and hashes are
    those of the frames applied in order."""
    import os
    parts, hashes = encoded(frame_size=32 << 10)
    fd, a = _applier(tmp_path)
    pool = _core.ApplyPool(3)
    try:
        tokens = []
        for i, f in enumerate(parts):
            tokens.append(pool.submit(a, f))
            if i % 3 == 0:
                pool.trim()
        got = _drain(pool, tokens)
        pool.trim()
        _check_applied(a, fd, got, hashes)
    finally:
        pool.close()
        a.close()
        os.close(fd)
