"""atheris harness: the protocol decoder and every payload parser of deltaxfer.wire.

Input: byte 0 picks how the stream is cut into chunks (the decoder must not care),
the rest is the stream. Only ProtocolError may come out; anything else is a crash.
Run through `make fuzz` (fuzz/run.py), or alone: python fuzz/fuzz_wire.py CORPUS_DIR"""
import sys

import atheris

with atheris.instrument_imports(include=["deltaxfer"]):
    from deltaxfer import wire
    from deltaxfer.wire import ProtocolError


def payloads(messages):
    for m in messages:
        try:
            wire.decode_payload(m)
        except ProtocolError:
            pass


# chunk sizes byte 0 picks from: whole, byte by byte (short streams only: byte-by-byte
# feeding of long ones is the hypothesis tests' job), odd sizes, header-sized, page-sized
STEPS = (0, 1, 3, 17, 24, 25, 64, 4096)


def test_one(data: bytes) -> None:
    if not data:
        return
    stream = data[1:]
    # at most 64 chunks per input: the per-call cost of feed() would otherwise dominate
    step = max(STEPS[data[0] % len(STEPS)] or len(stream), -(-len(stream) // 64), 1)
    dec = wire.Decoder()
    got = []
    try:
        for i in range(0, len(stream), step):
            got += dec.feed(stream[i:i + step])
        dec.eof()
    except ProtocolError as e:
        if not e.reason or e.code not in wire.ErrorCode.__members__.values():
            raise AssertionError(f"ProtocolError without a code or reason: {e!r}")
        got += e.messages
    payloads(got)
    # the same bytes as one control payload of every type: JSON schema checks
    t = sorted(wire.CONTROL_TYPES)[data[0] % len(wire.CONTROL_TYPES)]
    try:
        wire.parse_control(t, stream)
    except ProtocolError:
        pass


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one)
    atheris.Fuzz()
