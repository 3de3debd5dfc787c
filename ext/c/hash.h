/* Page hashing and change detection.
 *
 * Each 4 KiB page gets a 64-bit XXH3 hash; an all-zero page is flagged and gets the
 * hash of the zero page without running XXH3 over it.  Comparing a page's hash with the
 * hash of the version the destination holds decides "changed".
 */
#ifndef DX_HASH_H
#define DX_HASH_H

#include "dx_common.h"

uint64_t dx_xxh3(const void *data, size_t len);
uint64_t dx_zero_page_hash(void);
int dx_page_is_zero(const uint8_t *page);

/* Hash npages pages into hashes[], set zero[i] to 1 for all-zero pages (zero may be NULL).
 * With prev_hashes (same length, may be NULL) also list the indices whose hash differs
 * into changed[] and return their number; without it return the number of zero pages. */
size_t dx_hash_pages(const uint8_t *pages, size_t npages, uint64_t *hashes, uint8_t *zero,
                     const uint64_t *prev_hashes, uint64_t *changed);

/* Indices i where old[i] != new[i], written to changed[]; returns how many. */
size_t dx_changed_pages(const uint64_t *old_hashes, const uint64_t *new_hashes, size_t n,
                        uint64_t *changed);

/* memcpy, for the bandwidth baseline of the benchmarks. */
void dx_memcpy(void *dst, const void *src, size_t len);

#endif
