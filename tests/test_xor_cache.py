"""The bounded XOR cache: lookups, replacement policy, the memory bound; C == Python."""
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core_cases import IMPLS, PAGE, seed
from deltaxfer.core import native, reference

WAYS = native.XOR_CACHE_WAYS
SLOT = PAGE + 16


@pytest.fixture(params=IMPLS)
def impl(request):
    return request.param


def page(tag: int) -> bytes:
    return tag.to_bytes(8, "little") * (PAGE // 8)


def test_insert_lookup_replace_drop(impl):
    c = impl.XorCache(1 << 20)
    assert c.lookup(0x1000) is None
    c.insert(0x1000, page(1))
    assert c.lookup(0x1000) == page(1)
    c.insert(0x1000, page(2))              # same vaddr: replaced in place
    assert c.lookup(0x1000) == page(2) and len(c) == 1
    c.drop(0x1000)
    assert c.lookup(0x1000) is None and len(c) == 0
    assert c.stats["hits"] == 2 and c.stats["misses"] == 2 and c.stats["drops"] == 1
    with pytest.raises(ValueError, match="page aligned"):
        c.insert(0x1001, page(1))


def test_evicts_the_page_sent_longest_ago(impl):
    c = impl.XorCache(SLOT * WAYS)          # one set: every vaddr competes
    assert c.slots == WAYS
    for r in range(WAYS):
        c.next_round()
        c.insert(0x1000 * (r + 1), page(r))
    c.next_round()
    c.insert(0x1000, page(9))               # re-sent: now the youngest
    c.next_round()
    c.insert(0x100000, page(10))            # evicts 0x2000, the oldest
    assert c.lookup(0x2000) is None
    assert c.lookup(0x1000) == page(9)
    assert all(c.lookup(v) is not None for v in (0x3000, 0x4000, 0x100000))
    assert c.stats["evictions"] == 1


def test_capacity_bound(impl):
    with pytest.raises(ValueError, match="holds no set"):
        impl.XorCache(PAGE)
    for cap in (SLOT * WAYS, 1 << 20, 3_000_001):
        c = impl.XorCache(cap)
        assert c.nbytes <= cap and c.slots * PAGE <= cap
    c = impl.XorCache(1 << 20)
    for i in range(c.slots * 10):           # 10x more pages than fit
        c.insert(0x10000000 + i * PAGE, page(i))
    assert len(c) <= c.slots and c.nbytes <= 1 << 20
    assert c.stats["evictions"] >= c.slots * 9


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_memory_stays_within_the_bound_whatever_the_process_size():
    cap = 16 << 20
    before = _rss()
    c = native.XorCache(cap)
    p = bytearray(page(7))
    for i in range(100_000):               # 400 MiB of distinct pages through a 16 MiB cache
        p[:8] = i.to_bytes(8, "little")
        c.insert(0x7F0000000000 + i * PAGE, p)
    grown = _rss() - before
    assert len(c) <= c.slots
    assert grown <= cap + (4 << 20), f"RSS grew {grown >> 20} MiB for a {cap >> 20} MiB cache"


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["insert", "lookup", "drop", "round"]),
                          st.integers(0, 40)), max_size=80))
def test_property_c_and_python_caches_agree(ops):
    caches = [native.XorCache(SLOT * WAYS * 3), reference.XorCache(SLOT * WAYS * 3)]
    for op, n in ops:
        vaddr = 0x400000 + n * PAGE
        results = []
        for c in caches:
            if op == "insert":
                c.insert(vaddr, page(n))
            elif op == "drop":
                c.drop(vaddr)
            elif op == "round":
                c.next_round()
            results.append(c.lookup(vaddr))
        assert results[0] == results[1]
    assert caches[0].stats == caches[1].stats and len(caches[0]) == len(caches[1])


def test_random_workload_hit_rate_favours_hot_pages(impl):
    """Pages re-sent every round stay cached while a stream of one-off pages passes by."""
    rng = random.Random(seed())
    c = impl.XorCache(SLOT * 64)
    hot = [0x10000000 + i * PAGE for i in range(16)]
    cold = []
    for _ in range(20):
        c.next_round()
        for v in hot:
            c.insert(v, page(v))
        for _ in range(16):
            cold.append(0x20000000 + rng.randrange(1 << 20) * PAGE)
            c.insert(cold[-1], page(1))
    kept_hot = sum(c.lookup(v) is not None for v in hot)
    kept_cold = sum(c.lookup(v) is not None for v in cold[:16 * 10])
    assert kept_hot >= 14, f"only {kept_hot}/16 hot pages kept"
    assert kept_cold <= 16, f"{kept_cold} one-off pages from early rounds still cached"
