/* XOR+RLE delta of a page against the version the destination holds.
 *
 * d = old XOR new.  The delta is a sequence of (zero_run, literal_run, literal bytes):
 * zero_run and literal_run are ULEB128 varints (at most 2 bytes, since both are <= 4096),
 * literal bytes are d itself.  The first zero_run may be 0; literal_run is always >= 1;
 * the zero gap after the last literal is omitted (those bytes are unchanged).  Identical
 * pages encode to 0 bytes.  The encoding is canonical: a literal run ends where the first
 * gap of DX_DELTA_MIN_GAP or more zero bytes begins (or at the page end); shorter gaps
 * stay inside the literal, because splitting there would cost two varint bytes for fewer
 * saved bytes.  See docs/CORE.md.
 */
#ifndef DX_DELTA_H
#define DX_DELTA_H

#include "dx_common.h"

#define DX_DELTA_MIN_GAP 3
#define DX_DELTA_DEFAULT_CAP 3072

/* Encode into out[0..cap).  Returns the encoded length, or -1 when the delta would be
 * longer than cap (send the full page instead).  Bytes of out past the returned length
 * (still below cap) may have been overwritten. */
ptrdiff_t dx_xor_encode(const uint8_t *old_page, const uint8_t *new_page, uint8_t *out,
                        size_t cap);

/* Apply a delta to page in place (page becomes the new version).  Returns 0 or
 * -DX_E_DELTA_CORRUPT; on error the page may be partly patched. */
int dx_xor_decode(uint8_t *page, const uint8_t *delta, size_t len);

/* Check a delta's structure without touching any page. */
int dx_xor_validate(const uint8_t *delta, size_t len);

#endif
