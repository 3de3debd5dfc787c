"""References of the compiled CRIU pagemap codec (ext/images.pxi), as used by
src/deltaxfer/criu/images.py: the fast decoder of plain pagemap entries (anything else
is left to images.py's full parser, which names what is wrong) and the encoder.

A pagemap image is u32 magics, then entries each framed as a little-endian u32 size and
a protobuf message; pagemap_entry has vaddr (1), nr_pages (2), in_parent (3, old
images), flags (4) and, in some CRIU versions, a 64-bit nr_pages (5).
"""
import struct
from array import array

from ._buffers import byte_view, u64_list

IMG_COMMON_MAGIC, PAGEMAP_MAGIC = 0x54564319, 0x56084025
PE_PARENT, PE_PRESENT = 1 << 0, 1 << 2
_U32 = struct.Struct("<I")
_U64_MASK = (1 << 64) - 1


def _varint(data, pos: int, stop: int):
    """(value, next pos) of the varint at pos, or None: it runs past stop or has more than
    ten bytes. Bits above 64 are dropped, as a uint64 drops them."""
    value = 0
    for n in range(10):
        if pos + n >= stop:
            return None
        b = data[pos + n]
        value = (value | (b & 0x7F) << (7 * n)) & _U64_MASK
        if not b & 0x80:
            return value, pos + n + 1
    return None


def _entry(data, pos: int, stop: int):
    """(vaddr, nr_pages, flags) of one plain entry, or None: a field other than 1-5, one
    that is not a varint, no vaddr, no nr_pages. A repeated field's last value counts."""
    fields = {}
    while pos < stop:
        key = _varint(data, pos, stop)
        if key is None or key[0] & 7:
            return None
        value = _varint(data, key[1], stop)
        if value is None or not 1 <= key[0] >> 3 <= 5:
            return None
        fields[key[0] >> 3] = value[0]
        pos = value[1]
    if 1 not in fields or (2 not in fields and 5 not in fields):
        return None
    nr = fields[5] if 5 in fields else fields[2]
    flags = fields[4] if 4 in fields else (PE_PARENT if fields.get(3) else PE_PRESENT)
    return fields[1], nr, flags


def pagemap_entries_fast(data, start: int):
    """The entries framed from byte ``start`` of ``data`` to its end, as three array('Q')
    (vaddrs, nr_pages, flags); None when the frames do not end exactly at the end of data
    or any entry is not a plain one."""
    if start < 0:
        raise OverflowError("start must be >= 0")
    data = byte_view(data, "data")
    frames, pos = [], start
    while pos + 4 <= len(data):
        (size,) = _U32.unpack_from(data, pos)
        if size > len(data) - pos - 4:
            return None
        frames.append((pos + 4, pos + 4 + size))
        pos += 4 + size
    if pos != len(data):
        return None
    out = array("Q"), array("Q"), array("Q")
    for a, b in frames:
        e = _entry(data, a, b)
        if e is None:
            return None
        for column, value in zip(out, e):
            column.append(value)
    return out


def _put_varint(v: int) -> bytes:
    out = bytearray()
    while v >= 0x80:
        out.append(v & 0x7F | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def pagemap_encode_fast(pages_id: int, vaddrs, nr_pages, flags) -> bytes:
    """The pagemap image: the two magics, the head {pages_id (1)}, then one entry
    {vaddr (1), nr_pages (2), flags (4)} per element of the three u64 arrays."""
    if not 0 <= pages_id < 1 << 32:
        raise OverflowError("pages_id does not fit in 32 bits")
    v, n, f = (u64_list(vaddrs, "vaddrs"), u64_list(nr_pages, "nr_pages"),
               u64_list(flags, "flags"))
    if not len(v) == len(n) == len(f):
        raise ValueError("vaddrs, nr_pages and flags differ in length")
    for a, b in zip(v, n):
        if b >= 1 << 32:
            raise ValueError(f"pagemap entry at {a:#x} has {b} pages; "
                             "split it (CRIU 4.1's nr_pages is 32-bit)")
    payloads = [b"\x08" + _put_varint(pages_id)]
    payloads += [b"\x08" + _put_varint(a) + b"\x10" + _put_varint(b) + b"\x20" + _put_varint(c)
                 for a, b, c in zip(v, n, f)]
    return _U32.pack(IMG_COMMON_MAGIC) + _U32.pack(PAGEMAP_MAGIC) + b"".join(
        _U32.pack(len(p)) + p for p in payloads)
