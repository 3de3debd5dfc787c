"""The compiled store bookkeeping and pagemap codec == their Python references
(src/deltaxfer/core/reference/store.py and images.py): generated inputs (hypothesis),
the edge cases by hand, and the pagemaps of a real CRIU dump."""
import struct
from array import array

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deltaxfer import _core
from deltaxfer.core.reference import images as ref_images
from deltaxfer.core.reference import store as ref_store

PAGE = 4096
SETTINGS = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def Q(values) -> array:
    return array("Q", values)


def page_sets(max_page=64):
    """A sorted set of page vaddrs drawn from a small range (overlaps likely)."""
    return st.sets(st.integers(0, max_page), max_size=48).map(
        lambda s: Q(sorted(0x7f0000000000 + p * PAGE for p in s)))


def outcome(fn, *args):
    """(kind, value) of a call: its result with arrays as lists, or its exception type."""
    try:
        r = fn(*args)
    except (ValueError, OverflowError) as e:
        return ("raises", type(e).__name__)
    if isinstance(r, tuple):
        return ("ok", tuple(list(x) if isinstance(x, array) else x for x in r))
    return ("ok", list(r) if isinstance(r, array) else r)


# -- merge_parent_hashes ---------------------------------------------------------------------

@SETTINGS
@given(new=page_sets(), held=page_sets(), data=st.data())
def test_merge_parent_hashes_matches(new, held, data):
    recv = Q(v for v in new if data.draw(st.booleans()))
    held_h = Q(data.draw(st.integers(1, 2**64 - 1)) for _ in held)
    recv_h = Q(data.draw(st.integers(1, 2**64 - 1)) for _ in recv)
    c = outcome(_core.merge_parent_hashes, new, held, held_h, recv, recv_h)
    assert c == outcome(ref_store.merge_parent_hashes, new, held, held_h, recv, recv_h)
    hashes, runs, missing = c[1]
    assert sum(runs[1::3]) == len(new)
    assert missing == sum(1 for v in new if v not in set(recv) and v not in set(held))


@SETTINGS
@given(new=page_sets(), extra=page_sets())
def test_merge_parent_hashes_refuses_the_same_way(new, extra):
    """Received pages outside the round (or out of order) are refused by both."""
    recv = Q(sorted(set(new) | set(extra)))
    recv_h = Q(range(1, len(recv) + 1))
    c = outcome(_core.merge_parent_hashes, new, Q([]), Q([]), recv, recv_h)
    assert c == outcome(ref_store.merge_parent_hashes, new, Q([]), Q([]), recv, recv_h)
    assert (c[0] == "raises") == bool(set(extra) - set(new))


def test_merge_parent_hashes_by_hand():
    b = 0x1000000
    new = Q([b, b + PAGE, b + 2 * PAGE, b + 5 * PAGE, b + 6 * PAGE])
    held = Q([b, b + 2 * PAGE, b + 6 * PAGE])
    recv = Q([b + PAGE, b + 5 * PAGE])
    for impl in (_core, ref_store):
        hashes, runs, missing = impl.merge_parent_hashes(new, held, Q([10, 12, 16]), recv,
                                                         Q([21, 25]))
        assert list(hashes) == [10, 21, 12, 25, 16]
        assert list(runs) == [b, 1, 1, b + PAGE, 1, 0, b + 2 * PAGE, 1, 1,
                              b + 5 * PAGE, 1, 0, b + 6 * PAGE, 1, 1]
        assert missing == 0
        with pytest.raises(ValueError):
            impl.merge_parent_hashes(new, held, Q([1]), recv, Q([21, 25]))
        with pytest.raises(ValueError):
            impl.merge_parent_hashes(new, held, Q([10, 12, 16]), Q([b + 5 * PAGE, b + PAGE]),
                                     Q([1, 2]))


# -- layout_diff -----------------------------------------------------------------------------

@SETTINGS
@given(old=page_sets(), new=page_sets())
def test_layout_diff_matches(old, new):
    c = list(_core.layout_diff(old, new))
    assert c == list(ref_store.layout_diff(old, new))
    # applying the edits to old gives new's layout
    out, at = [], 0
    edits = [c[i:i + 3] for i in range(0, len(c), 3)]
    inserted = iter(v for v in new if v not in set(old))
    for index, count, kind in edits:
        out += old[at:index]
        at = index
        if kind == 0:
            at += count
        else:
            out += [next(inserted) for _ in range(count)]
    out += old[at:]
    assert out == list(new)


def test_layout_diff_by_hand():
    o = Q([1, 2, 3, 5, 6, 9])
    n = Q([0, 2, 3, 4, 6, 7, 8, 10])
    want = [0, 1, 1, 0, 1, 0, 3, 1, 1, 3, 1, 0, 5, 2, 1, 5, 1, 0, 6, 1, 1]
    assert list(_core.layout_diff(o, n)) == list(ref_store.layout_diff(o, n)) == want
    assert list(ref_store.layout_diff(o, o)) == [] == list(_core.layout_diff(o, o))
    assert list(ref_store.layout_diff(Q([]), n)) == list(_core.layout_diff(Q([]), n))
    assert list(ref_store.layout_diff(o, Q([]))) == list(_core.layout_diff(o, Q([]))) == [0, 6, 0]


# -- pagemap_layout --------------------------------------------------------------------------

entries = st.lists(st.tuples(st.integers(0, 8), st.integers(0, 5), st.sampled_from([0, 1, 4, 5, 6])),
                   max_size=12)


@SETTINGS
@given(entries=entries, misalign=st.sampled_from([0, 0, 0, 1, 100]), max_nr=st.integers(1, 6))
def test_pagemap_layout_matches(entries, misalign, max_nr):
    """Gaps, touching and overlapping entries, zero and over-long runs, misaligned vaddrs."""
    pairs, v = Q([]), 0x400000
    for gap, nr, flags in entries:
        v = max(0, v + (gap - 2) * PAGE)          # gap - 2 < 0: overlaps the previous one
        pairs.extend((v + misalign, nr | flags << 32))
        v += nr * PAGE
    c = outcome(_core.pagemap_layout, pairs, max_nr)
    r = outcome(ref_store.pagemap_layout, pairs, max_nr)
    assert c == r
    if c[0] == "raises":                          # the same message, naming the same entry
        with pytest.raises(ValueError) as ce:
            _core.pagemap_layout(pairs, max_nr)
        with pytest.raises(ValueError) as re_:
            ref_store.pagemap_layout(pairs, max_nr)
        assert str(ce.value) == str(re_.value)


def test_pagemap_layout_edges():
    top = (1 << 64) - PAGE
    for pairs in (Q([top, 1 | 4 << 32]), Q([top, 2 | 4 << 32]), Q([0, 1]), Q([0])):
        assert outcome(_core.pagemap_layout, pairs) == outcome(ref_store.pagemap_layout, pairs)
    assert list(ref_store.pagemap_layout(Q([top, 1 | 4 << 32]))) == [top]


# -- Xxh3Stream ------------------------------------------------------------------------------

@SETTINGS
@given(pieces=st.lists(st.binary(max_size=600), max_size=10))
def test_xxh3_stream_matches(pieces):
    c, r = _core.Xxh3Stream(), ref_store.Xxh3Stream()
    for p in pieces:
        c.update(p)
        r.update(p)
    assert c.digest() == r.digest() == _core.xxh3_64(b"".join(pieces))


# -- pagemap codec ---------------------------------------------------------------------------

def varint(v: int) -> bytes:
    return ref_images._put_varint(v)


values = st.one_of(st.integers(0, 300), st.integers(0, 2**64 - 1))
field = st.tuples(st.sampled_from([1, 2, 3, 4, 5] * 4 + [0, 6, 7]),   # 0, 6, 7: refused
                  st.sampled_from([0] * 19 + [2]),                    # wire type 2: refused
                  values)
# mostly plain entries (vaddr and nr_pages first, then extra fields), some anything at all
fields = st.one_of(
    st.tuples(values, values, st.lists(field, max_size=3)).map(
        lambda t: [(1, 0, t[0]), (2, 0, t[1])] + t[2]),
    st.lists(field, max_size=6))


@SETTINGS
@given(entries=st.lists(fields, max_size=5), head=st.binary(max_size=4),
       tail=st.sampled_from([b"", b"", b"\x01", b"\x05\x00\x00\x00\x08"]),
       overlong=st.booleans())
def test_pagemap_entries_fast_matches(entries, head, tail, overlong):
    body = bytearray()
    for fs in entries:
        msg = bytearray()
        for number, wire, value in fs:
            msg += varint(number << 3 | wire)
            v = varint(value)
            if overlong and value < 128:
                v = bytes([v[0] | 0x80]) + b"\x80" * 9 + b"\x00"   # 11 bytes: refused
            msg += v
        body += struct.pack("<I", len(msg)) + msg
    data = head + bytes(body) + tail
    c = outcome(_core.pagemap_entries_fast, data, len(head))
    assert c == outcome(ref_images.pagemap_entries_fast, data, len(head))


def test_pagemap_entries_fast_edges():
    one = varint(1 << 3) + varint(0x7f00_0000_0000) + varint(2 << 3) + varint(3)
    for msg in (one,                                              # no flags: PE_PRESENT
                one + varint(3 << 3) + varint(1),                 # in_parent: PE_PARENT
                one + varint(5 << 3) + varint(2**40),             # field 5 wins over 2
                varint(1 << 3) + varint(5),                       # no nr_pages: refused
                one + varint(1 << 3) + b"\xff" * 9 + b"\x7f",     # 10 bytes, top bits dropped
                one + varint(4 << 3) + b"\x80",                   # varint runs past the entry
                b""):
        data = struct.pack("<I", len(msg)) + msg
        assert outcome(_core.pagemap_entries_fast, data, 0) == \
            outcome(ref_images.pagemap_entries_fast, data, 0)
    assert outcome(_core.pagemap_entries_fast, b"xy", 5) == \
        outcome(ref_images.pagemap_entries_fast, b"xy", 5) == ("ok", None)
    v, n, f = ref_images.pagemap_entries_fast(struct.pack("<I", len(one)) + one, 0)
    assert (list(v), list(n), list(f)) == ([0x7f00_0000_0000], [3], [ref_images.PE_PRESENT])


@SETTINGS
@given(ents=st.lists(st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**33),
                               st.integers(0, 2**64 - 1)), max_size=8),
       pages_id=st.integers(0, 2**32 - 1))
def test_pagemap_encode_fast_matches(ents, pages_id):
    v, n, f = (Q(e[i] for e in ents) for i in range(3))
    c = outcome(_core.pagemap_encode_fast, pages_id, v, n, f)
    assert c == outcome(ref_images.pagemap_encode_fast, pages_id, v, n, f)
    if c[0] == "ok":       # and the decoder reads back what the encoder wrote
        head = 12 + struct.unpack_from("<I", c[1], 8)[0]
        got = ref_images.pagemap_entries_fast(c[1], head)
        assert (list(got[0]), list(got[1]), list(got[2])) == (list(v), list(n), list(f))


@pytest.mark.criu
def test_real_dump_pagemaps(criu, tmp_path):
    """Every pagemap of a real CRIU dump: decoded alike, and re-encoded byte for byte."""
    import workloads
    with workloads.start("memwork", mib=8, tmpdir=tmp_path) as wl:
        criu.dump(wl.pid, str(tmp_path), leave="running")
    paths = sorted(tmp_path.glob("pagemap-*.img"))
    assert paths
    for path in paths:
        data = path.read_bytes()
        head = 12 + struct.unpack_from("<I", data, 8)[0]
        c = _core.pagemap_entries_fast(data, head)
        r = ref_images.pagemap_entries_fast(data, head)
        assert c is not None and [list(x) for x in c] == [list(x) for x in r]
        pages_id = data[12 + 1]            # head: field 1, a one-byte varint here
        assert ref_images.pagemap_encode_fast(pages_id, *c) == \
            _core.pagemap_encode_fast(pages_id, *c)
