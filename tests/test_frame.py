"""Record frames: round trips, raw fallback, truncation at every offset, bit flips,
forged headers and records; C == Python bit for bit."""
import random
import struct
from array import array

import pytest

from core_cases import IMPLS, PAGE, seed
from deltaxfer import _core
from deltaxfer.core import FrameError, native, reference

HEADER = 32


@pytest.fixture(params=IMPLS)
def impl(request):
    return request.param


def sample_records(rng, n=12):
    recs = []
    for i in range(n):
        vaddr = 0x7F0000000000 + i * PAGE
        kind = i % 3
        if kind == 0:
            recs.append((vaddr, 0, b""))
        elif kind == 1:
            recs.append((vaddr, 1, native.xor_encode(bytes(PAGE), bytes(7) + rng.randbytes(20)
                                                     + bytes(PAGE - 27))))
        else:
            recs.append((vaddr, 2, rng.choice([rng.randbytes(PAGE), b"ab" * (PAGE // 2)])))
    return recs


def write(impl, records, **kw):
    w = impl.FrameWriter(**kw)
    for vaddr, kind, payload in records:
        (w.add_zero(vaddr) if kind == 0 else
         w.add_xor(vaddr, payload) if kind == 1 else w.add_full(vaddr, payload))
    return w.finish(), w.stats


def decode_all(impl, blob):
    out, off = [], 0
    while off < len(blob):
        recs, n = impl.decode_frame(memoryview(blob)[off:])
        out += recs
        off += n
    return out


def forge(raw: bytes, count: int, flags=0, stored=None, raw_len=None, version=1) -> bytes:
    """A frame with a valid header check around arbitrary content."""
    stored = raw if stored is None else stored
    head = struct.pack("<4sBBHIIIQ", b"DXPF", version, flags, 0, count,
                       len(raw) if raw_len is None else raw_len, len(stored), _core.xxh3_64(raw))
    return head + struct.pack("<I", _core.xxh3_64(head) & 0xFFFFFFFF) + stored


def test_round_trip_and_c_equals_python():
    rng = random.Random(seed())
    recs = sample_records(rng, 40)
    blob_c, stats_c = write(native, recs, frame_size=5 * PAGE)
    blob_p, stats_p = write(reference, recs, frame_size=5 * PAGE)
    assert blob_c == blob_p
    assert stats_c == stats_p
    assert stats_c["frames"] > 1 and stats_c["records"] == 40
    assert stats_c["stored_bytes"] == len(blob_c)
    for impl in (native, reference):
        assert decode_all(impl, blob_c) == recs


def test_incompressible_frames_are_stored_raw(impl):
    rng = random.Random(seed())
    blob, _ = write(impl, [(0x1000, 2, rng.randbytes(PAGE))])
    h = impl.read_frame_header(blob)
    assert h["flags"] == 0 and h["stored_len"] == h["raw_len"] == 11 + PAGE
    blob, _ = write(impl, [(0x1000, 2, bytes(PAGE))])
    h = impl.read_frame_header(blob)
    assert h["flags"] == 1 and h["stored_len"] < 100
    blob, _ = write(impl, [(0x1000, 2, bytes(PAGE))], compress=False)
    assert impl.read_frame_header(blob)["flags"] == 0


def test_header_layout():
    blob, _ = write(native, [(0x2000, 0, b"")])
    magic, version, flags, reserved, count, raw_len, stored_len, checksum, check = \
        struct.unpack_from("<4sBBHIIIQI", blob)
    assert (magic, version, reserved, count, raw_len) == (b"DXPF", 1, 0, 1, 11)
    raw = struct.pack("<QBH", 0x2000, 0, 0)
    assert checksum == _core.xxh3_64(raw)
    assert check == _core.xxh3_64(blob[:28]) & 0xFFFFFFFF
    assert blob[HEADER:] == raw and flags == 0


def test_frames_split_at_every_boundary(impl):
    """Truncating a stream anywhere raises FrameError, except at a frame boundary."""
    rng = random.Random(seed())
    recs = [(0x10000 + i * PAGE, 2, rng.choice([rng.randbytes(PAGE), b"%d" % i * PAGE]))
            for i in range(6)]
    blob, stats = write(impl, recs, frame_size=4200)     # one full page per frame
    assert stats["frames"] == 6
    vaddrs = array("Q", [r[0] for r in recs])
    boundaries, off = {0}, 0
    while off < len(blob):
        off += impl.read_frame_header(memoryview(blob)[off:])["frame_len"]
        boundaries.add(off)
    for cut in range(len(blob) + 1):
        pages = bytearray(len(recs) * PAGE)
        if cut in boundaries:
            assert sum(impl.apply_frames(blob[:cut], pages, vaddrs).values()) == \
                   sorted(boundaries).index(cut)
            continue
        with pytest.raises(FrameError, match="truncated"):
            impl.apply_frames(blob[:cut], pages, vaddrs)


def test_truncated_single_frame_says_what_is_missing(impl):
    blob, _ = write(impl, [(0x1000, 2, b"x" * PAGE)])
    with pytest.raises(FrameError, match="header needs 32 bytes, 10 present"):
        impl.decode_frame(blob[:10])
    with pytest.raises(FrameError, match=r"payload needs \d+ bytes, 3 present"):
        impl.decode_frame(blob[:HEADER + 3])


def test_every_bit_flip_is_detected(impl):
    rng = random.Random(seed())
    for compress in (True, False):
        blob, _ = write(impl, [(0x1000, 1, b"\x03\x02" + rng.randbytes(2)), (0x3000, 0, b"")],
                        compress=compress)
        for bit in range(len(blob) * 8):
            bad = bytearray(blob)
            bad[bit // 8] ^= 1 << (bit % 8)
            with pytest.raises(FrameError):
                impl.decode_frame(bytes(bad))


@pytest.mark.parametrize("frame, message", [
    (forge(b"", 0, raw_len=1 << 31), "exceeds the limit: 2147483648"),
    (forge(b"", 0, version=2), "unsupported frame version"),
    (forge(b"", 0, flags=0x80), "unknown frame flags"),
    (b"XXXX" + bytes(28), "bad frame magic"),
    (forge(struct.pack("<QBH", 0x1000, 7, 0), 1), "malformed page record"),
    (forge(struct.pack("<QBH", 0x1001, 0, 0), 1), "malformed page record"),
    (forge(struct.pack("<QBH", 0x1000, 2, 10) + bytes(10), 1), "malformed page record"),
    (forge(struct.pack("<QBH", 0x1000, 1, 2) + b"\x05\x00", 1), "xor delta is malformed"),
    (forge(struct.pack("<QBH", 0x1000, 0, 0), 2), "record count"),
    (forge(struct.pack("<QBH", 0x1000, 0, 0)[:7], 1), "malformed page record"),
    (forge(b"abc" * 10, 1, flags=1, stored=b"\x00garbage"), "lz4 payload"),
])
def test_forged_frames_raise_clear_errors(impl, frame, message):
    with pytest.raises(FrameError, match=message):
        impl.decode_frame(frame)


def test_raw_length_cap_is_configurable(impl):
    raw = struct.pack("<QBH", 0x1000, 2, PAGE) + bytes(PAGE)
    frame = forge(raw, 1, flags=1, stored=reference.frame.lz4_compress(raw))
    assert len(impl.decode_frame(frame)[0]) == 1
    with pytest.raises(FrameError, match="exceeds the limit"):
        impl.decode_frame(frame, max_raw=PAGE)


def test_apply_frames_patches_pages_and_checks_vaddrs(impl):
    rng = random.Random(seed())
    old = [rng.randbytes(PAGE) for _ in range(3)]
    new1 = bytearray(old[1])
    new1[100:104] = b"abcd"
    delta = native.xor_encode(old[1], new1)
    blob, _ = write(impl, [(0x1000, 0, b""), (0x2000, 1, delta), (0x3000, 2, b"z" * PAGE)])
    pages = bytearray(b"".join(old))
    counts = impl.apply_frames(blob, pages, array("Q", [0x1000, 0x2000, 0x3000]))
    assert counts == {"zero": 1, "xor": 1, "full": 1}
    assert pages == bytes(PAGE) + new1 + b"z" * PAGE
    pages = bytearray(b"".join(old))
    with pytest.raises(FrameError, match="does not hold.*0x3000"):
        impl.apply_frames(blob, pages, array("Q", [0x1000, 0x2000, 0x4000]))
    assert pages == b"".join(old), "a frame with an unknown vaddr must touch no page"
    with pytest.raises(ValueError, match="strictly ascending"):
        impl.apply_frames(blob, pages, array("Q", [0x2000, 0x1000, 0x3000]))


def test_writer_rejects_bad_records(impl):
    w = impl.FrameWriter()
    with pytest.raises(ValueError, match="page aligned"):
        w.add_zero(0x1001)
    with pytest.raises(ValueError, match="1..4095"):
        w.add_xor(0x1000, b"")
    with pytest.raises(ValueError, match="frame_size"):
        impl.FrameWriter(frame_size=100)
    assert w.finish() == b""
