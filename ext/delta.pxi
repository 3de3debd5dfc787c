# XOR+RLE page deltas (ext/c/delta.c).

XOR_MIN_GAP = DX_DELTA_MIN_GAP
XOR_DEFAULT_CAP = DX_DELTA_DEFAULT_CAP


cdef size_t _check_cap(size_t cap) except? 0:
    if cap < 1 or cap >= DX_PAGE_SIZE:
        raise ValueError(f"cap must be between 1 and {DX_PAGE_SIZE - 1} bytes, got {cap}")
    return cap


cdef _Buffer _one_page(obj, str what, bint writable=False):
    cdef _Buffer b = pages_buffer(obj, what, writable)
    if b.nbytes != DX_PAGE_SIZE:
        raise ValueError(f"{what} must be exactly one page ({DX_PAGE_SIZE} bytes), "
                         f"got {b.nbytes}")
    return b


def xor_encode(old_page, new_page, size_t cap=DX_DELTA_DEFAULT_CAP):
    """XOR+RLE delta turning old_page into new_page, or None when longer than cap bytes."""
    cdef _Buffer a = _one_page(old_page, "old_page")
    cdef _Buffer b = _one_page(new_page, "new_page")
    _check_cap(cap)
    cdef uint8_t out[DX_PAGE_SIZE]
    cdef ptrdiff_t n
    with nogil:
        n = dx_xor_encode(a.ptr, b.ptr, out, cap)
    if n < 0:
        return None
    return PyBytes_FromStringAndSize(<char *>out, n)


def xor_decode(page, delta):
    """Apply a delta to page (a writable one-page buffer) in place."""
    cdef _Buffer p = _one_page(page, "page", True)
    cdef _Buffer d = bytes_buffer(delta, "delta")
    cdef int rc
    with nogil:
        rc = dx_xor_validate(d.ptr, d.nbytes)
        if rc == 0:
            rc = dx_xor_decode(p.ptr, d.ptr, d.nbytes)
    if rc:
        raise _delta_error(dx_strerror(rc).decode())


def xor_encode_pages(old_pages, new_pages, size_t cap=DX_DELTA_DEFAULT_CAP):
    """Delta of every page pair: returns (deltas bytes back to back, lengths array('q')).

    lengths[i] is -1 where the delta would exceed cap (send that page whole).
    """
    cdef _Buffer a = pages_buffer(old_pages, "old_pages")
    cdef _Buffer b = pages_buffer(new_pages, "new_pages")
    if a.nbytes != b.nbytes:
        raise ValueError(f"old_pages and new_pages differ in length: {a.nbytes} != {b.nbytes}")
    _check_cap(cap)
    cdef size_t n = a.nbytes // DX_PAGE_SIZE, i, used = 0, capacity = 64 * 1024
    cdef array.array lengths = array.clone(array.array("q"), <Py_ssize_t>n, False)
    cdef long long *lp = lengths.data.as_longlongs
    cdef ptrdiff_t k
    cdef bint nomem = False
    # deltas are usually far smaller than the cap: grow the output instead of sizing it
    # for the worst case (n * cap bytes would be touched, page by page, on every call)
    cdef uint8_t *out = <uint8_t *>malloc(capacity)
    cdef uint8_t *grown
    if out == NULL:
        raise MemoryError("xor_encode_pages")
    try:
        with nogil:
            for i in range(n):
                if used + cap > capacity:
                    capacity = 2 * capacity + cap
                    grown = <uint8_t *>realloc(out, capacity)
                    if grown == NULL:
                        nomem = True
                        break
                    out = grown
                k = dx_xor_encode(a.ptr + i * DX_PAGE_SIZE, b.ptr + i * DX_PAGE_SIZE,
                                  out + used, cap)
                lp[i] = k
                if k > 0:
                    used += <size_t>k
        if nomem:
            raise MemoryError("xor_encode_pages")
        return PyBytes_FromStringAndSize(<char *>out, used), lengths
    finally:
        free(out)


def xor_decode_pages(pages, deltas, lengths):
    """Inverse of xor_encode_pages: patch pages in place (entries with length -1 skipped)."""
    cdef _Buffer p = pages_buffer(pages, "pages", True)
    cdef _Buffer d = bytes_buffer(deltas, "deltas")
    cdef long long[::1] lens = lengths
    cdef size_t n = p.nbytes // DX_PAGE_SIZE, i, used = 0
    cdef int rc = 0
    cdef size_t bad = 0
    if <size_t>lens.shape[0] != n:
        raise ValueError(f"lengths has {lens.shape[0]} entries for {n} pages")
    with nogil:
        for i in range(n):
            if lens[i] <= 0:
                continue
            if <size_t>lens[i] > d.nbytes - used:
                rc = -DX_E_DELTA_CORRUPT
            else:
                rc = dx_xor_validate(d.ptr + used, <size_t>lens[i])
                if rc == 0:
                    rc = dx_xor_decode(p.ptr + i * DX_PAGE_SIZE, d.ptr + used, <size_t>lens[i])
            if rc:
                bad = i
                break
            used += <size_t>lens[i]
    if rc:
        raise _delta_error(f"page {bad}: {dx_strerror(rc).decode()}")


def _delta_error(msg):
    from deltaxfer.core.errors import DeltaError
    return DeltaError(msg)
