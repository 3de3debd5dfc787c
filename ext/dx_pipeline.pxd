# Index of ext/c/pipeline.h: one pre-copy round; comparing two dumps page by page.
from libc.stdint cimport uint8_t, uint64_t
from dx_cache cimport dx_xor_cache
from dx_frame cimport dx_frame_writer

cdef extern from "pipeline.h" nogil:
    ctypedef struct dx_round_stats:
        uint64_t scanned, zero, unchanged, changed, added, removed
        uint64_t sent_zero, sent_xor, sent_full, xor_too_big, xor_bytes, skipped
    int dx_encode_round(const uint8_t *pages, const uint64_t *vaddrs, const uint8_t *clean,
                        size_t npages,
                        const uint64_t *prev_vaddrs, const uint64_t *prev_hashes, size_t nprev,
                        const uint8_t *base_pages, dx_xor_cache *cache, int use_xor,
                        size_t xor_cap, uint64_t *hashes_out, dx_frame_writer *fw,
                        dx_round_stats *st)
    ctypedef struct dx_compare_stats:
        uint64_t added, removed, changed, unchanged, zero, bytes_differing
    void dx_compare_pages(const uint8_t *old_pages, const uint64_t *old_vaddrs, size_t nold,
                          const uint8_t *new_pages, const uint64_t *new_vaddrs, size_t nnew,
                          dx_compare_stats *st)
