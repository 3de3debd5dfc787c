# Page hashing and change detection (ext/c/hash.c).

ZERO_PAGE_HASH = dx_zero_page_hash()


def xxh3_64(data, uint64_t seed=0):
    """XXH3 64-bit hash of a buffer, as the system libxxhash computes it (GIL released).
    The wire protocol seeds it to bind a frame's checksum to its header."""
    cdef _Buffer b = bytes_buffer(data, "data")
    cdef uint64_t h
    with nogil:
        if seed:
            h = XXH3_64bits_withSeed(b.ptr, b.nbytes, seed)
        else:
            h = dx_xxh3(b.ptr, b.nbytes)
    return h


def hash_pages(pages, prev_hashes=None):
    """Hash every page: returns (hashes array('Q'), zero bytearray, changed array('Q') | None).

    zero[i] is 1 for an all-zero page.  With prev_hashes (one per page) changed lists the
    indices whose hash differs, computed in the same pass.
    """
    cdef _Buffer pb = pages_buffer(pages, "pages")
    cdef size_t n = pb.nbytes // DX_PAGE_SIZE
    cdef _Buffer prev
    cdef const uint64_t *prev_ptr = NULL
    cdef uint64_t *changed_ptr = NULL
    cdef array.array changed = None
    if prev_hashes is not None:
        prev = u64_buffer(prev_hashes, "prev_hashes")
        if u64_len(prev) != n:
            raise ValueError(f"prev_hashes has {u64_len(prev)} entries for {n} pages")
        prev_ptr = u64_ptr(prev)
        changed = new_u64_array(n)
        changed_ptr = <uint64_t *>changed.data.as_voidptr
    cdef array.array hashes = new_u64_array(n)
    cdef bytearray zero = bytearray(n)
    cdef uint64_t *hp = <uint64_t *>hashes.data.as_voidptr
    cdef uint8_t *zp = <uint8_t *>zero if n else NULL
    cdef size_t k
    with nogil:
        k = dx_hash_pages(pb.ptr, n, hp, zp, prev_ptr, changed_ptr)
    if changed is not None:
        array.resize(changed, <Py_ssize_t>k)
    return hashes, zero, changed


def changed_pages(old_hashes, new_hashes):
    """Indices (array('Q')) where two equally long hash arrays differ."""
    cdef _Buffer a = u64_buffer(old_hashes, "old_hashes")
    cdef _Buffer b = u64_buffer(new_hashes, "new_hashes")
    if u64_len(a) != u64_len(b):
        raise ValueError(f"hash arrays differ in length: {u64_len(a)} != {u64_len(b)}")
    cdef array.array out = new_u64_array(u64_len(a))
    cdef size_t k
    with nogil:
        k = dx_changed_pages(u64_ptr(a), u64_ptr(b), u64_len(a), <uint64_t *>out.data.as_voidptr)
    array.resize(out, <Py_ssize_t>k)
    return out


def memcpy_bench(dst, src):
    """memcpy(dst, src) with the GIL released: the bandwidth baseline of the benchmarks."""
    cdef _Buffer d = bytes_buffer(dst, "dst", True)
    cdef _Buffer s = bytes_buffer(src, "src")
    if d.nbytes < s.nbytes:
        raise ValueError(f"dst ({d.nbytes} bytes) is smaller than src ({s.nbytes} bytes)")
    with nogil:
        dx_memcpy(d.ptr, s.ptr, s.nbytes)
