# Index of ext/c/procmem.h: process_vm_readv in bulk, /proc/PID/pagemap runs.
from libc.stdint cimport uint8_t, uint64_t
from posix.types cimport pid_t

cdef extern from "procmem.h" nogil:
    ptrdiff_t dx_read_process_memory(pid_t pid, const uint64_t *run_vaddrs,
                                     const uint64_t *run_lens, size_t nruns, uint8_t *buf,
                                     uint64_t *fail_vaddrs, uint64_t *fail_lens, size_t fail_cap,
                                     uint64_t *bytes_failed)
    ptrdiff_t dx_pagemap_runs(int fd, const uint64_t *starts, const uint64_t *ends, size_t nvmas,
                              const uint8_t *skip_file, uint64_t zero_pfn,
                              uint64_t **run_vaddrs, uint64_t **run_lens)
    ptrdiff_t dx_read_pages(pid_t pid, int memfd, const uint64_t *vaddrs, size_t n,
                            const uint8_t *skip, uint8_t *buf, uint64_t *pages_failed,
                            uint64_t *pages_forced)
