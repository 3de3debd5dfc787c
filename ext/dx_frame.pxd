# Index of ext/c/frame.h: page records packed into checksummed, lz4-compressed frames.
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t

cdef extern from "frame.h" nogil:
    enum: DX_FRAME_VERSION
    enum: DX_FRAME_HEADER_SIZE
    enum: DX_FRAME_FLAG_LZ4
    enum: DX_FRAME_DEFAULT_SIZE
    enum: DX_FRAME_MAX_RAW
    enum: DX_RECORD_HEADER_SIZE
    enum: DX_RECORD_MAX
    enum: DX_REC_ZERO
    enum: DX_REC_XOR
    enum: DX_REC_FULL

    ctypedef struct dx_frame_header:
        uint8_t flags
        uint32_t record_count, raw_len, stored_len
        uint64_t checksum

    ctypedef struct dx_frame_writer:
        uint8_t *out
        size_t out_len
        size_t raw_cap
        uint64_t frames, records, raw_bytes, stored_bytes
        int64_t prefix_index

    int dx_fw_init(dx_frame_writer *w, size_t frame_size, int compress)
    int dx_fw_init_with(dx_frame_writer *w, size_t frame_size, int compress, uint8_t *raw,
                        uint8_t *out, size_t out_cap)
    size_t dx_fw_output_bound(size_t nrecords, size_t frame_size, int prefix)
    void dx_fw_free(dx_frame_writer *w)
    int dx_fw_add(dx_frame_writer *w, uint64_t vaddr, int kind, const uint8_t *payload, size_t len)
    int dx_fw_flush(dx_frame_writer *w)
    int dx_frame_header_parse(const uint8_t *buf, size_t len, size_t max_raw, dx_frame_header *h)
    int dx_frame_decode(const uint8_t *buf, const dx_frame_header *h, uint8_t *raw)
    int dx_apply_frames(const uint8_t *buf, size_t len, uint8_t *pages, const uint64_t *vaddrs,
                        size_t npages, size_t max_raw, uint64_t counts[3], size_t *err_offset,
                        uint64_t *err_vaddr)
