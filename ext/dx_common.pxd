# Index of ext/c/dx_common.h: page size, error codes, vaddr checks.
from libc.stdint cimport uint64_t

cdef extern from "dx_common.h" nogil:
    enum: DX_PAGE_SIZE
    enum dx_error:
        DX_OK
        DX_E_NOMEM
        DX_E_ARG
        DX_E_UNSORTED
        DX_E_UNALIGNED
        DX_E_FRAME_TRUNCATED
        DX_E_FRAME_TOO_LARGE
        DX_E_DELTA_CORRUPT
        DX_E_UNKNOWN_VADDR
    const char *dx_strerror(int code)
    int dx_check_vaddrs(const uint64_t *vaddrs, size_t n)
