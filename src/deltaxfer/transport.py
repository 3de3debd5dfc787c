"""The transport: moves protocol v1 frames over one TCP (optionally TLS) connection.

asyncio with uvloop (plain asyncio as the fallback). The receiver is an
``asyncio.BufferedProtocol`` feeding deltaxfer.wire.Decoder: the socket reads straight into
the decoder's buffer, and a big payload straight into its own buffer. The sender coalesces
small frames into >= 64 KiB writes, hands big payloads to the transport as they are
(header + payload, no concatenation), and honours pause_writing/resume_writing with an
aiohttp-style drain(). The receiver stops reading while the application leaves more than
RECV_HIGH_WATER bytes of messages unconsumed, so a fast sender cannot exhaust its memory.

    conn = await connect(host, port, key=key)           # HELLO, WELCOME, AUTH, READY
    await conn.send_control(MsgType.BEGIN, {...}); await conn.send(MsgType.PAGES, payload)
    state = await conn.recv_control(MsgType.STATE)

    server = await serve(host, port, key=key, handler=handle)   # handle(conn) per client
"""
import asyncio
import collections
import logging
import os
import socket
import ssl as _ssl
import sys
from collections.abc import Awaitable, Callable, Collection

from . import __version__
from .wire import (CAPS, HANDSHAKE_TIMEOUT, HEADER_SIZE, LIMITS, VERSIONS, Decoder, ErrorCode, Message,
                   MsgType, ProtocolError, choose_version, decode_control, encode_control,
                   encode_header)
from .wire import handshake as hs
from .wire.framing import SMALL_PAYLOAD, held_bytes
from .keys import INSECURE_KEY, loopback_peer_uid

log = logging.getLogger("deltaxfer.transport")

WRITE_HIGH_WATER = 4 << 20       # the transport's buffer above which send() waits
WRITE_LOW_WATER = 1 << 20
COALESCE = 64 << 10              # small frames are gathered into writes of this size
RECV_HIGH_WATER = 32 << 20       # unconsumed message bytes above which reading stops
RECV_LOW_WATER = 8 << 20
ERROR_LINGER = 1.0               # after sending ERROR, how long to wait for the peer to close
SOCKET_BUFFER = 4 << 20          # SO_SNDBUF/SO_RCVBUF asked for (the kernel may clamp it)
# While a big payload arrives, the kernel wakes the reader only once this much of it (or all
# that is left of it) has arrived (SO_RCVLOWAT): on a slow link the stream otherwise comes
# in ~55 KiB reads, each an event-loop wake-up and two Python calls (8 000 per GiB at
# 1 Gbit/s). Never more than the rest of the current payload, so no wait ever depends on
# bytes the peer has not committed to send; the kernel caps it at half the receive buffer.
RECV_LOWAT = 1 << 20
RECV_LOWAT_MIN = 64 << 10        # below this, the rest of a payload is read as it comes
# payloads this big are checksummed on a worker thread, overlapping the socket writes; that
# needs a spare core (on 2 CPUs, sender + receiver + hash thread contend: measured no gain)
HASH_OFFLOAD: int | None = 512 << 10 if (os.cpu_count() or 1) >= 4 else None
PIPELINE_BYTES = 8 << 20         # payload bytes being checksummed above which send() waits
# struct tcp_info (linux/tcp.h): 8 one-byte fields, 24 u32 from tcpi_rto to
# tcpi_total_retrans, u64 pacing_rate and max_pacing_rate, then u64 tcpi_bytes_acked
_TCPI_BYTES_ACKED = 8 + 24 * 4 + 2 * 8
# until the peer has authenticated: one frame's payload at most a control message, and
# all it may send at most this (HELLO or WELCOME, then AUTH or READY, fit many times)
PRE_AUTH_PAYLOAD = 64 << 10
PRE_AUTH_BYTES = 256 << 10
PEER_TEXT_LOGGED = 200           # characters of an unauthenticated peer's text put in the log
DROP_LOG_INTERVAL = 10.0         # seconds between log lines about connections over the cap


class TransportError(Exception):
    """A connection failed; the message says why."""


class ConnectionClosed(TransportError):
    """The connection ended (the peer closed it, or it was lost)."""


class PeerError(TransportError):
    """The peer sent ERROR {code, reason}."""

    def __init__(self, code: str, reason: str):
        self.code, self.reason = code, reason
        super().__init__(f"the peer reported {code}: {reason}")


class AuthError(TransportError):
    """The peers do not share the pre-shared key (or, over TLS, the same connection), or
    the listener of an --insecure client is not trusted."""


def peer_text(text, limit: int = PEER_TEXT_LOGGED) -> str:
    """Text a peer sent (an ERROR's code or reason), fit for a log line: its repr (no
    newlines or terminal escapes reach the log), at most ``limit`` characters of it."""
    text = str(text)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


# -- event loops ------------------------------------------------------------------------------

def new_event_loop(kind: str = "uvloop") -> asyncio.AbstractEventLoop:
    """A new event loop: ``"uvloop"`` (plain asyncio if uvloop is not installed) or
    ``"asyncio"``."""
    if kind == "uvloop":
        try:
            import uvloop
        except ImportError:
            log.warning("uvloop is not installed: using the plain asyncio event loop")
            return asyncio.new_event_loop()
        return uvloop.new_event_loop()
    if kind == "asyncio":
        return asyncio.new_event_loop()
    raise ValueError(f"unknown event loop kind {kind!r} (uvloop or asyncio)")


def run(coro, *, loop: str = "uvloop"):
    """Run a coroutine to completion on a new event loop of the given kind."""
    with asyncio.Runner(loop_factory=lambda: new_event_loop(loop)) as runner:
        return runner.run(coro)


# -- the protocol: bytes in, frames out ------------------------------------------------------

class _FrameProtocol(asyncio.BufferedProtocol):
    """Socket callbacks: decode into a message queue, encode and coalesce writes, flow
    control both ways. The application talks to it through Connection."""

    def __init__(self, on_connected: Callable[["_FrameProtocol"], None] | None = None):
        self._loop = asyncio.get_running_loop()
        self._on_connected = on_connected
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self._writelines_ok = False
        # receive: the decoder (and its buffer) exists from the first byte received, so a
        # connection that sends nothing costs no buffer
        self._decoder: Decoder | None = None
        self._pre_auth = True
        self._queue: collections.deque[Message] = collections.deque()
        self._queued = 0
        self._reading_paused = False
        self._recv_waiter: asyncio.Future | None = None
        self._exc: BaseException | None = None   # why recv() fails once the queue is empty
        self._discard: memoryview | None = None  # set while lingering after an ERROR
        self._lowat_sock = None          # the TCP socket, once authenticated (RECV_LOWAT)
        self._lowat = 1
        # send
        self._out = bytearray()
        self._flush_scheduled = False
        self._seq_out = 0
        self._write_paused = False
        self._drain_waiter: asyncio.Future | None = None
        self._pipeline: collections.deque = collections.deque()   # (header|future, payload, n)
        self._pipeline_bytes = 0          # payload bytes whose check is being computed
        self._pipeline_waiter: asyncio.Future | None = None
        self._after_pipeline: list[Callable[[], None]] = []
        self.closing = False
        self.closed = self._loop.create_future()
        self.bytes_out = self.frames_out = 0

    # connection
    def connection_made(self, transport):
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        # uvloop (and asyncio from 3.12) write a list of buffers with one sendmsg; 3.11's
        # selector transport would join them into a copy, so there we write them one by one
        self._writelines_ok = (type(transport).__module__.startswith("uvloop")
                               or sys.version_info >= (3, 12))
        if self._on_connected is not None:
            self._on_connected(self)

    def connection_lost(self, exc):
        self.closing = True
        if self._exc is None:
            self._exc = ConnectionClosed(
                f"connection to {self.peer} lost: {exc}" if exc else
                f"{self.peer} closed the connection")
        self._wake_recv()
        for attr in ("_drain_waiter", "_pipeline_waiter"):
            waiter = getattr(self, attr)
            setattr(self, attr, None)
            if waiter is not None and not waiter.done():
                waiter.set_exception(ConnectionClosed(f"connection to {self.peer} closed"))
        if not self.closed.done():
            self.closed.set_result(None)

    # receive
    @property
    def decoder(self) -> Decoder:
        if self._decoder is None:
            # until the peer authenticated, frames are small: the smallest linear buffer
            self._decoder = Decoder(HEADER_SIZE + SMALL_PAYLOAD) if self._pre_auth else Decoder()
            self._decoder.max_payload = PRE_AUTH_PAYLOAD if self._pre_auth else None
        return self._decoder

    def get_buffer(self, sizehint):
        if self._discard is not None:
            return self._discard
        return self.decoder.get_buffer(sizehint)

    def buffer_updated(self, nbytes):
        if self._discard is not None:
            return
        try:
            messages = self.decoder.buffer_updated(nbytes)
            if self._pre_auth and self.decoder.bytes_in > PRE_AUTH_BYTES:
                raise ProtocolError(ErrorCode.TOO_LARGE,
                                    f"{self.decoder.bytes_in} bytes before authentication "
                                    f"(at most {PRE_AUTH_BYTES})")
        except ProtocolError as e:
            messages = getattr(e, "messages", None) or []
            self._stream_failed(e)
        if self._lowat_sock is not None:
            self._set_lowat()
        if not messages:
            return
        for m in messages:
            self._queue.append(m)
            self._queued += HEADER_SIZE + held_bytes(m.payload)
        if self._queued > RECV_HIGH_WATER and not self._reading_paused and not self.closing:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake_recv()

    def _set_lowat(self):
        rest = self._decoder.direct_remaining
        want = min(rest, RECV_LOWAT) if rest >= RECV_LOWAT_MIN else 1
        if want != self._lowat:
            self._set_lowat_to(want)

    def _set_lowat_to(self, want: int):
        try:
            self._lowat_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, want)
            self._lowat = want
        except OSError:
            self._lowat_sock = None              # not for this socket: read as it comes

    def eof_received(self):
        try:
            if self._decoder is not None:
                self._decoder.eof()
        except ProtocolError as e:
            self._exc = self._exc or e
        self._wake_recv()
        return False            # close our side too

    def _stream_failed(self, e: ProtocolError):
        log.warning("bad stream from %s: %s", self.peer, e)
        if self._exc is None:
            self._exc = e
        self.send_error(e.code, e.reason)

    def _wake_recv(self):
        waiter, self._recv_waiter = self._recv_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def next_message(self) -> Message:
        while not self._queue:
            if self._exc is not None:
                raise self._exc
            self._recv_waiter = self._loop.create_future()
            await self._recv_waiter
        return self._pop()

    def next_message_nowait(self, type: MsgType) -> Message | None:
        """The next message if it was already received and is of ``type``, else None."""
        if self._queue and self._queue[0].type == type:
            return self._pop()
        return None

    def _pop(self) -> Message:
        m = self._queue.popleft()
        self._queued -= HEADER_SIZE + held_bytes(m.payload)
        if self._reading_paused and self._queued <= RECV_LOW_WATER and not self.closing:
            self._reading_paused = False
            self.transport.resume_reading()
        return m

    def authenticated(self) -> None:
        """The peer proved the key: from now on the protocol's own limits apply, and the
        socket gets its big buffers (an unauthenticated peer gets the kernel's default)."""
        self._pre_auth = False
        if self._decoder is not None:
            self._decoder.max_payload = None
            self._decoder.grow()
        sock = self.transport.get_extra_info("socket") if self.transport is not None else None
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                try:
                    sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
                except OSError:
                    pass
            # not under TLS: the bytes still due of a payload say nothing of the
            # ciphertext still due (records, part of one already read), so a low-water
            # mark could wait for bytes that never come
            if (RECV_LOWAT > 1 and self._discard is None
                    and self.transport.get_extra_info("ssl_object") is None):
                self._lowat_sock = sock

    # send
    def write_frame(self, type: MsgType, payload) -> None:
        """Queue one frame; frames leave in the order of the calls."""
        if self.closing:
            raise self._exc if isinstance(self._exc, TransportError) else \
                ConnectionClosed(f"connection to {self.peer} is closing")
        n = memoryview(payload).nbytes
        seq = self._seq_out
        if HASH_OFFLOAD is not None and n >= HASH_OFFLOAD:
            # the check of a big payload is computed on a worker thread (xxh3 releases the
            # GIL), overlapping with the socket writes of the frames before it
            if n > LIMITS.get(type, -1):
                encode_header(type, payload, seq)            # raises the precise error
            header = self._loop.run_in_executor(None, encode_header, type, payload, seq)
            header.add_done_callback(self._pipeline_ready)
            self._pipeline_bytes += n
        else:
            header = encode_header(type, payload, seq)
        self._seq_out = seq + 1
        self.frames_out += 1
        self.bytes_out += HEADER_SIZE + n
        if self._pipeline or not isinstance(header, bytes):
            self._pipeline.append((header, payload, n))
            return
        self._write(header, payload, n)

    def _pipeline_ready(self, _=None):
        """Write the frames at the head of the pipeline whose headers are ready, in order."""
        pipeline = self._pipeline
        while pipeline:
            header, payload, n = pipeline[0]
            if not isinstance(header, bytes):
                if not header.done():
                    break
                if header.cancelled() or header.exception() is not None:
                    log.error("checksum of a frame to %s failed: %r", self.peer,
                              None if header.cancelled() else header.exception())
                    pipeline.clear()
                    self.closing = True
                    if self.transport is not None:
                        self.transport.abort()
                    break
                header = header.result()
                self._pipeline_bytes -= n
            pipeline.popleft()
            if self.transport is None or self.transport.is_closing():
                continue
            self._write(header, payload, n)
        if self._pipeline_bytes <= PIPELINE_BYTES:
            self._wake(self, "_pipeline_waiter")
        if not pipeline:
            self.flush()
            callbacks, self._after_pipeline = self._after_pipeline, []
            for cb in callbacks:
                cb()

    def _when_written(self, callback):
        """Run callback once every queued frame has gone to the transport."""
        if self._pipeline:
            self._after_pipeline.append(callback)
        else:
            callback()

    @staticmethod
    def _wake(obj, attr):
        waiter = getattr(obj, attr)
        setattr(obj, attr, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _write(self, header: bytes, payload, n: int) -> None:
        out = self._out
        if n < COALESCE:
            out += header
            out += payload
            if len(out) >= COALESCE:
                self.flush()
            elif not self._flush_scheduled:
                self._flush_scheduled = True
                self._loop.call_soon(self.flush)
            return
        # a big payload goes to the transport as it is, after what was gathered before it
        out += header
        self._out = bytearray()
        if self._writelines_ok:
            self.transport.writelines([out, payload])
        else:
            self.transport.write(out)
            self.transport.write(payload)

    def flush(self):
        self._flush_scheduled = False
        if self._out and self.transport is not None and not self.transport.is_closing():
            out, self._out = self._out, bytearray()
            self.transport.write(out)

    def pause_writing(self):
        self._write_paused = True

    def resume_writing(self):
        self._write_paused = False
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    @property
    def must_wait(self) -> bool:
        return self._write_paused or self._pipeline_bytes > PIPELINE_BYTES

    async def drain(self):
        """Wait until the frames being checksummed and the transport's buffer are below
        their bounds (aiohttp's drain, plus the checksum pipeline)."""
        while self._pipeline_bytes > PIPELINE_BYTES:
            if self.closed.done():
                raise ConnectionClosed(f"connection to {self.peer} closed")
            self._pipeline_waiter = self._loop.create_future()
            await self._pipeline_waiter
        if self.closing and self.closed.done():
            raise ConnectionClosed(f"connection to {self.peer} closed")
        if not self._write_paused:
            return
        self.flush()
        self._drain_waiter = self._loop.create_future()
        await self._drain_waiter

    # ending
    def send_error(self, code: str, reason: str) -> bool:
        """Send ERROR and start closing: keep reading (and discarding) until the peer
        closes or ERROR_LINGER passes, so our ERROR is not lost to a reset. False if the
        connection was already closing."""
        if self.closing:
            return False
        try:
            self.write_frame(MsgType.ERROR, encode_control(
                MsgType.ERROR, {"code": str(code), "reason": str(reason)[:2000]}))
        except (ProtocolError, TransportError):
            pass
        self.closing = True
        self._discard = memoryview(bytearray(64 << 10))
        if self._lowat_sock is not None and self._lowat != 1:
            self._set_lowat_to(1)
        if self._reading_paused:
            self._reading_paused = False
            self.transport.resume_reading()
        self._when_written(self._end_writing)
        self._loop.call_later(ERROR_LINGER, self.abort_if_open)
        return True

    def _end_writing(self):
        self.flush()
        if not self.transport.is_closing() and self.transport.can_write_eof():
            self.transport.write_eof()

    def refuse_now(self, code: str, reason: str) -> None:
        """Send ERROR and drop the connection at once: no reading, no lingering (a peer
        refused before the handshake must not hold a descriptor or a buffer). On loopback
        the ERROR is delivered before the reset; further away it may be lost."""
        if self.closing or self.transport is None:
            return
        try:
            self.write_frame(MsgType.ERROR, encode_control(
                MsgType.ERROR, {"code": str(code), "reason": str(reason)[:2000]}))
        except (ProtocolError, TransportError):
            pass
        self.flush()
        self.closing = True
        self.transport.abort()

    def abort_if_open(self):
        if self.transport is not None and not self.closed.done():
            self.transport.close()

    def close(self):
        """Close once every queued frame has gone to the transport (which flushes it)."""
        if self.transport is None:
            return
        self.closing = True
        self._when_written(self._close_now)

    def _close_now(self):
        self.flush()
        self.transport.close()


# -- the application's view -------------------------------------------------------------------

class Connection:
    """One authenticated connection. After the handshake: ``version``, ``caps`` (those both
    sides listed), ``session_limit`` (client side: what READY said), ``peer``.

    Frames are sent in the order of the send calls. A payload handed to send() must not
    be modified afterwards: the transport may still hold it."""

    def __init__(self, protocol: _FrameProtocol):
        self._p = protocol
        self.version: int | None = None
        self.caps: list[str] = []
        self.session_limit: int | None = None

    @property
    def peer(self) -> str:
        return self._p.peer

    @property
    def stats(self) -> dict:
        """Frames and bytes (headers included) each way."""
        d = self._p._decoder
        return {"frames_out": self._p.frames_out, "bytes_out": self._p.bytes_out,
                "frames_in": d.messages_in if d is not None else 0,
                "bytes_in": d.bytes_in if d is not None else 0}

    def trim_buffers(self, keep: int) -> None:
        """Keep at most ``keep`` bytes of free receive buffers for big payloads (a
        round's bulk left up to framing.POOL_BYTES of them)."""
        if self._p._decoder is not None:
            self._p._decoder.trim_pool(keep)

    @property
    def bytes_delivered(self) -> int:
        """How far the stream has got to the peer, for telling a slow link from a stopped
        one: the bytes the peer's TCP acknowledged (TCP_INFO's tcpi_bytes_acked, Linux
        >= 4.1; TLS records and handshakes included, so only its changes mean anything).
        Neither bytes_out (a whole round can sit in the transport's buffer) nor what the
        kernel took (several MB of socket buffer drain for seconds on a slow link) moves
        only as the link does. Falls back to the bytes handed to the kernel."""
        p = self._p
        t = p.transport
        if t is None:
            return p.bytes_out
        sock = t.get_extra_info("socket")
        if sock is not None and not t.is_closing() \
                and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
                if len(info) >= _TCPI_BYTES_ACKED + 8:
                    return int.from_bytes(info[_TCPI_BYTES_ACKED:_TCPI_BYTES_ACKED + 8],
                                          sys.byteorder)
            except (OSError, ValueError):     # closed under us (ValueError: fd -1)
                pass
        waiting = t.get_write_buffer_size() if not t.is_closing() else 0
        return p.bytes_out - waiting - p._pipeline_bytes

    @property
    def transport(self) -> asyncio.Transport | None:
        return self._p.transport

    # send
    async def send(self, type: MsgType, payload=b"") -> None:
        """Send one message; waits while the transport's buffer is over its high water mark.
        When the peer closed the connection after an ERROR (a streaming sender is usually
        still sending then), that ERROR is raised as PeerError: it names the cause."""
        p = self._p
        try:
            p.write_frame(type, payload)
            if p.must_wait:
                await p.drain()
        except ConnectionClosed:
            err = self._queued_peer_error()
            if err is not None:
                raise err from None
            raise

    def _queued_peer_error(self) -> "PeerError | None":
        for m in self._p._queue:
            if m.type == MsgType.ERROR:
                try:
                    e = decode_control(m)
                except ProtocolError as bad:
                    e = {"code": ErrorCode.INTERNAL,
                         "reason": f"(unreadable ERROR: {bad.reason})"}
                return PeerError(e["code"], e["reason"])
        return None

    async def send_control(self, type: MsgType, obj: dict) -> None:
        await self.send(type, encode_control(type, obj))

    async def drain(self) -> None:
        await self._p.drain()

    # receive
    async def recv(self, timeout: float | None = None) -> Message:
        """The next message. An ERROR from the peer raises PeerError; a broken stream raises
        ProtocolError (after an ERROR went to the peer); the end raises ConnectionClosed;
        ``timeout`` seconds without a message raise TimeoutError."""
        if timeout is None:
            m = await self._p.next_message()
        else:
            async with asyncio.timeout(timeout):
                m = await self._p.next_message()
        if m.type == MsgType.ERROR:
            try:
                e = decode_control(m)
            except ProtocolError as bad:
                e = {"code": ErrorCode.INTERNAL, "reason": f"(unreadable ERROR: {bad.reason})"}
            self._p.closing = True
            self._p.abort_if_open()
            raise PeerError(e["code"], e["reason"])
        return m

    def recv_ready(self, type: MsgType) -> Message | None:
        """A message of ``type`` that has already arrived and is next in the stream, or
        None (nothing waits, or the next message is of another type): lets a receiver
        take a run of queued frames in one go, e.g. to hand them to a worker thread at
        once. An ERROR is never taken here: recv() raises it."""
        return self._p.next_message_nowait(type)

    async def recv_message(self, expected: MsgType | Collection[MsgType],
                           timeout: float | None = None) -> Message:
        """The next message, which must be of the expected type(s): anything else sends
        ERROR unexpected to the peer and raises ProtocolError(unexpected)."""
        m = await self.recv(timeout)
        if m.type == expected if isinstance(expected, MsgType) else m.type in expected:
            return m
        names = expected.name if isinstance(expected, MsgType) else \
            " or ".join(t.name for t in expected)
        reason = f"expected {names}, got {m.type.name} (message {m.seq})"
        await self.error(ErrorCode.UNEXPECTED, reason)
        raise ProtocolError(ErrorCode.UNEXPECTED, reason)

    async def recv_control(self, expected: MsgType | Collection[MsgType],
                           timeout: float | None = None) -> dict:
        """The checked JSON object of the next message, which must be of the expected type(s).
        A payload that breaks its schema sends ERROR to the peer and raises ProtocolError."""
        m = await self.recv_message(expected, timeout)
        try:
            return decode_control(m)
        except ProtocolError as e:
            await self.error(e.code, e.reason)
            raise

    # ending
    async def error(self, code: str, reason: str) -> None:
        """Send ERROR {code, reason} to the peer, then close (after the peer closes, or
        after ERROR_LINGER seconds)."""
        # also when the ERROR already went out (a broken stream is answered by the protocol
        # itself): linger, reading and discarding, so that closing now with the peer's data
        # unread does not reset the connection before the peer has read our ERROR
        if self._p.send_error(code, reason) or self._p._discard is not None:
            try:
                async with asyncio.timeout(ERROR_LINGER + 0.5):
                    await asyncio.shield(self._p.closed)
            except TimeoutError:
                pass

    async def goodbye(self) -> None:
        """Send CLOSE (a clean end) and close."""
        if not self._p.closing:
            self._p.write_frame(MsgType.CLOSE, b"{}")
        self.close()
        await self.wait_closed()

    def close(self) -> None:
        self._p.close()

    async def wait_closed(self) -> None:
        await asyncio.shield(self._p.closed)

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        self.close()
        await self.wait_closed()


# -- client -------------------------------------------------------------------------------------

async def connect(host: str, port: int, *, key: bytes, ssl: _ssl.SSLContext | None = None,
                  caps: Collection[str] = CAPS, handshake_timeout: float = HANDSHAKE_TIMEOUT,
                  software: str = f"deltaxfer {__version__}",
                  versions: Collection[int] = VERSIONS) -> Connection:
    """Connect and authenticate: HELLO -> WELCOME (the server's proof is checked first) ->
    AUTH -> READY. Raises AuthError if the keys differ (or a relay terminates TLS, or the
    certificate is not the pinned one, or with the published --insecure key the listener
    belongs to another user), PeerError if the server refuses (``version``, ``busy``,
    ...), TimeoutError, OSError or ssl.SSLError for the connection itself.

    With ``ssl`` the certificate must carry ``ssl.server_name`` if the context has one
    (deltaxfer.keys.client_tls), else ``host``; and be the one ``ssl.pin`` names, if set."""
    hs._check_key(key)
    loop = asyncio.get_running_loop()
    server_name = (getattr(ssl, "server_name", None) or host) if ssl is not None else None
    _, proto = await asyncio.wait_for(
        loop.create_connection(_FrameProtocol, host, port, ssl=ssl,
                               server_hostname=server_name),
        handshake_timeout)
    conn = Connection(proto)
    try:
        if bytes(key) == INSECURE_KEY:
            await _check_insecure_listener(proto, host, port)
        binding = _client_binding(proto, ssl, host, port)
        async with asyncio.timeout(handshake_timeout):
            await _client_handshake(conn, key, _with_tls(caps, ssl), software, versions,
                                    binding)
    except TimeoutError:
        await conn.error(ErrorCode.TIMEOUT, f"handshake took over {handshake_timeout} s")
        raise TimeoutError(f"{host}:{port}: no complete handshake within "
                           f"{handshake_timeout} s") from None
    except BaseException:
        conn.close()
        raise
    return conn


async def _check_insecure_listener(proto: _FrameProtocol, host: str, port: int) -> None:
    """The published key proves nothing, so before a byte goes out the listener must be
    root's or ours: another local user could have taken the port of a `serve --insecure`
    and would otherwise receive the process's memory."""
    sock = proto.transport.get_extra_info("socket")
    uid = None
    for _ in range(20):          # the server's end appears once the kernel has our ACK
        uid = loopback_peer_uid(sock) if sock is not None else None
        if uid is not None:
            break
        await asyncio.sleep(0.005)
    if uid is None:
        raise AuthError(f"{host}:{port}: --insecure talks only to a local `serve --insecure`, "
                        "and no local socket answers on this port (is it a loopback "
                        "address?); use --key-file")
    if uid not in (0, os.geteuid()):
        raise AuthError(f"{host}:{port} is a socket of uid {uid}, not of root or of uid "
                        f"{os.geteuid()} (us): with --insecure (a published key) nothing is "
                        "sent to another user's listener; use --key-file")


def _client_binding(proto: _FrameProtocol, ssl_context, host, port) -> bytes:
    """The channel binding the client proves: SHA-256 of the certificate the server
    showed (b"" without TLS), after checking it against the pin, if one is set."""
    if ssl_context is None:
        return b""
    der = proto.transport.get_extra_info("ssl_object").getpeercert(binary_form=True)
    binding = hs.tls_server_end_point(der)
    pin = getattr(ssl_context, "pin", None)
    if pin is not None and binding != pin:
        raise AuthError(f"{host}:{port}: its TLS certificate is sha256:{binding.hex()}, not "
                        f"the pinned sha256:{pin.hex()} (--tls-pin)")
    return binding


def _with_tls(caps, ssl_context) -> list[str]:
    caps = [c for c in caps if c != "tls"]
    return caps + ["tls"] if ssl_context is not None else caps


async def _client_handshake(conn: Connection, key, caps, software, versions, binding=b""):
    nonce_c = hs.new_nonce()
    await conn.send_control(MsgType.HELLO, hs.hello(nonce_c, caps, software, versions))
    w = await conn.recv_control(MsgType.WELCOME)
    if w["version"] not in versions:
        reason = f"the server chose version {w['version']}, which we did not offer"
        await conn.error(ErrorCode.VERSION, reason)
        raise ProtocolError(ErrorCode.VERSION, reason)
    nonce_s = bytes.fromhex(w["nonce"])
    if not hs.proof_matches(hs.server_proof(key, nonce_c, nonce_s, binding), w["proof"]):
        if binding:
            await conn.error(ErrorCode.AUTH, "the server's proof does not match our key and "
                                             "the TLS certificate we were shown")
            raise AuthError(f"{conn.peer}: the server's proof does not match our key and the "
                            f"TLS certificate we were shown (sha256:{binding.hex()}): either "
                            "the keys differ, or something between us terminates TLS with "
                            "another certificate (a relay); use the same key on both hosts, "
                            "and check the certificate (--tls-pin)")
        await conn.error(ErrorCode.AUTH, "the server's proof does not match our key")
        raise AuthError(f"{conn.peer}: the server does not know our key (its proof does not "
                        "match); use the same key on both hosts")
    await conn.send_control(MsgType.AUTH, hs.auth(key, nonce_c, nonce_s, binding))
    try:
        ready = await conn.recv_control(MsgType.READY)
    except PeerError as e:
        if e.code == ErrorCode.AUTH:
            raise AuthError(f"{conn.peer} refused our key: {e.reason}") from e
        raise
    conn._p.authenticated()
    conn.version, conn.caps = w["version"], hs.common_caps(caps, w["caps"])
    conn.session_limit = ready["session_limit"]


# -- server ---------------------------------------------------------------------------------------

Handler = Callable[[Connection], Awaitable[None]]


async def serve(host: str | None, port: int, *, key: bytes, handler: Handler,
                ssl: _ssl.SSLContext | None = None, max_connections: int = 16,
                caps: Collection[str] = CAPS, handshake_timeout: float = HANDSHAKE_TIMEOUT,
                session_limit: int | None = None,
                admit: Callable[[asyncio.Transport], str | None] | None = None,
                max_handshakes: int | None = None, max_handshakes_per_host: int = 8,
                max_sockets: int | None = None, **server_kwargs) -> asyncio.Server:
    """Listen; authenticate each client (server side of the handshake), then run
    ``await handler(conn)``. An exception in the handler is logged and sent to the peer
    as ERROR (its code for a ProtocolError, ``internal`` otherwise); the server keeps
    serving. ``admit(transport)`` may refuse a connection before the handshake: it returns
    the reason, sent as ERROR auth. Returns the asyncio.Server (port 0 picks a free port:
    ``server.sockets[0].getsockname()``).

    Two limits, so that peers without the key cannot starve those with it: connections
    still in the handshake (``max_handshakes`` in all, default max(16, 2 x
    max_connections), and ``max_handshakes_per_host`` from one address) and authenticated
    connections (``max_connections``). Over either, the client gets ERROR busy — over the
    second only once it has authenticated, so a peer without the key learns nothing; over
    the first at once, and the connection is dropped (no linger). Above all of them a hard
    cap on open connections (``max_sockets``, default max_handshakes + max_connections +
    8): one over it is closed as soon as it is accepted (with TLS: once its TLS handshake,
    bounded by ``handshake_timeout``, is done), before a receive buffer exists.

    With ``ssl`` the context must come from deltaxfer.keys.server_tls, which records the
    certificate's channel binding (``ssl.end_point``) that the proofs include."""
    hs._check_key(key)
    loop = asyncio.get_running_loop()
    caps = _with_tls(caps, ssl)
    binding = b""
    if ssl is not None:
        binding = getattr(ssl, "end_point", None)
        if not binding:
            raise ValueError("a TLS server context needs its certificate's channel binding: "
                             "build it with deltaxfer.keys.server_tls(cert, key)")
    limit = max_connections if session_limit is None else session_limit
    max_handshakes = max_handshakes or max(16, 2 * max_connections)
    max_sockets = max_sockets or max_handshakes + max_connections + 8
    sockets = {"open": 0, "dropped": 0, "logged": 0.0}
    active = {"n": 0}
    handshaking: dict[str, int] = {}
    tasks: set[asyncio.Task] = set()

    def claim() -> bool:
        if active["n"] >= max_connections:
            return False
        active["n"] += 1
        return True

    async def one(proto: _FrameProtocol):
        conn = Connection(proto)
        refused = admit(proto.transport) if admit is not None else None
        if refused:
            log.warning("refusing %s: %s", conn.peer, refused)
            proto.refuse_now(ErrorCode.AUTH, refused)
            return
        peer = proto.transport.get_extra_info("peername")
        host = peer[0] if isinstance(peer, tuple) else str(peer)
        if sum(handshaking.values()) >= max_handshakes or \
                handshaking.get(host, 0) >= max_handshakes_per_host:
            reason = (f"server busy: {sum(handshaking.values())} connections "
                      f"({handshaking.get(host, 0)} from {host}) are in the handshake; "
                      "try again later")
            log.warning("refusing %s: %s", conn.peer, reason)
            proto.refuse_now(ErrorCode.BUSY, reason)
            return
        handshaking[host] = handshaking.get(host, 0) + 1
        claimed = False
        try:
            claimed = await _handshake_one(conn, key, caps, limit, handshake_timeout, claim,
                                           max_connections, binding)
        finally:
            handshaking[host] -= 1
            if not handshaking[host]:
                del handshaking[host]
        if not claimed:
            conn.close()
            return
        try:
            await _run_handler(conn, handler)
        finally:
            active["n"] -= 1
            conn.close()

    def connected(proto: _FrameProtocol):
        if sockets["open"] >= max_sockets:
            proto.closing = True
            proto.transport.abort()
            dropped()
            return
        sockets["open"] += 1
        proto.closed.add_done_callback(released)
        task = loop.create_task(one(proto))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def released(_):
        sockets["open"] -= 1

    def dropped():
        sockets["dropped"] += 1
        now = loop.time()
        if now - sockets["logged"] >= DROP_LOG_INTERVAL:
            sockets["logged"] = now
            log.warning("%d open connections, the most this server keeps (handshake and "
                        "session slots, and room to answer busy): dropped %d connection(s) "
                        "at once since the last such line", max_sockets, sockets["dropped"])
            sockets["dropped"] = 0

    if ssl is not None:
        server_kwargs.setdefault("ssl_handshake_timeout", handshake_timeout)
    return await loop.create_server(lambda: _FrameProtocol(connected), host, port, ssl=ssl,
                                    **server_kwargs)


class _Busy(Exception):
    pass


async def _handshake_one(conn, key, caps, session_limit, handshake_timeout, claim,
                         max_connections, binding=b"") -> bool:
    """The server's handshake; True once authenticated and holding a connection slot."""
    peer = conn.peer
    try:
        async with asyncio.timeout(handshake_timeout):
            await _server_handshake(conn, key, caps, session_limit, claim, max_connections,
                                    binding)
    except TimeoutError:
        log.warning("%s: no complete handshake within %s s", peer, handshake_timeout)
        await conn.error(ErrorCode.TIMEOUT, f"handshake took over {handshake_timeout} s")
        return False
    except _Busy:
        return False
    except AuthError as e:
        log.warning("client failed authentication from %s: %s", peer, e)
        return False
    except PeerError as e:
        log.warning("%s ended the handshake: ERROR %s %s", peer, peer_text(e.code, 40),
                    peer_text(e.reason))
        return False
    except (ProtocolError, ConnectionClosed) as e:
        log.warning("handshake with %s failed: %s", peer, e)
        return False
    log.info("%s authenticated (version %s, caps %s)", peer, conn.version, conn.caps)
    return True


async def _run_handler(conn, handler):
    peer = conn.peer
    try:
        await handler(conn)
    except PeerError as e:
        log.warning("%s: %s", peer, e)
    except ConnectionClosed as e:
        log.warning("%s: %s", peer, e)
    except ProtocolError as e:
        log.warning("%s: protocol error: %s", peer, e)
        await conn.error(e.code, e.reason)
    except Exception as e:
        log.exception("handler failed for %s", peer)
        await conn.error(ErrorCode.INTERNAL, f"the server failed: {type(e).__name__}: {e}")


async def _server_handshake(conn: Connection, key, caps, session_limit, claim=None,
                            max_connections=None, binding=b""):
    hello = await conn.recv_control(MsgType.HELLO)
    try:
        version = choose_version(hello["versions"])
    except ProtocolError as e:
        await conn.error(e.code, e.reason)
        raise
    nonce_c, nonce_s = bytes.fromhex(hello["nonce"]), hs.new_nonce()
    both = hs.common_caps(caps, hello["caps"])
    await conn.send_control(MsgType.WELCOME, hs.welcome(key, version, both, nonce_c, nonce_s,
                                                        binding))
    try:
        proof = (await conn.recv_control(MsgType.AUTH))["proof"]
    except PeerError as e:
        if e.code == ErrorCode.AUTH:
            tls = " (or saw another TLS certificate)" if binding else ""
            raise AuthError(f"the client does not hold our key{tls}: it rejected our "
                            f"proof: {peer_text(e.reason)}") from e
        raise
    if not hs.proof_matches(hs.client_proof(key, nonce_c, nonce_s, binding), proof):
        if binding:
            await conn.error(ErrorCode.AUTH, "client failed authentication: its proof does "
                                             "not match the server's key and TLS certificate")
            raise AuthError("its proof does not match our key and our TLS certificate: "
                            "either the keys differ, or a relay terminates TLS between us "
                            "with another certificate")
        await conn.error(ErrorCode.AUTH, "client failed authentication: its proof does not "
                                         "match the server's key")
        raise AuthError("its proof does not match our key")
    conn.version, conn.caps = version, both
    conn._p.authenticated()
    if claim is not None and not claim():
        reason = f"server busy: already serving {max_connections} connections; try again later"
        log.warning("refusing %s: %s", conn.peer, reason)
        await conn.error(ErrorCode.BUSY, reason)
        raise _Busy(reason)
    await conn.send_control(MsgType.READY, {"session_limit": session_limit})
