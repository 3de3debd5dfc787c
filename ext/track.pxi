# Written-page tracking (ext/c/track.c): see deltaxfer.tracking for the orchestration.

UFFD_FEATURE_WP_UNPOPULATED = 1 << 13
UFFD_FEATURE_WP_ASYNC = 1 << 15
_SYS_USERFAULTFD = 323      # x86-64 (injection is x86-64 only)


def _os_error(int rc, str what):
    err = -rc
    if err == _errno.ESRCH:
        return ProcessLookupError(err, f"{what}: {_os.strerror(err)}")
    if err in (_errno.EPERM, _errno.EACCES):
        return PermissionError(err, f"{what}: {_os.strerror(err)}")
    return OSError(err, f"{what}: {_os.strerror(err)}")


_REFUSED = {
    DX_REFUSED_NOT_SYSCALL: "the bytes at the chosen address are not a `syscall` "
                            "instruction (they changed since they were read); nothing was run",
    DX_REFUSED_NOT_UFFD: "the fd the injected call returned is not a userfaultfd (the call "
                         "did not do what was asked); it was neither used nor closed in the "
                         "target",
}


cdef _inject(int pid, int tid, uint64_t syscall_ip, long nr, long arg):
    cdef dx_inject_info info
    cdef int rc
    with nogil:
        rc = dx_inject_fd_syscall(pid, tid, syscall_ip, nr, arg, &info)
    d = {"signals_requeued": info.signals_requeued, "steps": info.steps, "stage": info.stage}
    if rc < 0:
        what = f"injecting userfaultfd() into pid {pid} (stage {info.stage})"
        if info.refused:
            e = OSError(-rc, f"{what}: refused: {_REFUSED[info.refused]}")
        else:
            e = _os_error(rc, what)
        e.info = d
        raise e
    return rc, d


def inject_userfaultfd(int pid, int tid, uint64_t syscall_ip, int flags):
    """Create a userfaultfd inside process pid (by running the system call in its thread
    tid at syscall_ip, an executable `syscall` instruction, re-checked once the thread is
    stopped), take it over, check it is a userfaultfd, close it in the target.  Returns
    (our fd, info dict).  Raises OSError (with .info) on failure; the target is left as
    it was."""
    return _inject(pid, tid, syscall_ip, _SYS_USERFAULTFD, flags)


def _inject_fd_syscall(int pid, int tid, uint64_t syscall_ip, long nr, long arg):
    """inject_userfaultfd with system call nr(arg) instead: for the tests of its checks."""
    return _inject(pid, tid, syscall_ip, nr, arg)


def uffd_create(int flags):
    """userfaultfd(flags) in this process (to probe the kernel's features)."""
    cdef int rc = dx_uffd_create(flags)
    if rc < 0:
        raise _os_error(rc, "userfaultfd()")
    return rc


def uffd_api(int fd, uint64_t features):
    """UFFDIO_API; returns the features the kernel granted."""
    cdef uint64_t got = 0
    cdef int rc = dx_uffd_api(fd, features, &got)
    if rc:
        raise _os_error(rc, "UFFDIO_API")
    return got


def uffd_register_wp(int fd, uint64_t start, uint64_t end):
    cdef int rc
    with nogil:
        rc = dx_uffd_register_wp(fd, start, end)
    if rc:
        raise _os_error(rc, f"UFFDIO_REGISTER {start:#x}-{end:#x}")


def uffd_writeprotect(int fd, uint64_t start, uint64_t end, bint protect=True):
    cdef int rc
    with nogil:
        rc = dx_uffd_writeprotect(fd, start, end, protect)
    if rc:
        raise _os_error(rc, f"UFFDIO_WRITEPROTECT {start:#x}-{end:#x}")


def uffd_unregister(int fd, uint64_t start, uint64_t end):
    cdef int rc
    with nogil:
        rc = dx_uffd_unregister(fd, start, end)
    if rc:
        raise _os_error(rc, f"UFFDIO_UNREGISTER {start:#x}-{end:#x}")


def scan_written(int pagemap_fd, starts, ends):
    """PAGEMAP_SCAN each range [starts[k], ends[k]): the ranges of pages written since
    they were last write-protected (nothing is re-protected: see protect_unclean).
    Returns (written_starts, written_ends, pages, failed) where failed lists the indexes
    k whose scan failed with EPERM (that range is not registered any more)."""
    cdef _Buffer sb = u64_buffer(starts, "starts")
    cdef _Buffer eb = u64_buffer(ends, "ends")
    cdef size_t n = u64_len(sb), k, nout = 0, cap = 0
    if u64_len(eb) != n:
        raise ValueError("starts and ends differ in length")
    cdef uint64_t *os_ = NULL
    cdef uint64_t *oe = NULL
    cdef ptrdiff_t got
    cdef uint64_t total = 0
    cdef const uint64_t *sp = u64_ptr(sb)
    cdef const uint64_t *ep = u64_ptr(eb)
    failed = []
    try:
        for k in range(n):
            with nogil:
                got = dx_scan_written(pagemap_fd, sp[k], ep[k], &os_, &oe, &nout,
                                      &cap)
            if got == -_errno.EPERM or got == -_errno.EINVAL:
                failed.append(k)
                continue
            if got < 0:
                raise _os_error(got, f"PAGEMAP_SCAN {sp[k]:#x}-{ep[k]:#x}")
            total += got
        return _take_u64(os_, nout), _take_u64(oe, nout), total, failed
    finally:
        free(os_)
        free(oe)


cdef array.array _take_u64(uint64_t *p, size_t n):
    cdef array.array a = new_u64_array(n)
    if n:
        memcpy(a.data.as_voidptr, p, n * 8)
    return a


def pagemap_scan_probe():
    """None when PAGEMAP_SCAN works here (on our own pagemap), else the reason."""
    fd = _os.open("/proc/self/pagemap", _os.O_RDONLY)
    try:
        rc = dx_pagemap_scan_probe(fd)
    finally:
        _os.close(fd)
    return None if rc == 0 else f"PAGEMAP_SCAN: {_os.strerror(-rc)}"


def scan_page_set(int fd, starts, ends, skip_file=None):
    """pagemap_runs through PAGEMAP_SCAN (see track.h dx_scan_page_set): the same runs
    of the page set CRIU dumps inside the given VMAs, the (huge) zero page left out by the
    kernel's PAGE_IS_PFNZERO. fd: an open /proc/PID/pagemap. Returns (run_vaddrs,
    run_lens) as array('Q'); OSError when the kernel has no PAGEMAP_SCAN."""
    cdef _Buffer sb = u64_buffer(starts, "starts")
    cdef _Buffer eb = u64_buffer(ends, "ends")
    cdef size_t n = u64_len(sb), i
    if u64_len(eb) != n:
        raise ValueError(f"starts has {n} entries but ends has {u64_len(eb)}")
    for i in range(n):
        if (u64_ptr(sb)[i] | u64_ptr(eb)[i]) % DX_PAGE_SIZE or u64_ptr(sb)[i] > u64_ptr(eb)[i]:
            raise ValueError(f"VMA {i} [{u64_ptr(sb)[i]:#x}, {u64_ptr(eb)[i]:#x}) is not "
                             f"a page-aligned range")
    cdef uint64_t *rv = NULL
    cdef uint64_t *rl = NULL
    cdef ptrdiff_t k
    cdef _Buffer fb
    cdef const uint8_t *fp = NULL
    if skip_file is not None:
        fb = bytes_buffer(skip_file, "skip_file")
        if fb.nbytes != n:
            raise ValueError(f"skip_file has {fb.nbytes} entries for {n} VMAs")
        fp = <const uint8_t *>fb.ptr
    with nogil:
        k = dx_scan_page_set(fd, u64_ptr(sb), u64_ptr(eb), n, fp, &rv, &rl)
    try:
        if k < 0:
            raise _os_error(<int>k, "PAGEMAP_SCAN of the page set")
        out_v = new_u64_array(k)
        out_l = new_u64_array(k)
        if k:
            memcpy((<array.array>out_v).data.as_voidptr, rv, k * 8)
            memcpy((<array.array>out_l).data.as_voidptr, rl, k * 8)
        return out_v, out_l
    finally:
        free(rv)
        free(rl)


def clean_mask(vaddrs, tracked_starts, tracked_ends, written_starts, written_ends, held):
    """bytearray, one byte per page of vaddrs: 1 where the page is in a tracked range,
    in no written range, and held by the destination (see track.h)."""
    cdef _Buffer vb = u64_buffer(vaddrs, "vaddrs")
    cdef _Buffer tsb = u64_buffer(tracked_starts, "tracked_starts")
    cdef _Buffer teb = u64_buffer(tracked_ends, "tracked_ends")
    cdef _Buffer wsb = u64_buffer(written_starts, "written_starts")
    cdef _Buffer web = u64_buffer(written_ends, "written_ends")
    cdef _Buffer hb = u64_buffer(held, "held")
    if u64_len(tsb) != u64_len(teb) or u64_len(wsb) != u64_len(web):
        raise ValueError("range starts and ends differ in length")
    cdef size_t n = u64_len(vb)
    out = bytearray(n)
    cdef uint8_t[::1] o = out
    cdef uint8_t *op = &o[0] if n else NULL
    if n:
        with nogil:
            dx_clean_mask(u64_ptr(vb), n, u64_ptr(tsb), u64_ptr(teb), u64_len(tsb),
                          u64_ptr(wsb), u64_ptr(web), u64_len(wsb), u64_ptr(hb), u64_len(hb),
                          op)
    return out


def read_pages_masked(int pid, vaddrs, clean, buf):
    """process_vm_readv the pages of vaddrs whose clean byte is 0 (all when clean is None)
    into their slots of buf (page i at offset i * 4096).  Returns (pages read, pages
    failed: unmapped meanwhile, zero-filled)."""
    cdef _Buffer vb = u64_buffer(vaddrs, "vaddrs")
    cdef _Buffer bb = bytes_buffer(buf, "buf", True)
    cdef size_t n = u64_len(vb)
    if bb.nbytes != n * DX_PAGE_SIZE:
        raise ValueError(f"buf holds {bb.nbytes} bytes for {n} pages")
    cdef _Buffer cb
    cdef const uint8_t *cp = NULL
    if clean is not None:
        cb = bytes_buffer(clean, "clean", False)
        if cb.nbytes != n:
            raise ValueError(f"clean has {cb.nbytes} bytes for {n} pages")
        cp = cb.ptr
    cdef uint64_t failed = 0
    cdef ptrdiff_t got
    with nogil:
        got = dx_read_pages_masked(pid, u64_ptr(vb), n, cp, bb.ptr, &failed)
    if got < 0:
        raise _os_error(got, f"reading the memory of process {pid}")
    return got, failed


def protect_unclean(int uffd, vaddrs, clean, tracked_starts, tracked_ends):
    """Write-protect the pages of vaddrs with clean == 0 (all when None) inside the tracked
    ranges, before they are read. Returns (runs, runs refused)."""
    cdef _Buffer vb = u64_buffer(vaddrs, "vaddrs")
    cdef _Buffer tsb = u64_buffer(tracked_starts, "tracked_starts")
    cdef _Buffer teb = u64_buffer(tracked_ends, "tracked_ends")
    cdef size_t n = u64_len(vb), failed = 0
    if u64_len(tsb) != u64_len(teb):
        raise ValueError("range starts and ends differ in length")
    cdef _Buffer cb
    cdef const uint8_t *cp = NULL
    if clean is not None:
        cb = bytes_buffer(clean, "clean", False)
        if cb.nbytes != n:
            raise ValueError(f"clean has {cb.nbytes} bytes for {n} pages")
        cp = cb.ptr
    cdef ptrdiff_t runs
    with nogil:
        runs = dx_protect_unclean(uffd, u64_ptr(vb), n, cp, u64_ptr(tsb), u64_ptr(teb),
                                  u64_len(tsb), &failed)
    return runs, failed
