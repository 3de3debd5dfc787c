# The destination's page applier (ext/c/apply.c): frames of page records written to a
# pages file with pwritev, each page hashed as it is built; no Python per page or record.

APPLY_AT_INDEX = DX_APPLY_AT_INDEX
APPLY_APPEND = DX_APPLY_APPEND


cdef object _apply_error(int rc, dx_apply_work *w):
    """The exception for an applier error: OSError for the disk, FrameError otherwise."""
    if rc == -DX_E_NOMEM:
        return MemoryError("PageApplier")
    if rc == -DX_E_APPLY_IO:
        from os import strerror
        return OSError(w.err_errno, strerror(w.err_errno))
    msg = dx_apply_strerror(rc).decode()
    if rc in (-DX_E_APPLY_ORDER, -DX_E_APPLY_NOT_HELD, -DX_E_UNKNOWN_VADDR,
              -DX_E_APPLY_TWICE):
        msg += f" (0x{w.err_vaddr:x})"
    return _frame_error(f"frame at byte {w.err_offset}: {msg}")


cdef class PageApplier:
    """Applies page frames to one memory image's new pages file.

    vaddrs: the image's layout (array('Q'), strictly ascending); fd: the output file,
    written with pwritev only; mode APPLY_AT_INDEX (page i at byte i * 4096, the file
    preallocated) or APPLY_APPEND (received pages in arrival order); held_vaddrs/held_fd:
    the held image, the base of XOR records (mapped read-only). See docs/CORE.md.

    apply() runs one call at a time. At-index mode takes frames in any order, each page
    at most once per round, and an ApplyPool may apply them on its threads; busy counts
    the calls and pool jobs out on this applier, and close() while one is out leaves the
    freeing to the last of them to come back."""
    cdef dx_applier a
    cdef bint ready, closing
    cdef int busy
    cdef _Buffer vb, hvb
    cdef array.array hashes, recv_vaddrs
    cdef bytearray src
    cdef int mode

    def __cinit__(self, vaddrs, int fd, int mode, held_vaddrs=None, int held_fd=-1):
        self.vb = u64_buffer(vaddrs, "vaddrs")
        check_vaddrs(self.vb, "vaddrs")
        self.hvb = u64_buffer(held_vaddrs if held_vaddrs is not None else _U64_TEMPLATE,
                              "held_vaddrs")
        check_vaddrs(self.hvb, "held_vaddrs")
        cdef size_t n = u64_len(self.vb)
        self.mode = mode
        self.hashes = new_u64_array(n)
        self.recv_vaddrs = new_u64_array(n if mode == DX_APPLY_APPEND else 0)
        self.src = bytearray(n if mode == DX_APPLY_AT_INDEX else 0)
        cdef uint8_t *srcp = NULL
        if mode == DX_APPLY_AT_INDEX and n:
            srcp = <uint8_t *>(<char *>self.src)
        cdef int rc = dx_applier_init(&self.a, u64_ptr(self.vb), n, fd, mode,
                                      u64_ptr(self.hvb), u64_len(self.hvb), held_fd,
                                      <uint64_t *>self.hashes.data.as_voidptr,
                                      <uint64_t *>self.recv_vaddrs.data.as_voidptr,
                                      srcp)
        if rc:
            e = _apply_error(rc, &self.a.w)
            dx_applier_free(&self.a)
            if rc == -DX_E_ARG:
                raise ValueError("PageApplier: bad mode or held file")
            raise e
        self.ready = True

    def __dealloc__(self):
        self._free()

    cdef void _free(self):
        if self.ready:
            dx_applier_free(&self.a)
            self.ready = False

    def close(self):
        """Unmap the held file and free the scratch memory (the arrays stay); with calls
        still running, the last of them to return does it."""
        if self.busy:
            self.closing = True
        else:
            self._free()

    cdef _check(self):
        if not self.ready:
            raise ValueError("PageApplier is closed")

    def share_held(self, int held_fd, held_hashes):
        """At-index mode: copy the pages the held image shares with the layout into the
        output (in-kernel) and take their hashes from held_hashes; returns their number."""
        self._check()
        cdef _Buffer hh = u64_buffer(held_hashes, "held_hashes")
        if u64_len(hh) != self.a.nheld:
            raise ValueError(f"held_hashes has {u64_len(hh)} entries for {self.a.nheld} "
                             "held pages")
        cdef int64_t rc
        with nogil:
            rc = dx_applier_share_held(&self.a, held_fd, u64_ptr(hh))
        if rc < 0:
            raise _apply_error(<int>rc, &self.a.w)
        return rc

    def apply(self, frames, size_t max_raw=DX_FRAME_MAX_RAW):
        """Apply frames (back to back); returns this call's records as (zero, xor, full).
        A frame is checked whole before any of its pages is written."""
        self._check()
        if self.closing:
            raise ValueError("PageApplier is closed")
        cdef _Buffer fb = bytes_buffer(frames, "frames")
        cdef uint64_t counts[3]
        cdef int rc
        if self.busy:
            raise ValueError("PageApplier: one call at a time (an ApplyPool applies "
                             "at-index frames on threads)")
        self.busy += 1
        try:
            with nogil:
                rc = dx_applier_apply(&self.a, fb.ptr, fb.nbytes, max_raw, counts)
            if rc:
                if rc == -DX_E_FRAME_TOO_LARGE or rc == -DX_E_FRAME_TRUNCATED:
                    _parse_header(fb.ptr + self.a.w.err_offset,
                                  fb.nbytes - self.a.w.err_offset, max_raw,
                                  self.a.w.err_offset)
                raise _apply_error(rc, &self.a.w)
        finally:
            self.busy -= 1
            if self.closing and not self.busy:
                self._free()
        return counts[0], counts[1], counts[2]

    def wait_idle(self):
        """Return once no ApplyPool job on this applier is still working (its file may be
        closed then)."""
        if self.ready:
            with nogil:
                dx_applier_wait_idle(&self.a)

    def finish(self):
        """End of the image. At-index: (hashes of every page in layout order, number of
        pages neither held nor received). Append: (vaddrs, hashes) of the received pages,
        the file's length set to theirs."""
        self._check()
        cdef int64_t rc
        with nogil:
            rc = dx_applier_finish(&self.a)
        if rc < 0:
            raise _apply_error(<int>rc, &self.a.w)
        if self.mode == DX_APPLY_APPEND:
            array.resize(self.recv_vaddrs, <Py_ssize_t>self.a.nrecv)
            array.resize(self.hashes, <Py_ssize_t>self.a.nrecv)
            return self.recv_vaddrs, self.hashes
        return self.hashes, rc

    @property
    def records(self):
        return self.a.nrecv

    @property
    def counts(self):
        return {"zero": self.a.counts[0], "xor": self.a.counts[1], "full": self.a.counts[2]}


def pagemap_layout(pairs, uint64_t max_nr=0xffffffff):
    """Check PAGEMAP pairs (vaddr, nr_pages | flags << 32), flat u64s: page aligned,
    ascending, not overlapping, 0 < nr_pages <= max_nr. Returns the present pages' vaddrs
    (array('Q')); raises ValueError naming the first bad entry (1-based)."""
    cdef _Buffer pb = u64_buffer(pairs, "pairs")
    cdef size_t n = u64_len(pb) // 2, err = 0
    cdef uint64_t present = 0
    cdef int rc
    if u64_len(pb) % 2:
        raise ValueError("pagemap pairs: an odd number of u64s")
    with nogil:
        rc = dx_pagemap_check(u64_ptr(pb), n, max_nr, &present, &err)
    if rc:
        v = u64_ptr(pb)[2 * err]
        nr = u64_ptr(pb)[2 * err + 1] & 0xffffffff
        what = {-DX_E_UNALIGNED: "is not page aligned",
                -DX_E_UNSORTED: "overlaps or precedes the previous entry; entries must ascend"
                }.get(rc, f"has an absurd nr_pages {nr}")
        raise ValueError(f"pagemap_entry #{err + 1}: vaddr 0x{v:x} {what}")
    cdef array.array out = new_u64_array(present)
    with nogil:
        dx_pagemap_present_vaddrs(u64_ptr(pb), n, <uint64_t *>out.data.as_voidptr)
    return out


cdef extern from "xxhash.h" nogil:
    ctypedef struct XXH3_state_t:
        pass
    XXH3_state_t *XXH3_createState()
    int XXH3_freeState(XXH3_state_t *state)
    int XXH3_64bits_reset(XXH3_state_t *state)
    int XXH3_64bits_update(XXH3_state_t *state, const void *data, size_t len)
    unsigned long long XXH3_64bits_digest(const XXH3_state_t *state)


cdef class Xxh3Stream:
    """XXH3-64 (seed 0) of data given in pieces: xxh3_64 of their concatenation."""
    cdef XXH3_state_t *st

    def __cinit__(self):
        self.st = XXH3_createState()
        if self.st == NULL or XXH3_64bits_reset(self.st):
            raise MemoryError("Xxh3Stream")

    def __dealloc__(self):
        if self.st != NULL:
            XXH3_freeState(self.st)

    def update(self, data):
        cdef _Buffer b = bytes_buffer(data, "data")
        with nogil:
            XXH3_64bits_update(self.st, b.ptr, b.nbytes)

    def digest(self):
        return XXH3_64bits_digest(self.st)
