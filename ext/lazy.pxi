# deltaxfer's own lazy-pages server (ext/c/lazy.c): see deltaxfer.lazyserve.

cdef class LazyServer:
    """Serves the userfaultfds of a lazily restored tree: page faults first (the faulted
    page and up to ``fault_pages`` after it), every other image page copied by
    ``workers`` background threads, ``chunk_pages`` per UFFDIO_COPY, once ``prefetch()``
    says the restore finished. Follows the tree's forks, mremaps, munmaps and madvises."""
    cdef dx_lazy *lz

    def __cinit__(self, int workers=1, uint32_t chunk_pages=256, uint32_t fault_pages=16):
        cdef int err = 0
        self.lz = dx_lazy_new(workers, chunk_pages, fault_pages, &err)
        if self.lz == NULL:
            raise OSError(-err, f"starting the lazy-pages server: {_os.strerror(-err)}")

    def add(self, int uffd, int pid, int pages_fd, uint64_t pages_file_size, vaddr, nr_pages,
            flags, vma_start, vma_end, pending=None, hashes=None):
        """Serve ``uffd`` (owned by the server from now on, also if this raises) for
        image pid ``pid``: its pagemap as three uint64 arrays, its pages file's fd and
        size, its VMAs' starts and ends (sorted). ``pending`` (post-copy): the sorted
        vaddrs of lazy pages whose content is not in the pages file yet (see arrived).
        ``hashes``: the receiver's XXH3-64 of each page of the pages file (one per page,
        else ignored): pages hashing as zeros get the zero page, their file pages unread."""
        cdef _Buffer v = u64_buffer(vaddr, "vaddr"), n = u64_buffer(nr_pages, "nr_pages")
        cdef _Buffer f = u64_buffer(flags, "flags")
        cdef _Buffer vs = u64_buffer(vma_start, "vma_start"), ve = u64_buffer(vma_end, "vma_end")
        cdef _Buffer pb = u64_buffer(pending if pending is not None else _U64_TEMPLATE,
                                     "pending")
        cdef _Buffer hb = u64_buffer(hashes if hashes is not None else _U64_TEMPLATE,
                                     "hashes")
        if not (u64_len(v) == u64_len(n) == u64_len(f)) or u64_len(vs) != u64_len(ve):
            _os.close(uffd)
            raise ValueError("pagemap arrays (or VMA arrays) of different lengths")
        cdef int rc
        if self.lz == NULL:
            raise ValueError("the lazy-pages server is closed")
        with nogil:
            rc = dx_lazy_add(self.lz, uffd, pid, pages_fd, pages_file_size, u64_ptr(v),
                             u64_ptr(n), u64_ptr(f), u64_len(v), u64_ptr(vs), u64_ptr(ve),
                             u64_len(vs), u64_ptr(pb), u64_len(pb), u64_ptr(hb),
                             u64_len(hb))
        if rc == -_errno.EINVAL:
            raise ValueError(f"pid {pid}: a lazy page in a parent image, outside every VMA, "
                             f"or beyond the pages file, or a pending page that is not a "
                             f"lazy page of the image")
        if rc < 0:
            raise OSError(-rc, f"serving pid {pid}: {_os.strerror(-rc)}")

    def set_request_fd(self, int fd):
        """Post-copy: where a fault on a pending page writes its request, a 16-byte
        record (int32 image pid, uint32 pages, uint64 first page's index in the pages
        file); -1: nowhere. The caller keeps the fd open while the server runs."""
        if self.lz != NULL:
            dx_lazy_set_request_fd(self.lz, fd)

    def arrived(self, int pid, uint64_t first, uint64_t count):
        """Post-copy: the pages file of image ``pid`` now holds pages [first,
        first + count): no longer pending; placed now (waking the threads waiting on
        them). Returns the pages placed."""
        cdef int64_t rc
        if self.lz == NULL:
            raise ValueError("the lazy-pages server is closed")
        with nogil:
            rc = dx_lazy_arrived(self.lz, pid, first, count)
        if rc == -_errno.ENOENT:
            raise ValueError(f"no task of image pid {pid} has pending pages")
        if rc == -_errno.EINVAL:
            raise ValueError(f"pages {first}+{count} are beyond pid {pid}'s pages file")
        if rc < 0:
            raise OSError(-rc, _os.strerror(-rc))
        return rc

    def recycle(self):
        """The migration is committed: punch every block of the pages files whose pages
        are all placed, now and as more complete (see dx_lazy_recycle in lazy.h). Only
        files handed over open for writing, with hashes. Returns the pages punched so
        far."""
        cdef int64_t rc
        if self.lz == NULL:
            return 0
        with nogil:
            rc = dx_lazy_recycle(self.lz)
        if rc < 0:
            raise OSError(-rc, _os.strerror(-rc))
        return rc

    def prefetch(self):
        """The restore finished: copy every page not faulted yet, in the background."""
        if self.lz != NULL:
            dx_lazy_prefetch(self.lz)

    def wait(self, double timeout):
        """True once every page of every task is placed (or its task exited) and its
        userfaultfd closed; False after ``timeout`` seconds."""
        cdef int rc, ms = <int>(timeout * 1000)
        if self.lz == NULL:
            return True
        with nogil:
            rc = dx_lazy_wait(self.lz, ms)
        return bool(rc)

    def stats(self):
        cdef dx_lazy_stats s
        if self.lz == NULL:
            return {}
        dx_lazy_get_stats(self.lz, &s)
        return {"tasks": s.tasks, "forks": s.forks, "pages_total": s.pages_total,
                "pages_faulted": s.pages_faulted, "pages_prefetched": s.pages_prefetched,
                "pages_present": s.pages_present, "pages_dropped": s.pages_dropped,
                "pages_zero": s.pages_zero, "pages_zero_image": s.pages_zero_image,
                "faults": s.faults, "events": s.events,
                "eagain": s.eagain, "tasks_gone": s.tasks_gone,
                "pages_abandoned": s.pages_abandoned, "placed_ns": s.placed_ns,
                "pages_pending": s.pages_pending, "pages_postcopied": s.pages_postcopied,
                "requests": s.requests, "requests_dropped": s.requests_dropped,
                "fault_waits": s.fault_waits, "pages_recycled": s.pages_recycled,
                "pages_recycle_failed": s.pages_recycle_failed, "punches": s.punches,
                "fault_wait_s": round(s.fault_wait_ns / 1e9, 6),
                "fault_wait_max_s": round(s.fault_wait_max_ns / 1e9, 6),
                "prefetch_ns": s.prefetch_ns, "complete_ns": s.complete_ns,
                "error": s.error,
                "error_what": s.error_what.decode("utf-8", "replace") if s.error else ""}

    def close(self):
        """Stop and close every userfaultfd (pages not placed by then read as zeros)."""
        cdef dx_lazy *lz = self.lz
        self.lz = NULL
        if lz != NULL:
            with nogil:
                dx_lazy_free(lz)

    def __dealloc__(self):
        if self.lz != NULL:
            dx_lazy_free(self.lz)
            self.lz = NULL
