#include "delta.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#define MASK_WORDS (DX_PAGE_SIZE / 64)

/* zm bit b set <=> byte b of old^new is zero.  Returns 1 when the pages are identical. */
static int zero_byte_mask(const uint8_t *a, const uint8_t *b, uint64_t *zm)
{
    uint64_t all = ~0ull;
#if defined(__SSE2__)
    const __m128i z = _mm_setzero_si128();
    for (size_t w = 0; w < MASK_WORDS; w++) {
        const uint8_t *pa = a + w * 64, *pb = b + w * 64;
        uint64_t m = 0;
        for (int k = 0; k < 4; k++) {
            __m128i x = _mm_xor_si128(_mm_loadu_si128((const __m128i *)(pa + 16 * k)),
                                      _mm_loadu_si128((const __m128i *)(pb + 16 * k)));
            m |= (uint64_t)(uint16_t)_mm_movemask_epi8(_mm_cmpeq_epi8(x, z)) << (16 * k);
        }
        zm[w] = m;
        all &= m;
    }
#else
    for (size_t w = 0; w < MASK_WORDS; w++) {
        uint64_t m = 0;
        for (int k = 0; k < 64; k++)
            m |= (uint64_t)(a[w * 64 + k] == b[w * 64 + k]) << k;
        zm[w] = m;
        all &= m;
    }
#endif
    return all == ~0ull;
}

/* First set bit at or after bit `from`, or DX_PAGE_SIZE. */
static inline size_t next_set(const uint64_t *m, size_t from, int invert)
{
    if (from >= DX_PAGE_SIZE) return DX_PAGE_SIZE;
    size_t w = from >> 6;
    uint64_t x = (invert ? ~m[w] : m[w]) & (~0ull << (from & 63));
    while (!x) {
        if (++w == MASK_WORDS) return DX_PAGE_SIZE;
        x = invert ? ~m[w] : m[w];
    }
    return (w << 6) + (size_t)__builtin_ctzll(x);
}

static inline size_t put_varint(uint8_t *out, size_t v)
{
    if (v < 0x80) { out[0] = (uint8_t)v; return 1; }
    out[0] = (uint8_t)(v | 0x80);
    out[1] = (uint8_t)(v >> 7);
    return 2;
}

#if defined(__SSE2__)
/* 16 bytes of 0xff then 16 of 0x00: loading at (16 - n) gives a mask of n leading bytes */
static const uint8_t lead_mask[32] = {
    0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
};
#endif

static inline void xor_copy(uint8_t *dst, const uint8_t *a, const uint8_t *b, size_t n)
{
    size_t i = 0;
    for (; i + 8 <= n; i += 8) dx_store64(dst + i, dx_load64(a + i) ^ dx_load64(b + i));
    for (; i < n; i++) dst[i] = a[i] ^ b[i];
}

ptrdiff_t dx_xor_encode(const uint8_t *old_page, const uint8_t *new_page, uint8_t *out,
                        size_t cap)
{
    uint64_t zm[MASK_WORDS], gap[MASK_WORDS];
    if (zero_byte_mask(old_page, new_page, zm)) return 0;
    /* gap bit p: bytes p .. p+MIN_GAP-1 are all zero (bytes past the page end count as
     * zero, so a trailing gap of any length ends the last literal). */
    for (size_t w = 0; w < MASK_WORDS; w++) {
        uint64_t next = w + 1 < MASK_WORDS ? zm[w + 1] : ~0ull;
        uint64_t g = zm[w];
        for (int s = 1; s < DX_DELTA_MIN_GAP; s++)
            g &= (zm[w] >> s) | (next << (64 - s));
        gap[w] = g;
    }
    size_t pos = 0, len = 0;
    for (;;) {
        size_t lit = next_set(zm, pos, 1);
        if (lit == DX_PAGE_SIZE) break;
        size_t end = next_set(gap, lit, 0);
        size_t zrun = lit - pos, lrun = end - lit;
        size_t need = (zrun < 0x80 ? 1 : 2) + (lrun < 0x80 ? 1 : 2) + lrun;
        if (len + need > cap) return -1;
        len += put_varint(out + len, zrun);
        len += put_varint(out + len, lrun);
#if defined(__SSE2__)
        /* most literals in real memory are a few bytes (a pointer, a counter): one
         * 16-byte store, whose bytes past the literal the next token overwrites */
        if (lrun <= 16 && lit + 16 <= DX_PAGE_SIZE && len + 16 <= cap) {
            __m128i x = _mm_xor_si128(_mm_loadu_si128((const __m128i *)(old_page + lit)),
                                      _mm_loadu_si128((const __m128i *)(new_page + lit)));
            _mm_storeu_si128((__m128i *)(out + len), x);
        } else
#endif
            xor_copy(out + len, old_page + lit, new_page + lit, lrun);
        len += lrun;
        pos = end;
    }
    return (ptrdiff_t)len;
}

static inline int get_varint(const uint8_t *in, size_t len, size_t *p, size_t *v)
{
    if (*p >= len) return -1;
    uint8_t b0 = in[(*p)++];
    if (!(b0 & 0x80)) { *v = b0; return 0; }
    if (*p >= len) return -1;
    uint8_t b1 = in[(*p)++];
    if (b1 & 0x80) return -1;   /* runs never need a third byte */
    *v = (size_t)(b0 & 0x7f) | ((size_t)b1 << 7);
    return 0;
}

static int walk(uint8_t *page, const uint8_t *delta, size_t len)
{
    size_t p = 0, pos = 0;
    while (p < len) {
        size_t zrun, lrun;
        if (get_varint(delta, len, &p, &zrun) || get_varint(delta, len, &p, &lrun))
            return -DX_E_DELTA_CORRUPT;
        if (lrun == 0 || zrun > DX_PAGE_SIZE - pos || lrun > DX_PAGE_SIZE - pos - zrun ||
            lrun > len - p)
            return -DX_E_DELTA_CORRUPT;
        pos += zrun;
#if defined(__SSE2__)
        if (page && lrun <= 16 && pos + 16 <= DX_PAGE_SIZE && p + 16 <= len) {
            /* short literal: xor 16 bytes, the ones past the literal with zero */
            __m128i m = _mm_loadu_si128((const __m128i *)(lead_mask + 16 - lrun));
            __m128i d = _mm_and_si128(m, _mm_loadu_si128((const __m128i *)(delta + p)));
            __m128i v = _mm_loadu_si128((const __m128i *)(page + pos));
            _mm_storeu_si128((__m128i *)(page + pos), _mm_xor_si128(v, d));
        } else
#endif
        if (page) xor_copy(page + pos, page + pos, delta + p, lrun);
        pos += lrun;
        p += lrun;
    }
    return 0;
}

int dx_xor_decode(uint8_t *page, const uint8_t *delta, size_t len) { return walk(page, delta, len); }

int dx_xor_validate(const uint8_t *delta, size_t len) { return walk(NULL, delta, len); }
