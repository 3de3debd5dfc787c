"""Frames: the 24-byte header, the encoder, and the incremental decoder.

The decoder is a state machine over one linear receive buffer (asyncpg/py-pgproto style):
it accepts the stream in chunks of any size, through ``feed(chunk)`` or through
``get_buffer()``/``buffer_updated(n)`` (what an ``asyncio.BufferedProtocol`` calls), and
returns whole messages. A header is validated in full before a byte is reserved for its
payload. Payloads up to SMALL_PAYLOAD bytes are parsed in place in the linear buffer and
copied out; a bigger one gets a buffer of its (checked) length from a pool of reusable
receive buffers, which the socket reads into directly, so a 1 MiB PAGES payload is never
copied by the receiver and costs no fresh pages. After a big payload the decoder asks for
just the next header, so that the next big payload also lands in its own buffer.
"""
import struct
import sys
from typing import NamedTuple

from deltaxfer._core import xxh3_64

from .messages import (HEADER_SIZE, LIMIT_BY_BYTE, MAGIC, ErrorCode, MsgType,
                       ProtocolError, type_name)

_HEADER = struct.Struct("<2sBBIQQ")          # magic, type, flags, length, seq, check
_PREFIX = struct.Struct("<Q")                # header[0:8] as the seed's u64
_U64_MASK = (1 << 64) - 1
_MAGIC_U16 = int.from_bytes(MAGIC, "little")

SMALL_PAYLOAD = 64 * 1024                    # parsed in the linear buffer
LINEAR_CAPACITY = 256 * 1024                 # >= HEADER_SIZE + SMALL_PAYLOAD, never grows
# big-payload buffers kept for reuse, at most: what a receiver can hold at once -- the
# transport's unconsumed queue (RECV_HIGH_WATER, 32 MiB, counted in buffer bytes:
# held_bytes), the frames a session's worker is applying (receiver.PAGES_BATCH_BYTES,
# 8 MiB of buffers) and the frame being decoded. A pool smaller than that, or a queue
# counted in payload bytes (a 570 KB lz4 frame sits in a 1 MiB size class), gave most
# frames of a first round a fresh bytearray (zero-fill, page faults, munmap at free):
# 0.3 s of the receiving event loop per GiB, measured with py-spy. With apply threads
# (serve --apply-threads N > 1) up to 8 MiB + N x 4 MiB of frames are in flight instead
# of the worker's 8 MiB: the cap allows N = 8 (a cap, not an allocation: with one apply
# thread the buffers alive at once stay within 48 MiB as before).
POOL_BYTES = 80 << 20
_POOL_REFS = 3                               # refs to a free pooled buffer: pool, loop var, call


class Message(NamedTuple):
    """``payload`` is bytes for a small payload, a read-only-by-convention memoryview of a
    pooled receive buffer for a big one (the buffer is reused once nothing refers to it)."""
    type: MsgType
    seq: int
    payload: bytes | memoryview


class _PayloadPool:
    """Receive buffers for big payloads, reused once no message refers to them any more
    (CPython reference counts: a view handed out keeps its buffer referenced). A fresh 1 MiB
    bytearray costs a zero-fill and 256 page faults per message; a reused one costs none."""

    def __init__(self, max_bytes: int = POOL_BYTES):
        self._free_check = sys.getrefcount
        self._bufs: list[bytearray] = []
        self._max = max_bytes

    def take(self, length: int, limit: int) -> bytearray:
        for buf in self._bufs:
            if len(buf) >= length and self._free_check(buf) == _POOL_REFS:
                return buf
        # a size class: the next power of two, at most the type's limit
        size = min(max(1 << (length - 1).bit_length(), SMALL_PAYLOAD), limit)
        buf = bytearray(size)
        held = sum(map(len, self._bufs))
        if held + size > self._max:
            self._bufs = [b for b in self._bufs if self._free_check(b) != _POOL_REFS]
            held = sum(map(len, self._bufs))
        if held + size <= self._max:
            self._bufs.append(buf)
        return buf

    def trim(self, keep: int) -> None:
        """Forget free buffers beyond ``keep`` bytes of them (the largest kept): after a
        round's bulk, a session's quiet rounds need a few. A buffer still referred to
        stays until its message is done with it, then goes."""
        free = sorted((b for b in self._bufs if self._free_check(b) == _POOL_REFS),
                      key=len, reverse=True)
        kept, n = set(), 0
        for b in free:
            if n + len(b) <= keep:
                kept.add(id(b))
                n += len(b)
        self._bufs = [b for b in self._bufs if id(b) in kept]

    @property
    def held(self) -> int:
        return sum(map(len, self._bufs))


def held_bytes(payload) -> int:
    """The memory a received payload holds: its pooled buffer's size for a big payload
    (a view of that buffer), else its length."""
    if isinstance(payload, memoryview) and isinstance(payload.obj, bytearray):
        return len(payload.obj)
    return len(payload)


def frame_seed(prefix8: int, seq: int) -> int:
    """The check's seed: the header's first 8 bytes as a little-endian u64, XOR seq."""
    return (prefix8 ^ seq) & _U64_MASK


def encode_header(type: MsgType | int, payload, seq: int) -> bytes:
    """The 24-byte header of a frame carrying ``payload`` (any buffer): send it followed by
    the payload itself, e.g. ``transport.writelines([header, payload])``, to avoid a copy."""
    n = memoryview(payload).nbytes
    limit = LIMIT_BY_BYTE[type] if 0 <= type < 256 else -1
    if limit < 0:
        raise ProtocolError(ErrorCode.BAD_TYPE, f"cannot encode message type {type!r}")
    if n > limit:
        raise ProtocolError(ErrorCode.TOO_LARGE,
                            f"{type_name(type)} payload of {n} bytes exceeds its limit of "
                            f"{limit} bytes")
    if not 0 <= seq <= _U64_MASK:
        raise ProtocolError(ErrorCode.BAD_SEQ, f"sequence number {seq} is not a u64")
    prefix = _MAGIC_U16 | (type << 16) | (n << 32)            # flags (byte 3) are 0
    return _HEADER.pack(MAGIC, type, 0, n, seq, xxh3_64(payload, prefix ^ seq))


def encode(type: MsgType | int, payload=b"", seq: int = 0) -> bytes:
    """One whole frame (header + payload) as bytes: convenient for small messages."""
    return encode_header(type, payload, seq) + bytes(payload)


class Decoder:
    """Incremental frame decoder. ``feed(chunk) -> [Message]`` or, for a BufferedProtocol,
    ``get_buffer(sizehint)`` then ``buffer_updated(n) -> [Message]``; ``eof()`` at the end
    of the stream. A bad stream raises ProtocolError; the messages decoded before the bad
    frame in the same call are in the error's ``messages``. After an error the decoder stays
    failed: every later call raises the same error."""

    _HEADER, _PAYLOAD, _DIRECT, _FAILED = range(4)

    def __init__(self, capacity: int = LINEAR_CAPACITY):
        if capacity < HEADER_SIZE + SMALL_PAYLOAD:
            raise ValueError(f"a decoder needs at least {HEADER_SIZE + SMALL_PAYLOAD} bytes")
        self._buf = bytearray(capacity)
        self._view = memoryview(self._buf)
        self._start = 0              # first unparsed byte in _buf
        self._end = 0                # end of received bytes in _buf
        self._state = self._HEADER
        self._seq = 0                # the next expected sequence number
        self._type = 0
        self._length = 0
        self._check = 0
        self._seed = 0
        self._payload_view: memoryview | None = None   # _DIRECT: the payload being received
        self._pool = _PayloadPool()
        self._filled = 0
        self._after_direct = False   # the last payload was big: see get_buffer()
        self._error: ProtocolError | None = None
        self.messages_in = 0
        self.bytes_in = 0
        # a lower payload limit for every type, set by the transport until the peer has
        # authenticated: a peer without the key cannot make us reserve a big buffer
        self.max_payload: int | None = None

    def grow(self, capacity: int = LINEAR_CAPACITY) -> None:
        """A larger linear buffer, the bytes not yet parsed moved into it (the transport
        starts a peer that has not authenticated on the smallest one). Only between two
        buffer_updated() calls: no view from get_buffer() may be outstanding."""
        if capacity <= len(self._buf):
            return
        pending = self._end - self._start
        buf = bytearray(capacity)
        buf[:pending] = self._buf[self._start:self._end]
        self._buf, self._view = buf, memoryview(buf)
        self._start, self._end = 0, pending

    def trim_pool(self, keep: int) -> None:
        """Keep at most ``keep`` bytes of free big-payload buffers (_PayloadPool.trim)."""
        self._pool.trim(keep)

    # -- introspection (tests, counters) ---------------------------------------------------
    @property
    def capacity(self) -> int:
        """Bytes reserved for receiving: the linear buffer plus the big-payload buffers."""
        return len(self._buf) + self._pool.held + (
            len(self._payload_view.obj) if self._payload_view is not None else 0)

    @property
    def error(self) -> ProtocolError | None:
        return self._error

    @property
    def direct_remaining(self) -> int:
        """Bytes still to come of the big payload being received into its own buffer (0
        when none is): the transport asks the kernel to wake it only once that many, or a
        cap, have arrived."""
        if self._state == self._DIRECT:
            return self._length - self._filled
        return 0

    @property
    def in_frame(self) -> bool:
        """True while part of a frame has been received but not the whole of it."""
        return self._state != self._HEADER or self._end > self._start

    # -- input ------------------------------------------------------------------------------
    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Where the next received bytes go (never empty)."""
        if self._state == self._DIRECT:
            return self._payload_view[self._filled:]
        if self._state == self._FAILED:
            return self._view[:HEADER_SIZE]       # scratch: the bytes are never parsed
        if self._start == self._end:
            self._start = self._end = 0
            if self._after_direct:
                # big payloads tend to follow each other: read just the next header, so
                # that the next payload goes straight into its own buffer, not via a copy
                return self._view[:HEADER_SIZE]
        elif len(self._buf) - self._end < HEADER_SIZE + SMALL_PAYLOAD:
            self._compact()
        return self._view[self._end:]

    def buffer_updated(self, nbytes: int) -> list[Message]:
        """``nbytes`` were written at the start of the last get_buffer(): parse them."""
        if self._error is not None:
            raise self._error
        self.bytes_in += nbytes
        if self._state == self._DIRECT:
            self._filled += nbytes
            if self._filled < self._length:
                return []
            return [self._finish_direct()]
        self._end += nbytes
        return self._parse()

    def feed(self, data) -> list[Message]:
        """Decode a chunk of the stream (any size, any split)."""
        if self._error is not None:
            raise self._error
        src = memoryview(data).cast("B")
        out: list[Message] = []
        pos, n = 0, len(src)
        while pos < n:
            dst = self.get_buffer(n - pos)
            k = min(len(dst), n - pos)
            dst[:k] = src[pos:pos + k]
            pos += k
            try:
                out += self.buffer_updated(k)
            except ProtocolError as e:
                e.messages = out + e.messages
                raise
        return out

    def eof(self) -> None:
        """The stream ended: raise ProtocolError(truncated) if it ended inside a frame."""
        if self._error is not None:
            raise self._error
        if self._state == self._DIRECT:
            have, need = HEADER_SIZE + self._filled, HEADER_SIZE + self._length
        elif self._state == self._PAYLOAD:
            have, need = self._end - self._start, HEADER_SIZE + self._length
        elif self._end > self._start:
            have, need = self._end - self._start, HEADER_SIZE
        else:
            return
        what = type_name(self._type) if self._state != self._HEADER else "frame"
        self._fail(ErrorCode.TRUNCATED,
                   f"the stream ended inside a {what} frame ({have} of {need} bytes)", [])

    # -- the state machine --------------------------------------------------------------------
    def _fail(self, code, reason, messages):
        self._state = self._FAILED
        self._payload_view = None
        self._error = ProtocolError(code, reason)
        err = ProtocolError(code, reason)       # the caller's copy carries this call's messages
        err.messages = messages
        raise err

    def _compact(self):
        n = self._end - self._start
        self._buf[:n] = self._view[self._start:self._end]
        self._start, self._end = 0, n

    def _parse(self) -> list[Message]:
        out: list[Message] = []
        buf, view = self._buf, self._view
        while True:
            avail = self._end - self._start
            if self._state == self._HEADER:
                if avail < HEADER_SIZE:
                    break
                self._process_header(buf, self._start, out)
                if self._state == self._DIRECT:
                    break
                continue
            # _PAYLOAD: a small payload is completed in place in the linear buffer
            if avail < HEADER_SIZE + self._length:
                if self._start + HEADER_SIZE + self._length > len(buf):
                    self._compact()
                break
            s = self._start + HEADER_SIZE
            payload = bytes(view[s:s + self._length])
            self._after_direct = False
            self._start = s + self._length
            self._state = self._HEADER
            out.append(self._emit(payload, out))
        if self._start == self._end:
            self._start = self._end = 0
        return out

    def _process_header(self, buf, at, out):
        magic, t, flags, length, seq, check = _HEADER.unpack_from(buf, at)
        if magic != MAGIC:
            self._fail(ErrorCode.BAD_MAGIC,
                       f"frame {self._seq} starts with {bytes(magic).hex()}, not the magic "
                       f"{MAGIC.hex()}: not a deltaxfer stream or out of sync", out)
        limit = LIMIT_BY_BYTE[t]
        if limit < 0:
            self._fail(ErrorCode.BAD_TYPE, f"frame {self._seq} has unknown type 0x{t:02x}", out)
        if flags:
            self._fail(ErrorCode.BAD_FLAGS,
                       f"{type_name(t)} frame {self._seq} has flags 0x{flags:02x} "
                       "(version 1 defines none)", out)
        if length > limit:
            self._fail(ErrorCode.TOO_LARGE,
                       f"{type_name(t)} frame {self._seq} announces {length} payload bytes, "
                       f"over its limit of {limit}", out)
        if self.max_payload is not None and length > self.max_payload:
            self._fail(ErrorCode.TOO_LARGE,
                       f"{type_name(t)} frame {self._seq} announces {length} payload bytes "
                       f"before authentication (at most {self.max_payload})", out)
        if seq != self._seq:
            self._fail(ErrorCode.BAD_SEQ,
                       f"{type_name(t)} frame has sequence number {seq}, expected {self._seq} "
                       "(a frame was lost, replayed or reordered)", out)
        self._type, self._length, self._check = t, length, check
        self._seed = (_PREFIX.unpack_from(buf, at)[0] ^ seq)
        if length <= SMALL_PAYLOAD:
            self._state = self._PAYLOAD
            return
        # a big payload gets its own buffer of the checked length; the socket fills it
        self._payload_view = memoryview(self._pool.take(length, LIMIT_BY_BYTE[t]))[:length]
        s = at + HEADER_SIZE
        take = min(self._end - s, length)
        self._payload_view[:take] = self._view[s:s + take]
        self._filled = take
        self._start = s + take
        self._state = self._DIRECT
        if take == length:
            out.append(self._finish_direct(out))

    def _finish_direct(self, out=None) -> Message:
        payload, self._payload_view = self._payload_view, None
        self._state = self._HEADER
        self._after_direct = True
        return self._emit(payload, out if out is not None else [])

    def _emit(self, payload, out) -> Message:
        if xxh3_64(payload, self._seed) != self._check:
            self._fail(ErrorCode.BAD_CHECK,
                       f"{type_name(self._type)} frame {self._seq} ({self._length} payload "
                       "bytes) fails its checksum: corrupted in transit", out)
        msg = Message(MsgType(self._type), self._seq, payload)
        self._seq += 1
        self.messages_in += 1
        return msg
