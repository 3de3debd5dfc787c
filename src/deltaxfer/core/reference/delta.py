"""Reference of the XOR+RLE page delta (format in docs/CORE.md and ext/c/delta.h).

d = old XOR new; the delta is (zero_run varint, literal_run varint, literal bytes of d)...
A literal ends where the first gap of XOR_MIN_GAP zero bytes starts, or where a gap runs
to the page end; the final gap is omitted.
"""
import re
from array import array

from ..errors import DeltaError
from ._buffers import PAGE_SIZE, byte_view, one_page, page_view

XOR_MIN_GAP = 3
XOR_DEFAULT_CAP = 3072

_NONZERO = re.compile(rb"[^\x00]")
_GAP = re.compile(rb"\x00{%d}|\x00+\Z" % XOR_MIN_GAP)


def _varint(v: int) -> bytes:
    return bytes([v]) if v < 0x80 else bytes([(v & 0x7F) | 0x80, v >> 7])


def _check_cap(cap: int) -> None:
    if not 1 <= cap < PAGE_SIZE:
        raise ValueError(f"cap must be between 1 and {PAGE_SIZE - 1} bytes, got {cap}")


def _xor(a, b) -> bytes:
    return (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(len(a), "little")


def xor_encode(old_page, new_page, cap: int = XOR_DEFAULT_CAP):
    d = _xor(one_page(old_page, "old_page"), one_page(new_page, "new_page"))
    _check_cap(cap)
    out = bytearray()
    pos = 0
    while m := _NONZERO.search(d, pos):
        lit = m.start()
        end = _GAP.search(d, lit).start() if _GAP.search(d, lit) else PAGE_SIZE
        out += _varint(lit - pos) + _varint(end - lit) + d[lit:end]
        if len(out) > cap:
            return None
        pos = end
    return bytes(out)


def _walk(delta: bytes):
    """Yield (offset, literal) pairs of a delta, checking its structure."""
    p = pos = 0

    def varint():
        nonlocal p
        if p >= len(delta):
            raise DeltaError("xor delta is malformed (runs past the page end or bad varint)")
        b0 = delta[p]
        p += 1
        if not b0 & 0x80:
            return b0
        if p >= len(delta) or delta[p] & 0x80:
            raise DeltaError("xor delta is malformed (runs past the page end or bad varint)")
        p += 1
        return (b0 & 0x7F) | (delta[p - 1] << 7)

    items = []
    while p < len(delta):
        zrun, lrun = varint(), varint()
        if lrun == 0 or pos + zrun + lrun > PAGE_SIZE or p + lrun > len(delta):
            raise DeltaError("xor delta is malformed (runs past the page end or bad varint)")
        pos += zrun
        items.append((pos, delta[p:p + lrun]))
        pos += lrun
        p += lrun
    return items


def xor_decode(page, delta) -> None:
    mv = one_page(page, "page", writable=True)
    for off, lit in _walk(bytes(byte_view(delta, "delta"))):
        mv[off:off + len(lit)] = _xor(mv[off:off + len(lit)], lit)


def xor_encode_pages(old_pages, new_pages, cap: int = XOR_DEFAULT_CAP):
    a, b = page_view(old_pages, "old_pages"), page_view(new_pages, "new_pages")
    if len(a) != len(b):
        raise ValueError(f"old_pages and new_pages differ in length: {len(a)} != {len(b)}")
    _check_cap(cap)
    out, lengths = bytearray(), array("q")
    for i in range(0, len(a), PAGE_SIZE):
        d = xor_encode(a[i:i + PAGE_SIZE], b[i:i + PAGE_SIZE], cap)
        lengths.append(-1 if d is None else len(d))
        out += d or b""
    return bytes(out), lengths


def xor_decode_pages(pages, deltas, lengths) -> None:
    mv = page_view(pages, "pages", writable=True)
    d = bytes(byte_view(deltas, "deltas"))
    if len(lengths) != len(mv) // PAGE_SIZE:
        raise ValueError(f"lengths has {len(lengths)} entries for {len(mv) // PAGE_SIZE} pages")
    used = 0
    for i, n in enumerate(lengths):
        if n <= 0:
            continue
        if n > len(d) - used:
            raise DeltaError(f"page {i}: xor delta is malformed (runs past the page end or bad varint)")
        try:
            xor_decode(mv[i * PAGE_SIZE:(i + 1) * PAGE_SIZE], d[used:used + n])
        except DeltaError as e:
            raise DeltaError(f"page {i}: {e}") from None
        used += n
