# Index of ext/c/hash.h: per-page XXH3, zero-page flags, change detection.
from libc.stdint cimport uint8_t, uint64_t

cdef extern from "hash.h" nogil:
    uint64_t dx_xxh3(const void *data, size_t len)
    uint64_t dx_zero_page_hash()
    int dx_page_is_zero(const uint8_t *page)
    size_t dx_hash_pages(const uint8_t *pages, size_t npages, uint64_t *hashes, uint8_t *zero,
                         const uint64_t *prev_hashes, uint64_t *changed)
    size_t dx_changed_pages(const uint64_t *old_hashes, const uint64_t *new_hashes, size_t n,
                            uint64_t *changed)
    void dx_memcpy(void *dst, const void *src, size_t len)
