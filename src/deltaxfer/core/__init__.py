"""deltaxfer.core: the page core's Python API.

Kernels (compiled, GIL released, in deltaxfer._core; pure-Python references of each in
deltaxfer.core.reference):
  hash_pages(pages, prev_hashes=None) -> (hashes, zero, changed)
  changed_pages(old_hashes, new_hashes) -> indices
  xor_encode(old_page, new_page, cap=3072) -> bytes | None;  xor_decode(page, delta)
  xor_encode_pages / xor_decode_pages: the same over many page pairs
  FrameWriter, decode_frame, read_frame_header, apply_frames
  XorCache(capacity_bytes=64 MiB)
  compare_pages(old_pages, old_vaddrs, new_pages, new_vaddrs) -> dict
  read_process_memory(pid, run_vaddrs, run_lens, buf), pagemap_runs(fd, starts, ends)
Orchestration: pipeline.encode_round / apply_round, procmem.snapshot.
See docs/CORE.md for the formats and the policies.
"""
from .errors import DeltaError, FrameError
from .native import (
    DEFAULT_FRAME_SIZE,
    DEFAULT_XOR_CACHE_BYTES,
    XOR_DEFAULT_CAP,
    ZERO_PAGE_HASH,
    FrameWriter,
    XorCache,
    apply_frames,
    changed_pages,
    decode_frame,
    hash_pages,
    read_frame_header,
    read_process_memory,
    xor_decode,
    xor_encode,
)
from .pipeline import (EncodedRound, RoundState, RoundStats, apply_round, apply_to_dict,
                       compare_pages, encode_round, split_frames)
from .procmem import MemorySnapshot, Vma, present_runs, read_maps, snapshot

__all__ = [
    "DEFAULT_FRAME_SIZE", "DEFAULT_XOR_CACHE_BYTES", "XOR_DEFAULT_CAP", "ZERO_PAGE_HASH",
    "DeltaError", "EncodedRound", "FrameError", "FrameWriter", "MemorySnapshot", "RoundState",
    "RoundStats", "Vma", "XorCache", "apply_frames", "apply_round", "apply_to_dict",
    "changed_pages", "compare_pages", "decode_frame", "encode_round", "hash_pages",
    "present_runs", "read_frame_header", "read_maps", "read_process_memory", "snapshot",
    "split_frames", "xor_decode", "xor_encode",
]
