"""CRIU image I/O on synthetic images: framing, pagemaps of CRIU 4.1 and 4.2, and the
clear errors every kind of bad input must produce (never a traceback, never a hang)."""
import os
import struct

import pytest
from hypothesis import given, settings, strategies as st

from deltaxfer import PAGE_SIZE
from deltaxfer.criu import images as im
from deltaxfer.criu import protobuf as pb
from deltaxfer.criu.dumpdir import DumpDir, rewrite


def entry(*fields):
    return b"".join(pb.encode_field_varint(n, v) for n, v in fields)


def write_dump(d, entries, pages_id=3, pages=None, pid=1):
    """A minimal dump directory: pstree, core with a comm, pagemap + pages."""
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "pstree.img"), "wb") as f:
        f.write(im.encode_image(im.PSTREE_MAGIC, [entry((1, pid), (2, 0), (3, pid), (4, pid))
                                                  + pb.encode_field_varint(5, pid)]))
    tc = pb.encode_field_bytes(6, b"worker")
    with open(os.path.join(d, f"core-{pid}.img"), "wb") as f:
        f.write(im.encode_image(im.CORE_MAGIC, [entry((1, 1)) + pb.encode_field_bytes(3, tc)]))
    pm = im.Pagemap(pages_id, [im.PagemapEntry(*e) for e in entries])
    im.write_pagemap(os.path.join(d, f"pagemap-{pid}.img"), pm)
    if pages is None:
        n = pm.present_pages
        pages = b"".join(bytes([i % 251 + 1]) * PAGE_SIZE for i in range(n))
    with open(os.path.join(d, f"pages-{pages_id}.img"), "wb") as f:
        f.write(pages)
    return pm


def test_pagemap_round_trip_and_coalesce(tmp_path):
    entries = [(0x10000, 2, im.PE_PRESENT), (0x12000, 3, im.PE_PRESENT),
               (0x15000, 1, im.PE_PRESENT | im.PE_LAZY), (0x20000, 1, im.PE_PRESENT)]
    pm = write_dump(tmp_path, entries)
    back = im.read_pagemap(tmp_path / "pagemap-1.img")
    assert back == pm
    co = back.coalesced()
    assert [(e.vaddr, e.nr_pages, e.flags) for e in co.entries] == [
        (0x10000, 5, im.PE_PRESENT), (0x15000, 1, im.PE_PRESENT | im.PE_LAZY),
        (0x20000, 1, im.PE_PRESENT)]
    assert co.present_pages == pm.present_pages == 7


def test_criu_42_nr_pages_field(tmp_path):
    """CRIU 4.2 writes nr_pages in field 5 and 0 in field 2; 4.1 uses field 2."""
    p = tmp_path / "pagemap-1.img"
    p.write_bytes(im.encode_image(im.PAGEMAP_MAGIC, [
        entry((1, 7)),
        entry((1, 0x400000), (2, 0), (4, im.PE_PRESENT), (5, 5)),
        entry((1, 0x500000), (2, 2), (4, im.PE_PRESENT)),
    ]))
    pm = im.read_pagemap(p)
    assert pm.pages_id == 7
    assert [(e.vaddr, e.nr_pages) for e in pm.entries] == [(0x400000, 5), (0x500000, 2)]
    # and we write the 4.1 form, which both versions read
    again = im.parse_pagemap(p, im.encode_pagemap(pm))
    assert again == pm


def test_old_in_parent_field_without_flags(tmp_path):
    p = tmp_path / "pagemap-1.img"
    p.write_bytes(im.encode_image(im.PAGEMAP_MAGIC, [
        entry((1, 1)), entry((1, 0x1000), (2, 1), (3, 1)), entry((1, 0x2000), (2, 1))]))
    pm = im.read_pagemap(p)
    assert [e.flags for e in pm.entries] == [im.PE_PARENT, im.PE_PRESENT]
    assert pm.entries[0].in_parent and not pm.entries[0].present


def test_memory_image_runs_are_views_at_the_right_offsets(tmp_path):
    entries = [(0x10000, 2, im.PE_PRESENT), (0x30000, 1, im.PE_LAZY), (0x40000, 3, im.PE_PRESENT)]
    write_dump(tmp_path, entries)
    with DumpDir.open(tmp_path).memory(1) as mem:
        runs = list(mem.runs())
        assert [(r.vaddr, r.nr_pages) for r in runs] == [(0x10000, 2), (0x40000, 3)]
        # page i of the file is filled with byte i+1; the run views point into the file
        assert runs[1].data[0] == 3 and runs[1].data[-1] == 5
        assert isinstance(runs[0].data, memoryview) and runs[0].data.readonly
        assert list(mem.vaddrs()) == [0x10000, 0x11000, 0x40000, 0x41000, 0x42000]
        del runs


def test_dumpdir_reads_processes_and_comm(tmp_path):
    write_dump(tmp_path, [(0x10000, 1, im.PE_PRESENT)], pid=42)
    d = DumpDir.open(tmp_path)
    assert [(p.pid, p.threads) for p in d.processes] == [(42, (42,))]
    assert d.comm(42) == "worker"


def test_rewrite_gives_new_pages_id_and_identical_pages(tmp_path):
    src = tmp_path / "src"
    write_dump(src, [(0x10000, 2, im.PE_PRESENT), (0x12000, 2, im.PE_PRESENT)], pages_id=3)
    (src / "other.img").write_bytes(b"verbatim")
    report = rewrite(src, tmp_path / "dst")
    assert report.entries_before == 2 and report.entries_after == 1 and report.pages == 4
    pm = im.read_pagemap(tmp_path / "dst" / "pagemap-1.img")
    assert pm.pages_id == 4 and not (tmp_path / "dst" / "pages-3.img").exists()
    assert (tmp_path / "dst" / "pages-4.img").read_bytes() == (src / "pages-3.img").read_bytes()
    assert (tmp_path / "dst" / "other.img").read_bytes() == b"verbatim"
    assert oct((tmp_path / "dst").stat().st_mode & 0o777) == "0o700"


# -- bad input: clear errors naming the file ------------------------------------------

def test_truncated_pagemap_at_every_offset(tmp_path):
    write_dump(tmp_path, [(0x10000, 2, im.PE_PRESENT), (0x40000, 3, im.PE_PRESENT)])
    data = (tmp_path / "pagemap-1.img").read_bytes()
    for cut in range(len(data)):
        (tmp_path / "pagemap-1.img").write_bytes(data[:cut])
        # A cut inside an entry is caught by the framing; a cut between entries leaves a
        # shorter, well-formed pagemap, caught because the pages file no longer matches it.
        with pytest.raises(im.ImageError) as e:
            DumpDir.open(tmp_path).memory(1)
        assert "pagemap-1.img" in str(e.value) or "pages-3.img: has" in str(e.value)


def test_wrong_magic(tmp_path):
    p = tmp_path / "pagemap-1.img"
    p.write_bytes(b"\x7fELF" + bytes(60))
    with pytest.raises(im.ImageError, match=r"pagemap-1.img: wrong magic 0x464c457f"):
        im.read_pagemap(p)
    p.write_bytes(im.encode_image(im.PSTREE_MAGIC, [entry((1, 1))]))
    with pytest.raises(im.ImageError, match="wrong type magic"):
        im.read_pagemap(p)


def test_pagemap_points_past_pages_file(tmp_path):
    write_dump(tmp_path, [(0x10000, 4, im.PE_PRESENT)], pages=bytes(3 * PAGE_SIZE))
    with pytest.raises(im.ImageError, match=r"pagemap-1.img: points past the end of pages-3.img: "
                                            r"its present entries need 16384 bytes, the file has 12288"):
        DumpDir.open(tmp_path).memory(1)


def test_pages_file_missing_or_too_long(tmp_path):
    write_dump(tmp_path, [(0x10000, 1, im.PE_PRESENT)])
    (tmp_path / "pages-3.img").write_bytes(bytes(2 * PAGE_SIZE))
    with pytest.raises(im.ImageError, match="pages-3.img: has 4096 bytes beyond"):
        DumpDir.open(tmp_path).memory(1)
    (tmp_path / "pages-3.img").unlink()
    with pytest.raises(im.ImageError, match="pages-3.img: missing"):
        DumpDir.open(tmp_path).memory(1)


@pytest.mark.parametrize("fields, reason", [
    (((1, 0x10000), (2, 1 << 40), (4, 4)), "absurd nr_pages"),
    (((1, 0x10000), (2, 0), (4, 4)), "absurd nr_pages"),
    (((1, 0x10001), (2, 1), (4, 4)), "not page aligned"),
    (((1, (1 << 64) - 4096), (2, 2), (4, 4)), "absurd nr_pages"),
    (((2, 1), (4, 4)), "lacks required field 1"),
])
def test_absurd_pagemap_entries(tmp_path, fields, reason):
    p = tmp_path / "pagemap-1.img"
    p.write_bytes(im.encode_image(im.PAGEMAP_MAGIC, [entry((1, 1)), entry(*fields)]))
    with pytest.raises(im.ImageError, match=reason):
        im.read_pagemap(p)


def test_absurd_entry_size_and_descending_entries(tmp_path):
    p = tmp_path / "pagemap-1.img"
    p.write_bytes(struct.pack("<III", im.IMG_COMMON_MAGIC, im.PAGEMAP_MAGIC, 0xFFFFFFF0))
    with pytest.raises(im.ImageError, match="claims 4294967280 bytes"):
        im.read_pagemap(p)
    p.write_bytes(im.encode_image(im.PAGEMAP_MAGIC, [
        entry((1, 1)), entry((1, 0x20000), (2, 1), (4, 4)), entry((1, 0x10000), (2, 1), (4, 4))]))
    with pytest.raises(im.ImageError, match="entries must ascend"):
        im.read_pagemap(p)


def test_not_a_dump_directory(tmp_path):
    with pytest.raises(im.ImageError, match="pstree.img: no such image file"):
        DumpDir.open(tmp_path)
    with pytest.raises(im.ImageError, match="not a directory"):
        DumpDir.open(tmp_path / "nope")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_give_image_errors_only(data):
    try:
        im.parse_pagemap("fuzz.img", struct.pack("<II", im.IMG_COMMON_MAGIC, im.PAGEMAP_MAGIC) + data)
    except im.ImageError as e:
        assert str(e).startswith("fuzz.img: ")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64), st.integers(0, 200))
def test_mutated_valid_pagemaps_give_image_errors_only(noise, at):
    valid = im.encode_pagemap(im.Pagemap(1, [im.PagemapEntry(0x10000 * (i + 1), i + 1) for i in range(8)]))
    data = valid[:at] + noise + valid[at + len(noise):]
    try:
        pm = im.parse_pagemap("fuzz.img", data)
    except im.ImageError:
        return
    # whatever parsed is internally consistent
    ends = [e.vaddr for e in pm.entries]
    assert ends == sorted(ends) and all(e.nr_pages > 0 for e in pm.entries)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**32 - 1),
       st.lists(st.tuples(st.integers(1, 2**20), st.integers(1, 2**31), st.integers(0, 7)),
                max_size=40))
def test_fast_pagemap_codec_equals_the_python_one(pages_id, specs):
    """The C fast path (encode and decode) and the Python codec agree byte for byte."""
    entries, vaddr = [], 0x1000
    for gap, n, flags in specs:
        vaddr += gap * PAGE_SIZE
        entries.append(im.PagemapEntry(vaddr, n, flags))
        vaddr += n * PAGE_SIZE
    pm = im.Pagemap(pages_id, entries)
    data = im.encode_pagemap(pm)
    assert data == im.encode_pagemap_py(pm)
    assert im._parse_pagemap_fast("x", data) == pm
    # the full parser (what the fast path falls back to) reads the same
    assert im.parse_pagemap("x", data + b"") == pm


def test_fast_path_defers_unusual_entries_to_the_full_parser():
    # a fixed64 field in an entry: not for the fast path, still valid protobuf
    odd = pb.encode_field_varint(1, 0x10000) + pb.encode_field_varint(2, 1) + \
        pb.encode_varint(9 << 3 | 1) + bytes(8)
    data = im.encode_image(im.PAGEMAP_MAGIC, [entry((1, 3)), odd])
    assert im._parse_pagemap_fast("x", data) is None
    assert im.parse_pagemap("x", data).entries == [im.PagemapEntry(0x10000, 1, im.PE_PRESENT)]


def test_array_pagemap_is_the_entries_pagemap():
    """The receiver's ArrayPagemap (pairs + arrays, no object per entry) reads, counts,
    expands and encodes exactly as a Pagemap of the same entries (CRIU reads what it
    writes)."""
    from array import array
    from deltaxfer import _core
    entries = [im.PagemapEntry(0x1000, 3, im.PE_PRESENT),
               im.PagemapEntry(0x10000, 1, im.PE_PRESENT | im.PE_LAZY),
               im.PagemapEntry(0x7f0000000000, 2**20, im.PE_PRESENT)]
    pairs = array("Q")
    for e in entries:
        pairs.extend((e.vaddr, e.nr_pages | e.flags << 32))
    vaddrs = _core.pagemap_layout(pairs)
    apm = im.ArrayPagemap(7, pairs, len(vaddrs))
    pm = im.Pagemap(7, entries)
    assert apm.entries == pm.entries
    assert apm.present_pages == pm.present_pages == 4 + 2**20
    assert apm.present_vaddrs() == pm.present_vaddrs()
    assert im.encode_pagemap(apm) == im.encode_pagemap(pm) == im.encode_pagemap_py(pm)
    moved = apm.with_pages_id(9)
    assert im.encode_pagemap(moved) == im.encode_pagemap(im.Pagemap(9, entries))
    assert apm.pages_id == 7


def test_pagemap_encoded_from_pairs_equals_the_reference():
    """An ArrayPagemap is encoded straight from its (vaddr, nr_pages | flags << 32)
    pairs: byte for byte what the three-array encoder and the Python reference write,
    for varints of every width; its vaddrs / nr_pages / flags arrays, made only when
    asked for, are the pairs' halves."""
    import random
    from array import array

    from deltaxfer import _core
    from deltaxfer.criu import images as im

    rnd = random.Random(9)
    pairs, v = array("Q"), 0x1000
    for _ in range(3000):
        nr = rnd.choice([1, 127, 128, 16383, 16384, (1 << 32) - 1])
        flags = rnd.choice([im.PE_PRESENT, im.PE_PRESENT | im.PE_LAZY, im.PE_LAZY, 0x7])
        pairs.extend((v, nr | flags << 32))
        v += (nr + rnd.randrange(0, 3)) * 4096
    pm = im.ArrayPagemap(0xABCDE, pairs, 0)
    got = im.encode_pagemap(pm)
    assert got == _core.pagemap_encode_fast(pm.pages_id, pm.v, pm.n, pm.f)
    assert got == im.encode_pagemap_py(pm)
    assert list(pm.v) == list(pairs[0::2])
    assert list(pm.n) == [x & 0xFFFFFFFF for x in pairs[1::2]]
    assert list(pm.f) == [x >> 32 for x in pairs[1::2]]
    with pytest.raises(ValueError):
        _core.pagemap_encode_pairs(1, array("Q", [1, 2, 3]))
