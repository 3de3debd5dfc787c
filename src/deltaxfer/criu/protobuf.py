"""The few protobuf wire-format rules CRIU's images need, bounds-checked.

CRIU frames each image entry as ``u32 size`` + a protobuf message. We read only a
handful of message types (pagemap, pstree, mm/vma, core's comm) and write only
pagemaps, so a small codec of the wire format beats a dependency on generated
classes: it also lets us say exactly *which* byte of *which* file is wrong.

A message decodes to ``{field_number: [values...]}``: varints as int, fixed64/32 as
int, length-delimited fields as ``memoryview`` (sub-messages are decoded on demand).
"""
from __future__ import annotations

WIRE_VARINT = 0
WIRE_FIXED64 = 1
WIRE_LEN = 2
WIRE_FIXED32 = 5


class DecodeError(ValueError):
    """A protobuf message is malformed; ``offset`` is relative to the message start."""

    def __init__(self, message: str, offset: int):
        super().__init__(f"{message} at byte {offset}")
        self.offset = offset


def decode_varint(buf, pos: int, end: int) -> tuple[int, int]:
    result = 0
    shift = 0
    start = pos
    while True:
        if pos >= end:
            raise DecodeError("truncated varint", start)
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise DecodeError("varint longer than 10 bytes", start)


def decode_message(data) -> dict[int, list]:
    """Decode one message into ``{field: [values]}``; unknown fields are kept too."""
    buf = memoryview(data).cast("B") if not isinstance(data, (bytes, bytearray)) else data
    fields: dict[int, list] = {}
    pos, end = 0, len(buf)
    while pos < end:
        key_at = pos
        key, pos = decode_varint(buf, pos, end)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise DecodeError("field number 0", key_at)
        if wire == WIRE_VARINT:
            value, pos = decode_varint(buf, pos, end)
        elif wire == WIRE_FIXED64:
            if pos + 8 > end:
                raise DecodeError("truncated fixed64", pos)
            value = int.from_bytes(buf[pos:pos + 8], "little")
            pos += 8
        elif wire == WIRE_FIXED32:
            if pos + 4 > end:
                raise DecodeError("truncated fixed32", pos)
            value = int.from_bytes(buf[pos:pos + 4], "little")
            pos += 4
        elif wire == WIRE_LEN:
            length, pos = decode_varint(buf, pos, end)
            if length > end - pos:
                raise DecodeError(f"length {length} runs past the message end ({end - pos} left)", pos)
            value = memoryview(buf)[pos:pos + length]
            pos += length
        else:
            raise DecodeError(f"unsupported wire type {wire} for field {field}", key_at)
        fields.setdefault(field, []).append(value)
    return fields


def packed_or_repeated_varints(values: list) -> list[int]:
    """A ``repeated uint*`` field may arrive packed (one LEN blob) or one varint each."""
    out: list[int] = []
    for v in values:
        if isinstance(v, int):
            out.append(v)
        else:
            pos, end = 0, len(v)
            while pos < end:
                n, pos = decode_varint(v, pos, end)
                out.append(n)
    return out


def encode_varint(value: int) -> bytes:
    if value < 0:
        value &= (1 << 64) - 1  # int32/int64 negatives are 10-byte two's complement
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def encode_field_varint(field: int, value: int) -> bytes:
    return encode_varint(field << 3 | WIRE_VARINT) + encode_varint(value)


def encode_field_bytes(field: int, value: bytes) -> bytes:
    return encode_varint(field << 3 | WIRE_LEN) + encode_varint(len(value)) + bytes(value)
