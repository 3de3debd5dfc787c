"""deltaxfer.wire: the migration protocol as a pure function of bytes (docs/PROTOCOL.md).

Frames: encode_header / encode, Decoder (feed or get_buffer/buffer_updated, eof), Message.
Control payloads: encode_control / decode_control / parse_control (schema per type).
Binary payloads: encode_/decode_ pagemap, held, pages; iter_pagemap / iter_held /
iter_file_data to split big tables and files into messages.
Names: check_image_name, check_session_name, check_image_id.
Handshake: new_nonce, server_proof, client_proof, proof_matches, choose_version, common_caps.
No sockets here: deltaxfer.transport moves the bytes.
"""
from .binary import (TABLE_MAX_ENTRIES, Pagemap, decode_held, decode_pagemap, decode_pages,
                     decode_postcopy_pages, decode_runs, encode_held, encode_pagemap,
                     encode_pagemap_entries, encode_pages, encode_postcopy_pages,
                     iter_file_data, iter_held, iter_pagemap, iter_runs)
from .control import SCHEMAS, decode_control, encode_control, parse_control, validate_control
from .framing import Decoder, Message, encode, encode_header
from .handshake import (NONCE_SIZE, choose_version, client_proof, common_caps, new_nonce,
                        proof_matches, server_proof)
from .messages import (BINARY_TYPES, CAPS, CONTROL_LIMIT, CONTROL_TYPES, DEFINED_CAPS,
                       FILE_DATA_LIMIT, RUNC_CAP,
                       HANDSHAKE_TIMEOUT, HEADER_SIZE, LIMITS, MAGIC, MAX_FILE_SIZE, MAX_FILES,
                       MAX_IMAGES, PAGES_LIMIT, TABLE_LIMIT, VERSIONS, ErrorCode, MsgType,
                       ProtocolError)
from .names import check_image_id, check_image_name, check_session_name



def decode_payload(m: Message):
    """The payload of a decoded message, parsed by its type's parser (control JSON,
    pagemap, held table, pages); other types' payloads are returned as they are. Raises
    ProtocolError — only that — on a malformed payload."""
    if m.type in CONTROL_TYPES:
        return decode_control(m)
    if m.type == MsgType.PAGEMAP:
        return decode_pagemap(m.payload)
    if m.type == MsgType.HELD:
        return decode_held(m.payload)
    if m.type == MsgType.PAGES:
        return decode_pages(m.payload)
    if m.type in (MsgType.PENDING, MsgType.FETCH):
        return decode_runs(m.payload, m.type.name)
    if m.type == MsgType.POSTCOPY_PAGES:
        return decode_postcopy_pages(m.payload)
    return m.payload


__all__ = [n for n in dir() if not n.startswith("_")]
