"""Reference of the frame format (docs/CORE.md, ext/c/frame.h).

header (32 bytes, little-endian): magic "DXPF", version u8, flags u8 (bit0 lz4),
reserved u16, record_count u32, raw_len u32, stored_len u32, payload XXH3 u64,
header_check u32 (low 32 bits of XXH3 of bytes 0..27); then the stored payload.
record: vaddr u64, kind u8 (0 zero, 1 xor, 2 full), payload_len u16, payload.
"""
import ctypes
import ctypes.util
import struct

from deltaxfer._core import xxh3_64

from ..errors import DeltaError, FrameError
from ._buffers import PAGE_SIZE, byte_view, check_vaddrs, one_page, page_view, u64_list
from .delta import _walk, xor_decode

MAGIC = b"DXPF"
VERSION = 1
FLAG_LZ4 = 0x01
FRAME_HEADER_SIZE = 32
DEFAULT_FRAME_SIZE = 256 * 1024
FRAME_MAX_RAW = 16 * 1024 * 1024
RECORD_HEADER_SIZE = 11
RECORD_MAX = RECORD_HEADER_SIZE + PAGE_SIZE
ZERO, XOR, FULL = 0, 1, 2

# LZ4 and XXH3 are the system libraries the core links (python-lz4 bundles its own lz4
# build, whose output differs byte for byte); the reference restates the framing.
_lz4 = ctypes.CDLL(ctypes.util.find_library("lz4") or "liblz4.so.1")
_lz4.LZ4_compressBound.argtypes = [ctypes.c_int]
_lz4.LZ4_compress_default.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
_lz4.LZ4_decompress_safe.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]


def lz4_compress(raw: bytes) -> bytes:
    bound = _lz4.LZ4_compressBound(len(raw))
    out = ctypes.create_string_buffer(bound)
    n = _lz4.LZ4_compress_default(raw, out, len(raw), bound)
    return out.raw[:n] if n > 0 else b""


def lz4_decompress(stored: bytes, raw_len: int):
    out = ctypes.create_string_buffer(max(raw_len, 1))
    n = _lz4.LZ4_decompress_safe(stored, out, len(stored), raw_len)
    return out.raw[:n] if n == raw_len else None


_HEADER = struct.Struct("<4sBBHIIIQ")     # without the trailing header_check
_RECORD = struct.Struct("<QBH")


class FrameWriter:
    def __init__(self, frame_size: int = DEFAULT_FRAME_SIZE, compress: bool = True):
        if not RECORD_MAX <= frame_size <= FRAME_MAX_RAW:
            raise ValueError(f"frame_size must be between {RECORD_MAX} and {FRAME_MAX_RAW} "
                             f"bytes, got {frame_size}")
        self.frame_size, self.compress = frame_size, compress
        self.raw, self.nrecords, self.out = bytearray(), 0, bytearray()
        self._stats = {"frames": 0, "records": 0, "raw_bytes": 0, "stored_bytes": 0}

    def reserve(self, max_len: int) -> None:
        """Close the frame if a record of max_len payload bytes might not fit."""
        if len(self.raw) + RECORD_HEADER_SIZE + max_len > self.frame_size:
            self.flush()

    def commit(self, vaddr: int, kind: int, payload: bytes) -> None:
        self.raw += _RECORD.pack(vaddr, kind, len(payload)) + payload
        self.nrecords += 1
        self._stats["records"] += 1

    def _add(self, vaddr, kind, payload):
        if vaddr % PAGE_SIZE:
            raise ValueError(f"vaddr {vaddr:#x} is not page aligned")
        self.reserve(len(payload))
        self.commit(vaddr, kind, payload)

    def add_zero(self, vaddr: int) -> None:
        self._add(vaddr, ZERO, b"")

    def add_full(self, vaddr: int, page) -> None:
        self._add(vaddr, FULL, bytes(one_page(page, "page")))

    def add_xor(self, vaddr: int, delta) -> None:
        delta = bytes(byte_view(delta, "delta"))
        if not 1 <= len(delta) < PAGE_SIZE:
            raise ValueError(f"an xor delta record holds 1..{PAGE_SIZE - 1} bytes, got {len(delta)}")
        try:
            _walk(delta)
        except DeltaError:
            raise DeltaError("xor delta is malformed") from None
        self._add(vaddr, XOR, delta)

    def flush(self) -> None:
        if not self.nrecords:
            return
        raw, flags, stored = bytes(self.raw), 0, bytes(self.raw)
        if self.compress:
            packed = lz4_compress(raw)
            if 0 < len(packed) < len(raw):
                flags, stored = FLAG_LZ4, packed
        head = _HEADER.pack(MAGIC, VERSION, flags, 0, self.nrecords, len(raw), len(stored),
                            xxh3_64(raw))
        self.out += head + struct.pack("<I", xxh3_64(head) & 0xFFFFFFFF) + stored
        self._stats["frames"] += 1
        self._stats["raw_bytes"] += len(raw)
        self._stats["stored_bytes"] += FRAME_HEADER_SIZE + len(stored)
        self.raw, self.nrecords = bytearray(), 0

    def finish(self) -> bytes:
        self.flush()
        out, self.out = bytes(self.out), bytearray()
        return out

    @property
    def stats(self):
        return dict(self._stats)


def _parse_header(buf: memoryview, max_raw: int, offset: int = 0) -> dict:
    where = f"frame at byte {offset}"
    if len(buf) < FRAME_HEADER_SIZE:
        raise FrameError(f"{where}: frame truncated: header needs {FRAME_HEADER_SIZE} bytes, "
                         f"{len(buf)} present")
    if bytes(buf[:4]) != MAGIC:
        raise FrameError(f"{where}: bad frame magic (not a deltaxfer frame)")
    if xxh3_64(buf[:28]) & 0xFFFFFFFF != struct.unpack_from("<I", buf, 28)[0]:
        raise FrameError(f"{where}: frame header checksum mismatch (header corrupt)")
    _, version, flags, reserved, count, raw_len, stored_len, checksum = _HEADER.unpack_from(buf)
    if version != VERSION:
        raise FrameError(f"{where}: unsupported frame version")
    if flags & ~FLAG_LZ4 or reserved:
        raise FrameError(f"{where}: unknown frame flags")
    limit = min(max_raw, FRAME_MAX_RAW)
    if raw_len > limit:
        raise FrameError(f"{where}: frame raw length exceeds the limit: {raw_len} > {limit}")
    if not flags & FLAG_LZ4 and stored_len != raw_len:
        raise FrameError(f"{where}: unknown frame flags")
    if len(buf) - FRAME_HEADER_SIZE < stored_len:
        raise FrameError(f"{where}: frame truncated: payload needs {stored_len} bytes, "
                         f"{len(buf) - FRAME_HEADER_SIZE} present")
    return {"flags": flags, "record_count": count, "raw_len": raw_len, "stored_len": stored_len,
            "checksum": checksum, "frame_len": FRAME_HEADER_SIZE + stored_len}


def read_frame_header(buf, max_raw: int = FRAME_MAX_RAW) -> dict:
    return _parse_header(byte_view(buf, "frame"), max_raw)


def _records(raw: bytes, count: int, where: str):
    records, p = [], 0
    while p < len(raw):
        if len(raw) - p < RECORD_HEADER_SIZE:
            raise FrameError(f"{where}: malformed page record")
        vaddr, kind, plen = _RECORD.unpack_from(raw, p)
        ok = ((kind == ZERO and plen == 0) or (kind == FULL and plen == PAGE_SIZE)
              or (kind == XOR and 1 <= plen < PAGE_SIZE))
        p += RECORD_HEADER_SIZE
        if vaddr % PAGE_SIZE or not ok or len(raw) - p < plen:
            raise FrameError(f"{where}: malformed page record")
        payload = raw[p:p + plen]
        if kind == XOR:
            try:
                _walk(payload)
            except DeltaError:
                raise FrameError(f"{where}: xor delta is malformed (runs past the page end "
                                 f"or bad varint)") from None
        records.append((vaddr, kind, payload))
        p += plen
    if len(records) != count:
        raise FrameError(f"{where}: record count does not match the frame payload")
    return records


def _decode(buf: memoryview, max_raw: int, offset: int):
    h = _parse_header(buf, max_raw, offset)
    where = f"frame at byte {offset}"
    stored = bytes(buf[FRAME_HEADER_SIZE:FRAME_HEADER_SIZE + h["stored_len"]])
    if h["flags"] & FLAG_LZ4:
        raw = lz4_decompress(stored, h["raw_len"])
        if raw is None:
            raise FrameError(f"{where}: lz4 payload does not decompress to the stated raw length")
    else:
        raw = stored
    if xxh3_64(raw) != h["checksum"]:
        raise FrameError(f"{where}: frame payload checksum mismatch (payload corrupt)")
    return _records(raw, h["record_count"], where), h["frame_len"]


def decode_frame(buf, max_raw: int = FRAME_MAX_RAW):
    return _decode(byte_view(buf, "frame"), max_raw, 0)


def apply_frames(frames, pages, vaddrs, max_raw: int = FRAME_MAX_RAW) -> dict:
    buf = byte_view(frames, "frames")
    mv = page_view(pages, "pages", writable=True)
    va = u64_list(vaddrs, "vaddrs")
    if len(va) * PAGE_SIZE != len(mv):
        raise ValueError(f"pages holds {len(mv) // PAGE_SIZE} pages but vaddrs has {len(va)}")
    check_vaddrs(va, "vaddrs")
    index = {v: i for i, v in enumerate(va)}
    counts = {"zero": 0, "xor": 0, "full": 0}
    off = 0
    while off < len(buf):
        records, n = _decode(buf[off:], max_raw, off)
        for vaddr, _, _ in records:
            if vaddr not in index:
                raise FrameError(f"frame at byte {off}: record for a vaddr the destination "
                                 f"does not hold ({vaddr:#x})")
        for vaddr, kind, payload in records:
            page = mv[index[vaddr] * PAGE_SIZE:(index[vaddr] + 1) * PAGE_SIZE]
            if kind == ZERO:
                page[:] = bytes(PAGE_SIZE)
            elif kind == FULL:
                page[:] = payload
            else:
                xor_decode(page, payload)
            counts[("zero", "xor", "full")[kind]] += 1
        off += n
    return counts
