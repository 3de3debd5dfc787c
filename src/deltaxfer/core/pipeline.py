"""A pre-copy round: Python decides what to scan and where frames go; the compiled core
does every per-page step (hash, compare, zero/xor/full, delta, pack, lz4) in one pass
with the GIL released, so shards of memory can be encoded on several threads.

Shards: an XorCache is not shared between threads; give each shard (e.g. a vaddr range)
its own cache and its own RoundState.
"""
from __future__ import annotations

from array import array
from dataclasses import dataclass, fields

from . import native

PAGE_SIZE = 4096


@dataclass(frozen=True)
class RoundState:
    """What the destination holds after a round: its pages' vaddrs and hashes (ascending)."""
    vaddrs: array
    hashes: array

    @classmethod
    def of(cls, pages, vaddrs, impl=native) -> "RoundState":
        """The state of a page set the destination already holds (e.g. an old dump)."""
        hashes, _, _ = impl.hash_pages(pages)
        return cls(array("Q", memoryview(vaddrs).cast("B").cast("Q")), hashes)


@dataclass(frozen=True)
class RoundStats:
    scanned: int          # pages hashed this round
    zero: int             # all-zero pages among them
    unchanged: int        # same hash as the destination's copy: not sent
    changed: int          # destination holds a different version
    added: int            # destination holds no version
    removed: int          # destination holds pages no longer present
    sent_zero: int
    sent_xor: int
    sent_full: int
    xor_too_big: int      # xor delta over the cap: sent full instead
    xor_bytes: int        # payload bytes of the xor records
    frames: int
    records: int
    raw_bytes: int        # record bytes before lz4
    stored_bytes: int     # frame bytes on the wire (headers included)
    skipped: int = 0      # clean pages (tracking): unchanged without being read or hashed

    @property
    def sent(self) -> int:
        return self.sent_zero + self.sent_xor + self.sent_full


@dataclass(frozen=True)
class EncodedRound:
    frames: bytes         # frames back to back; each is self-delimiting (see split_frames)
    state: RoundState     # pass as prev to the next round
    stats: RoundStats


def encode_round(pages, vaddrs, prev: RoundState | None = None, *, base_pages=None,
                 cache=None, xor: bool = True, xor_cap: int = native.XOR_DEFAULT_CAP,
                 frame_size: int = native.DEFAULT_FRAME_SIZE, compress: bool = True,
                 clean=None, impl=native) -> EncodedRound:
    """Encode the pages that changed since prev.

    pages: C-contiguous buffer of whole pages (never copied); vaddrs: uint64 buffer,
    strictly ascending, one per page.  prev: what the destination holds (None: nothing).
    XOR base of a changed page: base_pages[j] when given (aligned with prev.vaddrs, e.g.
    the old dump's pages), else the cache's copy.  xor=False sends changed pages whole
    (to measure what deltas save).  The cache, when given, learns every page sent.
    clean: one byte per page, nonzero where the page is known unchanged since the
    destination's version (written-page tracking): it must be held, its bytes are not
    read (they need not be valid) and its hash is the held one.
    """
    pv = ph = None
    if prev is not None:
        pv, ph = prev.vaddrs, prev.hashes
    frames, hashes, st = impl.encode_round(pages, vaddrs, pv, ph, base_pages, cache, xor,
                                           xor_cap, frame_size, compress, clean)
    new_vaddrs = array("Q", memoryview(vaddrs).cast("B").cast("Q"))
    known = {f.name for f in fields(RoundStats)}
    return EncodedRound(frames, RoundState(new_vaddrs, hashes),
                        RoundStats(**{k: v for k, v in st.items() if k in known}))


def apply_round(frames, pages, vaddrs, impl=native) -> dict:
    """Apply a round's frames to a destination page buffer (pages[i] holds vaddrs[i])."""
    return impl.apply_frames(frames, pages, vaddrs)


def split_payloads(frames, prefix: int = 4) -> list[memoryview]:
    """The payloads of encode_round(..., pages_index=i) output, one memoryview each:
    ``prefix`` bytes (the u32 image index of a PAGES payload) then one frame (its header
    checked)."""
    mv, out, off = memoryview(frames).cast("B"), [], 0
    while off < len(mv):
        n = prefix + native.read_frame_header(mv[off + prefix:])["frame_len"]
        out.append(mv[off:off + n])
        off += n
    return out


def split_frames(frames) -> list[memoryview]:
    """The frames of a round, one memoryview each (headers are checked)."""
    return split_payloads(frames, prefix=0)


def apply_to_dict(frames, store: dict, impl=native) -> int:
    """Apply frames to a {vaddr: bytearray page} store; returns the records applied.

    Slow path (a Python step per record) for tests and small stores; a zero or full
    record creates the page, an xor record needs the page already present.
    """
    from .errors import FrameError

    mv, off, n = memoryview(frames).cast("B"), 0, 0
    while off < len(mv):
        records, size = impl.decode_frame(mv[off:])
        for vaddr, kind, payload in records:
            if kind == 0:
                store[vaddr] = bytearray(PAGE_SIZE)
            elif kind == 2:
                store[vaddr] = bytearray(payload)
            elif vaddr not in store:
                raise FrameError(f"frame at byte {off}: xor record for vaddr {vaddr:#x}, "
                                 f"which the destination does not hold")
            else:
                impl.xor_decode(store[vaddr], payload)
            n += 1
        off += size
    return n


def compare_pages(old_pages, old_vaddrs, new_pages, new_vaddrs, impl=native) -> dict:
    """Compare two dumps of a process page by page (merge-join on vaddr, in C).

    Returns counts: added, removed, changed, unchanged, zero (all-zero pages in new),
    bytes_differing (summed over changed pages).
    """
    return impl.compare_pages(old_pages, old_vaddrs, new_pages, new_vaddrs)
