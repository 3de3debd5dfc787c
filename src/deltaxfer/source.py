"""The source side of a transfer: memory images of a dump or of a live (or frozen)
process, encoded against what the destination holds, streamed to the link.

An image is encoded in windows of pages (``WINDOW_PAGES``) on ``EncoderPool.threads``
threads: each fills its window into a per-thread buffer (process_vm_readv of the process,
or a slice of the dump's mmapped pages file without a copy) and encodes it (hash,
compare with the held hash, zero / XOR delta / full, frames, lz4; the core releases the
GIL). The event loop sends the windows' frames strictly in window order as each is ready,
with at most ``EncoderPool.inflight`` windows submitted ahead, so reading, encoding and
sending overlap and the memory used is O(threads x window), not O(process).
"""
from __future__ import annotations

import mmap
import os
import socket
import threading
import time
from array import array
from bisect import bisect_left
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from deltaxfer import PAGE_SIZE, _core
from deltaxfer.criu import images as im
from deltaxfer.criu.dumpdir import DumpDir
from deltaxfer.criu.images import image_id_of

# 2048 pages = 8 MiB per window: per-call overhead (Python, frame flush, a future) is
# small against ~3 ms of encoding, and 2 x threads windows in flight stay a few tens of MiB
WINDOW_PAGES = 2048
# ... but the threads' windows together stay within this (the buffers are resident once
# used, and 2 x threads windows of frames are in flight): with 16 threads, 1024-page
# windows; at least 256 pages
WINDOW_BUDGET = 64 << 20
# A window holds WINDOW_PAGES pages to read, at most, and spans up to SPARSE_SPAN times
# that where written-page tracking marked most of a range clean: a round that reads a
# few hundred pages scattered over GiBs then costs a few windows, not one per 8 MiB of
# memory (~0.15 ms of Python and thread hand-off each: 0.06-0.1 s per 4 GiB, inside the
# freeze for the final round). The window buffer is that span of virtual memory; only
# the pages read into it become resident, and a sparse window's are dropped after it.
SPARSE_SPAN = 32
# Each encoder thread may keep a frame area (a frame's staging, then room for a whole
# window's frames), resident once used: kept while all the threads' areas fit in this
# (2 threads of 2048-page windows: 25 MiB); beyond it each window allocates its own, as
# before, so that many threads do not keep threads x ~8 MiB for good. 1 GiB over
# 1 Gbit/s on 2 threads: source CPU 3-7 % lower with the areas, peak RSS the same.
FRAME_AREA_BUDGET = 32 << 20
# raw bytes of records per PAGES frame: every frame costs a message, a header check and a
# hand-off to the receiver's apply thread in Python on both sides, so fewer, larger frames
# (the protocol allows 16 MiB) cost less. 4 MiB (two frames per window; ~1.8 MB on the
# wire after lz4 for memwork): against 1 MiB, the destination's CPU for a 1 GiB migration
# at 1 Gbit/s went from 1.83-2.03 to 1.49-1.89 s (4 one-off runs each, with RECV_LOWAT;
# medians 1.85 and 1.58), the same total time and downtime; 8 MiB frames did no better
# and took ~20 MiB more of `migrate`'s RSS.
FRAME_SIZE = int(os.environ.get("DELTAXFER_FRAME_SIZE", 4 << 20))
ENCODER_THREADS_ENV = "DELTAXFER_ENCODER_THREADS"
WINDOW_PAGES_ENV = "DELTAXFER_WINDOW_PAGES"
_STAT_KEYS = ("scanned", "zero", "unchanged", "changed", "added", "sent_zero", "sent_xor",
              "sent_full", "raw_bytes", "stored_bytes", "frames", "skipped")


@dataclass
class SourceImage:
    """One memory image to send: its vaddrs (one per page, ascending), its PAGEMAP
    (``pagemap``, or ``pairs``: (vaddr, nr_pages | flags << 32) as PAGEMAP carries it —
    live rounds build only that), and its pages: either ``pages``, all of them in one
    buffer (a dump's mmapped pages file), or ``reader``, a callable(lo, hi, buf) that
    fills pages [lo, hi) into buf (a writable buffer of at least (hi - lo) pages) and
    returns a view of exactly those pages (called on encoder threads, concurrently for
    disjoint windows). ``clean`` (one byte per page, optional): pages known unchanged
    since the destination's copy (written-page tracking); readers leave them unread."""
    image_id: str
    pagemap: im.Pagemap | None
    pages: memoryview | None
    vaddrs: array
    clean: bytearray | None = None
    pairs: array | None = None
    reader: object = None

    def window(self, lo: int, hi: int, buf) -> memoryview:
        if self.reader is not None:
            return self.reader(lo, hi, buf)
        return self.pages[lo * PAGE_SIZE:hi * PAGE_SIZE]

    def close(self) -> None:
        close = getattr(self.reader, "close", None)
        if close is not None:
            close()


@dataclass
class Held:
    """What the destination holds of one image (from STATE/HELD), and optionally a local
    base whose pages equal those held, for XOR deltas."""
    vaddrs: array
    hashes: array
    base: memoryview | None = None


@dataclass
class SentRound:
    """What one round sent (send_round): its timing, and the core's counts summed over
    its windows (core.pipeline.RoundStats is one encode's counts)."""
    images: int = 0
    pages: int = 0
    removed: int = 0
    seconds: float = 0.0
    send_seconds: float = 0.0   # until the last byte of the round was handed to the link
    wire_bytes: int = 0   # bytes the destination had received when it confirmed
    # summed over the encoder threads (they overlap each other and the sending): filling
    # windows (reading process memory) and encoding them
    read_seconds: float = 0.0
    encode_seconds: float = 0.0
    # where the sending loop waited: for the next window's encode (the source's threads
    # are the bound), and in send (the link or the destination is)
    encode_wait_seconds: float = 0.0
    send_wait_seconds: float = 0.0
    windows: int = 0
    counts: dict = field(default_factory=lambda: dict.fromkeys(_STAT_KEYS, 0))

    def add(self, st: dict) -> None:
        for k in _STAT_KEYS:
            self.counts[k] += st.get(k, 0)

    def as_dict(self) -> dict:
        return {"images": self.images, "pages": self.pages, "removed": self.removed,
                "seconds": round(self.seconds, 6), "windows": self.windows,
                "read_thread_seconds": round(self.read_seconds, 6),
                "encode_thread_seconds": round(self.encode_seconds, 6),
                "encode_wait_seconds": round(self.encode_wait_seconds, 6),
                "send_wait_seconds": round(self.send_wait_seconds, 6), **self.counts}


def dump_images(dump: DumpDir) -> tuple[list[SourceImage], list, list[str]]:
    """The memory images of a dump (opened MemoryImages to close later) and the names of
    every other file, which travel verbatim."""
    images, opened = [], []
    for name in sorted(os.listdir(dump.path)):
        image_id = image_id_of(name)
        if image_id:
            mem = im.MemoryImage(os.path.join(dump.path, name))
            opened.append(mem)
            images.append(SourceImage(image_id, mem.pagemap, mem.pages, mem.vaddrs()))
    return images, opened, dump.verbatim_files()


def base_for(held: Held, base_image: im.MemoryImage | None) -> memoryview | None:
    """A local copy of the pages the destination holds, if ``base_image`` is exactly that
    (same vaddrs, same content hashes); XOR deltas against anything else would be wrong."""
    if base_image is None or base_image.vaddrs() != held.vaddrs:
        return None
    hashes, _, _ = _core.hash_pages(base_image.pages)
    return base_image.pages if hashes == held.hashes else None


def clean_window(img: SourceImage, held: Held | None, lo: int, hi: int, *,
                 aligned: bool = False):
    """The result of encode_window for a window whose every page is clean (written-page
    tracking: held by the destination and not written since), without reading or encoding
    anything: the held hashes of exactly those vaddrs, no frame. None when the window is
    not wholly clean or the held pages of its range are not exactly its pages. Inside the
    freeze most windows are clean: this keeps the final round O(written pages).
    ``aligned``: the held vaddrs are the image's (compared once per image by the
    caller), so no window needs its own search and comparison."""
    if img.clean is None or held is None or hi <= lo or img.clean.find(0, lo, hi) >= 0:
        return None
    if aligned:       # the caller found held.vaddrs == img.vaddrs: the same indexes
        plo, phi = lo, hi
    else:
        n = len(img.vaddrs)
        plo = bisect_left(held.vaddrs, img.vaddrs[lo]) if lo else 0
        phi = bisect_left(held.vaddrs, img.vaddrs[hi]) if hi < n else len(held.vaddrs)
        if phi - plo != hi - lo or held.vaddrs[plo:phi] != img.vaddrs[lo:hi]:
            return None
    k = hi - lo
    stats = dict.fromkeys(_STAT_KEYS, 0)
    stats.update(scanned=k, unchanged=k, skipped=k)
    return b"", held.hashes[plo:phi], stats, 0.0, 0.0


def encode_window(img: SourceImage, held: Held | None, lo: int, hi: int, buf, *, xor: bool,
                  compress: bool, cache=None, pages_index: int = -1, scratch=None):
    """Fill pages [lo, hi) of ``img`` into ``buf`` (or take a view of them) and encode
    them against the held pages of that vaddr range (called on an encoder thread; the
    core releases the GIL). Returns (frames, hashes, stats, read seconds, encode seconds);
    with ``pages_index`` (the image's index in the round) each frame comes as a whole
    PAGES payload, that index first (core.pipeline.split_payloads); ``scratch`` (at
    least FRAME_SIZE bytes, the thread's own) stages the frames.
    The windows of one image partition the held pages too: the first takes those below
    its range, the last those above, so 'removed' counts each held page once."""
    t0 = time.perf_counter()
    pages = img.window(lo, hi, buf)
    t1 = time.perf_counter()
    n = len(img.vaddrs)
    kwargs = {}
    if held is not None and len(held.vaddrs):
        plo = bisect_left(held.vaddrs, img.vaddrs[lo]) if lo else 0
        phi = bisect_left(held.vaddrs, img.vaddrs[hi]) if hi < n else len(held.vaddrs)
        kwargs = dict(prev_vaddrs=held.vaddrs[plo:phi], prev_hashes=held.hashes[plo:phi])
        if held.base is not None and xor:
            kwargs["base_pages"] = held.base[plo * PAGE_SIZE:phi * PAGE_SIZE]
    if img.clean is not None:
        kwargs["clean"] = memoryview(img.clean)[lo:hi]
    frames, hashes, stats = _core.encode_round(pages, img.vaddrs[lo:hi], xor=xor,
                                               compress=compress, cache=cache,
                                               frame_size=FRAME_SIZE, next_round=False,
                                               pages_index=pages_index, scratch=scratch,
                                               **kwargs)
    return frames, hashes, stats, t1 - t0, time.perf_counter() - t1


def hostname_source(image_dir: str) -> str:
    return f"{socket.gethostname()}:{os.path.abspath(image_dir)}"


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    if not v:
        return None
    try:
        n = int(v)
    except ValueError:
        raise ValueError(f"${name}={v!r}: expected a positive integer") from None
    if n < 1:
        raise ValueError(f"${name}={v!r}: expected a positive integer")
    return n


class EncoderPool:
    """The encoder threads of a transfer and their window buffers.

    threads: how many windows are filled and encoded at once (default:
    $DELTAXFER_ENCODER_THREADS, else os.cpu_count()); window_pages: pages per window
    (default: $DELTAXFER_WINDOW_PAGES, else WINDOW_PAGES, smaller with more threads than
    WINDOW_BUDGET holds at that size); inflight: windows submitted ahead of the one
    being sent (2 x threads; threads + 4 above 4 threads). Each thread keeps its window
    buffer for the life of the EncoderPool: an agent keeps one across its rounds, so the
    final round (inside the freeze) touches no fresh memory."""

    def __init__(self, threads: int | None = None, window_pages: int | None = None):
        self.threads = threads or _env_int(ENCODER_THREADS_ENV) or os.cpu_count() or 1
        self.window_pages = window_pages or _env_int(WINDOW_PAGES_ENV) or max(
            256, min(WINDOW_PAGES, WINDOW_BUDGET // (self.threads * PAGE_SIZE)))
        # windows ahead of the one being sent: one per thread and a few to send from.
        # 16 threads here (DELTAXFER_ENCODER_THREADS) at 2 GiB: `migrate` peaked at 508
        # MiB with 2 x threads and 2048-page windows, 313 with the window budget, 263-269
        # with threads + 4 as well (first round ~1 GB/s in each: 2 cores)
        self.inflight = 2 * self.threads if self.threads <= 4 else self.threads + 4
        self.area_bytes = FRAME_SIZE + _core.frames_output_bound(self.window_pages, FRAME_SIZE,
                                                                 True)
        self.keep_areas = self.threads * self.area_bytes <= FRAME_AREA_BUDGET
        self.pool = ThreadPoolExecutor(max_workers=self.threads,
                                       thread_name_prefix="deltaxfer-encode")
        self._local = threading.local()

    @property
    def span_pages(self) -> int:
        """The most pages one window may span (see SPARSE_SPAN)."""
        return self.window_pages * SPARSE_SPAN

    def buffer(self) -> mmap.mmap:
        """This thread's window buffer (mapped on its first window, then reused): private
        anonymous memory of span_pages pages, resident only where pages were read."""
        buf = getattr(self._local, "buf", None)
        if buf is None:
            buf = self._local.buf = mmap.mmap(-1, self.span_pages * PAGE_SIZE,
                                              flags=mmap.MAP_PRIVATE)
        return buf

    def scratch(self) -> mmap.mmap | None:
        """This thread's frame area (mapped on its first window, then reused like the
        buffer; None beyond FRAME_AREA_BUDGET): FRAME_SIZE bytes where a frame's records
        are staged for lz4, then room for a whole window's frames, so neither is fresh
        memory nor grown by copying."""
        if not self.keep_areas:
            return None
        s = getattr(self._local, "scratch", None)
        if s is None:
            s = self._local.scratch = mmap.mmap(-1, self.area_bytes, flags=mmap.MAP_PRIVATE)
        return s

    def encode(self, img: SourceImage, held: Held | None, lo: int, hi: int, *, xor: bool,
               compress: bool, cache=None, pages_index: int = -1):
        """encode_window into this thread's buffer (run on the pool)."""
        buf = self.buffer()
        try:
            return encode_window(img, held, lo, hi, buf, xor=xor, compress=compress,
                                 cache=cache, pages_index=pages_index,
                                 scratch=self.scratch())
        finally:
            if hi - lo > self.window_pages:
                # a sparse window touched pages beyond the dense part: give them back, so
                # the buffer stays at one dense window resident
                dense = self.window_pages * PAGE_SIZE
                buf.madvise(mmap.MADV_DONTNEED, dense, len(buf) - dense)

    def close(self):
        self.pool.shutdown(wait=True)


def now() -> float:
    return time.monotonic()
