/* Shared definitions of the deltaxfer page core: page size, error codes, small helpers. */
#ifndef DX_COMMON_H
#define DX_COMMON_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define DX_PAGE_SIZE 4096u
#define DX_PAGE_SHIFT 12

/* Error codes returned (negated) by the kernels; dx_strerror() names each one. */
enum dx_error {
    DX_OK = 0,
    DX_E_NOMEM = 1,
    DX_E_ARG = 2,               /* a caller-side precondition: lengths, alignment */
    DX_E_UNSORTED = 3,          /* vaddrs not strictly ascending */
    DX_E_UNALIGNED = 4,         /* vaddr not a multiple of the page size */
    DX_E_CLEAN_NOT_HELD = 5,    /* a page marked clean that the destination lacks */
    DX_E_FRAME_TRUNCATED = 10,  /* fewer bytes than the header or payload needs */
    DX_E_FRAME_MAGIC = 11,
    DX_E_FRAME_VERSION = 12,
    DX_E_FRAME_HEADER_CHECK = 13,
    DX_E_FRAME_FLAGS = 14,
    DX_E_FRAME_TOO_LARGE = 15,  /* raw length above the cap: never allocated */
    DX_E_FRAME_DECOMPRESS = 16,
    DX_E_FRAME_CHECKSUM = 17,
    DX_E_FRAME_RECORD = 18,     /* a record runs past the payload or has a bad kind/length */
    DX_E_FRAME_COUNT = 19,      /* record count disagrees with the payload */
    DX_E_DELTA_CORRUPT = 20,    /* xor delta runs past the page or has a bad varint */
    DX_E_UNKNOWN_VADDR = 21,    /* record for a page the destination does not hold */
};

const char *dx_strerror(int code);

static inline uint64_t dx_load64(const void *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static inline uint32_t dx_load32(const void *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint16_t dx_load16(const void *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static inline void dx_store64(void *p, uint64_t v) { memcpy(p, &v, 8); }
static inline void dx_store32(void *p, uint32_t v) { memcpy(p, &v, 4); }
static inline void dx_store16(void *p, uint16_t v) { memcpy(p, &v, 2); }

/* Index of vaddr in a strictly ascending array, or -1. */
static inline ptrdiff_t dx_find_vaddr(const uint64_t *vaddrs, size_t n, uint64_t vaddr)
{
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (vaddrs[mid] < vaddr) lo = mid + 1; else hi = mid;
    }
    return (lo < n && vaddrs[lo] == vaddr) ? (ptrdiff_t)lo : -1;
}

/* 0 if vaddrs are page aligned and strictly ascending, else a negative dx_error. */
int dx_check_vaddrs(const uint64_t *vaddrs, size_t n);

#endif
