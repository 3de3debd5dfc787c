"""Shared cases of the page-core tests: both implementations, page generators."""
import os
import random

import pytest

from deltaxfer.core import native, reference

PAGE = 4096
IMPLS = [pytest.param(native, id="c"), pytest.param(reference, id="python")]


def random_page(rng: random.Random) -> bytes:
    return rng.randbytes(PAGE)


def pages_of(*pages) -> bytearray:
    out = bytearray()
    for p in pages:
        assert len(p) == PAGE
        out += p
    return out


def mutate(page: bytes, rng: random.Random, kind: str) -> bytes:
    """A new version of page: sparse, dense, all-different or adversarial changes."""
    b = bytearray(page)
    if kind == "sparse":
        for _ in range(rng.randint(1, 8)):
            off = rng.randrange(PAGE)
            n = rng.randint(1, 16)
            b[off:off + n] = rng.randbytes(len(b[off:off + n]))
    elif kind == "dense":
        for _ in range(rng.randint(50, 400)):
            b[rng.randrange(PAGE)] ^= rng.randint(1, 255)
    elif kind == "all":
        b = bytearray(x ^ 0xFF for x in b)
    elif kind == "alternating":
        stride = rng.randint(2, 5)
        for i in range(rng.randrange(stride), PAGE, stride):
            b[i] ^= 1
    elif kind == "gap_edges":        # gaps of exactly MIN_GAP-1 and MIN_GAP zero bytes
        i = 0
        while i < PAGE:
            b[i] ^= 0x80
            i += rng.choice([3, 4])
    else:
        raise ValueError(kind)
    return bytes(b)


MUTATIONS = ["sparse", "dense", "all", "alternating", "gap_edges"]


def seed() -> int:
    return int(os.environ.get("DELTAXFER_TEST_SEED", "1234"))
