# Index of ext/c/apply.h: the destination's page applier (frames -> pages file, pwritev).
from libc.stdint cimport uint8_t, uint64_t, int64_t

cdef extern from "apply.h" nogil:
    enum: DX_APPLY_RUN_PAGES
    enum: DX_APPLY_AT_INDEX
    enum: DX_APPLY_APPEND
    enum: DX_SRC_NONE
    enum: DX_SRC_HELD
    enum: DX_SRC_RECEIVED
    enum: DX_E_APPLY_ORDER
    enum: DX_E_APPLY_NOT_HELD
    enum: DX_E_APPLY_IO
    enum: DX_E_APPLY_HELD_SHORT
    enum: DX_E_APPLY_NO_PAGES
    enum: DX_E_APPLY_TWICE

    ctypedef struct dx_apply_work:
        size_t err_offset
        uint64_t err_vaddr
        int err_errno

    ctypedef struct dx_applier:
        size_t npages, nheld, next, nrecv
        uint64_t append_pages
        uint64_t counts[3]
        dx_apply_work w

    void dx_applier_hold(dx_applier *a)
    void dx_applier_release(dx_applier *a)
    void dx_applier_wait_idle(dx_applier *a)
    int dx_applier_init(dx_applier *a, const uint64_t *vaddrs, size_t npages, int fd, int mode,
                        const uint64_t *held_vaddrs, size_t nheld, int held_fd,
                        uint64_t *hashes, uint64_t *recv_vaddrs, uint8_t *src)
    void dx_applier_free(dx_applier *a)
    int64_t dx_applier_share_held(dx_applier *a, int held_fd, const uint64_t *held_hashes)
    int dx_applier_apply(dx_applier *a, const uint8_t *buf, size_t len, size_t max_raw,
                         uint64_t counts[3])
    int64_t dx_applier_finish(dx_applier *a)
    const char *dx_apply_strerror(int code)
    int dx_pagemap_check(const uint64_t *pairs, size_t n, uint64_t max_nr, uint64_t *present,
                         size_t *err_index)
    void dx_pagemap_present_vaddrs(const uint64_t *pairs, size_t n, uint64_t *out)
    int64_t dx_copy_received_runs(int src_fd, int dst_fd, const uint64_t *runs, size_t nruns,
                                  uint64_t *out, int *err)
    int dx_write_u64_runs(int fd, const uint64_t *values, const uint64_t *pairs, size_t npairs)
