"""Reading and writing CRIU image files (checked against CRIU 4.1.1 and 4.2).

Layout of an image file: ``u32 IMG_COMMON_MAGIC`` (absent in inventory.img), ``u32``
type magic, then entries, each ``u32 size`` + protobuf. ``pages-N.img`` is raw pages
with no header. Memory is described by ``pagemap-PID.img`` (process) or
``pagemap-shmem-SHMID.img`` (shared anonymous memory): a ``pagemap_head{pages_id}``
followed by ``pagemap_entry{vaddr, nr_pages, flags}`` in ascending vaddr order; the
PRESENT entries' pages are stored back to back in ``pages-<pages_id>.img``.

Every error raised here is an :class:`ImageError` that names the file and what is
wrong with it; nothing allocates from a length it has not checked against the file.
"""
from __future__ import annotations

import mmap
import os
import re
import struct
import sys
from array import array
from dataclasses import dataclass, field
from typing import Iterator

from deltaxfer import PAGE_SIZE
from deltaxfer.criu import protobuf as pb

IMG_COMMON_MAGIC = 0x54564319
IMG_SERVICE_MAGIC = 0x55105940

INVENTORY_MAGIC = 0x58313116
PSTREE_MAGIC = 0x50273030
PAGEMAP_MAGIC = 0x56084025  # also used by pagemap-shmem-*.img
CORE_MAGIC = 0x55053847
MM_MAGIC = 0x57492820

# pagemap_entry.flags
PE_PARENT = 1 << 0
PE_LAZY = 1 << 1
PE_PRESENT = 1 << 2

# vma_entry.status (criu/include/image.h)
VMA_AREA_REGULAR = 1 << 0
VMA_AREA_STACK = 1 << 1
VMA_AREA_VSYSCALL = 1 << 2
VMA_AREA_VDSO = 1 << 3
VMA_AREA_HEAP = 1 << 5
VMA_FILE_PRIVATE = 1 << 6
VMA_FILE_SHARED = 1 << 7
VMA_ANON_SHARED = 1 << 8
VMA_ANON_PRIVATE = 1 << 9
VMA_AREA_SYSVIPC = 1 << 10
VMA_AREA_VVAR = 1 << 12
VMA_AREA_MEMFD = 1 << 14

# Bounds that no sane dump exceeds; a larger number is corruption, not a big process.
MAX_ENTRY_SIZE = 64 << 20          # one protobuf entry (mm images with many VMAs are ~100s KiB)
MAX_METADATA_IMAGE = 1 << 30       # a non-pages image we read whole
MAX_NR_PAGES = 1 << 36             # 256 TiB of address space in one pagemap entry
MAX_VADDR = 1 << 64

PAGEMAP_RE = re.compile(r"^pagemap-(\d+)\.img$")
SHMEM_PAGEMAP_RE = re.compile(r"^pagemap-shmem-(\d+)\.img$")
PAGES_RE = re.compile(r"^pages-(\d+)\.img$")

_U32 = struct.Struct("<I")


class ImageError(ValueError):
    """A CRIU image is missing, truncated or malformed. The message names the file."""

    def __init__(self, path, message: str):
        self.path = os.fspath(path)
        self.reason = message
        super().__init__(f"{self.path}: {message}")


def is_memory_image(name: str) -> bool:
    """Images that deltaxfer rewrites; every other file of a dump is copied verbatim."""
    return bool(PAGEMAP_RE.match(name) or SHMEM_PAGEMAP_RE.match(name) or PAGES_RE.match(name))


# -- generic entry framing ------------------------------------------------------------

def _read_small_file(path) -> bytes:
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_METADATA_IMAGE:
                raise ImageError(path, f"{size} bytes is too large for a metadata image")
            return f.read()
    except FileNotFoundError:
        raise ImageError(path, "no such image file") from None
    except IsADirectoryError:
        raise ImageError(path, "is a directory, expected an image file") from None


def parse_entries(path, data: bytes, type_magic: int, *, common: bool = True) -> list[memoryview]:
    """Check the magics and split ``data`` into the raw protobuf payload of each entry."""
    view = memoryview(data)
    pos = 0
    if common:
        if len(view) < 4:
            raise ImageError(path, f"truncated header ({len(view)} bytes)")
        (magic,) = _U32.unpack_from(view, 0)
        if magic != IMG_COMMON_MAGIC:
            raise ImageError(path, f"wrong magic 0x{magic:08x}, expected CRIU image magic "
                                   f"0x{IMG_COMMON_MAGIC:08x} (not a CRIU image?)")
        pos = 4
    if len(view) < pos + 4:
        raise ImageError(path, f"truncated header ({len(view)} bytes)")
    (magic,) = _U32.unpack_from(view, pos)
    if magic != type_magic:
        raise ImageError(path, f"wrong type magic 0x{magic:08x}, expected 0x{type_magic:08x}")
    pos += 4
    entries = []
    while pos < len(view):
        if pos + 4 > len(view):
            raise ImageError(path, f"truncated entry header at byte {pos}")
        (size,) = _U32.unpack_from(view, pos)
        pos += 4
        if size > MAX_ENTRY_SIZE:
            raise ImageError(path, f"entry at byte {pos - 4} claims {size} bytes "
                                   f"(limit {MAX_ENTRY_SIZE}): corrupt image")
        if pos + size > len(view):
            raise ImageError(path, f"entry at byte {pos - 4} claims {size} bytes but only "
                                   f"{len(view) - pos} remain: truncated image")
        entries.append(view[pos:pos + size])
        pos += size
    return entries


def read_entries(path, type_magic: int, *, common: bool = True) -> list[memoryview]:
    return parse_entries(path, _read_small_file(path), type_magic, common=common)


def decode(path, payload, what: str) -> dict[int, list]:
    try:
        return pb.decode_message(payload)
    except pb.DecodeError as e:
        raise ImageError(path, f"malformed {what}: {e}") from None


def _required(path, fields: dict, number: int, what: str):
    values = fields.get(number)
    if not values:
        raise ImageError(path, f"{what} lacks required field {number}")
    return values[-1]  # protobuf: the last occurrence of a scalar wins


def encode_image(type_magic: int, payloads, *, common: bool = True) -> bytes:
    parts = [_U32.pack(IMG_COMMON_MAGIC)] if common else []
    parts.append(_U32.pack(type_magic))
    for p in payloads:
        parts.append(_U32.pack(len(p)))
        parts.append(bytes(p))
    return b"".join(parts)


# -- pagemaps ----------------------------------------------------------------------

@dataclass(frozen=True)
class PagemapEntry:
    vaddr: int
    nr_pages: int
    flags: int = PE_PRESENT

    @property
    def present(self) -> bool:
        return bool(self.flags & PE_PRESENT)

    @property
    def in_parent(self) -> bool:
        return bool(self.flags & PE_PARENT)

    @property
    def end(self) -> int:
        return self.vaddr + self.nr_pages * PAGE_SIZE


@dataclass
class Pagemap:
    pages_id: int
    entries: list[PagemapEntry] = field(default_factory=list)

    @property
    def present_pages(self) -> int:
        return sum(e.nr_pages for e in self.entries if e.present)

    def present_vaddrs(self) -> array:
        """The vaddr of every present page, in pagemap (= pages file) order."""
        starts, lens = array("Q"), array("Q")
        for e in self.entries:
            if e.present:
                starts.append(e.vaddr)
                lens.append(e.nr_pages * PAGE_SIZE)
        try:
            from deltaxfer import _core
        except ImportError:      # the pure-Python tools work without the compiled core
            out = array("Q")
            for v, n in zip(starts, lens):
                out.extend(range(v, v + n, PAGE_SIZE))
            return out
        return _core.run_page_vaddrs(starts, lens)

    def coalesced(self) -> "Pagemap":
        """Merge entries that touch and share flags (CRIU restores coalesced maps fine)."""
        out: list[PagemapEntry] = []
        for e in self.entries:
            if out and out[-1].end == e.vaddr and out[-1].flags == e.flags:
                last = out[-1]
                out[-1] = PagemapEntry(last.vaddr, last.nr_pages + e.nr_pages, last.flags)
            else:
                out.append(e)
        return Pagemap(self.pages_id, out)


class ArrayPagemap(Pagemap):
    """A pagemap held as the PAGEMAP message's (vaddr, nr_pages | flags << 32) pairs and
    three arrays, with no Python object per entry until ``entries`` is asked for: the
    receiver builds one per image per round and writes it back inside the freeze, and a
    few GiB of memory make 10^4-10^5 entries (53 000 at 4 GiB here: ~0.05 s per pass of
    Python objects). ``pairs`` must have passed ``_core.pagemap_layout`` (aligned,
    ascending, sane sizes); ``present_pages`` is what that layout counted."""

    def __init__(self, pages_id: int, pairs: array, present_pages: int):
        self.pages_id = pages_id
        self.pairs = pairs
        self._vnf: tuple[array, array, array] | None = None
        self._present = present_pages
        self._entries: list[PagemapEntry] | None = None

    def _split(self) -> tuple[array, array, array]:
        """(vaddrs, nr_pages, flags) as three arrays, made when first asked for: the
        pagemap file is encoded from the pairs themselves (5 ms less per image per round
        at 4 GiB, on each side)."""
        if self._vnf is None:
            pairs = self.pairs
            if sys.byteorder == "little":  # each u64 is nr_pages (low half) | flags (high)
                halves = array("I")
                halves.frombytes(pairs[1::2].tobytes())
                self._vnf = (pairs[0::2], array("Q", halves[0::2]), array("Q", halves[1::2]))
            else:
                nf = pairs[1::2]
                self._vnf = (pairs[0::2], array("Q", (x & 0xFFFFFFFF for x in nf)),
                             array("Q", (x >> 32 for x in nf)))
        return self._vnf

    v = property(lambda self: self._split()[0])
    n = property(lambda self: self._split()[1])
    f = property(lambda self: self._split()[2])

    @property
    def entries(self) -> list[PagemapEntry]:   # type: ignore[override]
        if self._entries is None:
            self._entries = [PagemapEntry(v, n, f) for v, n, f in zip(self.v, self.n, self.f)]
        return self._entries

    @property
    def present_pages(self) -> int:
        return self._present

    def present_vaddrs(self) -> array:
        from deltaxfer import _core
        return _core.pagemap_layout(self.pairs)

    def with_pages_id(self, pages_id: int) -> "ArrayPagemap":
        out = ArrayPagemap.__new__(ArrayPagemap)
        out.__dict__.update(self.__dict__)
        out.pages_id = pages_id
        return out


def parse_pagemap(path, data: bytes) -> Pagemap:
    fast = _parse_pagemap_fast(path, data)
    if fast is not None:
        return fast
    entries = parse_entries(path, data, PAGEMAP_MAGIC)
    if not entries:
        raise ImageError(path, "no pagemap_head entry")
    head = decode(path, entries[0], "pagemap_head")
    pages_id = _required(path, head, 1, "pagemap_head")
    if not isinstance(pages_id, int) or pages_id >= 1 << 32:
        raise ImageError(path, f"bad pages_id {pages_id!r}")
    out: list[PagemapEntry] = []
    for i, payload in enumerate(entries[1:], start=1):
        what = f"pagemap_entry #{i}"
        f = decode(path, payload, what)
        vaddr = _required(path, f, 1, what)
        # CRIU 4.1 keeps nr_pages in field 2; 4.2 writes field 5 and leaves 2 at 0.
        nr_pages = f[5][-1] if 5 in f else _required(path, f, 2, what)
        if 4 in f:
            flags = f[4][-1]
        else:  # images from before the flags field: in_parent or present
            flags = PE_PARENT if f.get(3, [0])[-1] else PE_PRESENT
        for name, value in (("vaddr", vaddr), ("nr_pages", nr_pages), ("flags", flags)):
            if not isinstance(value, int):
                raise ImageError(path, f"{what}: {name} has the wrong wire type")
        out.append(PagemapEntry(vaddr, nr_pages, flags))
    check_entries(path, out)
    return Pagemap(pages_id, out)


def _pagemap_arrays(path, data: bytes) -> tuple[int, array, array, array] | None:
    """(pages_id, vaddrs, nr_pages, flags) decoded in C, without a Python object per
    entry; None for anything unusual (the full parser then names what is wrong). The
    entries are not checked here."""
    if len(data) < 12 or _U32.unpack_from(data, 0)[0] != IMG_COMMON_MAGIC or \
            _U32.unpack_from(data, 4)[0] != PAGEMAP_MAGIC:
        return None
    (size,) = _U32.unpack_from(data, 8)
    if 12 + size > len(data):
        return None
    from deltaxfer import _core
    arrays = _core.pagemap_entries_fast(data, 12 + size)
    if arrays is None:
        return None
    head = decode(path, memoryview(data)[12:12 + size], "pagemap_head")
    pages_id = head.get(1, [None])[-1]
    if not isinstance(pages_id, int) or pages_id >= 1 << 32:
        return None
    v, n, f = (x if isinstance(x, array) and x.typecode == "Q" else array("Q", x)
               for x in arrays)
    return pages_id, v, n, f


def _parse_pagemap_fast(path, data: bytes) -> Pagemap | None:
    """The common case in C (pagemaps of big processes have 10^4+ entries); None sends
    anything unusual to the full parser, which names what is wrong."""
    got = _pagemap_arrays(path, data)
    if got is None:
        return None
    pages_id, v, n, f = got
    out = [PagemapEntry(a, b, c) for a, b, c in zip(v, n, f)]
    check_entries(path, out)
    return Pagemap(pages_id, out)


def read_pagemap_arrays(path) -> tuple[int, array, array, array] | None:
    """(pages_id, vaddrs, nr_pages, flags) of a pagemap file, as arrays (see
    _pagemap_arrays); None for anything unusual (read_pagemap then says what). Not
    checked here: the caller checks the layout (``_core.pagemap_layout``)."""
    return _pagemap_arrays(path, _read_small_file(path))


def interleave_pairs(v: array, n: array, f: array, or_flags: int = 0) -> array | None:
    """The (vaddr, nr_pages | (flags | or_flags) << 32) pairs PAGEMAP carries, in one C
    pass (``_core.pagemap_pairs``); None if a value does not fit (nr_pages or flags
    >= 2^32)."""
    from deltaxfer import _core
    return _core.pagemap_pairs(v, n, f, or_flags)


def check_entries(path, entries: list[PagemapEntry]) -> None:
    """Entries must be page aligned, of sane size, ascending and not overlapping."""
    prev_end = 0
    for i, e in enumerate(entries, start=1):
        vaddr, nr_pages = e.vaddr, e.nr_pages
        if vaddr % PAGE_SIZE:
            raise ImageError(path, f"pagemap_entry #{i}: vaddr 0x{vaddr:x} is not page aligned")
        if not 0 < nr_pages <= MAX_NR_PAGES or vaddr + nr_pages * PAGE_SIZE > MAX_VADDR:
            raise ImageError(path, f"pagemap_entry #{i}: absurd nr_pages {nr_pages} at "
                                   f"vaddr 0x{vaddr:x}")
        if vaddr < prev_end:
            raise ImageError(path, f"pagemap_entry #{i}: vaddr 0x{vaddr:x} overlaps or precedes "
                                   f"the previous entry (ends 0x{prev_end:x}); entries must ascend")
        prev_end = vaddr + nr_pages * PAGE_SIZE


def read_pagemap(path) -> Pagemap:
    return parse_pagemap(path, _read_small_file(path))


def encode_pagemap(pagemap: Pagemap) -> bytes:
    """Write fields 1, 2 and 4 of each entry: what CRIU 4.1 needs and 4.2 accepts."""
    from deltaxfer import _core
    if isinstance(pagemap, ArrayPagemap):
        return _core.pagemap_encode_pairs(pagemap.pages_id, pagemap.pairs)
    v, n, f = array("Q"), array("Q"), array("Q")
    for e in pagemap.entries:
        v.append(e.vaddr)
        n.append(e.nr_pages)
        f.append(e.flags)
    return _core.pagemap_encode_fast(pagemap.pages_id, v, n, f)


def encode_pagemap_py(pagemap: Pagemap) -> bytes:
    """The same encoding in Python: the reference the tests compare with."""
    payloads = [pb.encode_field_varint(1, pagemap.pages_id)]
    for e in pagemap.entries:
        if e.nr_pages >= 1 << 32:
            raise ValueError(f"pagemap entry at 0x{e.vaddr:x} has {e.nr_pages} pages; "
                             "split it (CRIU 4.1's nr_pages is 32-bit)")
        payloads.append(pb.encode_field_varint(1, e.vaddr)
                        + pb.encode_field_varint(2, e.nr_pages)
                        + pb.encode_field_varint(4, e.flags))
    return encode_image(PAGEMAP_MAGIC, payloads)


def write_pagemap(path, pagemap: Pagemap) -> None:
    with open(path, "wb") as f:
        f.write(encode_pagemap(pagemap))


# -- pages of one process (or one shmem segment), mmapped --------------------------------

@dataclass(frozen=True)
class PageRun:
    """``nr_pages`` consecutive present pages starting at ``vaddr``; ``data`` is a view
    into the mmapped pages file (no copy)."""
    vaddr: int
    nr_pages: int
    data: memoryview


class MemoryImage:
    """A pagemap plus its pages file, mmapped read-only.

    ``pages`` is one buffer holding every present page in pagemap order and
    ``vaddrs()`` the address of each: the shape the compiled core works on.
    """

    def __init__(self, pagemap_path, pagemap: Pagemap | None = None):
        self.pagemap_path = os.fspath(pagemap_path)
        self.pagemap = pagemap if pagemap is not None else read_pagemap(self.pagemap_path)
        self.pages_path = os.path.join(os.path.dirname(self.pagemap_path),
                                       f"pages-{self.pagemap.pages_id}.img")
        need = self.pagemap.present_pages * PAGE_SIZE
        self._mmap = None
        if need == 0 and not os.path.exists(self.pages_path):
            self.pages = memoryview(b"")
            return
        try:
            fd = os.open(self.pages_path, os.O_RDONLY)
        except FileNotFoundError:
            raise ImageError(self.pages_path, f"missing; {os.path.basename(self.pagemap_path)} "
                                              f"refers to it for {need} bytes of pages") from None
        try:
            size = os.fstat(fd).st_size
            if size < need:
                raise ImageError(self.pagemap_path,
                                 f"points past the end of {os.path.basename(self.pages_path)}: "
                                 f"its present entries need {need} bytes, the file has {size}")
            if size != need:
                raise ImageError(self.pages_path,
                                 f"has {size - need} bytes beyond the {need} that "
                                 f"{os.path.basename(self.pagemap_path)} accounts for")
            if need:
                self._mmap = mmap.mmap(fd, need, prot=mmap.PROT_READ)
                self.pages = memoryview(self._mmap)
            else:
                self.pages = memoryview(b"")
        finally:
            os.close(fd)

    @property
    def nr_pages(self) -> int:
        return len(self.pages) // PAGE_SIZE

    def runs(self) -> Iterator[PageRun]:
        """Present runs in pagemap order, each a zero-copy view of its pages."""
        offset = 0
        for e in self.pagemap.entries:
            if e.present:
                n = e.nr_pages * PAGE_SIZE
                yield PageRun(e.vaddr, e.nr_pages, self.pages[offset:offset + n])
                offset += n

    def vaddrs(self) -> array:
        """The vaddr of every present page, in pages-file order (``array('Q')``)."""
        return self.pagemap.present_vaddrs()

    def close(self) -> None:
        pages, self.pages = self.pages, memoryview(b"")
        pages.release()
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:
                pass  # a caller still holds a run's view; the mapping goes with it
            self._mmap = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def image_id_of(pagemap_file: str) -> str | None:
    m = PAGEMAP_RE.match(pagemap_file)
    if m:
        return f"pid-{m.group(1)}"
    m = SHMEM_PAGEMAP_RE.match(pagemap_file)
    return f"shmem-{m.group(1)}" if m else None
