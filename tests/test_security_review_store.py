"""Security review of the destination store (issue 15 items 4, 6 and 7-serve): what a key
holder can make the receiver allocate or write, the serve directory's trust, and the
signalling of a restored tree. Every test here failed on the code before the fix."""
import os
import resource
import subprocess
import sys
import textwrap
import tracemalloc
from array import array

import pytest

from deltaxfer import PAGE_SIZE, _core
from deltaxfer.store import Store, StoreError, image_digest

from test_store import pagemap_of, pages_of, send_round


def _held_session(tmp_path, n=16):
    s = Store(str(tmp_path / "serve")).session("s")
    v = array("Q", (0x400000 + i * PAGE_SIZE for i in range(n)))
    send_round(s, 1, v, pages_of(v, 1))
    return s, v


def _begin(rnd, v, index=0):
    pm = pagemap_of(v)
    rnd.begin_image(index, "pid-1", len(pm.entries), len(v))
    rnd.add_pagemap(index, [(e.vaddr, e.nr_pages, e.flags) for e in pm.entries])


# -- item 4: key-holder limits ------------------------------------------------------------

@pytest.mark.parametrize("parent_linked", [True, False])
def test_zero_record_flood_is_refused_before_anything_is_allocated(tmp_path, parent_linked):
    """One frame of ~100k zero-page records for an image of 16 pages: refused from the
    records alone; before, the final round allocated records x 4 KiB (here 400 MiB; a
    16 MiB frame asked for ~5.8 GiB) and wrote it before checking any vaddr."""
    s, v = _held_session(tmp_path)
    fw = _core.FrameWriter(frame_size=_core.FRAME_MAX_RAW)
    for i in range(100_000):
        fw.add_zero(0x400000 + i * PAGE_SIZE)
    frame = fw.finish()
    rnd = s.begin_round(2, "test", parent_linked=parent_linked)
    _begin(rnd, v)
    tracemalloc.start()
    try:
        with pytest.raises(StoreError) as e:
            rnd.add_pages(0, frame)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        rnd.abort()
    assert e.value.code == "bad-payload" and "outside the image's pagemap" in e.value.reason
    assert peak < 8 << 20, peak
    assert not os.path.exists(os.path.join(s.path, "final.tmp"))


def test_huge_pagemap_entry_count_is_refused(tmp_path):
    """An image announcing 2^36 entries (kept as one Python object each, before) for a
    handful of pages is refused at IMAGE: at most one entry per present page."""
    s, _ = _held_session(tmp_path)
    rnd = s.begin_round(2, "test")
    try:
        with pytest.raises(StoreError) as e:
            rnd.begin_image(0, "pid-1", 1 << 36, 16)
        assert e.value.code == "too-large" and "entries" in e.value.reason
    finally:
        rnd.abort()


def test_more_entries_than_announced_are_refused_before_they_are_kept(tmp_path):
    s, v = _held_session(tmp_path)
    rnd = s.begin_round(2, "test")
    rnd.begin_image(0, "pid-1", 1, 16)
    pairs = array("Q")
    for i in range(4):
        pairs.extend((0x400000 + 2 * i * PAGE_SIZE, 1 | 4 << 32))
    try:
        with pytest.raises(StoreError, match="more pagemap entries"):
            rnd.add_pagemap(0, memoryview(pairs))
    finally:
        rnd.abort()


def test_large_file_end_keeps_memory_bounded(tmp_path):
    """FILE_END hashes what was written as it was written: a 128 MiB file costs no 128 MiB
    read at its end (before, FileSet.end read the whole file, up to 1 GiB, into memory on
    the event loop)."""
    s, _ = _held_session(tmp_path)
    files = s.begin_files()
    chunk = os.urandom(1 << 20)
    total = 128
    files.begin("core-1.img", total << 20)
    h = _core.Xxh3Stream()
    tracemalloc.start()
    try:
        for _ in range(total):
            files.data(chunk)
            h.update(chunk)
        files.end(h.digest())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        files.discard()
    assert peak < 16 << 20, peak


_SHORT_WRITE = textwrap.dedent("""
    import resource, sys
    from array import array
    sys.path.insert(0, sys.argv[2])
    from deltaxfer import PAGE_SIZE, _core
    from deltaxfer.store import Store, StoreError, image_digest
    from test_store import pagemap_of, pages_of, send_round
    s = Store(sys.argv[1]).session("s")
    v = array("Q", (0x400000 + i * PAGE_SIZE for i in range(16)))
    send_round(s, 1, v, pages_of(v, 1))
    new = bytearray(pages_of(v, 2))
    frames, hashes, _ = _core.encode_round(new, v, xor=False)
    rnd = s.begin_round(2, "t", parent_linked=True)
    pm = pagemap_of(v)
    rnd.begin_image(0, "pid-1", len(pm.entries), len(v))
    rnd.add_pagemap(0, [(e.vaddr, e.nr_pages, e.flags) for e in pm.entries])
    # files may grow to 5 pages and a half from here on: the child's pages file is cut short
    resource.setrlimit(resource.RLIMIT_FSIZE, (5 * PAGE_SIZE + 100, resource.RLIM_INFINITY))
    try:
        rnd.add_pages(0, frames)
        rnd.end_image(0, image_digest(hashes))
        rnd.finish()
        print("ACCEPTED")
    except StoreError as e:
        print("REFUSED", e.code, e.reason)
""")


def test_short_write_of_the_final_round_is_an_error(tmp_path):
    """A pages file that could not be written whole (RLIMIT_FSIZE: a short write, then
    EFBIG) fails the round; before, a short os.write went unnoticed and the round was
    confirmed over a truncated child image."""
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    r = subprocess.run([sys.executable, "-c", _SHORT_WRITE, str(tmp_path / "serve"), tests_dir],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("REFUSED quota"), r.stdout + r.stderr
    assert "File too large" in r.stdout


# -- item 6: the serve directory -----------------------------------------------------------

def _mode(p):
    return os.lstat(p).st_mode & 0o7777


def test_serve_dir_that_is_a_symlink_is_refused(tmp_path):
    real = tmp_path / "real"
    real.mkdir(mode=0o755)
    os.chmod(real, 0o755)
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(StoreError, match="not a directory this receiver can trust"):
        Store(str(tmp_path / "link"))
    assert _mode(real) == 0o755              # nothing chmodded through the link


def test_serve_dir_under_an_ancestor_writable_by_others_is_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)                  # world-writable, not sticky
    (shared / "serve").mkdir(mode=0o755)
    os.chmod(shared / "serve", 0o755)
    with pytest.raises(StoreError, match="writable by group/others without the sticky bit"):
        Store(str(shared / "serve"))
    assert _mode(shared / "serve") == 0o755
    assert not os.path.exists(shared / "other")
    with pytest.raises(StoreError):
        Store(str(shared / "other"))         # not created there either
    assert not os.path.exists(shared / "other")


def test_serve_dir_under_a_sticky_world_writable_ancestor_is_accepted(tmp_path):
    """Like /tmp: sticky, so others cannot rename or remove the receiver's directory."""
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    st = Store(str(sticky / "serve"))
    assert _mode(sticky / "serve") == 0o700 and st.root == str(sticky / "serve")


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")
def test_serve_dir_of_another_uid_is_refused_untouched(tmp_path):
    d = tmp_path / "theirs"
    d.mkdir()
    os.chmod(d, 0o755)
    os.chown(d, 12345, 12345)
    with pytest.raises(StoreError, match="belongs to uid 12345"):
        Store(str(d))
    st = os.lstat(d)
    assert (st.st_uid, st.st_mode & 0o7777) == (12345, 0o755)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")
def test_serve_dir_under_an_ancestor_of_another_uid_is_refused(tmp_path):
    a = tmp_path / "a"
    a.mkdir(mode=0o755)
    os.chown(a, 12345, 12345)
    with pytest.raises(StoreError, match=r"ancestor of .* is owned by uid 12345"):
        Store(str(a / "serve"))
    assert not os.path.exists(a / "serve")


def test_session_dir_planted_as_a_link_is_refused(tmp_path):
    st = Store(str(tmp_path / "serve"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o755)
    os.chmod(elsewhere, 0o755)
    os.symlink(elsewhere, os.path.join(st.root, "s"))
    with pytest.raises(StoreError, match="not a directory this receiver can trust"):
        st.session("s")
    assert _mode(elsewhere) == 0o755


# -- item 7 (destination): signalling the restored tree ------------------------------------

def _sleeper():
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    from deltaxfer.pidref import start_time
    for _ in range(100):
        try:
            return p, start_time(p.pid)
        except ProcessLookupError:
            pass
    raise AssertionError("no start time")


def test_signal_tree_spares_a_pid_with_another_start_time():
    """A pid whose start time differs from the recorded one names another process (the
    restored copy exited, its number reused): it is not signalled."""
    from deltaxfer.pidref import signal_tree
    p, start = _sleeper()
    try:
        assert signal_tree(p.pid, 9, start + 1) == 0
        assert signal_tree(p.pid, 9, None) == 0
        assert p.poll() is None                    # still running
        assert signal_tree(p.pid, 9, start) == 1
        assert p.wait(timeout=10) == -9
    finally:
        p.kill()
        p.wait()


def test_await_resume_kills_only_the_process_it_restored():
    """No RESUME: the copy is killed -- unless its pid has been reused meanwhile."""
    import asyncio
    import signal as _signal
    from deltaxfer.receiver import Receiver

    class Silent:
        async def recv_control(self, *a, **k):
            raise TimeoutError

    p, start = _sleeper()
    rcv = Receiver.__new__(Receiver)
    try:
        with pytest.raises(TimeoutError):
            asyncio.run(rcv._await_resume(Silent(), "peer", "s", p.pid, start + 5))
        assert p.poll() is None
        with pytest.raises(TimeoutError):
            asyncio.run(rcv._await_resume(Silent(), "peer", "s", p.pid, start))
        assert p.wait(timeout=10) == -_signal.SIGKILL
    finally:
        p.kill()
        p.wait()


def test_recover_kills_a_lazy_pages_daemon_left_by_a_receiver_that_died_in_a_restore(tmp_path):
    """Issue 17: a serve killed inside a lazy restore leaves its `criu lazy-pages -D
    <session>/images` child behind, waiting for a restore that never comes; the restarted
    receiver's recovery kills it (matched on its command line and that exact directory),
    and leaves a daemon of another directory alone."""
    import subprocess
    import sys as _sys

    from deltaxfer.store import Store

    root = tmp_path / "serve"
    store = Store(str(root))
    s = store.session("sess1")
    images = os.path.join(s.path, "images")
    os.makedirs(images)
    s.mark_restoring()
    sleeper = [_sys.executable, "-c", "import time; time.sleep(120)"]
    ours = subprocess.Popen(sleeper + ["lazy-pages", "-D", images, "-o", "lazy-pages.log"])
    other = subprocess.Popen(sleeper + ["lazy-pages", "-D", str(tmp_path / "elsewhere")])
    try:
        from deltaxfer.receiver import recover_restores
        done = recover_restores(Store(str(root)))   # what a receiver's start does
        assert ours.wait(timeout=10) == -9
        assert any("lazy-pages daemon" in d for d in done.get("sess1", [])), done
        assert other.poll() is None
    finally:
        for p in (ours, other):
            p.kill()
            p.wait()


def test_recover_kills_an_early_lazy_pages_daemon_only_before_its_commit(tmp_path):
    """The receiver starts a restore's lazy-pages daemon early, in <session>/images.tmp
    (receiver._prestart_lazy_pages). A receiver that dies before the commit leaves it
    waiting: the next start kills it. Once the commit renamed images.tmp, a daemon with
    that -D serves a restored process that runs: it is left alone."""
    import subprocess
    import sys as _sys

    from deltaxfer.receiver import recover_restores
    from deltaxfer.store import Store

    root = tmp_path / "serve"
    store = Store(str(root))
    early = store.session("early")
    early_tmp = early.prepare_images_dir()
    done_s = store.session("done")
    os.makedirs(os.path.join(done_s.path, "images"))
    sleeper = [_sys.executable, "-c", "import time; time.sleep(120)"]
    orphan = subprocess.Popen(sleeper + ["lazy-pages", "-D", early_tmp])
    serving = subprocess.Popen(sleeper + ["lazy-pages", "-D",
                                          os.path.join(done_s.path, "images.tmp")])
    try:
        done = recover_restores(Store(str(root)))
        assert orphan.wait(timeout=10) == -9
        assert any("lazy-pages daemon" in d for d in done.get("early", [])), done
        assert serving.poll() is None, "a daemon serving a committed restore was killed"
        assert "done" not in done
    finally:
        for p in (orphan, serving):
            p.kill()
            p.wait()


def test_lazy_pages_daemon_found_by_its_directory_after_a_rename(tmp_path):
    """A daemon started in images.tmp works in that directory after the commit renames it
    images: `lazy_pages_daemons(images)` finds it there (sessions list|rm must see that it
    still serves pages), though its -D names a path that is gone."""
    import subprocess
    import sys as _sys
    import time

    from deltaxfer.core import procmem
    tmp, final = tmp_path / "images.tmp", tmp_path / "images"
    tmp.mkdir()
    p = subprocess.Popen([_sys.executable, "-c", "import time; time.sleep(60)",
                          "lazy-pages", "-D", str(tmp)], cwd=tmp)
    try:
        deadline = time.monotonic() + 10
        while p.pid not in procmem.lazy_pages_daemons(str(tmp)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert p.pid in procmem.lazy_pages_daemons(str(tmp))
        os.rename(tmp, final)
        assert p.pid in procmem.lazy_pages_daemons(str(final))
        other = tmp_path / "other"
        other.mkdir()
        assert p.pid not in procmem.lazy_pages_daemons(str(other))
    finally:
        p.kill()
        p.wait()
