# Index of ext/c/track.h: userfaultfd injection, write-protect set-up, PAGEMAP_SCAN.
from libc.stdint cimport uint8_t, uint64_t
from posix.types cimport pid_t

cdef extern from "track.h" nogil:
    ctypedef struct dx_inject_info:
        int signals_requeued, steps, stage, refused
    enum:
        DX_REFUSED_NOT_SYSCALL
        DX_REFUSED_NOT_UFFD
    int dx_inject_userfaultfd(pid_t pid, pid_t tid, uint64_t syscall_ip, int uffd_flags,
                              dx_inject_info *info)
    int dx_inject_fd_syscall(pid_t pid, pid_t tid, uint64_t syscall_ip, long nr, long arg,
                             dx_inject_info *info)
    int dx_uffd_create(int flags)
    int dx_uffd_api(int fd, uint64_t features, uint64_t *got)
    int dx_uffd_register_wp(int fd, uint64_t start, uint64_t end)
    int dx_uffd_writeprotect(int fd, uint64_t start, uint64_t end, int protect)
    int dx_uffd_unregister(int fd, uint64_t start, uint64_t end)
    ptrdiff_t dx_scan_written(int pagemap_fd, uint64_t start, uint64_t end,
                              uint64_t **out_starts, uint64_t **out_ends, size_t *nout,
                              size_t *cap)
    int dx_pagemap_scan_probe(int pagemap_fd)
    ptrdiff_t dx_scan_page_set(int fd, const uint64_t *starts, const uint64_t *ends,
                               size_t nvmas, const uint8_t *skip_file, uint64_t **run_vaddrs,
                               uint64_t **run_lens)
    size_t dx_clean_mask(const uint64_t *vaddrs, size_t n,
                         const uint64_t *tr_starts, const uint64_t *tr_ends, size_t ntr,
                         const uint64_t *wr_starts, const uint64_t *wr_ends, size_t nwr,
                         const uint64_t *held, size_t nheld, uint8_t *clean)
    ptrdiff_t dx_read_pages_masked(pid_t pid, const uint64_t *vaddrs, size_t n,
                                   const uint8_t *clean, uint8_t *buf, uint64_t *pages_failed)
    ptrdiff_t dx_protect_unclean(int uffd, const uint64_t *vaddrs, size_t n,
                                 const uint8_t *clean, const uint64_t *tr_starts,
                                 const uint64_t *tr_ends, size_t ntr, size_t *failed)
