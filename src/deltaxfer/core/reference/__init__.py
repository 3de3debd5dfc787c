"""Pure-Python references of the page core's kernels, under the same names as
deltaxfer.core.native.  They are small and slow on purpose: they state each format and
policy plainly, and the tests check that the compiled core agrees with them bit for bit.

XXH3 itself is not restated: the reference hashes a page with deltaxfer._core.xxh3_64,
the system libxxhash; what it restates is everything around it.

Beyond the names below (the kernels' API, tests/core_cases.py runs both modules): the
destination's PageApplier (apply.py), the store's bookkeeping (store.py:
merge_parent_hashes, layout_diff, pagemap_layout, Xxh3Stream), the pagemap codec
(images.py: pagemap_entries_fast, pagemap_encode_fast) and tracking's clean_mask and
page readers (track.py); tests/test_reference_parity.py and the kernel tests compare
each with the compiled one. Not restated: the thin system-call wrappers of tracking
(uffd_create, uffd_api, uffd_register_wp, uffd_writeprotect, uffd_unregister,
scan_written = PAGEMAP_SCAN, pagemap_scan_probe, protect_unclean, inject_userfaultfd),
whose behaviour is the kernel's and which tests/test_tracking.py checks on live
processes; lib_versions and memcpy_bench (a diagnostic and a benchmark helper; src/ uses neither).
"""
from .cache import DEFAULT_XOR_CACHE_BYTES, XOR_CACHE_WAYS, XorCache
from .delta import XOR_DEFAULT_CAP, XOR_MIN_GAP, xor_decode, xor_decode_pages, xor_encode, xor_encode_pages
from .frame import (DEFAULT_FRAME_SIZE, FRAME_HEADER_SIZE, FRAME_MAX_RAW, FrameWriter,
                    apply_frames, decode_frame, read_frame_header)
from .hash import ZERO_PAGE_HASH, changed_pages, hash_pages
from .pipeline import compare_pages, encode_round
from .procmem import pagemap_runs, read_process_memory, run_page_vaddrs

NAME = "python"

__all__ = [
    "DEFAULT_FRAME_SIZE", "DEFAULT_XOR_CACHE_BYTES", "FRAME_HEADER_SIZE", "FRAME_MAX_RAW",
    "XOR_CACHE_WAYS", "XOR_DEFAULT_CAP", "XOR_MIN_GAP", "ZERO_PAGE_HASH", "FrameWriter",
    "XorCache", "apply_frames", "changed_pages", "compare_pages", "decode_frame",
    "encode_round", "hash_pages", "pagemap_runs", "read_frame_header", "read_process_memory",
    "run_page_vaddrs", "xor_decode", "xor_decode_pages", "xor_encode", "xor_encode_pages",
]
