# The destination store's per-page bookkeeping for a parent-linked round (src/deltaxfer/store.py).


def merge_parent_hashes(new_vaddrs, held_vaddrs, held_hashes, recv_vaddrs, recv_hashes):
    """For a round whose received pages go to a child image over a parent (the held pages):
    the hash of every new page (received if it was, else held) in new_vaddrs order, and
    the runs of consecutive pages by source.

    All vaddr arrays ascending; recv_vaddrs must be a subset of new_vaddrs. Returns
    (hashes array('Q'), runs array('Q') of (vaddr, nr_pages, from_parent) triples,
    missing = pages neither received nor held)."""
    cdef _Buffer nv = u64_buffer(new_vaddrs, "new_vaddrs")
    cdef _Buffer hv = u64_buffer(held_vaddrs, "held_vaddrs")
    cdef _Buffer hh = u64_buffer(held_hashes, "held_hashes")
    cdef _Buffer rv = u64_buffer(recv_vaddrs, "recv_vaddrs")
    cdef _Buffer rh = u64_buffer(recv_hashes, "recv_hashes")
    if u64_len(hv) != u64_len(hh) or u64_len(rv) != u64_len(rh):
        raise ValueError("vaddr and hash arrays differ in length")
    cdef size_t n = u64_len(nv), nh = u64_len(hv), nr = u64_len(rv)
    cdef array.array hashes = new_u64_array(n)
    cdef array.array runs = new_u64_array(3 * n + 3)
    cdef uint64_t *out = <uint64_t *>hashes.data.as_voidptr
    cdef uint64_t *ro = <uint64_t *>runs.data.as_voidptr
    cdef const uint64_t *pn = u64_ptr(nv)
    cdef const uint64_t *ph = u64_ptr(hv)
    cdef const uint64_t *phh = u64_ptr(hh)
    cdef const uint64_t *pr = u64_ptr(rv)
    cdef const uint64_t *prh = u64_ptr(rh)
    cdef size_t i, j = 0, k = 0, nruns = 0, missing = 0
    cdef uint64_t v, src, cur_src = 2, run_end = 0
    cdef int bad = 0
    with nogil:
        for i in range(n):
            v = pn[i]
            while j < nh and ph[j] < v:
                j += 1
            if k < nr and pr[k] == v:
                out[i] = prh[k]
                k += 1
                src = 0
            elif j < nh and ph[j] == v:
                out[i] = phh[j]
                src = 1
            else:
                out[i] = 0
                missing += 1
                src = 0
            if k < nr and pr[k] < v:
                bad = 1
                break
            if nruns and src == cur_src and v == run_end:
                ro[3 * (nruns - 1) + 1] += 1
            else:
                ro[3 * nruns] = v
                ro[3 * nruns + 1] = 1
                ro[3 * nruns + 2] = src
                nruns += 1
                cur_src = src
            run_end = v + DX_PAGE_SIZE
    if bad or k != nr:
        raise ValueError("received pages that are not in the round's pagemap")
    array.resize(runs, <Py_ssize_t>(3 * nruns))
    return hashes, runs, missing


def layout_diff(old_vaddrs, new_vaddrs):
    """How a pages file laid out for old_vaddrs becomes one for new_vaddrs (both
    ascending): runs of (old_index, count, kind) with kind 0 = pages only in old (to
    remove), 1 = pages only in new (to insert before old_index). Pages in both keep
    their order, so these edits are all there is. Returns array('Q') of triples."""
    cdef _Buffer ov = u64_buffer(old_vaddrs, "old_vaddrs")
    cdef _Buffer nv = u64_buffer(new_vaddrs, "new_vaddrs")
    cdef size_t no = u64_len(ov), nn = u64_len(nv)
    cdef array.array out = new_u64_array(3 * (no + nn) + 3)
    cdef uint64_t *ro = <uint64_t *>out.data.as_voidptr
    cdef const uint64_t *po = u64_ptr(ov)
    cdef const uint64_t *pn = u64_ptr(nv)
    cdef size_t i = 0, j = 0, n = 0
    cdef uint64_t kind, last_kind = 2, last_at = 0
    with nogil:
        while i < no or j < nn:
            if j >= nn or (i < no and po[i] < pn[j]):
                kind = 0            # only in old: remove old page i
            elif i >= no or pn[j] < po[i]:
                kind = 1            # only in new: insert before old page i
            else:
                i += 1
                j += 1
                last_kind = 2
                continue
            if n and kind == last_kind and (kind == 1 or ro[3 * (n - 1)] + ro[3 * (n - 1) + 1] == i):
                ro[3 * (n - 1) + 1] += 1
            else:
                ro[3 * n] = i
                ro[3 * n + 1] = 1
                ro[3 * n + 2] = kind
                n += 1
                last_kind = kind
            if kind == 0:
                i += 1
            else:
                j += 1
    array.resize(out, <Py_ssize_t>(3 * n))
    return out


def copy_received_runs(int src_fd, int dst_fd, runs):
    """A round over held pages, finishing: copy the pages of the received runs (runs =
    merge_parent_hashes' (vaddr, nr_pages, from_parent) triples; received pages lie back
    to back in src_fd from byte 0) to their layout index in dst_fd with
    copy_file_range, one call per run, no Python per run. Returns array('Q') of
    (index, nr_pages) pairs, one per run copied."""
    cdef _Buffer rb = u64_buffer(runs, "runs")
    cdef size_t n = u64_len(rb)
    if n % 3:
        raise ValueError(f"runs holds {n} entries, not (vaddr, nr_pages, from_parent) triples")
    cdef array.array out = new_u64_array(2 * (n // 3))
    cdef int err = 0
    cdef int64_t copied
    with nogil:
        copied = dx_copy_received_runs(src_fd, dst_fd, u64_ptr(rb), n // 3,
                                       <uint64_t *>out.data.as_voidptr, &err)
    if copied == -DX_E_APPLY_IO:
        raise OSError(err, f"copying received pages: {_os.strerror(err)}")
    if copied < 0:
        raise EOFError("the received pages file ended early")
    array.resize(out, <Py_ssize_t>(2 * copied))
    return out


def write_u64_runs(int fd, values, pairs):
    """pwrite values[at:at + n] at byte 8 * at of fd for each (at, n) of pairs (the
    entries of a u64 table file a round changed), no Python per pair."""
    cdef _Buffer vb = u64_buffer(values, "values")
    cdef _Buffer pb = u64_buffer(pairs, "pairs")
    cdef size_t np_ = u64_len(pb), nv = u64_len(vb), r
    cdef const uint64_t *pp = u64_ptr(pb)
    if np_ % 2:
        raise ValueError("pairs holds an odd number of entries")
    for r in range(0, np_, 2):
        if pp[r] > nv or pp[r + 1] > nv - pp[r]:
            raise ValueError(f"run ({pp[r]}, {pp[r + 1]}) is outside {nv} values")
    cdef int rc
    cdef int err = 0
    with nogil:
        rc = dx_write_u64_runs(fd, u64_ptr(vb), pp, np_ // 2)
        if rc:
            err = c_errno.errno
    if rc:
        raise OSError(err, f"writing table entries: {_os.strerror(err)}")
