"""The destination store: rounds applied on held pages, verified by digest, swapped in
whole; files; commit; and every refusal leaving the held state untouched."""
import os
import random
import stat
from array import array

import pytest

from deltaxfer import PAGE_SIZE, _core
from deltaxfer.criu import images as im
from deltaxfer.store import Store, StoreError, image_digest, shared_runs


def pages_of(vaddrs, seed):
    rnd = random.Random(seed)
    return bytearray(b"".join(
        bytes(PAGE_SIZE) if v % 7 == 0 else rnd.randbytes(64) * (PAGE_SIZE // 64) for v in vaddrs))


def pagemap_of(vaddrs):
    pm = im.Pagemap(0, [])
    for v in vaddrs:
        if pm.entries and pm.entries[-1].end == v:
            e = pm.entries[-1]
            pm.entries[-1] = im.PagemapEntry(e.vaddr, e.nr_pages + 1, e.flags)
        else:
            pm.entries.append(im.PagemapEntry(v, 1, im.PE_PRESENT))
    return pm


def send_round(session, round_no, vaddrs, pages, *, held=None, base=None, digest=None,
               drop_frames=False, image_id="pid-1"):
    """What a sender does for one image; returns the round (finished)."""
    vaddrs = array("Q", vaddrs)
    prev_v, prev_h = held if held else (None, None)
    frames, hashes, stats = _core.encode_round(pages, vaddrs, prev_vaddrs=prev_v,
                                               prev_hashes=prev_h, base_pages=base)
    rnd = session.begin_round(round_no, source="test")
    pm = pagemap_of(vaddrs)
    rnd.begin_image(0, image_id, len(pm.entries), len(vaddrs))
    rnd.add_pagemap(0, [(e.vaddr, e.nr_pages, e.flags) for e in pm.entries])
    if frames and not drop_frames:
        rnd.add_pages(0, frames)
    try:
        rnd.end_image(0, image_digest(hashes) if digest is None else digest)
        rnd.finish()
    except StoreError:
        rnd.abort()
        raise
    return stats


def held_pages(session, image_id="pid-1"):
    with session.held()[image_id].open() as mem:
        return list(mem.vaddrs()), bytes(mem.pages)


def test_first_round_then_delta_round(tmp_path):
    store = Store(str(tmp_path / "serve"))
    s = store.session("web-1")
    v1 = [0x10000 + i * PAGE_SIZE for i in range(64)] + [0x900000 + i * PAGE_SIZE for i in range(8)]
    p1 = pages_of(v1, 1)
    stats = send_round(s, 1, v1, p1)
    assert stats["sent_full"] + stats["sent_zero"] == len(v1)
    assert held_pages(s) == (v1, bytes(p1))
    assert s.round == 1

    # round 2: 5 pages changed by a few bytes, 3 removed, 4 added
    v2 = v1[3:] + [0xA00000 + i * PAGE_SIZE for i in range(4)]
    p2 = bytearray(p1[3 * PAGE_SIZE:]) + pages_of(v2[-4:], 2)
    for i in (1, 10, 20, 30, 40):
        p2[i * PAGE_SIZE + 100] ^= 0xFF
    held_v, held_h = s.held_hashes("pid-1")
    with s.held()["pid-1"].open() as base:
        stats = send_round(s, 2, v2, p2, held=(held_v, held_h), base=base.pages)
    assert stats["changed"] == 5 and stats["added"] == 4 and stats["removed"] == 3
    assert stats["sent_xor"] == 5
    assert held_pages(s) == (v2, bytes(p2))
    assert sorted(os.listdir(s.held_dir)) == ["hashes-pid-1.bin", "pagemap-1.img", "pages-1.img"]
    # the cached hashes are the stored pages' hashes
    v, h = s.held_hashes("pid-1")
    assert list(v) == v2 and h == _core.hash_pages(p2)[0]


def test_bad_digest_and_missing_pages_leave_held_untouched(tmp_path):
    s = Store(str(tmp_path)).session("s")
    v = [0x10000 + i * PAGE_SIZE for i in range(16)]
    send_round(s, 1, v, pages_of(v, 1))
    before = held_pages(s)
    v2 = v + [0x800000]
    with pytest.raises(StoreError) as e:
        send_round(s, 2, v2, pages_of(v2, 1), held=s.held_hashes("pid-1"), digest=12345)
    assert e.value.code == "digest"
    with pytest.raises(StoreError) as e:
        send_round(s, 2, v2, pages_of(v2, 1), held=s.held_hashes("pid-1"), drop_frames=True)
    assert e.value.code == "missing-page"
    assert held_pages(s) == before and s.round == 1
    assert not os.path.exists(os.path.join(s.path, "round.tmp"))


def test_corrupt_frame_is_refused(tmp_path):
    s = Store(str(tmp_path)).session("s")
    v = array("Q", [0x10000 + i * PAGE_SIZE for i in range(8)])
    frames, hashes, _ = _core.encode_round(pages_of(v, 3), v)
    bad = bytearray(frames)
    bad[-10] ^= 1
    rnd = s.begin_round(1)
    rnd.begin_image(0, "pid-1", 1, 8)
    rnd.add_pagemap(0, [(0x10000, 8, im.PE_PRESENT)])
    with pytest.raises(StoreError) as e:
        rnd.add_pages(0, bad)
    assert e.value.code == "bad-payload" and "pid-1" in e.value.reason
    rnd.abort()
    assert not os.path.exists(rnd.dir)


def test_round_numbers_and_protocol_order(tmp_path):
    s = Store(str(tmp_path)).session("s")
    with pytest.raises(StoreError, match="round 2 does not follow round 0"):
        s.begin_round(2)
    rnd = s.begin_round(1)
    # the wire's rule and error code (wire/names.py), not a second copy
    with pytest.raises(StoreError, match="is not pid-N or shmem-N") as bad_id:
        rnd.begin_image(0, "pid-../../x", 1, 1)
    assert bad_id.value.code == "name"
    with pytest.raises(StoreError, match="out of order"):
        rnd.begin_image(3, "pid-1", 1, 1)
    rnd.begin_image(0, "pid-1", 1, 1)
    with pytest.raises(StoreError, match="more pagemap entries"):
        rnd.add_pagemap(0, [(0x1000, 1, 4), (0x3000, 1, 4)])
    rnd.abort()


@pytest.mark.parametrize("name", ["../etc/passwd", "a/b.img", "..", "pagemap-1.img", "pages-3.img",
                                  "", ".hidden", "x" * 200, "core-1.img\x00"])
def test_file_names_refused(tmp_path, name):
    files = Store(str(tmp_path)).session("s").begin_files()
    with pytest.raises(StoreError) as e:
        files.begin(name, 10)
    assert e.value.code == "name"
    files.discard()


def test_release_memory_after_the_copy_runs(tmp_path):
    """release_memory (a migrated copy runs): held/ and images/'s pages files and page
    hashes go, the pagemaps and other images stay, the session holds nothing (its next
    round is a whole one), and it commits again after a new round."""
    store = Store(str(tmp_path / "serve"))
    s = store.session("s")
    v = [0x10000 + i * PAGE_SIZE for i in range(64)]
    send_round(s, 1, v, pages_of(v, 7))

    def commit(session):
        files = session.begin_files()
        files.begin("pstree.img", 4, 0o644)
        files.data(b"tree")
        files.end(_core.xxh3_64(b"tree"))
        return session.commit(files)

    path = commit(s)
    assert s.held()
    freed = s.release_memory()
    assert freed >= 64 * PAGE_SIZE
    assert sorted(os.listdir(path)) == ["pagemap-1.img", "pstree.img"]
    assert not os.path.exists(s.held_dir)
    assert s.held() == {}
    again = store.session("s")
    assert again.held() == {}
    send_round(again, again.round + 1, v, pages_of(v, 8))
    assert list(again.held()) == ["pid-1"]
    assert "pages-1.img" in os.listdir(commit(again))


def test_session_names_refused(tmp_path):
    for name in ["", "../x", "a/b", "x" * 65]:
        with pytest.raises(StoreError) as e:
            Store(str(tmp_path)).session(name)
        assert e.value.code == "name"


def test_files_and_commit(tmp_path):
    store = Store(str(tmp_path / "serve"))
    s = store.session("s")
    v = [0x10000 + i * PAGE_SIZE for i in range(4)]
    send_round(s, 1, v, pages_of(v, 5))
    files = s.begin_files()
    for name, data in [("pstree.img", b"tree"), ("core-1.img", b"c" * 3000)]:
        files.begin(name, len(data), 0o644)
        files.data(data[:1000])
        files.data(data[1000:])
        files.end(_core.xxh3_64(data))
    path = s.commit(files)
    assert sorted(os.listdir(path)) == ["core-1.img", "dx-hashes-1.bin", "pagemap-1.img",
                                        "pages-1.img", "pstree.img"]
    # beside the pages file, the hash of each of its pages (for the lazy-pages server)
    pages = open(os.path.join(path, "pages-1.img"), "rb").read()
    hashes = array("Q")
    hashes.frombytes(open(os.path.join(path, "dx-hashes-1.bin"), "rb").read())
    assert list(hashes) == [_core.xxh3_64(pages[i:i + PAGE_SIZE])
                            for i in range(0, len(pages), PAGE_SIZE)] and len(hashes) == 4
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(os.path.join(path, "core-1.img")).st_mode) == 0o600
    assert not os.path.exists(files.path)
    # a file whose content does not match its hash, or is short, is refused
    files = s.begin_files()
    files.begin("pstree.img", 4)
    files.data(b"tree")
    with pytest.raises(StoreError, match="content hash mismatch"):
        files.end(0)
    files.begin("fs-1.img", 4)
    files.data(b"tr")
    with pytest.raises(StoreError, match="2 bytes short"):
        files.end(0)
    with pytest.raises(StoreError, match="more data than announced"):
        files.begin("x.img", 1) or files.data(b"ab")
    files.discard()


def test_quota(tmp_path):
    s = Store(str(tmp_path), quota_bytes=10 * PAGE_SIZE).session("s")
    rnd = s.begin_round(1)
    with pytest.raises(StoreError) as e:
        rnd.begin_image(0, "pid-1", 1, 11)
    assert e.value.code == "quota"
    rnd.abort()


def test_shared_runs():
    old = pagemap_of([0x1000, 0x2000, 0x3000, 0x8000, 0x9000])
    new = pagemap_of([0x2000, 0x3000, 0x4000, 0x9000])
    assert list(shared_runs(old, new)) == [(1, 0, 2), (4, 3, 1)]


def resolve_child(images_dir, image_id="pid-1"):
    """Read a parent-linked image the way CRIU does: PRESENT pages from the child's pages
    file in order, PE_PARENT pages from the parent's image by vaddr."""
    pm = im.read_pagemap(os.path.join(images_dir, "pagemap-1.img"))
    child = open(os.path.join(images_dir, f"pages-{pm.pages_id}.img"), "rb").read()
    parent_dir = os.path.join(images_dir, "parent")
    ppm = im.read_pagemap(os.path.join(parent_dir, "pagemap-1.img"))
    parent = open(os.path.join(parent_dir, f"pages-{ppm.pages_id}.img"), "rb").read()
    pidx = {}
    i = 0
    for e in ppm.entries:
        for k in range(e.nr_pages):
            pidx[e.vaddr + k * PAGE_SIZE] = i
            i += 1
    vaddrs, out, at = [], [], 0
    for e in pm.entries:
        for k in range(e.nr_pages):
            v = e.vaddr + k * PAGE_SIZE
            vaddrs.append(v)
            if e.flags & im.PE_PRESENT:
                out.append(child[at:at + PAGE_SIZE])
                at += PAGE_SIZE
            else:
                assert e.flags & im.PE_PARENT
                j = pidx[v]
                out.append(parent[j * PAGE_SIZE:(j + 1) * PAGE_SIZE])
    assert at == len(child)
    return vaddrs, b"".join(out)


def test_parent_linked_final_round_writes_only_the_residual(tmp_path):
    s = Store(str(tmp_path)).session("m")
    v1 = [0x10000 + i * PAGE_SIZE for i in range(64)]
    p1 = pages_of(v1, 1)
    send_round(s, 1, v1, p1)
    # final round: 3 pages changed, 2 added, 4 removed; sent against the held pages
    v2 = v1[4:] + [0x900000, 0x901000]
    p2 = bytearray(p1[4 * PAGE_SIZE:]) + pages_of(v2[-2:], 9)
    for i in (0, 17, 40):
        p2[i * PAGE_SIZE + 9] ^= 0x5A
    held_v, held_h = s.held_hashes("pid-1")
    with s.held()["pid-1"].open() as base:
        frames, hashes, st = _core.encode_round(p2, array("Q", v2), prev_vaddrs=held_v,
                                                prev_hashes=held_h, base_pages=base.pages)
    assert st["sent_xor"] == 3 and st["added"] == 2
    rnd = s.begin_round(2, parent_linked=True)
    pm = pagemap_of(v2)
    rnd.begin_image(0, "pid-1", len(pm.entries), len(v2))
    rnd.add_pagemap(0, [(e.vaddr, e.nr_pages, e.flags | im.PE_LAZY) for e in pm.entries])
    for frame in split(frames):
        rnd.add_pages(0, frame)
    rnd.end_image(0, image_digest(hashes))
    rnd.finish()
    child_pages = [n for n in os.listdir(s.final_dir) if n.startswith("pages-")]
    assert os.path.getsize(os.path.join(s.final_dir, child_pages[0])) == 5 * PAGE_SIZE
    files = s.begin_files()
    files.begin("pstree.img", 1)
    files.data(b"t")
    files.end(_core.xxh3_64(b"t"))
    path = s.commit(files)
    assert os.readlink(os.path.join(path, "parent")) == "../held"
    vaddrs, content = resolve_child(path)
    assert vaddrs == v2 and content == bytes(p2)
    assert all(e.flags & im.PE_LAZY for e in im.read_pagemap(os.path.join(path, "pagemap-1.img")).entries)
    with pytest.raises(StoreError, match="already had its final round"):
        s.begin_round(3)


def test_parent_linked_round_refuses_bad_digest_and_missing_pages(tmp_path):
    s = Store(str(tmp_path)).session("m")
    v1 = [0x10000 + i * PAGE_SIZE for i in range(8)]
    send_round(s, 1, v1, pages_of(v1, 1))
    for kwargs, code in [(dict(digest=7), "digest"), (dict(drop_frames=True), "missing-page")]:
        v2 = v1 + [0x800000]
        orig = s.begin_round
        s.begin_round = lambda n, source="": orig(n, source, parent_linked=True)
        try:
            with pytest.raises(StoreError) as e:
                send_round(s, 2, v2, pages_of(v2, 1), held=s.held_hashes("pid-1"), **kwargs)
        finally:
            del s.begin_round
        assert e.value.code == code
        assert not os.path.exists(os.path.join(s.path, "final.tmp"))
        assert not os.path.exists(s.final_dir) and s.round == 1


def split(frames):
    from deltaxfer.core.pipeline import split_frames
    return [bytes(f) for f in split_frames(frames)]


def test_round_with_unchanged_layout_is_applied_in_place(tmp_path):
    s = Store(str(tmp_path)).session("s")
    v = [0x10000 + i * PAGE_SIZE for i in range(48)]
    p1 = pages_of(v, 1)
    send_round(s, 1, v, p1)
    pages_file = s.held()["pid-1"].pages_path
    inode = os.stat(pages_file).st_ino
    p2 = bytearray(p1)
    for i in (2, 3, 30):
        p2[i * PAGE_SIZE + 77] ^= 0x11
    p2[10 * PAGE_SIZE:11 * PAGE_SIZE] = bytes(PAGE_SIZE)   # became a zero page
    with s.held()["pid-1"].open() as base:
        stats = send_round(s, 2, v, p2, held=s.held_hashes("pid-1"), base=base.pages)
    assert stats["sent_xor"] == 3 and stats["sent_zero"] == 1
    assert held_pages(s) == (v, bytes(p2)) and s.round == 2
    # the same file, written in place; hashes cached; nothing left over
    assert s.held()["pid-1"].pages_path == pages_file and os.stat(pages_file).st_ino == inode
    assert s.held_hashes("pid-1")[1] == _core.hash_pages(p2)[0]
    assert sorted(os.listdir(s.path)) == ["held", "meta.json"]
    # the hashes file too was written in place (only the changed entries), and a fresh
    # session object (no memory of it) reads the same hashes back from disk
    hashes_file = os.path.join(s.held_dir, "hashes-pid-1.bin")
    assert array("Q", open(hashes_file, "rb").read()) == _core.hash_pages(p2)[0]
    assert Store(str(tmp_path)).session("s").held_hashes("pid-1")[1] == \
        _core.hash_pages(p2)[0]
    # a bad round leaves the held pages as they were
    p3 = bytearray(p2)
    p3[5 * PAGE_SIZE] ^= 1
    with pytest.raises(StoreError):
        send_round(s, 3, v, p3, held=s.held_hashes("pid-1"), digest=99)
    assert held_pages(s) == (v, bytes(p2)) and s.round == 2
    assert not os.path.exists(os.path.join(s.held_dir, ".dirty"))


def test_a_round_interrupted_while_writing_in_place_resets_the_session(tmp_path):
    store = Store(str(tmp_path))
    s = store.session("s")
    v = [0x10000 + i * PAGE_SIZE for i in range(4)]
    send_round(s, 1, v, pages_of(v, 1))
    open(os.path.join(s.held_dir, ".dirty"), "w").close()   # as a crash would leave it
    again = store.session("s")
    assert again.round == 0 and again.held() == {}
    send_round(again, 1, v, pages_of(v, 2))                  # a full send works again
    assert held_pages(again) == (v, bytes(pages_of(v, 2)))


@pytest.mark.parametrize("reshapable", [True, False])
def test_round_with_pages_added_and_removed_is_applied_in_place(tmp_path, reshapable):
    store = Store(str(tmp_path))
    if reshapable and not store.reshapable:
        pytest.skip("this filesystem cannot insert/collapse file ranges")
    store.reshapable = reshapable
    s = store.session("s")
    v1 = [0x10000 + i * PAGE_SIZE for i in range(40)] + [0x800000 + i * PAGE_SIZE for i in range(8)]
    p1 = pages_of(v1, 1)
    send_round(s, 1, v1, p1)
    inode = os.stat(s.held()["pid-1"].pages_path).st_ino
    # drop pages at the start, the middle and the end; add some in between and at the end
    keep = [v for i, v in enumerate(v1) if i not in (0, 1, 20, 21, 22, 47)]
    v2 = sorted(keep + [0x9000, 0x10000 + 40 * PAGE_SIZE, 0x700000, 0x900000, 0x901000])
    old = dict(zip(v1, (bytes(p1[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]) for i in range(len(v1)))))
    fresh = pages_of(v2, 7)
    p2 = bytearray(b"".join(old.get(v, fresh[i * PAGE_SIZE:(i + 1) * PAGE_SIZE])
                            for i, v in enumerate(v2)))
    p2[3 * PAGE_SIZE + 5] ^= 0x33                      # and one kept page changed
    with s.held()["pid-1"].open() as base:
        send_round(s, 2, v2, p2, held=s.held_hashes("pid-1"), base=base.pages)
    assert held_pages(s) == (v2, bytes(p2))
    same_file = os.stat(s.held()["pid-1"].pages_path).st_ino == inode
    assert same_file == reshapable
    assert s.held_hashes("pid-1")[1] == _core.hash_pages(p2)[0]


def test_layout_diff():
    o = array("Q", [1, 2, 3, 5, 6, 9])
    n = array("Q", [0, 2, 3, 4, 6, 7, 8, 10])
    r = _core.layout_diff(o, n)
    assert [tuple(r[i:i + 3]) for i in range(0, len(r), 3)] == [
        (0, 1, 1), (0, 1, 0), (3, 1, 1), (3, 1, 0), (5, 2, 1), (5, 1, 0), (6, 1, 1)]
    assert list(_core.layout_diff(o, o)) == []


# -- the page applier: compiled == reference ----------------------------------------------

from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from deltaxfer.core.errors import FrameError  # noqa: E402
from deltaxfer.core.reference import apply as ref_apply  # noqa: E402


def _layouts(seed, n_held, n_new):
    rnd = random.Random(seed)
    space = [0x10000 + i * PAGE_SIZE for i in range(2 * (n_held + n_new) + 4)]
    held = sorted(rnd.sample(space, n_held))
    keep = [v for v in held if rnd.random() < 0.7]
    pool = [v for v in space if v not in held]
    new = sorted(set(keep) | set(rnd.sample(pool, max(0, n_new - len(keep)))))
    return array("Q", held), array("Q", new)


def _new_pages(new, held, held_pages, seed):
    """The source's pages: held ones partly changed (XOR material), others fresh/zero."""
    rnd = random.Random(seed)
    out = bytearray()
    for v in new:
        if v in held and rnd.random() < 0.6:
            j = held.index(v)
            p = bytearray(held_pages[j * PAGE_SIZE:(j + 1) * PAGE_SIZE])
            for _ in range(rnd.randrange(0, 4)):
                p[rnd.randrange(PAGE_SIZE)] ^= 0x5A
            out += p
        elif rnd.random() < 0.3:
            out += bytes(PAGE_SIZE)
        else:
            out += rnd.randbytes(32) * (PAGE_SIZE // 32)
    return out


def _run_applier(impl, tmp_path, tag, new, held, held_path, held_hashes, frames, mode):
    out_path = tmp_path / f"out-{tag}"
    fd = os.open(out_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    hfd = os.open(held_path, os.O_RDONLY)
    try:
        if mode == impl.APPLY_AT_INDEX and new:
            os.posix_fallocate(fd, 0, len(new) * PAGE_SIZE)
        a = impl.PageApplier(new, fd, mode, held, hfd)
        shared = a.share_held(hfd, held_hashes) if mode == impl.APPLY_AT_INDEX else None
        try:
            counts = a.apply(frames)
            result = ("ok", counts, shared, [bytes(x) if isinstance(x, array) else x
                                             for x in a.finish()], a.records)
        except FrameError as e:
            result = ("error", str(e).split(" (")[0].split(": ", 1)[1])
        a.close()
    finally:
        os.close(fd)
        os.close(hfd)
    return result, out_path.read_bytes()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32), n_held=st.integers(0, 40), n_new=st.integers(0, 40),
       mode=st.sampled_from([0, 1]),
       corrupt=st.sampled_from(["", "swap", "foreign", "xor", "reorder", "dup"]))
def test_page_applier_matches_reference(tmp_path, seed, n_held, n_new, mode, corrupt):
    held, new = _layouts(seed, n_held, n_new)
    held_pages = pages_of(held, seed)
    held_path = tmp_path / "held"
    held_path.write_bytes(held_pages)
    held_hashes, _, _ = _core.hash_pages(held_pages)
    pages = _new_pages(new, held, held_pages, seed + 1)
    frames, hashes, _ = _core.encode_round(pages, new, prev_vaddrs=held, prev_hashes=held_hashes,
                                           base_pages=held_pages, frame_size=8 * PAGE_SIZE)
    if corrupt in ("reorder", "dup") and frames:
        # frames in reverse order (at-index: any order is fine; append: refused), or the
        # first frame sent again (a page twice in a round: refused either way)
        parts = split(frames)
        frames = b"".join(parts[::-1] if corrupt == "reorder" else parts + parts[:1])
    elif corrupt and frames:
        fw, records = _core.FrameWriter(frame_size=8 * PAGE_SIZE), []
        off = 0
        while off < len(frames):
            r, n = _core.decode_frame(frames[off:])
            records += r
            off += n
        if corrupt == "swap" and len(records) > 1:
            records[0], records[-1] = records[-1], records[0]
        elif corrupt == "foreign":
            records.append((0x7fff0000, 0, b""))
        elif corrupt == "xor":          # a delta for a page the destination lacks
            records = [(v, 1, b"\x00\x01\x01") if v not in held else (v, k, p)
                       for v, k, p in records]
        for v, k, p in records:
            {0: lambda: fw.add_zero(v), 1: lambda: fw.add_xor(v, p), 2: lambda: fw.add_full(v, p)}[k]()
        frames = fw.finish()
    c, c_file = _run_applier(_core, tmp_path, "c", new, held, held_path, held_hashes, frames, mode)
    r, r_file = _run_applier(ref_apply, tmp_path, "ref", new, held, held_path, held_hashes,
                             frames, mode)
    assert c == r
    if corrupt == "dup" and frames:
        assert c[0] == "error", c
    if corrupt == "reorder" and mode == 0:
        assert c[0] == "ok", c
    if c[0] == "ok":
        assert c_file == r_file
        if corrupt in ("", "reorder") and mode == 0:   # every page present: the source's digest
            assert c[3][1] == 0 and c[3][0] == bytes(hashes)
            assert c_file == bytes(pages)


@pytest.mark.parametrize("seed", [3, 11, 29])
def test_at_index_frames_without_xor_match_the_reference(tmp_path, seed):
    """At-index frames with no XOR record are claimed, hashed and laid out first, then
    written under the lock in one go: with a held image shared in (zero records over held
    pages are written), zero gaps bridged between full pages, long zero stretches left
    unwritten, frames of 64 pages -- the same file and hashes as the reference applier's."""
    rnd = random.Random(seed)
    held = array("Q", [0x400000 + i * PAGE_SIZE for i in range(0, 600, 2)])
    new = array("Q", [0x400000 + i * PAGE_SIZE for i in range(600)])
    held_pages = b"".join(rnd.randbytes(64) * (PAGE_SIZE // 64) for _ in held)
    held_path = tmp_path / "held"
    held_path.write_bytes(held_pages)
    held_hashes, _, _ = _core.hash_pages(held_pages)
    pages = bytearray()
    for i in range(len(new)):
        k = rnd.random()
        # zero stretches long and short, over held pages and not, between full pages
        pages += bytes(PAGE_SIZE) if (k < 0.35 or 200 <= i < 260) else rnd.randbytes(PAGE_SIZE)
    frames, hashes, _ = _core.encode_round(bytes(pages), new, xor=False,
                                           frame_size=64 * PAGE_SIZE)
    kinds = {k for f in split(frames) for _, k, _ in _core.decode_frame(f)[0]}
    assert kinds == {0, 2}                      # zero and full records, no XOR
    c, c_file = _run_applier(_core, tmp_path, "c", new, held, held_path, held_hashes, frames, 0)
    r, r_file = _run_applier(ref_apply, tmp_path, "ref", new, held, held_path, held_hashes,
                             frames, 0)
    assert c == r and c[0] == "ok", (c, r)
    assert c_file == r_file == bytes(pages)
    assert c[3][1] == 0 and c[3][0] == bytes(hashes)


def test_copy_received_runs_and_write_u64_runs(tmp_path):
    """The in-place finish's two C loops: received runs (back to back in the side file)
    land at their layout index in the held file, held runs are left alone, the copied
    runs are reported as (index, count) pairs; write_u64_runs rewrites exactly those
    table entries; a side file shorter than the runs, or a pair outside the table, is
    an error, not a silent partial copy."""
    import os
    from array import array

    from deltaxfer import _core

    P = 4096
    held = bytearray(os.urandom(10 * P))
    side = os.urandom(4 * P)
    # layout of 10 pages: 2 held, 1 received, 3 held, 3 received, 1 held
    runs = array("Q", [0x1000, 2, 1, 0x3000, 1, 0, 0x4000, 3, 1, 0x7000, 3, 0, 0xa000, 1, 1])
    hp, sp = tmp_path / "held", tmp_path / "side"
    hp.write_bytes(held)
    sp.write_bytes(side)
    src, dst = os.open(sp, os.O_RDONLY), os.open(hp, os.O_WRONLY)
    try:
        pairs = _core.copy_received_runs(src, dst, runs)
    finally:
        os.close(src)
        os.close(dst)
    assert list(pairs) == [2, 1, 6, 3]
    want = bytearray(held)
    want[2 * P:3 * P] = side[:P]
    want[6 * P:9 * P] = side[P:4 * P]
    assert hp.read_bytes() == want

    table = array("Q", range(100, 110))
    tp = tmp_path / "table"
    tp.write_bytes(bytes(80))
    fd = os.open(tp, os.O_WRONLY)
    try:
        _core.write_u64_runs(fd, table, pairs)
        with pytest.raises(ValueError):
            _core.write_u64_runs(fd, table, array("Q", [8, 3]))
    finally:
        os.close(fd)
    got = array("Q")
    got.frombytes(tp.read_bytes())
    assert list(got) == [0, 0, 102, 0, 0, 0, 106, 107, 108, 0]

    sp.write_bytes(side[:2 * P])                     # one received page short
    src, dst = os.open(sp, os.O_RDONLY), os.open(hp, os.O_WRONLY)
    try:
        with pytest.raises(EOFError):
            _core.copy_received_runs(src, dst, runs)
    finally:
        os.close(src)
        os.close(dst)
