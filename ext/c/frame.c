#include <stdlib.h>
#include <lz4.h>

#include "delta.h"
#include "frame.h"
#include "hash.h"

int dx_fw_init_with(dx_frame_writer *w, size_t frame_size, int compress, uint8_t *raw,
                    uint8_t *out, size_t out_cap)
{
    memset(w, 0, sizeof *w);
    if (frame_size < DX_RECORD_MAX || frame_size > DX_FRAME_MAX_RAW) return -DX_E_ARG;
    w->own_raw = raw == NULL;
    w->raw = raw ? raw : malloc(frame_size);
    if (!w->raw) return -DX_E_NOMEM;
    w->raw_cap = frame_size;
    w->own_out = out == NULL;
    if (out) { w->out = out; w->out_cap = out_cap; }
    w->compress = compress;
    w->prefix_index = -1;
    return 0;
}

int dx_fw_init(dx_frame_writer *w, size_t frame_size, int compress)
{
    return dx_fw_init_with(w, frame_size, compress, NULL, NULL, 0);
}

void dx_fw_free(dx_frame_writer *w)
{
    if (w->own_raw) free(w->raw);
    if (w->own_out) free(w->out);
    w->raw = w->out = NULL;
}

size_t dx_fw_output_bound(size_t nrecords, size_t frame_size, int prefix)
{
    if (nrecords == 0) return 0;
    if (frame_size < DX_RECORD_MAX) frame_size = DX_RECORD_MAX;
    size_t raw = nrecords * DX_RECORD_MAX;
    /* a frame is flushed only when the next record might not fit, so every frame but
     * the last holds more than frame_size - DX_RECORD_MAX raw bytes, and at least one
     * record */
    size_t frames = raw / (frame_size - DX_RECORD_MAX + 1) + 1;
    if (frames > nrecords) frames = nrecords;
    /* frames are stored at most raw; the frame being flushed reserves lz4's bound */
    return raw + frames * ((prefix ? 4 : 0) + DX_FRAME_HEADER_SIZE)
           + (size_t)LZ4_compressBound((int)frame_size) - frame_size;
}

static int out_reserve(dx_frame_writer *w, size_t extra)
{
    if (w->out_len + extra <= w->out_cap) return 0;
    if (!w->own_out) return -DX_E_NOMEM;
    size_t cap = w->out_cap ? w->out_cap : 64 * 1024;
    while (cap < w->out_len + extra) cap *= 2;
    uint8_t *p = realloc(w->out, cap);
    if (!p) return -DX_E_NOMEM;
    w->out = p;
    w->out_cap = cap;
    return 0;
}

int dx_fw_flush(dx_frame_writer *w)
{
    if (w->nrecords == 0) return 0;
    size_t bound = (size_t)LZ4_compressBound((int)w->raw_len);
    size_t prefix = w->prefix_index >= 0 ? 4 : 0;
    if (out_reserve(w, prefix + DX_FRAME_HEADER_SIZE + (bound > w->raw_len ? bound : w->raw_len)))
        return -DX_E_NOMEM;
    if (prefix) dx_store32(w->out + w->out_len, (uint32_t)w->prefix_index);
    uint8_t *hdr = w->out + w->out_len + prefix, *payload = hdr + DX_FRAME_HEADER_SIZE;
    uint8_t flags = 0;
    size_t stored = 0;
    if (w->compress) {
        int n = LZ4_compress_default((const char *)w->raw, (char *)payload, (int)w->raw_len,
                                     (int)bound);
        if (n > 0 && (size_t)n < w->raw_len) { stored = (size_t)n; flags = DX_FRAME_FLAG_LZ4; }
    }
    if (!flags) { memcpy(payload, w->raw, w->raw_len); stored = w->raw_len; }
    memcpy(hdr, DX_FRAME_MAGIC, 4);
    hdr[4] = DX_FRAME_VERSION;
    hdr[5] = flags;
    dx_store16(hdr + 6, 0);
    dx_store32(hdr + 8, w->nrecords);
    dx_store32(hdr + 12, (uint32_t)w->raw_len);
    dx_store32(hdr + 16, (uint32_t)stored);
    dx_store64(hdr + 20, dx_xxh3(w->raw, w->raw_len));
    dx_store32(hdr + 28, (uint32_t)dx_xxh3(hdr, 28));
    w->out_len += prefix + DX_FRAME_HEADER_SIZE + stored;
    w->frames++;
    w->raw_bytes += w->raw_len;
    w->stored_bytes += DX_FRAME_HEADER_SIZE + stored;
    w->raw_len = 0;
    w->nrecords = 0;
    return 0;
}

uint8_t *dx_fw_reserve(dx_frame_writer *w, size_t max_len)
{
    if (w->raw_len + DX_RECORD_HEADER_SIZE + max_len > w->raw_cap && dx_fw_flush(w))
        return NULL;
    return w->raw + w->raw_len + DX_RECORD_HEADER_SIZE;
}

void dx_fw_commit(dx_frame_writer *w, uint64_t vaddr, int kind, size_t len)
{
    uint8_t *rec = w->raw + w->raw_len;
    dx_store64(rec, vaddr);
    rec[8] = (uint8_t)kind;
    dx_store16(rec + 9, (uint16_t)len);
    w->raw_len += DX_RECORD_HEADER_SIZE + len;
    w->nrecords++;
    w->records++;
}

int dx_fw_add(dx_frame_writer *w, uint64_t vaddr, int kind, const uint8_t *payload, size_t len)
{
    if (kind < DX_REC_ZERO || kind > DX_REC_FULL || len > DX_PAGE_SIZE) return -DX_E_ARG;
    uint8_t *dst = dx_fw_reserve(w, len);
    if (!dst) return -DX_E_NOMEM;
    if (len) memcpy(dst, payload, len);
    dx_fw_commit(w, vaddr, kind, len);
    return 0;
}

int dx_frame_header_parse(const uint8_t *buf, size_t len, size_t max_raw, dx_frame_header *h)
{
    if (len < DX_FRAME_HEADER_SIZE) return -DX_E_FRAME_TRUNCATED;
    if (memcmp(buf, DX_FRAME_MAGIC, 4) != 0) return -DX_E_FRAME_MAGIC;
    if ((uint32_t)dx_xxh3(buf, 28) != dx_load32(buf + 28)) return -DX_E_FRAME_HEADER_CHECK;
    if (buf[4] != DX_FRAME_VERSION) return -DX_E_FRAME_VERSION;
    if ((buf[5] & ~DX_FRAME_FLAG_LZ4) || dx_load16(buf + 6)) return -DX_E_FRAME_FLAGS;
    h->flags = buf[5];
    h->record_count = dx_load32(buf + 8);
    h->raw_len = dx_load32(buf + 12);
    h->stored_len = dx_load32(buf + 16);
    h->checksum = dx_load64(buf + 20);
    if (max_raw > DX_FRAME_MAX_RAW) max_raw = DX_FRAME_MAX_RAW;
    if (h->raw_len > max_raw) return -DX_E_FRAME_TOO_LARGE;
    if (!(h->flags & DX_FRAME_FLAG_LZ4) && h->stored_len != h->raw_len) return -DX_E_FRAME_FLAGS;
    if (len - DX_FRAME_HEADER_SIZE < h->stored_len) return -DX_E_FRAME_TRUNCATED;
    return 0;
}

int dx_records_validate(const uint8_t *raw, size_t len, uint32_t count)
{
    size_t p = 0;
    uint32_t n = 0;
    while (p < len) {
        if (len - p < DX_RECORD_HEADER_SIZE) return -DX_E_FRAME_RECORD;
        uint8_t kind = raw[p + 8];
        size_t plen = dx_load16(raw + p + 9);
        if (dx_load64(raw + p) & (DX_PAGE_SIZE - 1)) return -DX_E_FRAME_RECORD;
        if (!((kind == DX_REC_ZERO && plen == 0) || (kind == DX_REC_FULL && plen == DX_PAGE_SIZE) ||
              (kind == DX_REC_XOR && plen >= 1 && plen < DX_PAGE_SIZE)))
            return -DX_E_FRAME_RECORD;
        p += DX_RECORD_HEADER_SIZE;
        if (len - p < plen) return -DX_E_FRAME_RECORD;
        if (kind == DX_REC_XOR && dx_xor_validate(raw + p, plen)) return -DX_E_DELTA_CORRUPT;
        p += plen;
        n++;
    }
    return n == count ? 0 : -DX_E_FRAME_COUNT;
}

int dx_frame_decode(const uint8_t *buf, const dx_frame_header *h, uint8_t *raw)
{
    const uint8_t *payload = buf + DX_FRAME_HEADER_SIZE;
    if (h->flags & DX_FRAME_FLAG_LZ4) {
        if (h->stored_len > (uint32_t)LZ4_compressBound(DX_FRAME_MAX_RAW))
            return -DX_E_FRAME_DECOMPRESS;
        int n = LZ4_decompress_safe((const char *)payload, (char *)raw, (int)h->stored_len,
                                    (int)h->raw_len);
        if (n < 0 || (uint32_t)n != h->raw_len) return -DX_E_FRAME_DECOMPRESS;
    } else {
        memcpy(raw, payload, h->raw_len);
    }
    if (dx_xxh3(raw, h->raw_len) != h->checksum) return -DX_E_FRAME_CHECKSUM;
    return dx_records_validate(raw, h->raw_len, h->record_count);
}

int dx_apply_frames(const uint8_t *buf, size_t len, uint8_t *pages, const uint64_t *vaddrs,
                    size_t npages, size_t max_raw, uint64_t counts[3], size_t *err_offset,
                    uint64_t *err_vaddr)
{
    uint8_t *raw = NULL;
    size_t raw_cap = 0, off = 0;
    int rc = 0;
    while (off < len) {
        dx_frame_header h;
        *err_offset = off;
        if ((rc = dx_frame_header_parse(buf + off, len - off, max_raw, &h))) break;
        if (h.raw_len > raw_cap) {
            free(raw);
            raw_cap = h.raw_len;
            if (!(raw = malloc(raw_cap))) { rc = -DX_E_NOMEM; break; }
        }
        if ((rc = dx_frame_decode(buf + off, &h, raw))) break;
        /* every vaddr must be known before any page is touched */
        for (size_t p = 0; p < h.raw_len; p += DX_RECORD_HEADER_SIZE + dx_load16(raw + p + 9)) {
            if (dx_find_vaddr(vaddrs, npages, dx_load64(raw + p)) < 0) {
                *err_vaddr = dx_load64(raw + p);
                rc = -DX_E_UNKNOWN_VADDR;
                goto done;
            }
        }
        for (size_t p = 0; p < h.raw_len;) {
            uint64_t vaddr = dx_load64(raw + p);
            uint8_t kind = raw[p + 8];
            size_t plen = dx_load16(raw + p + 9);
            uint8_t *page = pages + (size_t)dx_find_vaddr(vaddrs, npages, vaddr) * DX_PAGE_SIZE;
            p += DX_RECORD_HEADER_SIZE;
            if (kind == DX_REC_ZERO) memset(page, 0, DX_PAGE_SIZE);
            else if (kind == DX_REC_FULL) memcpy(page, raw + p, DX_PAGE_SIZE);
            else dx_xor_decode(page, raw + p, plen);   /* validated above */
            counts[kind]++;
            p += plen;
        }
        off += DX_FRAME_HEADER_SIZE + h.stored_len;
    }
done:
    free(raw);
    return rc;
}
