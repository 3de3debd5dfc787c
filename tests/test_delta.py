"""XOR+RLE page deltas: exact format, round trips, caps, corrupt input; C == Python."""
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core_cases import IMPLS, MUTATIONS, PAGE, mutate, seed
from deltaxfer.core import DeltaError, native, reference

SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.large_base_example])


@pytest.fixture(params=IMPLS)
def impl(request):
    return request.param


def page_with(diffs: dict) -> bytes:
    b = bytearray(PAGE)
    for off, v in diffs.items():
        b[off] = v
    return bytes(b)


@pytest.mark.parametrize("diffs, encoded", [
    ({}, b""),                                            # identical: empty delta
    ({5: 1}, b"\x05\x01\x01"),                            # zero run 5, literal 1
    ({0: 7}, b"\x00\x01\x07"),                            # literal at the very start
    ({200: 2}, b"\xc8\x01\x01\x02"),                      # 200 = varint c8 01
    ({10: 1, 12: 2}, b"\x0a\x03\x01\x00\x02"),            # 1-byte gap stays in the literal
    ({10: 1, 13: 2}, b"\x0a\x04\x01\x00\x00\x02"),        # 2-byte gap stays in the literal
    ({10: 1, 14: 2}, b"\x0a\x01\x01\x03\x01\x02"),        # 3-byte gap splits
    ({PAGE - 1: 9}, b"\xff\x1f\x01\x09"),                 # 4095 = ff 1f, last byte
])
def test_exact_encoding(impl, diffs, encoded):
    old = bytes(PAGE)
    new = page_with(diffs)
    assert impl.xor_encode(old, new) == encoded
    page = bytearray(old)
    impl.xor_decode(page, encoded)
    assert page == new


def test_literal_is_the_xor_not_the_new_bytes(impl):
    old = page_with({100: 0xF0})
    new = page_with({100: 0x0F})
    assert impl.xor_encode(old, new) == b"\x64\x01\xff"


@pytest.mark.parametrize("kind", MUTATIONS)
def test_round_trip_and_agreement(kind):
    rng = random.Random(seed())
    for _ in range(10):
        old = rng.choice([rng.randbytes(PAGE), bytes(PAGE), bytes([rng.choice(range(4))]) * PAGE])
        new = mutate(old, rng, kind)
        for cap in (PAGE - 1, native.XOR_DEFAULT_CAP, 64):
            c, p = native.xor_encode(old, new, cap), reference.xor_encode(old, new, cap)
            assert c == p, (kind, cap)
            if c is None:
                continue
            assert len(c) <= cap
            for impl in (native, reference):
                page = bytearray(old)
                impl.xor_decode(page, c)
                assert page == new


@st.composite
def page_pairs(draw):
    old = draw(st.binary(min_size=PAGE, max_size=PAGE) | st.just(bytes(PAGE)))
    new = bytearray(old)
    strategy = draw(st.sampled_from(["patches", "stride", "random", "runs"]))
    if strategy == "patches":
        for off, data in draw(st.lists(st.tuples(st.integers(0, PAGE - 1), st.binary(min_size=1, max_size=40)),
                                       max_size=30)):
            new[off:off + len(data)] = data[:PAGE - off]
    elif strategy == "stride":
        start, stride = draw(st.integers(0, 10)), draw(st.integers(1, 6))
        for i in range(start, PAGE, stride):
            new[i] ^= 0x5A
    elif strategy == "runs":                       # long and max-length runs
        a = draw(st.integers(0, PAGE - 1))
        b = draw(st.integers(a, PAGE))
        new[a:b] = bytes((x ^ 0xFF) for x in new[a:b])
    else:
        new = bytearray(draw(st.binary(min_size=PAGE, max_size=PAGE)))
    cap = draw(st.sampled_from([PAGE - 1, 3072, 256, 1]))
    return old, bytes(new), cap


@SETTINGS
@given(page_pairs())
def test_property_decode_encode_is_new(pair):
    old, new, cap = pair
    c = native.xor_encode(old, new, cap)
    assert c == reference.xor_encode(old, new, cap)
    if c is None:
        # only give up when the delta really is longer than the cap
        assert len(native.xor_encode(old, new, PAGE - 1) or b"x" * PAGE) > cap
        return
    assert len(c) <= cap
    page = bytearray(old)
    native.xor_decode(page, c)
    assert page == new


@SETTINGS
@given(st.binary(max_size=64), st.binary(min_size=PAGE, max_size=PAGE))
def test_property_random_deltas_never_crash(delta, old):
    """Arbitrary bytes either decode identically in both impls or raise DeltaError."""
    results = []
    for impl in (native, reference):
        page = bytearray(old)
        try:
            impl.xor_decode(page, delta)
            results.append(bytes(page))
        except DeltaError:
            assert page == old, "a rejected delta must leave the page untouched"
            results.append(None)
    assert results[0] == results[1]


@pytest.mark.parametrize("delta, why", [
    (b"\x05", "literal length missing"),
    (b"\x05\x00", "empty literal"),
    (b"\x05\x02\x01", "literal shorter than stated"),
    (b"\x80", "truncated 2-byte varint"),
    (b"\x80\x80\x01\x01\x01", "3-byte varint"),
    (b"\xff\x1f\x02\x01\x01", "literal runs past the page end"),
    (b"\x81\x20\x01\x01", "zero run past the page end"),
])
def test_corrupt_delta_raises_delta_error(impl, delta, why):
    page = bytearray(b"\xaa" * PAGE)
    with pytest.raises(DeltaError, match="malformed"):
        impl.xor_decode(page, delta)
    assert page == b"\xaa" * PAGE, why


def test_cap_gives_up_exactly_at_the_limit(impl):
    old = bytes(PAGE)
    new = page_with({5: 1})          # encodes to 3 bytes
    assert impl.xor_encode(old, new, 3) == b"\x05\x01\x01"
    assert impl.xor_encode(old, new, 2) is None
    assert impl.xor_encode(old, bytes(b ^ 1 for b in old)) is None   # every byte differs
    with pytest.raises(ValueError, match="cap"):
        impl.xor_encode(old, new, PAGE)


def test_page_size_checked(impl):
    with pytest.raises(ValueError, match="exactly one page"):
        impl.xor_encode(bytes(PAGE * 2), bytes(PAGE * 2))
    with pytest.raises(ValueError, match="writable"):
        impl.xor_decode(bytes(PAGE), b"\x00\x01\x01")


def test_many_pages_in_one_call(impl):
    rng = random.Random(seed())
    old = [rng.randbytes(PAGE) for _ in range(20)]
    new = [mutate(p, rng, rng.choice(MUTATIONS)) for p in old]
    deltas, lengths = impl.xor_encode_pages(b"".join(old), b"".join(new))
    assert (deltas, list(lengths)) == (lambda d, n: (d, list(n)))(
        *reference.xor_encode_pages(b"".join(old), b"".join(new)))
    assert all(n == -1 or 0 < n <= native.XOR_DEFAULT_CAP for n in lengths)
    pages = bytearray(b"".join(old))
    impl.xor_decode_pages(pages, deltas, lengths)
    for i in range(20):
        expect = new[i] if lengths[i] > 0 else old[i]
        assert pages[i * PAGE:(i + 1) * PAGE] == expect
