"""Reference of page hashing: XXH3-64 per page, zero pages flagged and given the hash of
the zero page, changed = hash differs from the previous one."""
from deltaxfer._core import xxh3_64

from ._buffers import PAGE_SIZE, page_view, u64_array, u64_list

ZERO_PAGE = bytes(PAGE_SIZE)
ZERO_PAGE_HASH = xxh3_64(ZERO_PAGE)


def hash_pages(pages, prev_hashes=None):
    mv = page_view(pages, "pages")
    n = len(mv) // PAGE_SIZE
    hashes, zero = u64_array(), bytearray(n)
    for i in range(n):
        page = mv[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]
        if page == ZERO_PAGE:
            zero[i] = 1
            hashes.append(ZERO_PAGE_HASH)
        else:
            hashes.append(xxh3_64(page))
    changed = None
    if prev_hashes is not None:
        prev = u64_list(prev_hashes, "prev_hashes")
        if len(prev) != n:
            raise ValueError(f"prev_hashes has {len(prev)} entries for {n} pages")
        changed = u64_array(i for i in range(n) if prev[i] != hashes[i])
    return hashes, zero, changed


def changed_pages(old_hashes, new_hashes):
    old, new = u64_list(old_hashes, "old_hashes"), u64_list(new_hashes, "new_hashes")
    if len(old) != len(new):
        raise ValueError(f"hash arrays differ in length: {len(old)} != {len(new)}")
    return u64_array(i for i in range(len(old)) if old[i] != new[i])
