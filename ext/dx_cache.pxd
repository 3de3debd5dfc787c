# Index of ext/c/cache.h: the bounded, set-associative cache of last-sent page versions.
from libc.stdint cimport uint8_t, uint32_t, uint64_t

cdef extern from "cache.h" nogil:
    enum: DX_CACHE_WAYS
    ctypedef struct dx_xor_cache:
        size_t nsets, nslots, nbytes
        uint32_t round
        uint64_t hits, misses, inserts, evictions, drops
    int dx_cache_init(dx_xor_cache *c, size_t capacity_bytes)
    void dx_cache_free(dx_xor_cache *c)
    uint8_t *dx_cache_lookup(dx_xor_cache *c, uint64_t vaddr)
    void dx_cache_insert(dx_xor_cache *c, uint64_t vaddr, const uint8_t *page)
    void dx_cache_drop(dx_xor_cache *c, uint64_t vaddr)
    size_t dx_cache_count(const dx_xor_cache *c)
    void dx_cache_lock(dx_xor_cache *c, uint64_t vaddr)
    void dx_cache_unlock(dx_xor_cache *c, uint64_t vaddr)
