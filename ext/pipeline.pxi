# One pre-copy round and the comparison of two dumps (ext/c/pipeline.c).

_EMPTY_U64 = array.array("Q")


def encode_round(pages, vaddrs, prev_vaddrs=None, prev_hashes=None, base_pages=None,
                 XorCache cache=None, bint xor=True, size_t xor_cap=DX_DELTA_DEFAULT_CAP,
                 size_t frame_size=DX_FRAME_DEFAULT_SIZE, bint compress=True, clean=None,
                 bint next_round=True, long long pages_index=-1, scratch=None):
    """Encode one round; returns (frames bytes, hashes array('Q'), stats dict).

    See deltaxfer.core.pipeline.encode_round for the meaning of each argument.
    clean: None or one byte per page, nonzero for a page known unchanged since the
    destination's version (written-page tracking); such a page must be held, its bytes
    are not read, its hash is the held one.
    next_round: advance the cache's round first (one call = one round). A round encoded
    as several windows, possibly on several threads sharing the cache, passes False and
    calls cache.next_round() once before its first window.
    pages_index (0..2**32-1): each frame is preceded by that u32 (little-endian), making
    the output a run of whole PAGES payloads (index, frame) for the link, without a copy.
    scratch: None or a writable buffer (an encoder thread's own, reused for every
    window it encodes): its first frame_size bytes stage the records of a frame, and the
    frames are written after them when the rest holds frames_output_bound(...) bytes
    (else into a buffer grown as they come). Either way one copy of them is returned.
    """
    cdef _Buffer pb = pages_buffer(pages, "pages")
    cdef _Buffer vb = u64_buffer(vaddrs, "vaddrs")
    cdef size_t n = u64_len(vb)
    if n * DX_PAGE_SIZE != pb.nbytes:
        raise ValueError(f"pages holds {pb.nbytes // DX_PAGE_SIZE} pages but vaddrs has {n}")
    check_vaddrs(vb, "vaddrs")
    cdef _Buffer cb
    cdef const uint8_t *cp_clean = NULL
    if clean is not None:
        cb = bytes_buffer(clean, "clean", False)
        if cb.nbytes != n:
            raise ValueError(f"clean has {cb.nbytes} bytes for {n} pages")
        cp_clean = cb.ptr
    cdef _Buffer pvb = u64_buffer(_EMPTY_U64 if prev_vaddrs is None else prev_vaddrs,
                                  "prev_vaddrs")
    cdef _Buffer phb = u64_buffer(_EMPTY_U64 if prev_hashes is None else prev_hashes,
                                  "prev_hashes")
    cdef size_t nprev = u64_len(pvb)
    if u64_len(phb) != nprev:
        raise ValueError(f"prev_vaddrs has {nprev} entries but prev_hashes has {u64_len(phb)}")
    check_vaddrs(pvb, "prev_vaddrs")
    cdef _Buffer bb
    cdef const uint8_t *base = NULL
    if base_pages is not None:
        bb = pages_buffer(base_pages, "base_pages")
        if bb.nbytes != nprev * DX_PAGE_SIZE:
            raise ValueError(f"base_pages holds {bb.nbytes // DX_PAGE_SIZE} pages but "
                             f"prev_vaddrs has {nprev}")
        base = bb.ptr
    if xor_cap < 1:
        raise ValueError("xor_cap must be at least 1 byte")
    if pages_index > 0xFFFFFFFF:
        raise ValueError(f"pages_index {pages_index} is not a u32")
    check_frame_size(frame_size)
    # the records to come: at most one per page not known clean
    cdef size_t i, nrec = n
    if cp_clean != NULL:
        with nogil:
            for i in range(n):
                if cp_clean[i]:
                    nrec -= 1
    cdef size_t cap = dx_fw_output_bound(nrec, frame_size, pages_index >= 0)
    cdef _Buffer sb
    cdef uint8_t *raw = NULL
    cdef uint8_t *out = NULL
    cdef size_t out_cap = 0
    if scratch is not None:
        sb = bytes_buffer(scratch, "scratch", True)
        if sb.nbytes < frame_size:
            raise ValueError(f"scratch holds {sb.nbytes} bytes, less than frame_size "
                             f"{frame_size}")
        raw = <uint8_t *>sb.ptr
        if <size_t>sb.nbytes - frame_size >= cap:     # room for the frames too
            out = raw + frame_size
            out_cap = <size_t>sb.nbytes - frame_size
    cdef array.array hashes = new_u64_array(n)
    cdef dx_round_stats st
    memset(&st, 0, sizeof(st))
    cdef dx_frame_writer fw
    cdef int rc = dx_fw_init_with(&fw, frame_size, compress, raw, out, out_cap)
    if rc:
        raise MemoryError("encode_round")
    fw.prefix_index = pages_index if pages_index >= 0 else -1
    cdef dx_xor_cache *cp = NULL
    try:
        if cache is not None:
            cp = cache.acquire()
            if next_round:
                cp.round += 1
        with nogil:
            rc = dx_encode_round(pb.ptr, u64_ptr(vb), cp_clean, n, u64_ptr(pvb), u64_ptr(phb), nprev,
                                 base, cp, xor, xor_cap, <uint64_t *>hashes.data.as_voidptr,
                                 &fw, &st)
        if rc:
            raise_core_error(rc, "encode_round")
        stats = {"scanned": st.scanned, "zero": st.zero, "unchanged": st.unchanged,
                 "changed": st.changed, "added": st.added, "removed": st.removed,
                 "sent_zero": st.sent_zero, "sent_xor": st.sent_xor, "sent_full": st.sent_full,
                 "xor_too_big": st.xor_too_big, "skipped": st.skipped, "xor_bytes": st.xor_bytes,
                 "frames": fw.frames, "records": fw.records, "raw_bytes": fw.raw_bytes,
                 "stored_bytes": fw.stored_bytes}
        return _take_output(&fw), hashes, stats
    finally:
        if cp != NULL:
            cache.release()
        dx_fw_free(&fw)


def frames_output_bound(size_t nrecords, size_t frame_size=DX_FRAME_DEFAULT_SIZE,
                        bint prefix=False):
    """The most bytes encode_round's frames can take for nrecords records (a scratch of
    frame_size + this many bytes holds a window's frames as well as its staging)."""
    return dx_fw_output_bound(nrecords, frame_size, prefix)


def compare_pages(old_pages, old_vaddrs, new_pages, new_vaddrs):
    """Compare two page sets by vaddr: counts of added, removed, changed, unchanged and
    zero (all-zero pages in new) pages, and bytes_differing summed over changed pages."""
    cdef _Buffer op = pages_buffer(old_pages, "old_pages")
    cdef _Buffer ov = u64_buffer(old_vaddrs, "old_vaddrs")
    cdef _Buffer np_ = pages_buffer(new_pages, "new_pages")
    cdef _Buffer nv = u64_buffer(new_vaddrs, "new_vaddrs")
    if u64_len(ov) * DX_PAGE_SIZE != op.nbytes:
        raise ValueError(f"old_pages holds {op.nbytes // DX_PAGE_SIZE} pages but old_vaddrs "
                         f"has {u64_len(ov)}")
    if u64_len(nv) * DX_PAGE_SIZE != np_.nbytes:
        raise ValueError(f"new_pages holds {np_.nbytes // DX_PAGE_SIZE} pages but new_vaddrs "
                         f"has {u64_len(nv)}")
    check_vaddrs(ov, "old_vaddrs")
    check_vaddrs(nv, "new_vaddrs")
    cdef dx_compare_stats st
    memset(&st, 0, sizeof(st))
    with nogil:
        dx_compare_pages(op.ptr, u64_ptr(ov), u64_len(ov), np_.ptr, u64_ptr(nv), u64_len(nv),
                         &st)
    return {"added": st.added, "removed": st.removed, "changed": st.changed,
            "unchanged": st.unchanged, "zero": st.zero, "bytes_differing": st.bytes_differing}
