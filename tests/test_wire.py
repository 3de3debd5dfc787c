"""deltaxfer.wire: frames, the incremental decoder, control schemas, binary tables, names,
handshake proofs. Pure functions of bytes: no sockets here."""
import json
import random
import struct
from array import array

import pytest

from deltaxfer import _core, wire
from deltaxfer.wire import ErrorCode, MsgType, ProtocolError
from deltaxfer.wire.framing import LINEAR_CAPACITY, SMALL_PAYLOAD

T = MsgType
NONCE = "ab" * 32
DIGEST = "0123456789abcdef"

CONTROL_EXAMPLES = {
    T.HELLO: {"protocol": "deltaxfer", "versions": [1], "caps": ["lz4", "xor"], "nonce": NONCE,
              "software": "deltaxfer 0.1.0"},
    T.WELCOME: {"version": 1, "caps": ["lz4"], "nonce": NONCE, "proof": NONCE},
    T.AUTH: {"proof": NONCE},
    T.READY: {"session_limit": 4},
    T.BEGIN: {"session": "web-1.a_b", "mode": "migrate", "source": "host-a",
              "images": [{"id": "pid-42"}, {"id": "shmem-7"}]},
    T.STATE: {"session": "s", "round": 3, "source": "host-a",
              "images": [{"id": "pid-1", "pages": 10, "digest": DIGEST}]},
    T.STATE_END: {},
    T.ROUND: {"round": 0, "final": False},
    T.IMAGE: {"index": 0, "id": "pid-9", "entries": 3, "pages": 100},
    T.IMAGE_END: {"index": 0, "digest": DIGEST},
    T.ROUND_END: {"round": 2},
    T.ROUND_OK: {"round": 2, "pages": 5, "bytes": 20480},
    T.FILE: {"name": "core-42.img", "size": 1234, "mode": 0o644},
    T.FILE_END: {"xxh3": DIGEST},
    T.COMMIT: {"restore": True},
    T.COMMITTED: {"path": "/var/lib/deltaxfer/s/images", "restored_pid": None},
    T.ERROR: {"code": "busy", "reason": "server at its limit of 4 connections"},
    T.CLOSE: {},
}


def stream_of(messages):
    """Frames of (type, payload) pairs with consecutive sequence numbers."""
    return b"".join(wire.encode(t, p, seq) for seq, (t, p) in enumerate(messages))


def decode_all(data, sizes=None):
    dec = wire.Decoder()
    out, pos = [], 0
    while pos < len(data):
        n = len(data) - pos if sizes is None else next(sizes)
        out += dec.feed(data[pos:pos + n])
        pos += n
    dec.eof()
    return out


def mixed_messages():
    rng = random.Random(7)
    big = rng.randbytes(3 * SMALL_PAYLOAD + 123)      # takes the direct-payload path
    return [(t, wire.encode_control(t, obj)) for t, obj in CONTROL_EXAMPLES.items()] + [
        (T.PAGEMAP, wire.encode_pagemap(0, [0x1000, 0x5000], [2, 1], [4, 4])),
        (T.HELD, wire.encode_held(1, [0x1000, 0x2000], [11, 22])),
        (T.PAGES, wire.encode_pages(0, big)),
        (T.FILE_DATA, rng.randbytes(1000)),
        (T.FILE_DATA, b""),
        (T.PAGES, wire.encode_pages(1, rng.randbytes(SMALL_PAYLOAD - 4))),   # exactly SMALL
        (T.PAGES, wire.encode_pages(1, rng.randbytes(SMALL_PAYLOAD - 3))),   # one over
    ]


# -- frames ---------------------------------------------------------------------------------

def test_header_layout_and_seeded_check():
    payload = b"hello"
    frame = wire.encode(T.FILE_DATA, payload, seq=5)
    magic, t, flags, length, seq, check = struct.unpack_from("<2sBBIQQ", frame)
    assert (magic, t, flags, length, seq) == (b"\xd8X", 0x31, 0, 5, 5)
    seed = int.from_bytes(frame[:8], "little") ^ 5
    assert check == _core.xxh3_64(payload, seed)
    assert frame[24:] == payload


def test_every_type_round_trips_in_one_feed():
    msgs = mixed_messages()
    out = decode_all(stream_of(msgs))
    assert [(m.type, m.seq, bytes(m.payload)) for m in out] == \
        [(t, i, bytes(p)) for i, (t, p) in enumerate(msgs)]
    for m in out:
        if m.type in wire.CONTROL_TYPES:
            assert wire.decode_control(m) == CONTROL_EXAMPLES[m.type]


def test_one_byte_at_a_time():
    msgs = mixed_messages()
    data = stream_of(msgs)
    out = decode_all(data, iter(lambda: 1, None))
    assert [bytes(m.payload) for m in out] == [bytes(p) for _, p in msgs]


@pytest.mark.parametrize("seed", range(20))
def test_random_splits(seed):
    rng = random.Random(seed)
    msgs = mixed_messages()
    data = stream_of(msgs)
    sizes = iter(lambda: rng.choice([1, 2, 23, 24, 25, 4096, 65559, 200000, 1 << 20]), None)
    out = decode_all(data, sizes)
    assert [bytes(m.payload) for m in out] == [bytes(p) for _, p in msgs]


def test_split_at_every_boundary_of_two_frames():
    data = stream_of([(T.ROUND, wire.encode_control(T.ROUND, {"round": 1, "final": True})),
                      (T.FILE_DATA, b"x" * (SMALL_PAYLOAD + 10))])
    first = len(wire.encode(T.ROUND, wire.encode_control(T.ROUND, {"round": 1, "final": True})))
    cuts = set(range(first + 60)) | set(range(len(data) - 30, len(data) + 1)) | \
        set(range(0, len(data), 997))          # every byte of both headers and of the edges
    for cut in sorted(cuts):
        out = decode_all(data, iter([cut, len(data) - cut]))
        assert [m.type for m in out] == [T.ROUND, T.FILE_DATA], cut


def test_buffered_protocol_path_reads_big_payloads_into_their_own_buffer():
    big = bytes(range(256)) * 4096                    # 1 MiB
    data = stream_of([(T.FILE_DATA, big)])
    dec = wire.Decoder()
    pos, out = 0, []
    while pos < len(data):
        buf = dec.get_buffer(-1)
        assert len(buf) > 0
        n = min(len(buf), len(data) - pos)
        buf[:n] = data[pos:pos + n]
        pos += n
        out += dec.buffer_updated(n)
    (m,) = out
    assert m.payload == big and isinstance(m.payload, memoryview)
    assert dec.capacity == LINEAR_CAPACITY + len(big)      # one pooled payload buffer


def test_payload_buffers_are_reused_only_when_released():
    a, b = bytes([1]) * (200 << 10), bytes([2]) * (200 << 10)
    dec = wire.Decoder()
    (m0,) = dec.feed(wire.encode(T.FILE_DATA, a, 0))
    (m1,) = dec.feed(wire.encode(T.FILE_DATA, b, 1))
    assert m0.payload.obj is not m1.payload.obj            # m0 still held: not overwritten
    assert m0.payload == a and m1.payload == b
    first = id(m0.payload.obj)
    del m0
    (m2,) = dec.feed(wire.encode(T.FILE_DATA, b"\3" * 1000 + a[1000:], 2))
    assert id(m2.payload.obj) == first and m2.payload[:1000] == b"\3" * 1000
    assert m1.payload == b


def test_eof_inside_a_frame_is_truncated():
    data = stream_of([(T.FILE_DATA, b"abc" * 30000)])
    for cut in (1, 23, 24, 25, len(data) - 1):
        dec = wire.Decoder()
        assert dec.feed(data[:cut]) == []
        with pytest.raises(ProtocolError) as e:
            dec.eof()
        assert e.value.code == ErrorCode.TRUNCATED
        assert f"{cut} of" in e.value.reason
    dec = wire.Decoder()
    dec.feed(data)
    dec.eof()                                           # a clean end: no error


def test_oversize_length_rejected_from_header_before_any_allocation():
    for t, limit in ((T.FILE_DATA, wire.FILE_DATA_LIMIT), (T.PAGES, wire.PAGES_LIMIT),
                     (T.HELLO, wire.CONTROL_LIMIT), (T.HELD, wire.TABLE_LIMIT)):
        header = bytearray(wire.encode_header(t, b"", 0))
        struct.pack_into("<I", header, 4, limit + 1)
        dec = wire.Decoder()
        before = dec.capacity
        with pytest.raises(ProtocolError) as e:
            dec.feed(header)
        assert e.value.code == ErrorCode.TOO_LARGE and str(limit) in e.value.reason
        assert dec.capacity == before == LINEAR_CAPACITY
    header = bytearray(wire.encode_header(T.FILE_DATA, b"", 0))
    struct.pack_into("<I", header, 4, 0xFFFFFFFF)
    dec = wire.Decoder()
    with pytest.raises(ProtocolError, match="too-large"):
        dec.feed(header)
    assert dec.capacity == LINEAR_CAPACITY


def test_encoder_refuses_oversize_and_unknown_types():
    with pytest.raises(ProtocolError, match="too-large"):
        wire.encode_header(T.FILE_DATA, bytes(wire.FILE_DATA_LIMIT + 1), 0)
    with pytest.raises(ProtocolError, match="bad-type"):
        wire.encode_header(0x55, b"", 0)


def _corrupt(offset, value, seq=0, payload=b"payload!"):
    frame = bytearray(wire.encode(T.FILE_DATA, payload, seq))
    frame[offset] = value
    return bytes(frame)


@pytest.mark.parametrize("frame,code,says", [
    (_corrupt(0, 0x00), ErrorCode.BAD_MAGIC, "magic"),
    (_corrupt(1, 0x59), ErrorCode.BAD_MAGIC, "magic"),
    (_corrupt(2, 0x55), ErrorCode.BAD_TYPE, "0x55"),
    (_corrupt(2, 0x00), ErrorCode.BAD_TYPE, "0x00"),
    (_corrupt(3, 0x01), ErrorCode.BAD_FLAGS, "flags 0x01"),
    (wire.encode(T.FILE_DATA, b"x", 1), ErrorCode.BAD_SEQ, "expected 0"),
    (_corrupt(16, 0x00), ErrorCode.BAD_CHECK, "checksum"),
    (_corrupt(30, 0x00), ErrorCode.BAD_CHECK, "checksum"),
    (_corrupt(2, 0x22), ErrorCode.BAD_CHECK, "checksum"),   # a valid type, but the seed changed
])
def test_bad_frames_name_the_cause(frame, code, says):
    dec = wire.Decoder()
    with pytest.raises(ProtocolError) as e:
        dec.feed(frame)
    assert e.value.code == code and says in e.value.reason
    # the decoder stays failed, even on a good frame
    with pytest.raises(ProtocolError) as again:
        dec.feed(wire.encode(T.CLOSE, b"{}", 0))
    assert again.value.code == code
    assert dec.error is not None and dec.error.code == code


def test_big_payload_corruption_is_caught():
    frame = bytearray(wire.encode(T.PAGES, bytes(1 << 20), 0))
    frame[24 + 777777] ^= 0x10
    with pytest.raises(ProtocolError, match="bad-check"):
        wire.Decoder().feed(frame)


def test_replayed_frame_fails_its_sequence_check():
    f0 = wire.encode(T.FILE_DATA, b"a", 0)
    dec = wire.Decoder()
    assert len(dec.feed(f0)) == 1
    with pytest.raises(ProtocolError, match="bad-seq"):
        dec.feed(f0)


def test_messages_before_a_bad_frame_travel_with_the_error():
    data = wire.encode(T.FILE_DATA, b"a", 0) + wire.encode(T.FILE_DATA, b"b", 1) + b"\0" * 24
    with pytest.raises(ProtocolError) as e:
        wire.Decoder().feed(data)
    assert [bytes(m.payload) for m in e.value.messages] == [b"a", b"b"]


# -- control payloads -----------------------------------------------------------------------

@pytest.mark.parametrize("t", sorted(CONTROL_EXAMPLES))
def test_control_round_trip(t):
    payload = wire.encode_control(t, CONTROL_EXAMPLES[t])
    assert wire.parse_control(t, payload) == CONTROL_EXAMPLES[t]


def test_control_unknown_keys_are_ignored():
    obj = dict(CONTROL_EXAMPLES[T.ROUND], future_key=[1, 2])
    assert wire.parse_control(T.ROUND, json.dumps(obj).encode()) == {"round": 0, "final": False}


@pytest.mark.parametrize("t,payload,code,says", [
    (T.ROUND, b'{"round": 1, "final": true, "round": 2}', ErrorCode.BAD_PAYLOAD, "duplicate key 'round'"),
    (T.ROUND, b'{"round": 1}', ErrorCode.BAD_PAYLOAD, "lacks the key 'final'"),
    (T.ROUND, b'{"round": "1", "final": true}', ErrorCode.BAD_PAYLOAD, "ROUND.round must be a non-negative integer"),
    (T.ROUND, b'{"round": true, "final": true}', ErrorCode.BAD_PAYLOAD, "ROUND.round"),
    (T.ROUND, b'{"round": -1, "final": true}', ErrorCode.BAD_PAYLOAD, "ROUND.round"),
    (T.ROUND, b'{"round": 1, "final": 1}', ErrorCode.BAD_PAYLOAD, "ROUND.final must be true or false"),
    (T.ROUND, b'{"round": NaN, "final": true}', ErrorCode.BAD_PAYLOAD, "NaN is not JSON"),
    (T.ROUND, b'[1, 2]', ErrorCode.BAD_PAYLOAD, "a JSON object"),
    (T.ROUND, b'{"round": 1, "final": tru', ErrorCode.BAD_PAYLOAD, "not valid JSON"),
    (T.ROUND, b'\xff\xfe', ErrorCode.BAD_PAYLOAD, "not UTF-8"),
    (T.ROUND, b'[' * 30000 + b']' * 30000, ErrorCode.BAD_PAYLOAD, "not valid JSON"),
    (T.HELLO, json.dumps(dict(CONTROL_EXAMPLES[T.HELLO], protocol="ssh")).encode(),
     ErrorCode.BAD_PAYLOAD, "HELLO.protocol"),
    (T.HELLO, json.dumps(dict(CONTROL_EXAMPLES[T.HELLO], nonce="AB" * 32)).encode(),
     ErrorCode.BAD_PAYLOAD, "64 lowercase hex digits"),
    (T.BEGIN, json.dumps(dict(CONTROL_EXAMPLES[T.BEGIN], mode="steal")).encode(),
     ErrorCode.BAD_PAYLOAD, "BEGIN.mode"),
    (T.BEGIN, json.dumps(dict(CONTROL_EXAMPLES[T.BEGIN], session="..")).encode(),
     ErrorCode.NAME, "BEGIN.session"),
    (T.BEGIN, json.dumps(dict(CONTROL_EXAMPLES[T.BEGIN], images=[{"id": "pid-1/x"}])).encode(),
     ErrorCode.NAME, "BEGIN.images[0].id"),
    (T.BEGIN, json.dumps(dict(CONTROL_EXAMPLES[T.BEGIN],
                              images=[{"id": "pid-1"}] * 4097), separators=(",", ":")).encode(),
     ErrorCode.QUOTA, "4097 items"),
    (T.FILE, b'{"name": "../etc/passwd", "size": 1, "mode": 420}', ErrorCode.NAME, "FILE.name"),
    (T.FILE, b'{"name": "core-1.img", "size": 1073741825, "mode": 420}', ErrorCode.QUOTA,
     "FILE.size"),
    (T.STATE, json.dumps(dict(CONTROL_EXAMPLES[T.STATE],
                              images=[{"id": "pid-1", "pages": 1, "digest": "xyz"}])).encode(),
     ErrorCode.BAD_PAYLOAD, "STATE.images[0].digest"),
    (T.ROUND, b'{"round": 1, "final": true}' + b" " * 65536, ErrorCode.TOO_LARGE, "65536"),
])
def test_bad_control_payloads(t, payload, code, says):
    with pytest.raises(ProtocolError) as e:
        wire.parse_control(t, payload)
    assert e.value.code == code and says in e.value.reason


def test_encode_control_checks_the_schema_too():
    with pytest.raises(ProtocolError, match="lacks the key 'final'"):
        wire.encode_control(T.ROUND, {"round": 1})
    with pytest.raises(ProtocolError, match="not a control message"):
        wire.encode_control(T.PAGES, {})


# -- binary payloads ------------------------------------------------------------------------

def test_pagemap_round_trip():
    rng = random.Random(1)
    n = 5000
    vaddrs = array("Q", sorted(rng.sample(range(1 << 47), n)))
    nr = array("I", (rng.randrange(1, 1 << 31) for _ in range(n)))
    flags = array("I", (rng.choice([0, 2, 4, 6, 0xFFFFFFFF]) for _ in range(n)))
    pm = wire.decode_pagemap(wire.encode_pagemap(7, vaddrs, nr, flags))
    assert (pm.index, len(pm)) == (7, n)
    assert pm.vaddrs == vaddrs and pm.nr_pages == nr and pm.flags == flags
    # the packed u64 pair view: (vaddr, nr_pages | flags << 32)
    assert pm.entries[1] == nr[0] | flags[0] << 32
    raw = struct.unpack_from("<IIQII", wire.encode_pagemap(7, vaddrs, nr, flags))
    assert raw == (7, n, vaddrs[0], nr[0], flags[0])
    again = wire.decode_pagemap(wire.encode_pagemap_entries(7, pm.entries))
    assert again.vaddrs == vaddrs and again.flags == flags


def test_held_round_trip_and_split():
    n = wire.TABLE_MAX_ENTRIES + 10
    vaddrs = array("Q", range(0, n * 4096, 4096))
    hashes = array("Q", range(n, 2 * n))
    payloads = list(wire.iter_held(3, vaddrs, hashes))
    assert len(payloads) == 2 and all(len(p) <= wire.TABLE_LIMIT for p in payloads)
    got_v, got_h = array("Q"), array("Q")
    for p in payloads:
        index, v, h = wire.decode_held(p)
        assert index == 3
        got_v += v
        got_h += h
    assert got_v == vaddrs and got_h == hashes
    assert wire.decode_held(wire.encode_held(0, [], [])) == (0, array("Q"), array("Q"))
    with pytest.raises(ValueError, match="do not fit"):
        wire.encode_held(0, vaddrs, hashes)


@pytest.mark.parametrize("decode", [wire.decode_held, wire.decode_pagemap])
def test_table_count_must_match_length(decode):
    good = wire.encode_held(0, [1, 2], [3, 4])
    for bad in (good[:-1], good + b"\0" * 16, good[:7], struct.pack("<II", 0, 0xFFFFFFFF)):
        with pytest.raises(ProtocolError, match="bad-payload"):
            decode(bytes(bad))


def test_pages_and_file_data():
    frame = b"DXPF" + bytes(100)
    index, view = wire.decode_pages(wire.encode_pages(9, frame))
    assert index == 9 and bytes(view) == frame
    with pytest.raises(ProtocolError, match="lacks its u32 image index"):
        wire.decode_pages(b"\1\2")
    data = bytes(range(256)) * 9000
    chunks = list(wire.iter_file_data(data))
    assert b"".join(chunks) == data and max(map(len, chunks)) == wire.FILE_DATA_LIMIT


# -- names ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["core-1.img", "inventory.img", "fs-42.img", "tty-info.img",
                                  "A" * 128])
def test_good_image_names(name):
    assert wire.check_image_name(name) == name


@pytest.mark.parametrize("name,says", [
    ("", "empty"), ("a/b.img", "path"), ("/etc/passwd", "path"), ("..", ".."),
    ("core..img", ".."), ("pagemap-1.img", "memory image"), ("pages-1.img", "memory image"),
    ("pagemap-shmem-3.img", "memory image"), (".hidden", "not a CRIU image name"),
    ("-rf", "not a CRIU image name"), ("a b", "not a CRIU image name"),
    ("nul\0.img", "path"), ("A" * 129, "over the limit"), ("é.img", "not a CRIU image name"),
    (b"core.img", "must be a string"),
])
def test_bad_image_names(name, says):
    with pytest.raises(ProtocolError) as e:
        wire.check_image_name(name)
    assert e.value.code == ErrorCode.NAME and says in e.value.reason


def test_session_names_and_image_ids():
    assert wire.check_session_name("web-1.prod_2") == "web-1.prod_2"
    for bad in ("", ".", "..", "a/b", "x" * 65, "-x", None):
        with pytest.raises(ProtocolError, match="name"):
            wire.check_session_name(bad)
    assert wire.check_image_id("pid-1") == "pid-1"
    # CRIU numbers SysV shm segments' images from 0 (pagemap-shmem-0.img)
    assert wire.check_image_id("shmem-0") == "shmem-0"
    for bad in ("pid-0", "pid-", "shm-1", "pid-1x", "pid-01", "shmem-00", "shmem-01", 7):
        with pytest.raises(ProtocolError, match="name"):
            wire.check_image_id(bad)


# -- handshake -----------------------------------------------------------------------------

def test_proofs():
    key, nc, ns = b"secret key", wire.new_nonce(), wire.new_nonce()
    assert len(nc) == wire.NONCE_SIZE and nc != ns
    sp, cp = wire.server_proof(key, nc, ns), wire.client_proof(key, nc, ns)
    assert len(sp) == 32 and sp != cp                   # different labels
    assert wire.proof_matches(sp, sp.hex())
    assert not wire.proof_matches(sp, wire.server_proof(b"other", nc, ns).hex())
    assert not wire.proof_matches(sp, "zz")
    assert wire.server_proof(key, ns, nc) != sp          # nonce order matters
    with pytest.raises(ValueError, match="non-empty"):
        wire.server_proof(b"", nc, ns)


def test_version_and_caps_negotiation():
    assert wire.choose_version([1]) == 1
    assert wire.choose_version([1, 2, 3], supported=(1, 2)) == 2
    with pytest.raises(ProtocolError) as e:
        wire.choose_version([2, 3])
    assert e.value.code == ErrorCode.VERSION and "speaks [1]" in e.value.reason
    assert wire.common_caps(["lz4", "xor", "zstd"], ["xor", "lz4", "tls"]) == ["lz4", "xor"]


def test_payload_pool_trim_keeps_the_largest_free_buffers_within_the_bound():
    from deltaxfer.wire.framing import _PayloadPool
    pool = _PayloadPool(max_bytes=64 << 20)
    limit = 16 << 20
    bufs = [pool.take(n, limit) for n in (4 << 20, 4 << 20, 1 << 20, 2 << 20)]
    in_use = memoryview(bufs[0])           # a message still refers to this one
    sizes = [len(b) for b in bufs]
    del bufs
    pool.trim(5 << 20)
    # the buffer in use is forgotten (it goes when its message does); of the free ones the
    # largest that fit in 5 MiB: 4 MiB, then 1 MiB (2 MiB would not fit)
    assert sorted(len(b) for b in pool._bufs) == [1 << 20, 4 << 20], sizes
    assert all(b is not in_use.obj for b in pool._bufs)
    pool.trim(0)
    assert pool.held == 0


def test_payload_pool_over_its_cap_makes_room_from_free_buffers():
    from deltaxfer.wire.framing import _PayloadPool
    pool = _PayloadPool(max_bytes=8 << 20)
    small = [pool.take(1 << 20, 16 << 20) for _ in range(8)]     # the cap, all in use
    del small[:]                                                  # all free now
    big = pool.take(4 << 20, 16 << 20)
    # the free 1 MiB buffers made room, so the 4 MiB one is pooled (reused next time)
    assert any(b is big for b in pool._bufs) and pool.held <= 8 << 20
    del big
    again = pool.take(4 << 20, 16 << 20)
    assert any(b is again for b in pool._bufs) and len(again) == 4 << 20
