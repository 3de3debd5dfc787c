"""The source side of a transfer: memory images of a dump (or, later, of a live process)
encoded against what the destination holds, pipelined with sending.

Per memory image the core encodes slices of pages (hash, compare with the held hash,
zero / XOR delta / full, frames, lz4) in a worker thread with the GIL released while the
event loop sends the previous slice's frames, so the link stays busy.
"""
from __future__ import annotations

import asyncio
import os
import socket
import time
from array import array
from bisect import bisect_left
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from deltaxfer import PAGE_SIZE, _core
from deltaxfer.criu import images as im
from deltaxfer.criu.dumpdir import DumpDir
from deltaxfer.store import image_id_of

SLICE_PAGES = 16384          # 64 MiB of pages per encode call: bounded memory, pipelined
_STAT_KEYS = ("scanned", "zero", "unchanged", "changed", "added", "sent_zero", "sent_xor",
              "sent_full", "raw_bytes", "stored_bytes", "frames", "skipped")


@dataclass
class SourceImage:
    """One memory image to send: its pagemap, its pages (one buffer) and their vaddrs.
    ``clean`` (one byte per page, optional): pages known unchanged since the destination's
    copy (written-page tracking); their bytes in ``pages`` were not read. ``pairs``
    (optional): the pagemap as PAGEMAP carries it, (vaddr, nr_pages | flags << 32) —
    live rounds build only that."""
    image_id: str
    pagemap: im.Pagemap | None
    pages: memoryview
    vaddrs: array
    clean: bytearray | None = None
    pairs: array | None = None


@dataclass
class Held:
    """What the destination holds of one image (from STATE/HELD), and optionally a local
    base whose pages equal those held, for XOR deltas."""
    vaddrs: array
    hashes: array
    base: memoryview | None = None


@dataclass
class RoundStats:
    images: int = 0
    pages: int = 0
    removed: int = 0
    seconds: float = 0.0
    send_seconds: float = 0.0   # until the last byte of the round was handed to the link
    wire_bytes: int = 0   # bytes the destination had received when it confirmed
    counts: dict = field(default_factory=lambda: dict.fromkeys(_STAT_KEYS, 0))

    def add(self, st: dict) -> None:
        for k in _STAT_KEYS:
            self.counts[k] += st.get(k, 0)

    def as_dict(self) -> dict:
        return {"images": self.images, "pages": self.pages, "removed": self.removed,
                "seconds": round(self.seconds, 6), **self.counts}


def dump_images(dump: DumpDir) -> tuple[list[SourceImage], list, list[str]]:
    """The memory images of a dump (opened MemoryImages to close later) and the names of
    every other file, which travel verbatim."""
    images, opened, files = [], [], []
    for name in sorted(os.listdir(dump.path)):
        path = os.path.join(dump.path, name)
        image_id = image_id_of(name)
        if image_id:
            mem = im.MemoryImage(path)
            opened.append(mem)
            images.append(SourceImage(image_id, mem.pagemap, mem.pages, mem.vaddrs()))
        elif not im.PAGES_RE.match(name) and os.path.isfile(path) and not os.path.islink(path) \
                and not name.endswith(".log"):
            files.append(name)
    return images, opened, files


def base_for(held: Held, base_image: im.MemoryImage | None) -> memoryview | None:
    """A local copy of the pages the destination holds, if ``base_image`` is exactly that
    (same vaddrs, same content hashes); XOR deltas against anything else would be wrong."""
    if base_image is None or base_image.vaddrs() != held.vaddrs:
        return None
    hashes, _, _ = _core.hash_pages(base_image.pages)
    return base_image.pages if hashes == held.hashes else None


def encode_slices(img: SourceImage, held: Held | None, *, xor: bool, compress: bool,
                  cache=None, slice_pages: int = SLICE_PAGES):
    """Yield (frames, hashes, stats) for consecutive slices of ``img`` (called in a worker
    thread; every call into the core releases the GIL)."""
    n = len(img.vaddrs)
    for lo in range(0, max(n, 1), slice_pages):
        hi = min(lo + slice_pages, n)
        vaddrs = img.vaddrs[lo:hi]
        kwargs = {}
        if held is not None and len(held.vaddrs):
            # the held pages whose vaddrs fall in this slice's range
            first = img.vaddrs[lo] if lo < n else 0
            last = img.vaddrs[hi] if hi < n else 1 << 64
            plo = bisect_left(held.vaddrs, first) if lo else 0
            phi = bisect_left(held.vaddrs, last) if hi < n else len(held.vaddrs)
            kwargs = dict(prev_vaddrs=held.vaddrs[plo:phi], prev_hashes=held.hashes[plo:phi])
            if held.base is not None and xor:
                kwargs["base_pages"] = held.base[plo * PAGE_SIZE:phi * PAGE_SIZE]
        if img.clean is not None:
            kwargs["clean"] = memoryview(img.clean)[lo:hi]
        frames, hashes, stats = _core.encode_round(
            img.pages[lo * PAGE_SIZE:hi * PAGE_SIZE], vaddrs, xor=xor, compress=compress,
            cache=cache, **kwargs)
        yield frames, hashes, stats


def split_frames(frames: bytes):
    """The core's output is frames back to back; the wire carries one per PAGES message."""
    view = memoryview(frames)
    pos = 0
    while pos < len(view):
        size = _core.read_frame_header(view[pos:])["frame_len"]
        yield view[pos:pos + size]
        pos += size


def hostname_source(image_dir: str) -> str:
    return f"{socket.gethostname()}:{os.path.abspath(image_dir)}"


class Pipeline:
    """Run blocking core work in one worker thread (the event loop keeps the link full)."""

    def __init__(self):
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="deltaxfer-encode")

    async def iterate(self, gen):
        """Drive a blocking generator in the worker, one item ahead of the consumer."""
        loop = asyncio.get_running_loop()
        sentinel = object()
        nxt = loop.run_in_executor(self.pool, next, gen, sentinel)
        while True:
            item = await nxt
            if item is sentinel:
                return
            nxt = loop.run_in_executor(self.pool, next, gen, sentinel)
            yield item

    def close(self):
        self.pool.shutdown(wait=True)


def now() -> float:
    return time.monotonic()
