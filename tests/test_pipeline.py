"""The round pipeline and the dump comparison: round trips over several rounds, C == Python
bit for bit, stats, xor on/off, dump-vs-dump XOR base, threads."""
import random
import threading
from array import array

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core_cases import IMPLS, MUTATIONS, PAGE, mutate, seed
from deltaxfer.core import (RoundState, XorCache, apply_round, apply_to_dict, compare_pages,
                            encode_round, native, reference)


@pytest.fixture(params=IMPLS)
def impl(request):
    return request.param


def memory(rng, n, zero_every=5):
    vaddrs = array("Q", sorted(rng.sample(range(0x400, 0x400 + 4 * n), n)))
    vaddrs = array("Q", [v * PAGE for v in vaddrs])
    pages = bytearray()
    for i in range(n):
        pages += bytes(PAGE) if i % zero_every == 0 else rng.randbytes(PAGE)
    return pages, vaddrs


def evolve(rng, pages, fraction=0.3):
    new = bytearray(pages)
    n = len(pages) // PAGE
    for i in rng.sample(range(n), int(n * fraction)):
        kind = rng.choice(MUTATIONS + ["zero", "fill"])
        old = bytes(new[i * PAGE:(i + 1) * PAGE])
        new[i * PAGE:(i + 1) * PAGE] = (bytes(PAGE) if kind == "zero" else
                                        rng.randbytes(PAGE) if kind == "fill" else
                                        mutate(old, rng, kind))
    return new


def test_three_rounds_round_trip_with_cache(impl):
    rng = random.Random(seed())
    pages, vaddrs = memory(rng, 60)
    cache = impl.XorCache(1 << 20)
    dest = bytearray(len(pages))
    prev = None
    for rnd in range(3):
        r = encode_round(pages, vaddrs, prev, cache=cache, frame_size=5 * PAGE, impl=impl)
        apply_round(r.frames, dest, vaddrs, impl=impl)
        assert dest == pages, f"round {rnd}"
        s = r.stats
        assert s.scanned == 60 == s.unchanged + s.changed + s.added
        assert s.sent == s.changed + s.added
        assert s.stored_bytes == len(r.frames)
        if rnd == 0:
            assert s.added == 60 and s.sent_xor == 0
        else:
            assert s.sent_xor > 0 and s.unchanged > 0
        prev = r.state
        pages = evolve(rng, pages)


def test_c_and_python_rounds_agree_bit_for_bit():
    rng = random.Random(seed())
    pages, vaddrs = memory(rng, 80)
    caches = {m: m.XorCache(native.XOR_CACHE_WAYS * (PAGE + 16) * 5) for m in (native, reference)}
    prev = {native: None, reference: None}
    for _ in range(3):
        out = {}
        for m in (native, reference):
            out[m] = encode_round(pages, vaddrs, prev[m], cache=caches[m], frame_size=6 * PAGE,
                                  xor_cap=1500, impl=m)
            prev[m] = out[m].state
        assert out[native].frames == out[reference].frames
        assert out[native].stats == out[reference].stats
        assert out[native].state == out[reference].state
        pages = evolve(rng, pages)
    assert caches[native].stats == caches[reference].stats
    assert caches[native].stats["evictions"] > 0


def test_pages_added_and_removed_between_rounds(impl):
    rng = random.Random(seed())
    pages, vaddrs = memory(rng, 40)
    store = {}
    cache = impl.XorCache(1 << 20)
    r = encode_round(pages, vaddrs, cache=cache, impl=impl)
    apply_to_dict(r.frames, store, impl=impl)
    # drop every third page, add new ones at fresh vaddrs, change some
    keep = [i for i in range(40) if i % 3]
    new_v = [vaddrs[i] for i in keep] + [0x900000 * PAGE + k * PAGE for k in range(5)]
    new_p = [bytes(pages[i * PAGE:(i + 1) * PAGE]) for i in keep] + \
            [rng.randbytes(PAGE) for _ in range(4)] + [bytes(PAGE)]
    new_p[0] = mutate(new_p[0], rng, "sparse")
    r2 = encode_round(b"".join(new_p), array("Q", new_v), r.state, cache=cache, impl=impl)
    s = r2.stats
    assert (s.removed, s.added, s.changed) == (14, 5, 1)
    assert (s.sent_xor, s.sent_zero, s.sent_full) == (1, 1, 4)
    apply_to_dict(r2.frames, store, impl=impl)
    assert {v: bytes(store[v]) for v in new_v} == dict(zip(new_v, new_p))


def test_xor_off_sends_changed_pages_whole_and_costs_more(impl):
    rng = random.Random(seed())
    old, vaddrs = memory(rng, 50, zero_every=1000)
    new = bytearray(old)
    for i in range(0, 50, 2):
        new[i * PAGE:(i + 1) * PAGE] = mutate(bytes(old[i * PAGE:(i + 1) * PAGE]), rng, "sparse")
    prev = RoundState.of(old, vaddrs, impl=impl)
    with_xor = encode_round(new, vaddrs, prev, base_pages=old, impl=impl)
    without = encode_round(new, vaddrs, prev, base_pages=old, xor=False, impl=impl)
    assert with_xor.stats.sent_xor == 25 and with_xor.stats.sent_full == 0
    assert without.stats.sent_xor == 0 and without.stats.sent_full == 25
    assert with_xor.stats.stored_bytes * 10 < without.stats.stored_bytes
    for r in (with_xor, without):
        dest = bytearray(old)
        apply_round(r.frames, dest, vaddrs, impl=impl)
        assert dest == new


def test_compare_pages_counts(impl):
    rng = random.Random(seed())
    a, b, c = rng.randbytes(PAGE), rng.randbytes(PAGE), rng.randbytes(PAGE)
    b2 = bytearray(b)
    b2[10] ^= 1
    b2[4000:4003] = bytes(x ^ 0xFF for x in b2[4000:4003])
    old = a + b + c + bytes(PAGE)
    old_v = array("Q", [0x1000, 0x2000, 0x3000, 0x5000])
    new = a + bytes(b2) + bytes(PAGE) + bytes(PAGE)
    new_v = array("Q", [0x1000, 0x2000, 0x4000, 0x5000])
    assert compare_pages(old, old_v, new, new_v, impl=impl) == {
        "added": 1, "removed": 1, "changed": 1, "unchanged": 2, "zero": 2,
        "bytes_differing": 4}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**32), st.integers(1, 30), st.floats(0, 1))
def test_property_compare_and_round_trip(s, n, fraction):
    rng = random.Random(s)
    old, vaddrs = memory(rng, n, zero_every=rng.randint(1, 6))
    new = evolve(rng, old, fraction)
    assert compare_pages(old, vaddrs, new, vaddrs) == \
        compare_pages(old, vaddrs, new, vaddrs, impl=reference)
    prev = RoundState.of(old, vaddrs)
    for xor in (True, False):
        c = encode_round(new, vaddrs, prev, base_pages=old, xor=xor, xor_cap=rng.randint(1, 4095))
        dest = bytearray(old)
        apply_round(c.frames, dest, vaddrs)
        assert dest == new
        cmp = compare_pages(old, vaddrs, new, vaddrs)
        assert c.stats.changed == cmp["changed"] and c.stats.unchanged == cmp["unchanged"]


def test_two_threads_on_two_halves_match_one_thread():
    rng = random.Random(seed())
    old, vaddrs = memory(rng, 400)
    new = evolve(rng, old, 0.2)
    half = 200 * PAGE
    prev = RoundState.of(old, vaddrs)
    shards = [(slice(0, half), slice(0, 200)), (slice(half, None), slice(200, None))]
    results = [None, None]

    def work(k):
        ps, vs = shards[k]
        p = RoundState(prev.vaddrs[vs], prev.hashes[vs])
        results[k] = encode_round(memoryview(new)[ps], memoryview(vaddrs)[vs], p,
                                  cache=XorCache(1 << 20))

    threads = [threading.Thread(target=work, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    dest = bytearray(old)
    for r in results:
        apply_round(r.frames, dest, vaddrs)
    assert dest == new
    whole = encode_round(new, vaddrs, prev, cache=XorCache(1 << 20))
    assert whole.stats.changed == sum(r.stats.changed for r in results)


def _windowed_rounds(rounds, vaddrs, cache, threads, window, impl, next_round):
    """Encode each round of ``rounds`` (page buffers) as windows of ``window`` pages on
    ``threads`` threads sharing ``cache``, as the streaming source does; the frames of
    each round in window order, and the hashes."""
    from concurrent.futures import ThreadPoolExecutor
    n = len(vaddrs)
    prev_v, prev_h, out = None, None, []
    with ThreadPoolExecutor(threads) as pool:
        for pages in rounds:
            if not next_round:
                cache.next_round()

            def one(lo, pages=pages, pv=prev_v, ph=prev_h):
                hi = min(lo + window, n)
                kw = {}
                if pv is not None:      # the held pages of this window's vaddr range
                    kw = dict(prev_vaddrs=pv[lo:hi], prev_hashes=ph[lo:hi])
                if not next_round:
                    kw["next_round"] = False
                return impl.encode_round(memoryview(pages)[lo * PAGE:hi * PAGE],
                                         vaddrs[lo:hi], cache=cache, **kw)
            parts = list(pool.map(one, range(0, n, window)))
            frames = b"".join(p[0] for p in parts)
            hashes = array("Q")
            for p in parts:
                hashes.extend(p[1])
            out.append((frames, hashes))
            prev_v, prev_h = vaddrs, hashes
    return out


@pytest.mark.parametrize("cache_bytes", [64 << 20, 64 << 10])
def test_one_cache_shared_by_threads_encoding_windows(cache_bytes):
    """The streaming source's encoders share one XorCache per image (a lock per set):
    over several rounds the destination rebuilds every round exactly; with a cache big
    enough never to evict, the frames equal the Python reference's, encoded serially."""
    rng = random.Random(seed())
    pages, vaddrs = memory(rng, 3000)
    vaddrs = array("Q", vaddrs)
    rounds = [pages]
    for _ in range(3):
        rounds.append(evolve(rng, rounds[-1], 0.3))
    got = _windowed_rounds(rounds, vaddrs, XorCache(cache_bytes), 4, 97, native, False)
    dest = bytearray(len(pages))
    for (frames, _), want in zip(got, rounds):
        apply_round(frames, dest, vaddrs)
        assert dest == want
    if cache_bytes >= len(pages) * 2:
        ref = _windowed_rounds(rounds, vaddrs, reference.XorCache(cache_bytes), 1, 97,
                               reference, True)
        assert [f for f, _ in got] == [f for f, _ in ref]
        assert [h for _, h in got] == [h for _, h in ref]


def test_input_checks(impl):
    with pytest.raises(ValueError, match="strictly ascending"):
        encode_round(bytes(2 * PAGE), array("Q", [0x2000, 0x1000]), impl=impl)
    with pytest.raises(ValueError, match="not page aligned"):
        encode_round(bytes(PAGE), array("Q", [0x1001]), impl=impl)
    with pytest.raises(ValueError, match="holds 2 pages but vaddrs has 1"):
        encode_round(bytes(2 * PAGE), array("Q", [0x1000]), impl=impl)
    with pytest.raises(ValueError, match="base_pages holds 0 pages"):
        encode_round(bytes(PAGE), array("Q", [0x1000]),
                     RoundState(array("Q", [0x1000]), array("Q", [1])), base_pages=b"", impl=impl)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**32), st.integers(1, 40), st.floats(0, 1))
def test_clean_pages_are_skipped_unread_and_the_round_still_round_trips(s, n, fraction):
    """Written-page tracking marks pages clean: their bytes are not looked at (here they
    are garbage), their hash is the held one; the other pages go as usual. C == Python."""
    rng = random.Random(s)
    old, vaddrs = memory(rng, n)
    new = evolve(rng, old, fraction)
    changed = {i for i in range(n) if old[i * PAGE:(i + 1) * PAGE] != new[i * PAGE:(i + 1) * PAGE]}
    # clean: a random subset of the unchanged pages (the tracker may miss none, but it
    # may report unchanged pages as written: those are simply not clean)
    clean = bytearray(1 if i not in changed and rng.random() < 0.7 else 0 for i in range(n))
    garbled = bytearray(new)
    for i in range(n):
        if clean[i]:
            garbled[i * PAGE:(i + 1) * PAGE] = rng.randbytes(PAGE)
    prev = RoundState.of(old, vaddrs)
    outs = [encode_round(garbled, vaddrs, prev, clean=clean, impl=m) for m in (native, reference)]
    assert outs[0].frames == outs[1].frames and outs[0].stats == outs[1].stats
    assert outs[0].state == outs[1].state
    full = encode_round(new, vaddrs, prev)
    assert outs[0].state.hashes == full.state.hashes      # the held hash is the right one
    assert outs[0].stats.skipped == clean.count(1)
    assert outs[0].stats.changed == full.stats.changed
    dest = bytearray(old)
    apply_round(outs[0].frames, dest, vaddrs)
    assert dest == new


def test_a_clean_page_the_destination_lacks_is_an_error(impl):
    rng = random.Random(seed())
    pages, vaddrs = memory(rng, 4)
    prev = RoundState.of(pages[:3 * PAGE], vaddrs[:3])
    with pytest.raises(ValueError, match="clean"):
        encode_round(pages, vaddrs, prev, clean=bytes([0, 0, 0, 1]), impl=impl)
    with pytest.raises(ValueError, match="clean"):
        encode_round(pages, vaddrs, prev, clean=bytes([0, 1]), impl=impl)


def test_pages_index_output_is_the_pages_payloads_of_the_frames():
    """encode_round(..., pages_index=i) writes each frame preceded by i as a u32: exactly
    the PAGES payloads encode_pages(i, frame) builds from the plain output (the sender
    sends them without a copy); hashes and counts are unchanged; an index over u32 is
    refused."""
    import os

    from deltaxfer import _core
    from deltaxfer.core.pipeline import split_frames, split_payloads
    from deltaxfer.wire import decode_pages, encode_pages

    n = 700
    pages = bytearray(os.urandom(4096 * n))
    pages[4096 * 5:4096 * 9] = bytes(4096 * 4)            # zero records too
    vaddrs = array("Q", [0x7f0000000000 + i * 4096 for i in range(n)])
    plain, h1, s1 = _core.encode_round(pages, vaddrs, frame_size=1 << 20)
    prefixed, h2, s2 = _core.encode_round(pages, vaddrs, frame_size=1 << 20,
                                          pages_index=0x01020304)
    want = [bytes(encode_pages(0x01020304, f)) for f in split_frames(plain)]
    got = [bytes(p) for p in split_payloads(prefixed)]
    assert len(want) >= 3 and got == want
    assert h1 == h2 and s1 == s2
    assert all(decode_pages(p)[0] == 0x01020304 for p in got)
    with pytest.raises(ValueError):
        _core.encode_round(pages, vaddrs, pages_index=1 << 32)


@pytest.mark.parametrize("frame_size", [4107, 4108, 3 * 4107 - 1, 6 * PAGE, 1 << 20])
def test_frames_are_written_into_an_output_that_always_fits(frame_size):
    """encode_round writes a window's frames into the caller's scratch, after the staging
    area, when it holds frames_output_bound bytes: enough for records of every kind
    (whole incompressible pages, zero pages, xor deltas) at every frame size down to one
    record per frame, with and without lz4 and the PAGES index before each frame. The
    frames are bit for bit the Python reference's, and the same with a scratch too small
    for them (grown as they come), with a staging area only, or with none."""
    import mmap
    import struct

    from deltaxfer import _core
    from deltaxfer.core.pipeline import split_frames, split_payloads

    rng = random.Random(seed())
    n = 96
    base, vaddrs = memory(rng, n, zero_every=3)
    new = bytearray(base)
    for i in range(n):
        if i % 2 == 0:                             # small changes (xor)
            new[i * PAGE + 100:i * PAGE + 140] = rng.randbytes(40)
        elif i % 6 == 1:                           # rewritten whole (full page)
            new[i * PAGE:(i + 1) * PAGE] = rng.randbytes(PAGE)
        elif i % 6 == 5:                           # cleared (zero record)
            new[i * PAGE:(i + 1) * PAGE] = bytes(PAGE)
    whole = mmap.mmap(-1, frame_size + _core.frames_output_bound(n, frame_size, True))
    short = bytearray(frame_size + _core.frames_output_bound(n, frame_size, True) // 2)
    assert _core.frames_output_bound(0, frame_size) == 0
    assert _core.frames_output_bound(n, frame_size) < _core.frames_output_bound(
        n, frame_size, True) <= n * (PAGE + 11 + 4 + 32) + frame_size // 255 + 16
    for compress in (True, False):
        want, hashes, stats = reference.encode_round(new, vaddrs, vaddrs, array(
            "Q", _core.hash_pages(base)[0]), base_pages=base, frame_size=frame_size,
            compress=compress, xor_cap=PAGE - 1)
        for scr in (None, bytearray(frame_size), short, whole):
            got, h, s = _core.encode_round(new, vaddrs, vaddrs, array(
                "Q", _core.hash_pages(base)[0]), base_pages=base, frame_size=frame_size,
                compress=compress, xor_cap=PAGE - 1, scratch=scr)
            assert type(got) is bytes and got == want
            assert h == hashes and s["frames"] == len(split_frames(got)) >= 1
            assert s["sent_xor"] and s["sent_full"] and s["sent_zero"]
            prefixed, _, _ = _core.encode_round(new, vaddrs, vaddrs, array(
                "Q", _core.hash_pages(base)[0]), base_pages=base, frame_size=frame_size,
                compress=compress, xor_cap=PAGE - 1, scratch=scr, pages_index=7)
            payloads = [bytes(p) for p in split_payloads(prefixed)]
            assert [struct.unpack_from("<I", p)[0] for p in payloads] == [7] * len(payloads)
            assert b"".join(p[4:] for p in payloads) == want
        # all pages new and incompressible: the largest output there is
        rand = bytearray(rng.randbytes(PAGE * n))
        for scr in (short, whole):
            full, _, s = _core.encode_round(rand, vaddrs, frame_size=frame_size,
                                            compress=compress, scratch=scr, pages_index=1)
            assert s["sent_full"] == n and len(full) >= n * (PAGE + 11)
            assert full == _core.encode_round(rand, vaddrs, frame_size=frame_size,
                                              compress=compress, pages_index=1)[0]
    with pytest.raises(ValueError, match="scratch"):
        _core.encode_round(base, vaddrs, frame_size=frame_size, scratch=bytearray(4000))
    with pytest.raises(ValueError, match="scratch must be a writable"):
        _core.encode_round(base, vaddrs, frame_size=frame_size, scratch=b"\0" * frame_size)
