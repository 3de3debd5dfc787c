#include "dx_common.h"

const char *dx_strerror(int code)
{
    if (code < 0) code = -code;
    switch (code) {
    case DX_OK: return "no error";
    case DX_E_NOMEM: return "out of memory";
    case DX_E_ARG: return "invalid argument";
    case DX_E_UNSORTED: return "vaddrs are not strictly ascending";
    case DX_E_UNALIGNED: return "vaddr is not page aligned";
    case DX_E_CLEAN_NOT_HELD: return "a page marked clean is not held by the destination";
    case DX_E_FRAME_TRUNCATED: return "frame truncated";
    case DX_E_FRAME_MAGIC: return "bad frame magic (not a deltaxfer frame)";
    case DX_E_FRAME_VERSION: return "unsupported frame version";
    case DX_E_FRAME_HEADER_CHECK: return "frame header checksum mismatch (header corrupt)";
    case DX_E_FRAME_FLAGS: return "unknown frame flags";
    case DX_E_FRAME_TOO_LARGE: return "frame raw length exceeds the limit";
    case DX_E_FRAME_DECOMPRESS: return "lz4 payload does not decompress to the stated raw length";
    case DX_E_FRAME_CHECKSUM: return "frame payload checksum mismatch (payload corrupt)";
    case DX_E_FRAME_RECORD: return "malformed page record";
    case DX_E_FRAME_COUNT: return "record count does not match the frame payload";
    case DX_E_DELTA_CORRUPT: return "xor delta is malformed (runs past the page end or bad varint)";
    case DX_E_UNKNOWN_VADDR: return "record for a vaddr the destination does not hold";
    default: return "unknown error";
    }
}

int dx_check_vaddrs(const uint64_t *vaddrs, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (vaddrs[i] & (DX_PAGE_SIZE - 1)) return -DX_E_UNALIGNED;
        if (i && vaddrs[i] <= vaddrs[i - 1]) return -DX_E_UNSORTED;
    }
    return 0;
}
