"""live._lazy_layout (a lazy dump's pagemap as the final round's layout, from arrays
with no Python per entry) against the per-entry statement of the same rule."""
import random
from array import array

import pytest

from deltaxfer import PAGE_SIZE, _core, live
from deltaxfer.criu import images as im


def per_entry(entries):
    """The rule, one entry at a time (what frozen_images did before)."""
    starts, lens, pairs = array("Q"), array("Q"), array("Q")
    file_at, file_len, file_from = array("Q"), array("Q"), array("Q")
    at = file_pos = 0
    for vaddr, n, f in entries:
        if f & im.PE_PRESENT or f & im.PE_LAZY:
            starts.append(vaddr)
            lens.append(n * PAGE_SIZE)
            pairs.extend((vaddr, n | (f | im.PE_PRESENT) << 32))
            if f & im.PE_PRESENT:
                file_at.append(at)
                file_len.append(n)
                file_from.append(file_pos)
                file_pos += n
            at += n
    return (_core.run_page_vaddrs(starts, lens), pairs, file_at, file_len, file_from,
            file_pos, any(f & im.PE_LAZY and not f & im.PE_PRESENT for _, _, f in entries))


def random_entries(rng, count):
    out, vaddr = [], 0x400000
    for _ in range(count):
        vaddr += rng.choice((0, 1, 7)) * PAGE_SIZE
        n = rng.choice((1, 1, 2, 3, 512, 4096))
        f = rng.choice((im.PE_LAZY, im.PE_LAZY, im.PE_LAZY, im.PE_PRESENT,
                        im.PE_PRESENT | im.PE_LAZY))
        out.append((vaddr, n, f))
        vaddr += n * PAGE_SIZE
    return out


@pytest.mark.parametrize("seed", range(20))
def test_arrays_give_the_per_entry_layout(seed):
    rng = random.Random(seed)
    entries = random_entries(rng, rng.choice((0, 1, 5, 300, 3000)))
    v, n, f = (array("Q", x) for x in zip(*entries)) if entries else \
        (array("Q"), array("Q"), array("Q"))
    lay = live._lazy_layout(v, n, f)
    want = per_entry(entries)
    assert (lay.vaddrs, lay.pairs, lay.file_at, lay.file_len, lay.file_from,
            lay.file_pages, lay.has_lazy) == want


def test_unusual_flags_take_the_per_entry_path_and_bad_layouts_are_refused():
    v, n = array("Q", [0x1000, 0x3000]), array("Q", [1, 1])
    assert live._lazy_layout(v, n, array("Q", [im.PE_LAZY, im.PE_PARENT])) is None
    assert live._lazy_layout(v, n, array("Q", [im.PE_LAZY, 0])) is None
    assert live._lazy_layout(v, n, array("Q", [im.PE_LAZY, 1 << 40])) is None
    with pytest.raises(ValueError):      # descending
        live._lazy_layout(array("Q", [0x3000, 0x1000]), n, array("Q", [im.PE_LAZY] * 2))
    with pytest.raises(ValueError):      # not page aligned
        live._lazy_layout(array("Q", [0x1001]), array("Q", [1]), array("Q", [im.PE_LAZY]))


def test_flags_and_sizes_that_do_not_fit_are_caught():
    """The flags' low byte alone could look like PRESENT / LAZY: a value with any higher
    bit set must still take the per-entry path; so must an entry of 2^32 pages or more."""
    v, n = array("Q", [0x1000, 0x3000]), array("Q", [1, 1])
    for high in (0x100, 1 << 32, 1 << 63):
        assert live._lazy_layout(v, n, array("Q", [im.PE_LAZY, im.PE_LAZY | high])) is None
    assert live._lazy_layout(v, array("Q", [1, 1 << 32]), array("Q", [im.PE_LAZY] * 2)) is None
    assert im.interleave_pairs(v, array("Q", [1, 1 << 32]), array("Q", [0, 0])) is None
    assert im.interleave_pairs(v, n, array("Q", [0, 1 << 32])) is None
    # PAGEMAP's pairs: vaddr, then nr_pages in the low half and the flags in the high one
    assert im.interleave_pairs(v, array("Q", [(1 << 32) - 1, 2]), array("Q", [3, 4]), 8) == \
        array("Q", [0x1000, (1 << 32) - 1 | 11 << 32, 0x3000, 2 | 12 << 32])
    with pytest.raises(ValueError):
        im.interleave_pairs(v, array("Q", [1]), array("Q", [0, 0]))
