"""Reference of the destination's page applier (ext/c/apply.c, docs/CORE.md).

Frames of page records become pages of a pages file: every record of a frame is checked
first (vaddrs strictly ascending -- within the frame at-index, where frames may come in
any order and a page once per round; across the image in append mode -- in the image's
layout, XOR only for a held page), then each page is built (zero / full / XOR against the held page), hashed
and written at its place: page i of the layout at byte i * 4096 (APPLY_AT_INDEX; a zero
page nothing was written to is left as it is), or appended in arrival order with zero
pages left as holes (APPLY_APPEND). Plain os.pwrite, one page at a time: the statement of
what the compiled applier does, not how fast.
"""
import os
from array import array
from bisect import bisect_left

from deltaxfer._core import xxh3_64

from ..errors import FrameError
from ._buffers import PAGE_SIZE, byte_view, check_vaddrs, u64_list
from .frame import FRAME_MAX_RAW, FULL, XOR, ZERO, _decode, _parse_header
from .delta import xor_decode

APPLY_AT_INDEX, APPLY_APPEND = 0, 1
SRC_NONE, SRC_HELD, SRC_RECEIVED = 0, 1, 2
_ZERO = bytes(PAGE_SIZE)
_ZERO_HASH = xxh3_64(_ZERO)


def _find(vaddrs, v, lo=0) -> int:
    i = bisect_left(vaddrs, v, lo)
    return i if i < len(vaddrs) and vaddrs[i] == v else -1


def _hash(page) -> int:
    return _ZERO_HASH if page == _ZERO else xxh3_64(page)


class PageApplier:
    def __init__(self, vaddrs, fd: int, mode: int, held_vaddrs=None, held_fd: int = -1):
        self.vaddrs = list(u64_list(vaddrs, "vaddrs"))
        check_vaddrs(self.vaddrs, "vaddrs")
        self.held_vaddrs = list(u64_list(held_vaddrs, "held_vaddrs")) if held_vaddrs is not None else []
        check_vaddrs(self.held_vaddrs, "held_vaddrs")
        if mode not in (APPLY_AT_INDEX, APPLY_APPEND) or (self.held_vaddrs and held_fd < 0):
            raise ValueError("PageApplier: bad mode or held file")
        self.fd, self.mode, self.held_fd = fd, mode, held_fd
        if self.held_vaddrs and os.fstat(held_fd).st_size < len(self.held_vaddrs) * PAGE_SIZE:
            raise FrameError("frame at byte 0: the held pages file is shorter than its pagemap")
        n = len(self.vaddrs)
        self.hashes = array("Q", bytes(8 * n)) if mode == APPLY_AT_INDEX else array("Q")
        self.src = bytearray(n if mode == APPLY_AT_INDEX else 0)
        self.recv_vaddrs = array("Q")
        self.next = 0
        self.append_pages = 0
        self._counts = [0, 0, 0]

    def close(self) -> None:
        pass

    def share_held(self, held_fd: int, held_hashes) -> int:
        hh = u64_list(held_hashes, "held_hashes")
        if len(hh) != len(self.held_vaddrs):
            raise ValueError("held_hashes and held vaddrs differ in length")
        shared = 0
        for i, v in enumerate(self.held_vaddrs):
            j = _find(self.vaddrs, v)
            if j >= 0:
                os.pwrite(self.fd, os.pread(held_fd, PAGE_SIZE, i * PAGE_SIZE), j * PAGE_SIZE)
                self.hashes[j] = hh[i]
                self.src[j] = SRC_HELD
                shared += 1
        return shared

    def _held_page(self, vaddr) -> bytes:
        return os.pread(self.held_fd, PAGE_SIZE, _find(self.held_vaddrs, vaddr) * PAGE_SIZE)

    def apply(self, frames, max_raw: int = FRAME_MAX_RAW):
        buf = byte_view(frames, "frames")
        counts = [0, 0, 0]
        off = 0
        while off < len(buf):
            _parse_header(buf[off:], max_raw, off)
            records, n = _decode(buf[off:], max_raw, off)
            if records and not self.vaddrs:
                raise FrameError(f"frame at byte {off}: page records for an image without "
                                 "present pages")
            # append: records ascend across the image; at-index: within the frame (frames
            # may come in any order, each page once per round)
            at_index = self.mode == APPLY_AT_INDEX
            first = 0 if at_index else self.next
            cur = first
            for vaddr, kind, _ in records:      # every record checked first
                if cur and vaddr <= self.vaddrs[cur - 1]:
                    raise FrameError(f"frame at byte {off}: page records out of order "
                                     f"(vaddrs must ascend within an image) (0x{vaddr:x})")
                i = _find(self.vaddrs, vaddr, cur)
                if i < 0:
                    raise FrameError(f"frame at byte {off}: page record for a vaddr outside "
                                     f"the image's pagemap (0x{vaddr:x})")
                if kind == XOR and _find(self.held_vaddrs, vaddr) < 0:
                    raise FrameError(f"frame at byte {off}: XOR delta for a page the "
                                     f"destination does not hold (0x{vaddr:x})")
                cur = i + 1
            cur = first
            for vaddr, kind, payload in records:
                i = _find(self.vaddrs, vaddr, cur)
                cur = i + 1
                if at_index and self.src[i] == SRC_RECEIVED:
                    raise FrameError(f"frame at byte {off}: page record for a page already "
                                     f"received in this round (0x{vaddr:x})")
                if not at_index:
                    self.next = cur
                if kind == ZERO:
                    page = _ZERO
                elif kind == FULL:
                    page = bytes(payload)
                else:
                    b = bytearray(self._held_page(vaddr))
                    xor_decode(b, payload)
                    page = bytes(b)
                if self.mode == APPLY_AT_INDEX:
                    if kind != ZERO or self.src[i] != SRC_NONE:
                        self._write(page, i)
                    self.hashes[i] = _hash(page)
                    self.src[i] = SRC_RECEIVED
                else:
                    if kind != ZERO:
                        self._write(page, self.append_pages)
                    self.recv_vaddrs.append(vaddr)
                    self.hashes.append(_hash(page))
                    self.append_pages += 1
                counts[kind] += 1
                self._counts[kind] += 1
            off += n
        return tuple(counts)

    def _write(self, page: bytes, at: int) -> None:
        done = 0
        while done < PAGE_SIZE:
            k = os.pwrite(self.fd, page[done:], at * PAGE_SIZE + done)
            if k <= 0:
                raise OSError(28, os.strerror(28))
            done += k

    def finish(self):
        if self.mode == APPLY_APPEND:
            os.ftruncate(self.fd, self.append_pages * PAGE_SIZE)
            return self.recv_vaddrs, self.hashes
        return self.hashes, sum(1 for s in self.src if s == SRC_NONE)

    @property
    def records(self) -> int:
        return sum(self._counts)

    @property
    def counts(self) -> dict:
        return dict(zip(("zero", "xor", "full"), self._counts))
