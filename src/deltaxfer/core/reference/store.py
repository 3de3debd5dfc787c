"""References of the destination store's compiled bookkeeping (ext/store.pxi, the layout
check of ext/apply.pxi and ext/c/apply.c, the streaming XXH3 of ext/apply.pxi), as used
by src/deltaxfer/store.py: which hash and which source each page of a parent-linked round
has, how one pages-file layout becomes another, the check of a pagemap's entries, and
XXH3 over data given in pieces.

Sets, dicts and sorting where the core walks sorted arrays once: the statement of the
result, not of the method.
"""
from array import array
from itertools import groupby

from deltaxfer._core import xxh3_64

from ._buffers import PAGE_SIZE, byte_view, u64_list

FROM_RECEIVED, FROM_PARENT = 0, 1
REMOVE, INSERT = 0, 1
PE_PRESENT = 1 << 2


def merge_parent_hashes(new_vaddrs, held_vaddrs, held_hashes, recv_vaddrs, recv_hashes):
    """Each page of new_vaddrs takes the hash it was received with, else the held one,
    else 0 (counted as missing). Runs: maximal groups of pages that are adjacent in memory
    (each starts where the previous ends) and have the same source, 1 = held (from the
    parent), 0 = received or missing. Every received vaddr must be one of new_vaddrs, in
    their order: else ValueError. Returns (hashes, runs as (vaddr, nr_pages, from_parent)
    triples, missing)."""
    nv = list(u64_list(new_vaddrs, "new_vaddrs"))
    hv, hh = u64_list(held_vaddrs, "held_vaddrs"), u64_list(held_hashes, "held_hashes")
    rv, rh = u64_list(recv_vaddrs, "recv_vaddrs"), u64_list(recv_hashes, "recv_hashes")
    if len(hv) != len(hh) or len(rv) != len(rh):
        raise ValueError("vaddr and hash arrays differ in length")
    if not _is_subsequence(list(rv), nv):
        raise ValueError("received pages that are not in the round's pagemap")
    received, held = dict(zip(rv, rh)), dict(zip(hv, hh))
    hashes, sources, missing = array("Q"), [], 0
    for v in nv:
        if v in received:
            hashes.append(received[v])
            sources.append(FROM_RECEIVED)
        elif v in held:
            hashes.append(held[v])
            sources.append(FROM_PARENT)
        else:
            hashes.append(0)
            sources.append(FROM_RECEIVED)
            missing += 1
    runs = array("Q")
    for i, (v, src) in enumerate(zip(nv, sources)):
        if i and src == sources[i - 1] and v == nv[i - 1] + PAGE_SIZE:
            runs[-2] += 1
        else:
            runs.extend((v, 1, src))
    return hashes, runs, missing


def _is_subsequence(sub: list, seq: list) -> bool:
    it = iter(seq)
    return all(any(x == y for y in it) for x in sub)


def layout_diff(old_vaddrs, new_vaddrs):
    """Walk the union of both (ascending) vaddr lists in order: each page is in both
    (kept), only in old (REMOVE) or only in new (INSERT). Each maximal group of
    consecutive REMOVEs or INSERTs (no kept page or other kind between) is one edit
    (old_index, count, kind): for REMOVE the index in old of its first page, for INSERT
    the number of old pages below it (insert before that one). array('Q') of triples."""
    old = list(u64_list(old_vaddrs, "old_vaddrs"))
    new = list(u64_list(new_vaddrs, "new_vaddrs"))
    in_old, in_new = set(old), set(new)
    below = {v: i for i, v in enumerate(old)}

    def kind(v):
        return None if v in in_old and v in in_new else (REMOVE if v in in_old else INSERT)

    out = array("Q")
    union = sorted(in_old | in_new)
    for k, group in groupby(union, key=kind):
        if k is None:
            continue
        group = list(group)
        first = group[0]
        at = below[first] if k == REMOVE else sum(1 for v in old if v < first)
        out.extend((at, len(group), k))
    return out


def pagemap_layout(pairs, max_nr: int = 0xffffffff):
    """PAGEMAP pairs (vaddr, nr_pages | flags << 32), flat u64s. Each entry: page aligned;
    0 < nr_pages <= max_nr with its end within 2^64; not below the previous entry's end.
    The first entry breaking a rule is named (1-based) in a ValueError. Returns the vaddrs
    of the pages of the entries flagged PE_PRESENT, in order."""
    p = u64_list(pairs, "pairs")
    if len(p) % 2:
        raise ValueError("pagemap pairs: an odd number of u64s")
    prev_end, present = 0, array("Q")
    for i in range(len(p) // 2):
        vaddr, nr, flags = p[2 * i], p[2 * i + 1] & 0xffffffff, p[2 * i + 1] >> 32
        end = vaddr + nr * PAGE_SIZE
        if vaddr % PAGE_SIZE:
            what = "is not page aligned"
        elif nr == 0 or nr > max_nr or end > 1 << 64:
            what = f"has an absurd nr_pages {nr}"
        elif vaddr < prev_end:
            what = "overlaps or precedes the previous entry; entries must ascend"
        else:
            prev_end = end
            if flags & PE_PRESENT:
                present.extend(vaddr + j * PAGE_SIZE for j in range(nr))
            continue
        raise ValueError(f"pagemap_entry #{i + 1}: vaddr 0x{vaddr:x} {what}")
    return present


class Xxh3Stream:
    """XXH3-64 (seed 0) of data given in pieces: xxh3_64 of their concatenation."""

    def __init__(self):
        self._data = bytearray()

    def update(self, data) -> None:
        self._data += byte_view(data, "data")

    def digest(self) -> int:
        return xxh3_64(bytes(self._data))
