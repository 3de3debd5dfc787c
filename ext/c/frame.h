/* Page records batched into lz4-compressed frames.
 *
 * Frame = 32-byte header + stored payload (little-endian):
 *   0  magic "DXPF"          8  record_count u32      20 payload_xxh3 u64 (of the raw payload)
 *   4  version u8 (=1)       12 raw_len u32           28 header_check u32 (low 32 bits of
 *   5  flags u8 (bit0: lz4)  16 stored_len u32           XXH3 of header bytes 0..27)
 *   6  reserved u16 (=0)
 * Raw payload = records: vaddr u64 | kind u8 | payload_len u16 | payload
 *   kind 0 zero page (len 0), 1 xor delta (len 1..4095), 2 full page (len 4096).
 * A frame whose lz4 form is not smaller than its raw payload is stored raw (flags 0).
 */
#ifndef DX_FRAME_H
#define DX_FRAME_H

#include "dx_common.h"

#define DX_FRAME_MAGIC "DXPF"
#define DX_FRAME_VERSION 1
#define DX_FRAME_HEADER_SIZE 32
#define DX_FRAME_FLAG_LZ4 0x01u
#define DX_FRAME_DEFAULT_SIZE (256u * 1024u)
#define DX_FRAME_MAX_RAW (16u * 1024u * 1024u)   /* decoders never allocate more */
#define DX_RECORD_HEADER_SIZE 11
#define DX_RECORD_MAX (DX_RECORD_HEADER_SIZE + DX_PAGE_SIZE)

enum dx_record_kind { DX_REC_ZERO = 0, DX_REC_XOR = 1, DX_REC_FULL = 2 };

typedef struct {
    uint8_t flags;
    uint32_t record_count, raw_len, stored_len;
    uint64_t checksum;
} dx_frame_header;

typedef struct {
    uint8_t *raw;            /* staging area for the frame being filled */
    size_t raw_cap, raw_len;
    uint32_t nrecords;
    int compress;
    uint8_t *out;            /* finished frames, back to back */
    size_t out_len, out_cap;
    /* >= 0: each frame in out is preceded by this value as a little-endian u32 (the image
     * index that starts a PAGES payload), so a payload goes out without a copy */
    int64_t prefix_index;
    uint64_t frames, records, raw_bytes, stored_bytes;
    int own_raw, own_out;    /* allocated here (else the caller's: never resized or freed) */
} dx_frame_writer;

int dx_fw_init(dx_frame_writer *w, size_t frame_size, int compress);
/* As dx_fw_init, with the caller's staging area (frame_size bytes) and output (out_cap
 * bytes), either NULL to have it allocated here.  An output of the caller's is never
 * grown: a frame that would not fit fails with -DX_E_NOMEM, which an output of
 * dx_fw_output_bound bytes never does.  Two encoder threads keep one area each for both
 * (source.FRAME_AREA_BUDGET), so a window's records and frames are written into memory
 * already resident, not into buffers allocated (fresh) and grown (copied) per window. */
int dx_fw_init_with(dx_frame_writer *w, size_t frame_size, int compress, uint8_t *raw,
                    uint8_t *out, size_t out_cap);
/* The most output bytes nrecords records of at most DX_RECORD_MAX raw bytes each can
 * make in frames of frame_size raw bytes (prefix: each frame led by a u32 index). */
size_t dx_fw_output_bound(size_t nrecords, size_t frame_size, int prefix);
void dx_fw_free(dx_frame_writer *w);
/* Append one record, flushing the current frame first when it would not fit. */
int dx_fw_add(dx_frame_writer *w, uint64_t vaddr, int kind, const uint8_t *payload, size_t len);
/* Reserve room for a record whose payload the caller writes in place (at most max_len
 * bytes); commit it with dx_fw_commit.  Saves a copy for xor deltas and full pages. */
uint8_t *dx_fw_reserve(dx_frame_writer *w, size_t max_len);
void dx_fw_commit(dx_frame_writer *w, uint64_t vaddr, int kind, size_t len);
int dx_fw_flush(dx_frame_writer *w);

/* Parse and check a header at buf[0..len).  max_raw caps raw_len (<= DX_FRAME_MAX_RAW). */
int dx_frame_header_parse(const uint8_t *buf, size_t len, size_t max_raw, dx_frame_header *h);
/* Decode the frame at buf (header already parsed into h) into raw[0..h->raw_len) and
 * verify the checksum and the record structure. */
int dx_frame_decode(const uint8_t *buf, const dx_frame_header *h, uint8_t *raw);
/* Check that raw[0..len) holds exactly count well-formed records. */
int dx_records_validate(const uint8_t *raw, size_t len, uint32_t count);

/* Apply every frame in buf[0..len) to a page store: pages[i] holds vaddrs[i] (strictly
 * ascending).  Each frame is checked whole before any of its records touch a page.
 * Per-kind counters go to counts[3]; on error *err_offset is the failing frame's offset. */
int dx_apply_frames(const uint8_t *buf, size_t len, uint8_t *pages, const uint64_t *vaddrs,
                    size_t npages, size_t max_raw, uint64_t counts[3], size_t *err_offset,
                    uint64_t *err_vaddr);

#endif
