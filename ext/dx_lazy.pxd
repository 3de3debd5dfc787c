# Index of ext/c/lazy.h: deltaxfer's own lazy-pages server (userfaultfd).
from libc.stdint cimport int64_t, uint32_t, uint64_t

cdef extern from "lazy.h" nogil:
    ctypedef struct dx_lazy:
        pass
    ctypedef struct dx_lazy_stats:
        uint64_t tasks, forks, pages_total, pages_faulted, pages_prefetched, pages_present
        uint64_t pages_dropped, pages_zero, pages_zero_image, faults, events, eagain, tasks_gone
        uint64_t pages_abandoned, placed_ns, prefetch_ns, complete_ns
        uint64_t pages_pending, pages_postcopied, requests, requests_dropped
        uint64_t fault_waits, fault_wait_ns, fault_wait_max_ns
        uint64_t pages_recycled, pages_recycle_failed, punches
        int error
        char error_what[128]
    dx_lazy *dx_lazy_new(int workers, uint32_t chunk_pages, uint32_t fault_pages, int *err)
    int dx_lazy_add(dx_lazy *lz, int uffd, int pid, int pages_fd, uint64_t pages_file_size,
                    const uint64_t *vaddr, const uint64_t *nr_pages, const uint64_t *flags,
                    size_t n, const uint64_t *vma_start, const uint64_t *vma_end, size_t nvma,
                    const uint64_t *pending, size_t npending, const uint64_t *hashes,
                    size_t nhashes)
    void dx_lazy_set_request_fd(dx_lazy *lz, int fd)
    int64_t dx_lazy_arrived(dx_lazy *lz, int pid, uint64_t p, uint64_t n)
    void dx_lazy_prefetch(dx_lazy *lz)
    int64_t dx_lazy_recycle(dx_lazy *lz)
    int dx_lazy_wait(dx_lazy *lz, int timeout_ms)
    void dx_lazy_get_stats(dx_lazy *lz, dx_lazy_stats *out)
    void dx_lazy_free(dx_lazy *lz)
