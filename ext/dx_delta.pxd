# Index of ext/c/delta.h: XOR+RLE delta of a page against the destination's version.
from libc.stdint cimport uint8_t

cdef extern from "delta.h" nogil:
    enum: DX_DELTA_MIN_GAP
    enum: DX_DELTA_DEFAULT_CAP
    ptrdiff_t dx_xor_encode(const uint8_t *old_page, const uint8_t *new_page, uint8_t *out,
                            size_t cap)
    int dx_xor_decode(uint8_t *page, const uint8_t *delta, size_t len)
    int dx_xor_validate(const uint8_t *delta, size_t len)
