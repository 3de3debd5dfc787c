/* Bounded cache of the last-sent version of pages, the XOR base for deltas.
 *
 * Set-associative (DX_CACHE_WAYS ways per set), keyed by vaddr.  Every page we send
 * (xor or full) is inserted with the current round number; when its set is full, the
 * way sent longest ago is evicted.  A page that keeps changing is re-inserted every round
 * and so stays; pages that changed once and then settled age out.  A page sent as zero is
 * dropped (the XOR base of a zero page is the page itself).  All memory is allocated once
 * at creation: slots = capacity / (4096 + metadata), whatever the process size.
 *
 * Thread safety: lookup, insert and drop of one vaddr must run under dx_cache_lock of
 * that vaddr (its set's lock); the statistics are updated atomically.  ``round`` is
 * advanced only while no thread uses the cache (between rounds).
 */
#ifndef DX_CACHE_H
#define DX_CACHE_H

#include "dx_common.h"

#define DX_CACHE_WAYS 4
#define DX_CACHE_SLOT_OVERHEAD 16   /* tag u64 + round u32 + padding, per slot */

typedef struct {
    uint64_t *tags;     /* vaddr | 1 when valid, 0 when empty */
    uint32_t *rounds;   /* round of the last insert */
    uint8_t *pages;
    uint8_t *locks;     /* one spin lock per set: encoders on several threads share a cache */
    size_t nsets, nslots, nbytes;
    uint32_t round;
    uint64_t hits, misses, inserts, evictions, drops;
} dx_xor_cache;

int dx_cache_init(dx_xor_cache *c, size_t capacity_bytes);
void dx_cache_free(dx_xor_cache *c);
/* The cached page for vaddr, or NULL. */
uint8_t *dx_cache_lookup(dx_xor_cache *c, uint64_t vaddr);
/* Store page as the current version of vaddr (replacing or evicting). */
void dx_cache_insert(dx_xor_cache *c, uint64_t vaddr, const uint8_t *page);
void dx_cache_drop(dx_xor_cache *c, uint64_t vaddr);
size_t dx_cache_count(const dx_xor_cache *c);

static inline size_t dx_cache_set_of(size_t nsets, uint64_t vaddr)
{
    uint64_t h = (vaddr >> DX_PAGE_SHIFT) * 0x9E3779B97F4A7C15ull;
    return (size_t)(((unsigned __int128)h * nsets) >> 64);
}

/* Hold the set of vaddr while looking up, XOR-encoding against and replacing its page:
 * threads encode disjoint vaddrs, so they contend only when two vaddrs share a set. */
static inline void dx_cache_lock(dx_xor_cache *c, uint64_t vaddr)
{
    uint8_t *l = &c->locks[dx_cache_set_of(c->nsets, vaddr)];
    while (__atomic_test_and_set(l, __ATOMIC_ACQUIRE)) {
        while (__atomic_load_n(l, __ATOMIC_RELAXED)) {
#if defined(__x86_64__) || defined(__i386__)
            __builtin_ia32_pause();
#endif
        }
    }
}

static inline void dx_cache_unlock(dx_xor_cache *c, uint64_t vaddr)
{
    __atomic_clear(&c->locks[dx_cache_set_of(c->nsets, vaddr)], __ATOMIC_RELEASE);
}
#endif
