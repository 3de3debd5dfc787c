#include <stdlib.h>

#include "cache.h"

int dx_cache_init(dx_xor_cache *c, size_t capacity_bytes)
{
    memset(c, 0, sizeof *c);
    size_t nsets = capacity_bytes / ((DX_PAGE_SIZE + DX_CACHE_SLOT_OVERHEAD) * DX_CACHE_WAYS);
    if (nsets == 0) return -DX_E_ARG;
    c->nsets = nsets;
    c->nslots = nsets * DX_CACHE_WAYS;
    c->tags = calloc(c->nslots, sizeof *c->tags);
    c->rounds = calloc(c->nslots, sizeof *c->rounds);
    c->locks = calloc(c->nsets, 1);
    if (posix_memalign((void **)&c->pages, 64, c->nslots * DX_PAGE_SIZE)) c->pages = NULL;
    if (!c->tags || !c->rounds || !c->locks || !c->pages) { dx_cache_free(c); return -DX_E_NOMEM; }
    c->nbytes = c->nslots * (DX_PAGE_SIZE + sizeof *c->tags + sizeof *c->rounds) + c->nsets;
    return 0;
}

void dx_cache_free(dx_xor_cache *c)
{
    free(c->tags);
    free(c->rounds);
    free(c->pages);
    free(c->locks);
    c->locks = NULL;
    c->tags = NULL;
    c->rounds = NULL;
    c->pages = NULL;
}

static inline ptrdiff_t find_slot(const dx_xor_cache *c, uint64_t vaddr)
{
    size_t base = dx_cache_set_of(c->nsets, vaddr) * DX_CACHE_WAYS;
    for (size_t w = 0; w < DX_CACHE_WAYS; w++)
        if (c->tags[base + w] == (vaddr | 1)) return (ptrdiff_t)(base + w);
    return -1;
}

uint8_t *dx_cache_lookup(dx_xor_cache *c, uint64_t vaddr)
{
    ptrdiff_t s = find_slot(c, vaddr);
    if (s < 0) { __atomic_fetch_add(&c->misses, 1, __ATOMIC_RELAXED); return NULL; }
    __atomic_fetch_add(&c->hits, 1, __ATOMIC_RELAXED);
    return c->pages + (size_t)s * DX_PAGE_SIZE;
}

void dx_cache_insert(dx_xor_cache *c, uint64_t vaddr, const uint8_t *page)
{
    ptrdiff_t s = find_slot(c, vaddr);
    if (s < 0) {
        /* an empty way, else the way inserted longest ago (lowest way on a tie) */
        size_t base = dx_cache_set_of(c->nsets, vaddr) * DX_CACHE_WAYS, victim = base;
        for (size_t w = 0; w < DX_CACHE_WAYS; w++) {
            size_t i = base + w;
            if (!c->tags[i]) { victim = i; break; }
            if (c->rounds[i] < c->rounds[victim]) victim = i;
        }
        if (c->tags[victim]) __atomic_fetch_add(&c->evictions, 1, __ATOMIC_RELAXED);
        s = (ptrdiff_t)victim;
        c->tags[s] = vaddr | 1;
    }
    c->rounds[s] = c->round;
    memcpy(c->pages + (size_t)s * DX_PAGE_SIZE, page, DX_PAGE_SIZE);
    __atomic_fetch_add(&c->inserts, 1, __ATOMIC_RELAXED);
}

void dx_cache_drop(dx_xor_cache *c, uint64_t vaddr)
{
    ptrdiff_t s = find_slot(c, vaddr);
    if (s >= 0) { c->tags[s] = 0; __atomic_fetch_add(&c->drops, 1, __ATOMIC_RELAXED); }
}

size_t dx_cache_count(const dx_xor_cache *c)
{
    size_t n = 0;
    for (size_t i = 0; i < c->nslots; i++) n += c->tags[i] != 0;
    return n;
}
