#define XXH_INLINE_ALL
#include <xxhash.h>

#include "hash.h"

static const uint8_t zero_page[DX_PAGE_SIZE];

uint64_t dx_xxh3(const void *data, size_t len) { return XXH3_64bits(data, len); }

uint64_t dx_zero_page_hash(void) { return XXH3_64bits(zero_page, DX_PAGE_SIZE); }

/* Most non-zero pages have a non-zero byte in their first cache line, so checking
 * 64 bytes at a time with an early exit costs almost nothing on top of the hash. */
int dx_page_is_zero(const uint8_t *page)
{
    for (size_t off = 0; off < DX_PAGE_SIZE; off += 64) {
        uint64_t acc = 0;
        for (size_t w = 0; w < 64; w += 8) acc |= dx_load64(page + off + w);
        if (acc) return 0;
    }
    return 1;
}

size_t dx_hash_pages(const uint8_t *pages, size_t npages, uint64_t *hashes, uint8_t *zero,
                     const uint64_t *prev_hashes, uint64_t *changed)
{
    const uint64_t zero_hash = dx_zero_page_hash();
    size_t nzero = 0, nchanged = 0;
    for (size_t i = 0; i < npages; i++) {
        const uint8_t *page = pages + i * DX_PAGE_SIZE;
        int is_zero = dx_page_is_zero(page);
        uint64_t h = is_zero ? zero_hash : XXH3_64bits(page, DX_PAGE_SIZE);
        hashes[i] = h;
        if (zero) zero[i] = (uint8_t)is_zero;
        nzero += is_zero;
        if (prev_hashes && prev_hashes[i] != h) changed[nchanged++] = i;
    }
    return prev_hashes ? nchanged : nzero;
}

size_t dx_changed_pages(const uint64_t *old_hashes, const uint64_t *new_hashes, size_t n,
                        uint64_t *changed)
{
    size_t k = 0;
    for (size_t i = 0; i < n; i++)
        if (old_hashes[i] != new_hashes[i]) changed[k++] = i;
    return k;
}

void dx_memcpy(void *dst, const void *src, size_t len) { memcpy(dst, src, len); }
