"""Binary payloads: PAGEMAP and HELD tables, PAGES (u32 index + a core frame), FILE_DATA;
post-copy: PENDING and FETCH tables of runs (vaddr, pages), POSTCOPY_PAGES.

Tables are built and read with array/memoryview casts, never a Python loop per entry: a
PAGEMAP entry (u64 vaddr, u32 nr_pages, u32 flags) is, on a little-endian host, the u64 pair
(vaddr, nr_pages | flags << 32); a HELD entry is the pair (vaddr, hash).
"""
import struct
import sys
from array import array

from .messages import FILE_DATA_LIMIT, PAGES_LIMIT, TABLE_LIMIT, ErrorCode, ProtocolError

_TABLE_HEAD = struct.Struct("<II")            # u32 index, u32 count
_U32 = struct.Struct("<I")
ENTRY_SIZE = 16
TABLE_MAX_ENTRIES = (TABLE_LIMIT - _TABLE_HEAD.size) // ENTRY_SIZE
PAGES_INDEX_SIZE = _U32.size
_LITTLE = sys.byteorder == "little"


def _u64(values, what) -> memoryview:
    """values (array('Q'), a 'Q' memoryview, bytes of u64s, a list) as a 'Q' memoryview."""
    if isinstance(values, (list, tuple, range)):
        values = array("Q", values)
    m = memoryview(values)
    if m.format != "Q":
        if m.nbytes % 8:
            raise ValueError(f"{what}: {m.nbytes} bytes is not a whole number of u64s")
        m = m.cast("B").cast("Q")
    return m


def _le(a: array) -> array:
    if not _LITTLE:
        a.byteswap()
    return a


def _table(index: int, first, second, what) -> bytearray:
    if len(first) != len(second):
        raise ValueError(f"{what}: {len(first)} vaddrs but {len(second)} values")
    count = len(first)
    if count > TABLE_MAX_ENTRIES:
        raise ValueError(f"{what}: {count} entries do not fit one message "
                         f"(at most {TABLE_MAX_ENTRIES}); split with iter_{what.lower()}")
    pairs = array("Q", bytes(ENTRY_SIZE * count))
    view = memoryview(pairs)
    view[0::2] = first
    view[1::2] = second
    out = bytearray(_TABLE_HEAD.pack(index, count))
    out += _le(pairs)
    return out


def _read_table(payload, what, limit) -> tuple[int, memoryview]:
    m = memoryview(payload).cast("B")
    if len(m) > limit:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"{what} payload over {limit} bytes")
    if len(m) < _TABLE_HEAD.size:
        raise ProtocolError(ErrorCode.BAD_PAYLOAD,
                            f"{what} payload of {len(m)} bytes is shorter than its 8-byte head")
    index, count = _TABLE_HEAD.unpack_from(m)
    if len(m) != _TABLE_HEAD.size + ENTRY_SIZE * count:
        raise ProtocolError(ErrorCode.BAD_PAYLOAD,
                            f"{what} announces {count} entries ({ENTRY_SIZE * count} bytes) but "
                            f"carries {len(m) - _TABLE_HEAD.size} bytes of entries")
    pairs = array("Q")
    pairs.frombytes(m[_TABLE_HEAD.size:])
    return index, memoryview(_le(pairs))


# -- PAGEMAP ------------------------------------------------------------------------------

def _u32(values, what) -> memoryview:
    if isinstance(values, (list, tuple, range)):
        try:
            values = array("I", values)
        except OverflowError:
            raise ValueError(f"{what}: values must be u32") from None
    m = memoryview(values)
    if m.format != "I":
        if m.itemsize != 4:
            raise ValueError(f"{what}: expected u32 values (array('I')), got format {m.format!r}")
        m = m.cast("B").cast("I")
    return m


def encode_pagemap(index: int, vaddrs, nr_pages, flags) -> bytearray:
    """PAGEMAP payload from parallel arrays: u64 vaddrs, u32 nr_pages, u32 flags."""
    v = _u64(vaddrs, "PAGEMAP vaddrs")
    n, f = _u32(nr_pages, "PAGEMAP nr_pages"), _u32(flags, "PAGEMAP flags")
    if not len(v) == len(n) == len(f):
        raise ValueError(f"PAGEMAP: {len(v)} vaddrs, {len(n)} nr_pages, {len(f)} flags")
    second = array("I", bytes(8 * len(n)))        # u32 halves of nr_pages | flags << 32
    halves = memoryview(second)
    lo, hi = (0, 1) if _LITTLE else (1, 0)
    halves[lo::2] = n
    halves[hi::2] = f
    return _table(index, v, halves.cast("B").cast("Q"), "PAGEMAP")


def encode_pagemap_entries(index: int, entries) -> bytearray:
    """PAGEMAP payload from u64 pairs (vaddr, nr_pages | flags << 32), flat: 2 per entry."""
    e = _u64(entries, "PAGEMAP entries")
    if len(e) % 2:
        raise ValueError("PAGEMAP entries: an odd number of u64s")
    return _table(index, e[0::2], e[1::2], "PAGEMAP")


class Pagemap:
    """A decoded PAGEMAP payload: image ``index`` and its ``entries``, a 'Q' memoryview of
    (vaddr, nr_pages | flags << 32) pairs; ``vaddrs``/``nr_pages``/``flags`` as arrays."""

    __slots__ = ("index", "entries")

    def __init__(self, index: int, entries: memoryview):
        self.index, self.entries = index, entries

    def __len__(self):
        return len(self.entries) // 2

    @property
    def vaddrs(self) -> array:
        return array("Q", self.entries[0::2].tobytes())

    def _half(self, high: bool) -> array:
        quarters = self.entries.cast("B").cast("I")     # vaddr lo/hi, second lo/hi
        pick = (3 if high else 2) if _LITTLE else (2 if high else 3)
        return array("I", quarters[pick::4].tobytes())

    @property
    def nr_pages(self) -> array:
        return self._half(False)

    @property
    def flags(self) -> array:
        return self._half(True)


def decode_pagemap(payload) -> Pagemap:
    index, pairs = _read_table(payload, "PAGEMAP", TABLE_LIMIT)
    return Pagemap(index, pairs)


def iter_pagemap(index: int, entries):
    """PAGEMAP payloads for any number of (vaddr, nr_pages | flags << 32) pairs."""
    e = _u64(entries, "PAGEMAP entries")
    step = 2 * TABLE_MAX_ENTRIES
    for at in range(0, max(len(e), 1), step):
        yield encode_pagemap_entries(index, e[at:at + step])


# -- HELD ---------------------------------------------------------------------------------

def encode_held(index: int, vaddrs, hashes) -> bytearray:
    """HELD payload: the held pages' vaddrs and their XXH3-64 hashes (u64 arrays)."""
    return _table(index, _u64(vaddrs, "HELD vaddrs"), _u64(hashes, "HELD hashes"), "HELD")


def decode_held(payload) -> tuple[int, array, array]:
    """(index, vaddrs, hashes) of a HELD payload, as array('Q')s."""
    index, pairs = _read_table(payload, "HELD", TABLE_LIMIT)
    return index, array("Q", pairs[0::2].tobytes()), array("Q", pairs[1::2].tobytes())


def iter_held(index: int, vaddrs, hashes):
    """HELD payloads for any number of held pages (one image's whole table)."""
    v, h = _u64(vaddrs, "HELD vaddrs"), _u64(hashes, "HELD hashes")
    if len(v) != len(h):
        raise ValueError(f"HELD: {len(v)} vaddrs but {len(h)} hashes")
    for at in range(0, max(len(v), 1), TABLE_MAX_ENTRIES):
        yield _table(index, v[at:at + TABLE_MAX_ENTRIES], h[at:at + TABLE_MAX_ENTRIES], "HELD")


# -- PAGES and FILE_DATA -------------------------------------------------------------------

def encode_pages(index: int, frame) -> bytearray:
    """PAGES payload: u32 image index then one core frame (one copy of the frame: the
    frame check covers the payload as one buffer)."""
    f = memoryview(frame).cast("B")
    if PAGES_INDEX_SIZE + len(f) > PAGES_LIMIT:
        raise ValueError(f"PAGES: a frame of {len(f)} bytes is over the limit of "
                         f"{PAGES_LIMIT - PAGES_INDEX_SIZE}")
    out = bytearray(PAGES_INDEX_SIZE + len(f))
    _U32.pack_into(out, 0, index)
    out[PAGES_INDEX_SIZE:] = f
    return out


def decode_pages(payload) -> tuple[int, memoryview]:
    """(index, frame) of a PAGES payload; the frame is a view into the payload, to be
    checked and decoded by the core (decode_frame / apply_frames)."""
    m = memoryview(payload).cast("B")
    if len(m) < PAGES_INDEX_SIZE:
        raise ProtocolError(ErrorCode.BAD_PAYLOAD,
                            f"PAGES payload of {len(m)} bytes lacks its u32 image index")
    if len(m) > PAGES_LIMIT:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"PAGES payload over {PAGES_LIMIT} bytes")
    return _U32.unpack_from(m)[0], m[PAGES_INDEX_SIZE:]


def iter_file_data(data):
    """FILE_DATA payloads (views, no copies) of a file's content."""
    m = memoryview(data).cast("B")
    for at in range(0, len(m), FILE_DATA_LIMIT):
        yield m[at:at + FILE_DATA_LIMIT]


# -- post-copy: PENDING and FETCH (runs of pages), POSTCOPY_PAGES --------------------------

_PC_HEAD = struct.Struct("<IIII")       # u32 index, u32 runs, u32 flags, u32 raw bytes
PC_LZ4 = 1          # the body is one lz4 block
PC_XOR = 2          # the body is i64 lengths per page, XOR deltas, then whole pages
PC_MAX_RAW = 16 * 1024 * 1024


def iter_runs(index: int, vaddrs, counts, what: str = "PENDING"):
    """PENDING / FETCH payloads: runs (vaddr, pages) of one image."""
    v, n = _u64(vaddrs, what), _u64(counts, what)
    if len(v) != len(n):
        raise ValueError(f"{what}: {len(v)} vaddrs but {len(n)} counts")
    for at in range(0, max(len(v), 1), TABLE_MAX_ENTRIES):
        yield _table(index, v[at:at + TABLE_MAX_ENTRIES], n[at:at + TABLE_MAX_ENTRIES], what)


def decode_runs(payload, what: str = "PENDING") -> tuple[int, array, array]:
    """(index, vaddrs, page counts) of a PENDING or FETCH payload: page-aligned vaddrs,
    counts of at least one page."""
    index, pairs = _read_table(payload, what, TABLE_LIMIT)
    v, n = array("Q", pairs[0::2].tobytes()), array("Q", pairs[1::2].tobytes())
    if any(x & 4095 for x in v) or (len(n) and (min(n) < 1 or max(n) > 1 << 32)):
        raise ProtocolError(ErrorCode.BAD_PAYLOAD, f"{what}: a run that is not page-aligned "
                                                   "or not 1..2^32 pages")
    return index, v, n


def encode_postcopy_pages(index: int, vaddrs, counts, data, lz4: bool, xor_raw: int = 0
                          ) -> bytearray:
    """POSTCOPY_PAGES: runs (vaddr, pages) of one image and their pages, back to back
    (``data``: lz4-compressed when ``lz4``; the raw size is sum(counts) pages). With
    ``xor_raw`` (the body's raw size), the body is per page an i64 length (-1: the page
    follows whole; 0: unchanged; else an XOR+RLE delta against the destination's copy),
    the deltas back to back, then the whole pages."""
    v, n = _u64(vaddrs, "POSTCOPY_PAGES"), _u64(counts, "POSTCOPY_PAGES")
    raw = xor_raw or sum(n) * 4096
    if raw > PC_MAX_RAW + 8 * sum(n):
        raise ValueError(f"POSTCOPY_PAGES: {raw} bytes of pages, at most {PC_MAX_RAW}")
    pairs = array("Q", bytes(16 * len(v)))
    view = memoryview(pairs)
    view[0::2] = v
    view[1::2] = n
    flags = (PC_LZ4 if lz4 else 0) | (PC_XOR if xor_raw else 0)
    out = bytearray(_PC_HEAD.pack(index, len(v), flags, raw))
    out += _le(pairs)
    out += data
    return out


def decode_postcopy_pages(payload) -> tuple[int, array, array, int, int, memoryview]:
    """(index, vaddrs, counts, flags, raw bytes, data) of a POSTCOPY_PAGES payload."""
    m = memoryview(payload).cast("B")
    if len(m) > PAGES_LIMIT:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"POSTCOPY_PAGES payload over {PAGES_LIMIT} "
                                                 "bytes")
    if len(m) < _PC_HEAD.size:
        raise ProtocolError(ErrorCode.BAD_PAYLOAD, "POSTCOPY_PAGES payload lacks its header")
    index, nruns, flags, raw = _PC_HEAD.unpack_from(m)
    end = _PC_HEAD.size + 16 * nruns
    if flags & ~(PC_LZ4 | PC_XOR) or end > len(m) or raw > PC_MAX_RAW + 8 * (PC_MAX_RAW // 4096):
        raise ProtocolError(ErrorCode.BAD_PAYLOAD, "POSTCOPY_PAGES: bad header")
    pairs = array("Q", m[_PC_HEAD.size:end].tobytes())
    if not _LITTLE:
        pairs.byteswap()
    v, n = pairs[0::2], pairs[1::2]
    pages = sum(n)
    if any(x & 4095 for x in v) or (len(n) and min(n) < 1) or pages * 4096 > PC_MAX_RAW or (
            raw != pages * 4096 if not flags & PC_XOR else raw < 8 * pages):
        raise ProtocolError(ErrorCode.BAD_PAYLOAD, "POSTCOPY_PAGES: runs do not match the "
                                                   "page bytes, or are not page-aligned")
    data = m[end:]
    if not flags & PC_LZ4 and len(data) != raw:
        raise ProtocolError(ErrorCode.BAD_PAYLOAD, "POSTCOPY_PAGES: page bytes truncated")
    return index, v, n, flags, raw, data
