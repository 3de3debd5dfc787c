"""Reference of one pre-copy round (ext/c/pipeline.c) and of comparing two dumps."""
from array import array

from ._buffers import PAGE_SIZE, check_vaddrs, page_view, u64_list
from .delta import XOR_DEFAULT_CAP, xor_encode
from .frame import DEFAULT_FRAME_SIZE, FULL, XOR, ZERO, FrameWriter
from .hash import ZERO_PAGE, ZERO_PAGE_HASH, xxh3_64

_EMPTY = array("Q")


def encode_round(pages, vaddrs, prev_vaddrs=None, prev_hashes=None, base_pages=None,
                 cache=None, xor=True, xor_cap=XOR_DEFAULT_CAP,
                 frame_size=DEFAULT_FRAME_SIZE, compress=True, clean=None):
    mv = page_view(pages, "pages")
    va = u64_list(vaddrs, "vaddrs")
    if len(va) * PAGE_SIZE != len(mv):
        raise ValueError(f"pages holds {len(mv) // PAGE_SIZE} pages but vaddrs has {len(va)}")
    check_vaddrs(va, "vaddrs")
    if clean is not None:
        clean = bytes(memoryview(clean).cast("B"))
        if len(clean) != len(va):
            raise ValueError(f"clean has {len(clean)} bytes for {len(va)} pages")
    pv = u64_list(_EMPTY if prev_vaddrs is None else prev_vaddrs, "prev_vaddrs")
    ph = u64_list(_EMPTY if prev_hashes is None else prev_hashes, "prev_hashes")
    if len(pv) != len(ph):
        raise ValueError(f"prev_vaddrs has {len(pv)} entries but prev_hashes has {len(ph)}")
    check_vaddrs(pv, "prev_vaddrs")
    base = None
    if base_pages is not None:
        base = page_view(base_pages, "base_pages")
        if len(base) != len(pv) * PAGE_SIZE:
            raise ValueError(f"base_pages holds {len(base) // PAGE_SIZE} pages but "
                             f"prev_vaddrs has {len(pv)}")
    xor_cap = min(xor_cap, PAGE_SIZE - 1)
    fw = FrameWriter(frame_size, compress)
    if cache is not None:
        cache.next_round()
    st = dict.fromkeys(["scanned", "zero", "unchanged", "changed", "added", "removed",
                        "sent_zero", "sent_xor", "sent_full", "xor_too_big", "xor_bytes",
                        "skipped"], 0)
    hashes = array("Q")
    j = 0
    for i, vaddr in enumerate(va):
        while j < len(pv) and pv[j] < vaddr:
            j += 1
            st["removed"] += 1
        held = None
        have_prev = j < len(pv) and pv[j] == vaddr
        if have_prev:
            prev_hash = ph[j]
            if base is not None:
                held = base[j * PAGE_SIZE:(j + 1) * PAGE_SIZE]
            j += 1
        if clean is not None and clean[i]:
            if not have_prev:
                raise ValueError("encode_round: a page marked clean is not held by the "
                                 "destination")
            hashes.append(prev_hash)
            st["scanned"] += 1
            st["unchanged"] += 1
            st["skipped"] += 1
            continue
        page = bytes(mv[i * PAGE_SIZE:(i + 1) * PAGE_SIZE])
        is_zero = page == ZERO_PAGE
        h = ZERO_PAGE_HASH if is_zero else xxh3_64(page)
        hashes.append(h)
        st["scanned"] += 1
        st["zero"] += is_zero
        if have_prev and prev_hash == h:
            st["unchanged"] += 1
            continue
        st["changed" if have_prev else "added"] += 1
        if is_zero:
            fw.reserve(0)
            fw.commit(vaddr, ZERO, b"")
            st["sent_zero"] += 1
            if cache is not None:
                cache.drop(vaddr)
            continue
        if xor and have_prev and held is None and cache is not None:
            held = cache.lookup(vaddr)
        sent = False
        if xor and held is not None:
            fw.reserve(xor_cap)
            delta = xor_encode(held, page, xor_cap)
            if delta:
                fw.commit(vaddr, XOR, delta)
                st["sent_xor"] += 1
                st["xor_bytes"] += len(delta)
                sent = True
            elif delta is not None:
                sent = True    # hash differs but the held copy is identical
            else:
                st["xor_too_big"] += 1
        if not sent:
            fw.reserve(PAGE_SIZE)
            fw.commit(vaddr, FULL, page)
            st["sent_full"] += 1
        if cache is not None:
            cache.insert(vaddr, page)
    st["removed"] += len(pv) - j
    frames = fw.finish()
    st.update(fw.stats)
    return frames, hashes, st


def _bytes_differing(a: bytes, b: bytes) -> int:
    return sum(x != y for x, y in zip(a, b))


def compare_pages(old_pages, old_vaddrs, new_pages, new_vaddrs) -> dict:
    op, np_ = page_view(old_pages, "old_pages"), page_view(new_pages, "new_pages")
    ov, nv = u64_list(old_vaddrs, "old_vaddrs"), u64_list(new_vaddrs, "new_vaddrs")
    for pages, va, what in ((op, ov, "old"), (np_, nv, "new")):
        if len(va) * PAGE_SIZE != len(pages):
            raise ValueError(f"{what}_pages holds {len(pages) // PAGE_SIZE} pages but "
                             f"{what}_vaddrs has {len(va)}")
        check_vaddrs(va, f"{what}_vaddrs")
    old = {v: i for i, v in enumerate(ov)}
    st = dict.fromkeys(["added", "removed", "changed", "unchanged", "zero", "bytes_differing"], 0)
    for j, vaddr in enumerate(nv):
        new = bytes(np_[j * PAGE_SIZE:(j + 1) * PAGE_SIZE])
        st["zero"] += new == ZERO_PAGE
        if vaddr not in old:
            st["added"] += 1
            continue
        i = old.pop(vaddr)
        prev = bytes(op[i * PAGE_SIZE:(i + 1) * PAGE_SIZE])
        if prev == new:
            st["unchanged"] += 1
        else:
            st["changed"] += 1
            st["bytes_differing"] += _bytes_differing(prev, new)
    st["removed"] = len(old)
    return st
