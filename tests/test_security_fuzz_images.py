"""Fuzzing the CRIU image parsers and the compiled core's parsers of untrusted bytes with
hypothesis (the longer coverage-guided run is `make fuzz`): random and mutated images
raise only the parser's own error, and the C fast path of the pagemap parser agrees with
the Python parser on every input."""
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deltaxfer import PAGE_SIZE, _core
from deltaxfer.criu import images as im
from deltaxfer.criu import protobuf as pb

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

PAGEMAP = im.encode_pagemap(im.Pagemap(1, [
    im.PagemapEntry(0x400000, 2, im.PE_PRESENT),
    im.PagemapEntry(0x600000, 1, im.PE_PRESENT | im.PE_LAZY),
    im.PagemapEntry(0x700000, 3, im.PE_PARENT)]))


def both_parsers(data: bytes):
    """(fast-path result, Python-parser result), each a Pagemap or the ImageError."""
    def parse():
        try:
            return im.parse_pagemap("f.img", data)
        except im.ImageError as e:
            assert e.reason and "f.img" in str(e)
            return "error"
    fast = parse()
    saved = im._parse_pagemap_fast
    im._parse_pagemap_fast = lambda path, data: None
    try:
        slow = parse()
    finally:
        im._parse_pagemap_fast = saved
    return fast, slow


def mutate(data: bytes, draw) -> bytes:
    b = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "byte", "truncate", "insert", "delete"]))
        at = draw(st.integers(0, max(len(b) - 1, 0)))
        if kind == "flip" and b:
            b[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "byte" and b:
            b[at] = draw(st.integers(0, 255))
        elif kind == "truncate":
            del b[at:]
        elif kind == "insert":
            b[at:at] = draw(st.binary(min_size=1, max_size=12))
        else:
            del b[at:at + draw(st.integers(1, 12))]
    return bytes(b)


@FUZZ
@given(st.data())
def test_mutated_pagemap_fast_and_full_parser_agree(data):
    fast, slow = both_parsers(mutate(PAGEMAP, data.draw))
    assert fast == slow


@FUZZ
@given(st.binary(max_size=300))
def test_random_pagemap_after_valid_magics(tail):
    fast, slow = both_parsers(PAGEMAP[:8] + tail)
    assert fast == slow


@FUZZ
@given(st.binary(max_size=300), st.sampled_from([im.PSTREE_MAGIC, im.CORE_MAGIC, im.MM_MAGIC]))
def test_random_image_entries_and_protobuf(body, magic):
    try:
        entries = im.parse_entries("x.img", im.encode_image(magic, []) + body, magic)
    except im.ImageError as e:
        assert e.reason
        return
    for e in entries:
        try:
            pb.decode_message(e)
        except pb.DecodeError as err:
            assert str(err)


@FUZZ
@given(st.binary(max_size=400))
def test_random_protobuf(body):
    try:
        fields = pb.decode_message(body)
    except pb.DecodeError:
        return
    assert all(isinstance(k, int) and k > 0 for k in fields)


FRAME = bytes(_core.encode_round(bytes(range(256)) * 16 + bytes(PAGE_SIZE),
                                 __import__("array").array("Q", [0x1000, 0x2000]))[0])


@FUZZ
@given(st.data())
def test_mutated_page_frames(data):
    buf = mutate(FRAME, data.draw)
    try:
        records, used = _core.decode_frame(buf)
    except ValueError as e:
        assert str(e)
        return
    assert used <= len(buf)
    for vaddr, kind, payload in records:
        assert kind in (0, 1, 2)
        assert kind != 2 or len(payload) == PAGE_SIZE


@FUZZ
@given(st.binary(max_size=600))
def test_random_xor_deltas(delta):
    page = bytearray(PAGE_SIZE)
    try:
        _core.xor_decode(page, delta)
    except ValueError as e:
        assert str(e)
    assert len(page) == PAGE_SIZE
