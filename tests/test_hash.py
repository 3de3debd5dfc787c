"""Page hashing, zero-page flags and change detection: C core and Python reference."""
import mmap
import random
from array import array

import pytest

from core_cases import IMPLS, PAGE, pages_of, seed
from deltaxfer import _core


@pytest.fixture(params=IMPLS)
def impl(request):
    return request.param


def test_xxh3_known_answers():
    # reference values of XXH3_64bits (seed 0) from the xxHash test vectors
    assert _core.xxh3_64(b"") == 0x2D06800538D394C2
    assert _core.ZERO_PAGE_HASH == _core.xxh3_64(bytes(PAGE))


def test_hash_pages_flags_zero_and_matches_xxh3(impl):
    rng = random.Random(seed())
    pages = [bytes(PAGE), rng.randbytes(PAGE), bytes(PAGE - 1) + b"\x01", b"\x01" + bytes(PAGE - 1),
             rng.randbytes(PAGE)]
    hashes, zero, changed = impl.hash_pages(pages_of(*pages))
    assert changed is None
    assert list(zero) == [1, 0, 0, 0, 0]
    assert list(hashes) == [_core.xxh3_64(p) for p in pages]
    assert hashes[1] != hashes[4]


def test_changed_pages_found_in_the_same_pass(impl):
    rng = random.Random(seed())
    old = bytearray(rng.randbytes(PAGE * 64))
    for i in range(0, 64, 7):
        old[i * PAGE:(i + 1) * PAGE] = bytes(PAGE)
    new = bytearray(old)
    expect = [0, 5, 14, 62]
    new[0] ^= 1                          # first byte of a page
    new[6 * PAGE - 1] ^= 0x80            # last byte of page 5
    new[14 * PAGE + 7] = 9               # a zero page becomes non-zero
    new[62 * PAGE:63 * PAGE] = bytes(PAGE)   # a page becomes zero
    old_hashes, _, _ = impl.hash_pages(old)
    hashes, zero, changed = impl.hash_pages(new, old_hashes)
    assert list(changed) == expect
    assert list(impl.changed_pages(old_hashes, hashes)) == expect
    assert zero[62] == 1 and zero[14] == 0


def test_c_and_python_agree_bit_for_bit():
    from deltaxfer.core import native, reference
    rng = random.Random(seed())
    buf = pages_of(*[rng.choice([bytes(PAGE), rng.randbytes(PAGE)]) for _ in range(40)])
    prev = array("Q", [rng.getrandbits(64) for _ in range(40)])
    c, p = native.hash_pages(buf, prev), reference.hash_pages(buf, prev)
    assert c[0] == p[0] and c[1] == p[1] and c[2] == p[2]


@pytest.mark.parametrize("kind", ["bytes", "bytearray", "memoryview", "mmap", "empty"])
def test_accepts_any_contiguous_buffer(impl, kind):
    data = random.Random(seed()).randbytes(PAGE * 3)
    if kind == "mmap":
        m = mmap.mmap(-1, len(data))
        m.write(data)
        buf = m
    elif kind == "empty":
        data, buf = b"", b""
    else:
        buf = {"bytes": bytes, "bytearray": bytearray, "memoryview": memoryview}[kind](data)
    hashes, _, _ = impl.hash_pages(buf)
    assert list(hashes) == [_core.xxh3_64(data[i:i + PAGE]) for i in range(0, len(data), PAGE)]


def test_rejects_partial_pages_and_strided_buffers(impl):
    with pytest.raises(ValueError, match="multiple of the page size"):
        impl.hash_pages(bytes(PAGE + 1))
    strided = memoryview(bytearray(PAGE * 4))[::2]
    with pytest.raises(ValueError, match="C-contiguous"):
        impl.hash_pages(strided)


def test_hash_arrays_must_be_uint64(impl):
    with pytest.raises(ValueError, match="uint64"):
        impl.changed_pages(array("I", [1, 2]), array("I", [1, 3]))
    with pytest.raises(ValueError, match="length"):
        impl.changed_pages(array("Q", [1, 2]), array("Q", [1]))
    raw = memoryview(array("Q", [1, 2, 3]).tobytes()).cast("Q")
    assert list(impl.changed_pages(raw, array("Q", [1, 5, 3]))) == [1]
    with pytest.raises(ValueError, match="prev_hashes has 1 entries for 2 pages"):
        impl.hash_pages(bytes(2 * PAGE), array("Q", [0]))
