"""The compiled kernels (deltaxfer._core), under the same names as deltaxfer.core.reference.

Tests run the same cases against both modules.
"""
from deltaxfer._core import (  # noqa: F401
    DEFAULT_FRAME_SIZE,
    DEFAULT_XOR_CACHE_BYTES,
    FRAME_HEADER_SIZE,
    FRAME_MAX_RAW,
    XOR_CACHE_WAYS,
    XOR_DEFAULT_CAP,
    XOR_MIN_GAP,
    ZERO_PAGE_HASH,
    FrameWriter,
    XorCache,
    apply_frames,
    changed_pages,
    compare_pages,
    decode_frame,
    encode_round,
    hash_pages,
    pagemap_runs,
    read_frame_header,
    read_process_memory,
    run_page_vaddrs,
    xor_decode,
    xor_decode_pages,
    xor_encode,
    xor_encode_pages,
)

NAME = "c"
