# CRIU pagemap entries at C speed (src/deltaxfer/criu/images.py keeps the full parser,
# with its precise errors, for anything this fast path does not recognise).


cdef inline int _varint(const uint8_t *p, size_t end, size_t *pos, uint64_t *out) noexcept nogil:
    cdef uint64_t v = 0
    cdef unsigned shift = 0
    cdef uint8_t b
    while pos[0] < end:
        b = p[pos[0]]
        pos[0] += 1
        if shift >= 64:
            return -1
        v |= <uint64_t>(b & 0x7F) << shift
        if not (b & 0x80):
            out[0] = v
            return 0
        shift += 7
    return -1


def pagemap_entries_fast(data, size_t start):
    """Decode the pagemap_entry records framed as u32 size + protobuf from byte ``start``
    of ``data``: returns (vaddrs, nr_pages, flags) as array('Q'), or None when any entry
    is not a plain one (fields 1-5 as varints only) or the framing is off — the caller's
    full parser then says exactly what is wrong."""
    cdef _Buffer b = bytes_buffer(data, "data")
    cdef const uint8_t *p = <const uint8_t *>b.ptr
    cdef size_t end = b.nbytes, pos = start, stop, count = 0, cap
    cdef uint32_t size
    # count entries first, to size the outputs once
    while pos + 4 <= end:
        size = p[pos] | (p[pos + 1] << 8) | (p[pos + 2] << 16) | (<uint32_t>p[pos + 3] << 24)
        if size > end - pos - 4:
            return None
        pos += 4 + size
        count += 1
    if pos != end:
        return None
    cap = count
    cdef array.array va = new_u64_array(cap)
    cdef array.array nr = new_u64_array(cap)
    cdef array.array fl = new_u64_array(cap)
    cdef uint64_t *pv = <uint64_t *>va.data.as_voidptr
    cdef uint64_t *pn = <uint64_t *>nr.data.as_voidptr
    cdef uint64_t *pf = <uint64_t *>fl.data.as_voidptr
    cdef uint64_t key, val, v, n2, n5, f, inp
    cdef int seen, bad = 0
    cdef size_t i = 0
    pos = start
    with nogil:
        while i < count:
            size = p[pos] | (p[pos + 1] << 8) | (p[pos + 2] << 16) | (<uint32_t>p[pos + 3] << 24)
            pos += 4
            stop = pos + size
            seen = 0
            v = n2 = n5 = f = inp = 0
            while pos < stop:
                if _varint(p, stop, &pos, &key) or (key & 7) != 0:
                    bad = 1
                    break
                if _varint(p, stop, &pos, &val):
                    bad = 1
                    break
                key >>= 3
                if key == 1:
                    v = val
                    seen |= 1
                elif key == 2:
                    n2 = val
                    seen |= 2
                elif key == 3:
                    inp = val
                    seen |= 4
                elif key == 4:
                    f = val
                    seen |= 8
                elif key == 5:
                    n5 = val
                    seen |= 16
                else:
                    bad = 1
                    break
            if bad or not (seen & 1) or not (seen & 18):
                bad = 1
                break
            pv[i] = v
            pn[i] = n5 if (seen & 16) else n2
            pf[i] = f if (seen & 8) else (1 if inp else 4)   # PE_PARENT or PE_PRESENT
            pos = stop
            i += 1
    if bad:
        return None
    return va, nr, fl


def pagemap_pairs(vaddrs, nr_pages, flags, uint64_t or_flags=0):
    """PAGEMAP's (vaddr, nr_pages | (flags | or_flags) << 32) u64 pairs from three u64
    arrays, in one pass (the final round builds them for every image of a lazy dump:
    ~0.1 ms per 100 000 entries, against ~5 ms with array slices); None if an nr_pages
    or a flags value does not fit in 32 bits."""
    cdef _Buffer bv = u64_buffer(vaddrs, "vaddrs")
    cdef _Buffer bn = u64_buffer(nr_pages, "nr_pages")
    cdef _Buffer bf = u64_buffer(flags, "flags")
    cdef size_t n = u64_len(bv), i
    if u64_len(bn) != n or u64_len(bf) != n:
        raise ValueError("vaddrs, nr_pages and flags differ in length")
    cdef array.array out = new_u64_array(2 * n)
    cdef uint64_t *po = <uint64_t *>out.data.as_voidptr
    cdef const uint64_t *pv = u64_ptr(bv)
    cdef const uint64_t *pn = u64_ptr(bn)
    cdef const uint64_t *pf = u64_ptr(bf)
    cdef uint64_t fl
    cdef int bad = 0
    with nogil:
        for i in range(n):
            fl = pf[i] | or_flags
            if (pn[i] >> 32) or (fl >> 32):
                bad = 1
                break
            po[2 * i] = pv[i]
            po[2 * i + 1] = pn[i] | (fl << 32)
    if bad:
        return None
    return out


def pagemap_encode_fast(uint32_t pages_id, vaddrs, nr_pages, flags):
    """A pagemap image (CRIU magics, head, entries with fields 1, 2 and 4) for entries
    given as three u64 arrays; nr_pages must fit in 32 bits (CRIU 4.1)."""
    cdef _Buffer bv = u64_buffer(vaddrs, "vaddrs")
    cdef _Buffer bn = u64_buffer(nr_pages, "nr_pages")
    cdef _Buffer bf = u64_buffer(flags, "flags")
    cdef size_t n = u64_len(bv), i, pos
    if u64_len(bn) != n or u64_len(bf) != n:
        raise ValueError("vaddrs, nr_pages and flags differ in length")
    for i in range(n):
        if u64_ptr(bn)[i] >= (<uint64_t>1 << 32):
            raise ValueError(f"pagemap entry at {u64_ptr(bv)[i]:#x} has {u64_ptr(bn)[i]} pages; "
                             "split it (CRIU 4.1's nr_pages is 32-bit)")
    cdef bytearray out = bytearray(_pagemap_bound(n))
    cdef uint8_t *o = <uint8_t *>out
    with nogil:
        pos = _pagemap_head(o, pages_id)
        for i in range(n):
            pos = _pagemap_entry(o, pos, u64_ptr(bv)[i], u64_ptr(bn)[i], u64_ptr(bf)[i])
    return bytes(memoryview(out)[:pos])


def pagemap_encode_pairs(uint32_t pages_id, pairs):
    """pagemap_encode_fast for entries given as PAGEMAP's (vaddr, nr_pages | flags << 32)
    u64 pairs (an ArrayPagemap's own), without splitting them into three arrays first."""
    cdef _Buffer bp = u64_buffer(pairs, "pairs")
    cdef size_t m = u64_len(bp), n, i, pos
    if m % 2:
        raise ValueError("pairs holds an odd number of u64")
    n = m // 2
    cdef const uint64_t *pp = u64_ptr(bp)
    cdef bytearray out = bytearray(_pagemap_bound(n))
    cdef uint8_t *o = <uint8_t *>out
    cdef uint64_t low32 = 0xFFFFFFFF
    with nogil:
        pos = _pagemap_head(o, pages_id)
        for i in range(n):
            pos = _pagemap_entry(o, pos, pp[2 * i], pp[2 * i + 1] & low32, pp[2 * i + 1] >> 32)
    return bytes(memoryview(out)[:pos])


cdef inline size_t _pagemap_bound(size_t n) noexcept:
    """Bytes a pagemap image of n entries can take: magics and head, and per entry 4
    (size) + 3 keys + 10 + 5 + 10 varint bytes at most."""
    return 16 + 8 + n * 40


cdef inline size_t _pagemap_head(uint8_t *o, uint32_t pages_id) noexcept nogil:
    """CRIU's two magics and the pagemap head (field 1: pages_id) at o; its length."""
    cdef uint8_t tmp[16]
    cdef size_t pos = 0, t
    _put32(o, &pos, 0x54564319)
    _put32(o, &pos, 0x56084025)
    tmp[0] = 0x08
    t = _putv(tmp, 1, pages_id)
    _put32(o, &pos, <uint32_t>t)
    memcpy(o + pos, tmp, t)
    return pos + t


cdef inline size_t _pagemap_entry(uint8_t *o, size_t pos, uint64_t vaddr, uint64_t nr,
                                  uint64_t flags) noexcept nogil:
    """One pagemap entry (fields 1, 2, 4, length-prefixed) at o + pos; the new pos."""
    cdef uint8_t tmp[32]
    cdef size_t t
    tmp[0] = 0x08
    t = _putv(tmp, 1, vaddr)
    tmp[t] = 0x10
    t = _putv(tmp, t + 1, nr)
    tmp[t] = 0x20
    t = _putv(tmp, t + 1, flags)
    _put32(o, &pos, <uint32_t>t)
    memcpy(o + pos, tmp, t)
    return pos + t


cdef inline void _put32(uint8_t *o, size_t *pos, uint32_t v) noexcept nogil:
    o[pos[0]] = v & 0xFF
    o[pos[0] + 1] = (v >> 8) & 0xFF
    o[pos[0] + 2] = (v >> 16) & 0xFF
    o[pos[0] + 3] = (v >> 24) & 0xFF
    pos[0] += 4


cdef inline size_t _putv(uint8_t *o, size_t t, uint64_t v) noexcept nogil:
    while v >= 0x80:
        o[t] = <uint8_t>((v & 0x7F) | 0x80)
        v >>= 7
        t += 1
    o[t] = <uint8_t>v
    return t + 1
