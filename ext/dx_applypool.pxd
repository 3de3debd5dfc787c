# Index of ext/c/applypool.h: threads applying frames to at-index appliers, no GIL.
from libc.stdint cimport uint8_t, uint64_t
from dx_apply cimport dx_applier

cdef extern from "applypool.h" nogil:
    enum: DX_E_APPLY_CANCELLED

    ctypedef struct dx_apply_job:
        dx_applier *a
        const uint8_t *buf
        size_t len, max_raw
        uint64_t token
        int rc
        uint64_t counts[3]
        size_t err_offset
        uint64_t err_vaddr
        int err_errno
        dx_apply_job *next

    ctypedef struct dx_apply_pool:
        int efd, nthreads

    int dx_apply_pool_start(dx_apply_pool *p, int nthreads)
    void dx_apply_pool_submit(dx_apply_pool *p, dx_apply_job *j)
    dx_apply_job *dx_apply_pool_take_done(dx_apply_pool *p)
    void dx_apply_pool_trim(dx_apply_pool *p)
    void dx_apply_pool_stop(dx_apply_pool *p)
    void dx_apply_pool_free(dx_apply_pool *p)
