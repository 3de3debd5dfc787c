#include "delta.h"
#include "hash.h"
#include "pipeline.h"

int dx_encode_round(const uint8_t *pages, const uint64_t *vaddrs, const uint8_t *clean,
                    size_t npages,
                    const uint64_t *prev_vaddrs, const uint64_t *prev_hashes, size_t nprev,
                    const uint8_t *base_pages, dx_xor_cache *cache, int use_xor,
                    size_t xor_cap, uint64_t *hashes_out, dx_frame_writer *fw,
                    dx_round_stats *st)
{
    const uint64_t zero_hash = dx_zero_page_hash();
    size_t j = 0;
    if (xor_cap >= DX_PAGE_SIZE) xor_cap = DX_PAGE_SIZE - 1;
    for (size_t i = 0; i < npages; i++) {
        const uint8_t *page = pages + i * DX_PAGE_SIZE;
        uint64_t vaddr = vaddrs[i];
        while (j < nprev && prev_vaddrs[j] < vaddr) { j++; st->removed++; }
        const uint8_t *held = NULL;    /* the destination's version, when we have it */
        int have_prev = j < nprev && prev_vaddrs[j] == vaddr;
        uint64_t prev_hash = 0;
        if (have_prev) {
            prev_hash = prev_hashes[j];
            if (base_pages) held = base_pages + j * DX_PAGE_SIZE;
            j++;
        }
        if (clean && clean[i]) {
            if (!have_prev) return -DX_E_CLEAN_NOT_HELD;
            hashes_out[i] = prev_hash;
            st->scanned++;
            st->unchanged++;
            st->skipped++;
            continue;
        }
        int is_zero = dx_page_is_zero(page);
        uint64_t h = is_zero ? zero_hash : dx_xxh3(page, DX_PAGE_SIZE);
        hashes_out[i] = h;
        st->scanned++;
        st->zero += is_zero;
        if (have_prev && prev_hash == h) { st->unchanged++; continue; }
        if (have_prev) st->changed++; else st->added++;

        if (is_zero) {
            if (!dx_fw_reserve(fw, 0)) return -DX_E_NOMEM;
            dx_fw_commit(fw, vaddr, DX_REC_ZERO, 0);
            st->sent_zero++;
            if (cache) {
                dx_cache_lock(cache, vaddr);
                dx_cache_drop(cache, vaddr);
                dx_cache_unlock(cache, vaddr);
            }
            continue;
        }
        /* XOR only against a page the destination holds (have_prev): the cache keeps
         * what we last sent, which equals the destination's copy while it holds it. */
        /* the set stays locked from the lookup to the insert: another thread's insert
         * into the same set could otherwise overwrite the base while we XOR against it */
        if (cache) dx_cache_lock(cache, vaddr);
        if (use_xor && have_prev && !held && cache) held = dx_cache_lookup(cache, vaddr);
        int sent = 0;
        if (use_xor && held) {
            uint8_t *dst = dx_fw_reserve(fw, xor_cap);
            if (!dst) { if (cache) dx_cache_unlock(cache, vaddr); return -DX_E_NOMEM; }
            ptrdiff_t n = dx_xor_encode(held, page, dst, xor_cap);
            if (n > 0) {
                dx_fw_commit(fw, vaddr, DX_REC_XOR, (size_t)n);
                st->sent_xor++;
                st->xor_bytes += (uint64_t)n;
                sent = 1;
            } else if (n == 0) {
                /* hash differs but the held copy is identical: nothing to send */
                sent = 1;
            } else {
                st->xor_too_big++;
            }
        }
        if (!sent) {
            uint8_t *dst = dx_fw_reserve(fw, DX_PAGE_SIZE);
            if (!dst) { if (cache) dx_cache_unlock(cache, vaddr); return -DX_E_NOMEM; }
            memcpy(dst, page, DX_PAGE_SIZE);
            dx_fw_commit(fw, vaddr, DX_REC_FULL, DX_PAGE_SIZE);
            st->sent_full++;
        }
        if (cache) {
            dx_cache_insert(cache, vaddr, page);
            dx_cache_unlock(cache, vaddr);
        }
    }
    st->removed += nprev - j;
    return dx_fw_flush(fw);
}

size_t dx_page_bytes_differing(const uint8_t *a, const uint8_t *b)
{
    size_t n = 0;
    for (size_t i = 0; i < DX_PAGE_SIZE; i += 8) {
        uint64_t x = dx_load64(a + i) ^ dx_load64(b + i);
        x |= x >> 4;
        x |= x >> 2;
        x |= x >> 1;
        n += (size_t)__builtin_popcountll(x & 0x0101010101010101ull);
    }
    return n;
}

void dx_compare_pages(const uint8_t *old_pages, const uint64_t *old_vaddrs, size_t nold,
                      const uint8_t *new_pages, const uint64_t *new_vaddrs, size_t nnew,
                      dx_compare_stats *st)
{
    size_t i = 0, j = 0;
    while (i < nold || j < nnew) {
        if (j == nnew || (i < nold && old_vaddrs[i] < new_vaddrs[j])) {
            st->removed++;
            i++;
            continue;
        }
        const uint8_t *np = new_pages + j * DX_PAGE_SIZE;
        st->zero += dx_page_is_zero(np);
        if (i == nold || new_vaddrs[j] < old_vaddrs[i]) {
            st->added++;
        } else {
            const uint8_t *op = old_pages + i * DX_PAGE_SIZE;
            if (memcmp(op, np, DX_PAGE_SIZE) == 0) {
                st->unchanged++;
            } else {
                st->changed++;
                st->bytes_differing += dx_page_bytes_differing(op, np);
            }
            i++;
        }
        j++;
    }
}
