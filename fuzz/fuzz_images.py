"""atheris harness: the CRIU image parsers (deltaxfer.criu.images, .protobuf) and the
compiled core's parsers of untrusted bytes (the pagemap fast path, page frames, XOR
deltas). Byte 0 picks the target; only the parser's documented error may come out.
The pagemap is parsed twice, by the C fast path and by the Python parser, and the two
must agree whenever the fast path accepts the image.
Run through `make fuzz` (fuzz/run.py), or alone: python fuzz/fuzz_images.py CORPUS_DIR"""
import sys

import atheris

with atheris.instrument_imports(include=["deltaxfer"]):
    from deltaxfer import PAGE_SIZE, _core
    from deltaxfer.criu import images as im
    from deltaxfer.criu import protobuf as pb

MAGICS = [im.PSTREE_MAGIC, im.CORE_MAGIC, im.MM_MAGIC, im.PAGEMAP_MAGIC, im.INVENTORY_MAGIC]


_FAST = im._parse_pagemap_fast


def _no_fast(path, data):
    return None


def pagemap_both_ways(data: bytes) -> None:
    """parse_pagemap with the C fast path, then with the Python parser alone."""
    try:
        fast = im.parse_pagemap("f", data)
    except im.ImageError:
        fast = None
    im._parse_pagemap_fast = _no_fast
    try:
        slow = im.parse_pagemap("f", data)
    except im.ImageError:
        slow = None
    finally:
        im._parse_pagemap_fast = _FAST
    if fast != slow:
        raise AssertionError(f"the fast and the full pagemap parser disagree: "
                             f"{fast} != {slow}")


def test_one(data: bytes) -> None:
    if len(data) < 2:
        return
    what, body = data[0] % 6, data[1:]
    if what == 0:
        pagemap_both_ways(body)
    elif what == 1:
        magic = MAGICS[data[1] % len(MAGICS)]
        try:
            for e in im.parse_entries("f", body[1:], magic, common=magic != im.INVENTORY_MAGIC):
                try:
                    pb.decode_message(e)
                except pb.DecodeError:
                    pass
        except im.ImageError:
            pass
    elif what == 2:
        try:
            pb.decode_message(body)
        except pb.DecodeError:
            pass
    elif what == 3:
        try:
            _core.decode_frame(body)
        except ValueError:
            pass
    elif what == 4:
        page = bytearray(bytes([data[1]]) * PAGE_SIZE)
        try:
            _core.xor_decode(page, body[1:])
        except ValueError:
            pass
    else:
        try:
            arrays = _core.pagemap_entries_fast(body, 0)
            if arrays is not None and not len(arrays[0]) == len(arrays[1]) == len(arrays[2]):
                raise AssertionError("pagemap_entries_fast returned arrays of unequal length")
        except ValueError:
            pass


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one)
    atheris.Fuzz()
