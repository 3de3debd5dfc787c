/* One pre-copy round over a page buffer, and the page-by-page comparison of two dumps. */
#ifndef DX_PIPELINE_H
#define DX_PIPELINE_H

#include "cache.h"
#include "frame.h"

typedef struct {
    uint64_t scanned, zero, unchanged, changed, added, removed;
    uint64_t sent_zero, sent_xor, sent_full, xor_too_big, xor_bytes;
    uint64_t skipped;    /* clean pages taken as unchanged without reading or hashing */
} dx_round_stats;

/* Hash every page, compare with what the destination holds (prev_vaddrs/prev_hashes,
 * merge-joined on vaddr), and write a record for each changed or added page to fw:
 * zero if all-zero, else an xor delta against the XOR base when use_xor and one is known
 * and the delta fits in xor_cap bytes, else the full page.  The XOR base is
 * base_pages[j] (the page the destination holds, aligned with prev_vaddrs) when given,
 * else the cache entry.  The cache, when given, is updated with every page sent.
 * hashes_out receives the new page hashes (the next round's prev_hashes).
 * clean (NULL or one byte per page): a page marked clean is known unchanged since the
 * destination's version (not written since it was read) and must be held; its hash is
 * the held one and its bytes in pages are not looked at (they need not have been read).
 * A clean page that the destination does not hold is -DX_E_CLEAN_NOT_HELD. */
int dx_encode_round(const uint8_t *pages, const uint64_t *vaddrs, const uint8_t *clean,
                    size_t npages,
                    const uint64_t *prev_vaddrs, const uint64_t *prev_hashes, size_t nprev,
                    const uint8_t *base_pages, dx_xor_cache *cache, int use_xor,
                    size_t xor_cap, uint64_t *hashes_out, dx_frame_writer *fw,
                    dx_round_stats *st);

typedef struct {
    uint64_t added, removed, changed, unchanged, zero, bytes_differing;
} dx_compare_stats;

/* Merge-join two page sets by vaddr (both strictly ascending).  zero counts all-zero
 * pages of the new set; bytes_differing is summed over changed pages. */
void dx_compare_pages(const uint8_t *old_pages, const uint64_t *old_vaddrs, size_t nold,
                      const uint8_t *new_pages, const uint64_t *new_vaddrs, size_t nnew,
                      dx_compare_stats *st);

/* Number of bytes that differ between two pages. */
size_t dx_page_bytes_differing(const uint8_t *a, const uint8_t *b);

#endif
