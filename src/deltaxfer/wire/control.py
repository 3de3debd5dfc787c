"""JSON control payloads: encode, parse (never evaluate) and check against each type's schema.

A schema maps each required key to a checker ``(value, where) -> value`` that raises
ProtocolError saying which key of which message was wrong. Unknown keys are dropped, so
minor additions stay compatible and the caller sees only what it knows. OPTIONAL lists
the keys a message may carry (checked when present, absent from the result otherwise).
"""
import json
import re

from .framing import Message
from .messages import (CONTROL_LIMIT, CONTROL_TYPES, MAX_FILE_SIZE, MAX_IMAGES, PROTOCOL_NAME,
                       ErrorCode, MsgType, ProtocolError, type_name)
from .names import check_image_id, check_image_name, check_session_name

_HEX = {n: re.compile(f"[0-9a-f]{{{2 * n}}}") for n in (8, 32)}
_I64_MAX = (1 << 63) - 1


def _bad(where, what, value):
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    raise ProtocolError(ErrorCode.BAD_PAYLOAD, f"{where} must be {what}, got {shown}")


def _int(v, where):
    if type(v) is not int or not 0 <= v <= _I64_MAX:     # bool is not an int here
        _bad(where, "a non-negative integer", v)
    return v


def _float(v, where):
    if type(v) not in (int, float) or not 0 <= v < 1e12:     # (no NaN, no infinity)
        _bad(where, "a non-negative number", v)
    return float(v)


def _bool(v, where):
    if type(v) is not bool:
        _bad(where, "true or false", v)
    return v


def _str(v, where):
    if type(v) is not str:
        _bad(where, "a string", v)
    return v


def _hex(nbytes):
    pattern = _HEX[nbytes]

    def check(v, where):
        if type(v) is not str or not pattern.fullmatch(v):
            _bad(where, f"{2 * nbytes} lowercase hex digits", v)
        return v
    return check


def _const(*allowed):
    def check(v, where):
        if v not in allowed or type(v) is not type(allowed[0]):
            _bad(where, " or ".join(json.dumps(a) for a in allowed), v)
        return v
    return check


def _list(item, max_len=None, code=ErrorCode.BAD_PAYLOAD):
    def check(v, where):
        if type(v) is not list:
            _bad(where, "a list", v)
        if max_len is not None and len(v) > max_len:
            raise ProtocolError(code, f"{where} lists {len(v)} items, over the limit of {max_len}")
        return [item(x, f"{where}[{i}]") for i, x in enumerate(v)]
    return check


def _obj(schema):
    def check(v, where):
        if type(v) is not dict:
            _bad(where, "an object", v)
        return _check_keys(schema, v, where)
    return check


def _optional_int(v, where):
    return None if v is None else _int(v, where)


def _named(checker):
    def check(v, where):
        try:
            return checker(v)
        except ProtocolError as e:
            raise ProtocolError(e.code, f"{where}: {e.reason}") from None
    return check


def _file_size(v, where):
    _int(v, where)
    if v > MAX_FILE_SIZE:
        raise ProtocolError(ErrorCode.QUOTA,
                            f"{where} is {v} bytes, over the limit of {MAX_FILE_SIZE} per file")
    return v


_digest = _hex(8)          # XXH3-64 as 16 lowercase hex digits
_nonce = _hex(32)

SCHEMAS: dict[MsgType, dict] = {
    MsgType.HELLO: {"protocol": _const(PROTOCOL_NAME), "versions": _list(_int, 64),
                    "caps": _list(_str, 64), "nonce": _nonce, "software": _str},
    MsgType.WELCOME: {"version": _int, "caps": _list(_str, 64), "nonce": _nonce,
                      "proof": _nonce},
    MsgType.AUTH: {"proof": _nonce},
    MsgType.READY: {"session_limit": _int},
    MsgType.BEGIN: {"session": _named(check_session_name), "mode": _const("send", "migrate"),
                    "source": _str,
                    "images": _list(_obj({"id": _named(check_image_id)}), MAX_IMAGES,
                                    ErrorCode.QUOTA)},
    MsgType.STATE: {"session": _named(check_session_name), "round": _int, "source": _str,
                    "images": _list(_obj({"id": _named(check_image_id), "pages": _int,
                                          "digest": _digest}), MAX_IMAGES, ErrorCode.QUOTA)},
    MsgType.STATE_END: {},
    MsgType.ROUND: {"round": _int, "final": _bool},
    MsgType.IMAGE: {"index": _int, "id": _named(check_image_id), "entries": _int, "pages": _int},
    MsgType.IMAGE_END: {"index": _int, "digest": _digest},
    MsgType.ROUND_END: {"round": _int},
    MsgType.ROUND_OK: {"round": _int, "pages": _int, "bytes": _int},
    MsgType.FILE: {"name": _named(check_image_name), "size": _file_size, "mode": _int},
    MsgType.FILE_END: {"xxh3": _digest},
    MsgType.COMMIT: {"restore": _bool},
    MsgType.COMMITTED: {"path": _str, "restored_pid": _optional_int},
    MsgType.RESUME: {},
    MsgType.RESUMED: {"pid": _int},
    MsgType.POSTCOPY_END: {"pages": _int},
    MsgType.POSTCOPY_DONE: {"pages": _int, "requests": _int},
    MsgType.ERROR: {"code": _str, "reason": _str},
    MsgType.CLOSE: {},
}
assert set(SCHEMAS) == CONTROL_TYPES

# Keys added after version 1's first form: old peers drop them, so a sender must learn
# first (a capability) that the receiver understands them.
OPTIONAL: dict[MsgType, dict] = {
    # a runc container to restore (capability "runc"): its ID and bundle directory
    MsgType.BEGIN: {"container": _obj({"id": _str, "bundle": _str}),
                    # a migration says whether it wants the destination to restore: a
                    # server that does not (no --restore) refuses it at BEGIN, before any
                    # round; an old server drops the key and refuses at COMMIT as before
                    "restore": _bool},
    # the receiver can take a post-copy commit (PENDING, then pages after RESUMED)
    MsgType.STATE: {"postcopy": _bool},
    # post-copy: how many pages PENDING named (their content comes after RESUMED)
    MsgType.COMMIT: {"postcopy_pages": _int},
    # how long the copy's faults waited on pages still on the source
    MsgType.POSTCOPY_DONE: {"fault_waits": _int, "fault_wait_s": _float,
                            "fault_wait_max_s": _float},
}


def _check_keys(schema, obj, where):
    out = {}
    for key, check in schema.items():
        if key not in obj:
            raise ProtocolError(ErrorCode.BAD_PAYLOAD, f"{where} lacks the key {key!r}")
        out[key] = check(obj[key], f"{where}.{key}")
    return out


def validate_control(type: MsgType, obj) -> dict:
    """``obj`` checked against the schema of ``type``: the known keys only."""
    if type not in SCHEMAS:
        raise ProtocolError(ErrorCode.BAD_TYPE, f"{type_name(type)} is not a control message")
    if not isinstance(obj, dict):
        _bad(type_name(type), "a JSON object", obj)
    out = _check_keys(SCHEMAS[type], obj, type_name(type))
    for key, check in OPTIONAL.get(type, {}).items():
        if key in obj:
            out[key] = check(obj[key], f"{type_name(type)}.{key}")
    return out


def encode_control(type: MsgType, obj: dict) -> bytes:
    """The JSON payload of a control message; raises ProtocolError if obj breaks the schema."""
    validate_control(type, obj)
    payload = json.dumps(obj, separators=(",", ":"), ensure_ascii=False,
                         allow_nan=False).encode("utf-8")
    if len(payload) > CONTROL_LIMIT:
        raise ProtocolError(ErrorCode.TOO_LARGE,
                            f"{type_name(type)} payload of {len(payload)} bytes exceeds "
                            f"{CONTROL_LIMIT}")
    return payload


def _no_duplicates(pairs):
    obj = {}
    for k, v in pairs:
        if k in obj:
            raise ProtocolError(ErrorCode.BAD_PAYLOAD, f"duplicate key {k!r}")
        obj[k] = v
    return obj


def _no_constant(name):
    raise ProtocolError(ErrorCode.BAD_PAYLOAD, f"{name} is not JSON")


def parse_control(type: MsgType, payload) -> dict:
    """Parse and check the JSON payload of a control message of ``type``."""
    name = type_name(type)
    if len(payload) > CONTROL_LIMIT:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"{name} payload over {CONTROL_LIMIT} bytes")
    try:
        text = bytes(payload).decode("utf-8")
        obj = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except ProtocolError as e:
        raise ProtocolError(e.code, f"{name} payload: {e.reason}") from None
    except UnicodeDecodeError as e:
        raise ProtocolError(ErrorCode.BAD_PAYLOAD,
                            f"{name} payload is not UTF-8 (byte {e.start})") from None
    except (ValueError, RecursionError) as e:       # JSONDecodeError, int digit limit, nesting
        raise ProtocolError(ErrorCode.BAD_PAYLOAD,
                            f"{name} payload is not valid JSON: {str(e)[:100]}") from None
    return validate_control(type, obj)


def decode_control(msg: Message) -> dict:
    """The checked JSON object of a control message."""
    return parse_control(msg.type, msg.payload)
