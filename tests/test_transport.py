"""deltaxfer.transport over loopback, on uvloop and on plain asyncio: handshake, keys,
versions, bad clients, integrity of big transfers, backpressure both ways, errors, the
connection limit, TLS."""
import asyncio
import logging
import os
import shutil
import ssl
import subprocess

import pytest

from deltaxfer import _core, transport, wire
from deltaxfer.transport import AuthError, ConnectionClosed, PeerError
from deltaxfer.wire import ErrorCode, MsgType, ProtocolError

from servers import run_bounded

KEY = b"k" * 32
MiB = 1 << 20


def run(kind, coro, timeout=20):
    return run_bounded(kind, coro, timeout)


async def start(handler, **kw):
    server = await transport.serve("127.0.0.1", 0, key=KEY, handler=handler, **kw)
    return server, server.sockets[0].getsockname()[1]


async def echo(conn):
    while True:
        m = await conn.recv()
        if m.type == MsgType.CLOSE:
            return
        await conn.send(m.type, m.payload)


def test_handshake_and_echo(loop_kind):
    servers = []

    async def recording_echo(conn):
        servers.append(conn)
        await echo(conn)

    async def main():
        server, port = await start(recording_echo, max_connections=3)
        async with server:
            conn = await transport.connect("127.0.0.1", port, key=KEY, caps=["lz4", "zstd"])
            assert (conn.version, conn.caps, conn.session_limit) == (1, ["lz4"], 3)
            await conn.send_control(MsgType.ROUND, {"round": 4, "final": True})
            assert await conn.recv_control(MsgType.ROUND) == {"round": 4, "final": True}
            for i in range(100):                     # small frames, coalesced
                await conn.send(MsgType.FILE_DATA, bytes([i]) * i)
            for i in range(100):
                assert (await conn.recv_message(MsgType.FILE_DATA)).payload == bytes([i]) * i
            s = conn.stats
            # HELLO + AUTH + ROUND + 100 FILE_DATA out; WELCOME + READY + ROUND + 100 in
            assert (s["frames_out"], s["frames_in"]) == (103, 103)
            assert s["bytes_out"] - s["bytes_in"] > 0      # HELLO + AUTH outweigh WELCOME + READY
            await conn.goodbye()
            await asyncio.sleep(0.05)
            theirs = servers[0].stats
            assert (theirs["frames_in"], theirs["bytes_in"]) == (104, s["bytes_out"] + 26)
            assert (theirs["frames_out"], theirs["bytes_out"]) == (103, s["bytes_in"])
    run(loop_kind, main())


def test_wrong_key_both_sides_say_so(loop_kind, caplog):
    called = []

    async def handler(conn):
        called.append(conn)

    async def main():
        server, port = await start(handler)
        async with server:
            with pytest.raises(AuthError, match="the server does not know our key"):
                await transport.connect("127.0.0.1", port, key=b"another key")
            await asyncio.sleep(0.1)
    with caplog.at_level(logging.WARNING, logger="deltaxfer.transport"):
        run(loop_kind, main())
    assert not called
    assert "client failed authentication from 127.0.0.1:" in caplog.text


def test_client_with_wrong_proof_is_refused(loop_kind, caplog):
    """A client that cannot prove the key (here: forges AUTH) gets ERROR auth."""
    async def main():
        server, port = await start(echo)
        async with server:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            dec = wire.Decoder()
            nonce = wire.new_nonce()
            hello = {"protocol": "deltaxfer", "versions": [1], "caps": [], "nonce": nonce.hex(),
                     "software": "forger"}
            writer.write(wire.encode(MsgType.HELLO, wire.encode_control(MsgType.HELLO, hello), 0))
            writer.write(wire.encode(MsgType.AUTH, wire.encode_control(
                MsgType.AUTH, {"proof": "00" * 32}), 1))
            msgs = dec.feed(await reader.read())        # until the server's EOF
            writer.close()
            await asyncio.sleep(0.1)                    # the server logs once we closed
            return msgs
    with caplog.at_level(logging.WARNING, logger="deltaxfer.transport"):
        msgs = run(loop_kind, main())
    assert [m.type for m in msgs] == [MsgType.WELCOME, MsgType.ERROR]
    assert wire.decode_control(msgs[1])["code"] == "auth"
    assert "client failed authentication from 127.0.0.1:" in caplog.text


def test_unsupported_version(loop_kind):
    async def main():
        server, port = await start(echo)
        async with server:
            with pytest.raises(PeerError) as e:
                await transport.connect("127.0.0.1", port, key=KEY, versions=[7, 9])
            assert e.value.code == "version"
            assert "offers [7, 9]" in e.value.reason and "speaks [1]" in e.value.reason
    run(loop_kind, main())


def test_garbage_client_then_good_client(loop_kind):
    async def main():
        server, port = await start(echo)
        async with server:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.1\r\nHost: example\r\n\r\n")
            answer = await reader.read()
            writer.close()
            (m,) = wire.Decoder().feed(answer)
            err = wire.decode_control(m)
            assert err["code"] == "bad-magic" and "not a deltaxfer stream" in err["reason"]
            conn = await transport.connect("127.0.0.1", port, key=KEY)
            await conn.send(MsgType.FILE_DATA, b"still serving")
            assert (await conn.recv()).payload == b"still serving"
            await conn.goodbye()
    run(loop_kind, main())


@pytest.mark.parametrize("offload", [None, 512 << 10], ids=["inline-check", "thread-check"])
def test_big_transfer_integrity(loop_kind, offload, monkeypatch):
    """64 MiB in 1 MiB PAGES payloads with small frames in between, checked end to end and
    in order, with the sender's checksums computed inline or on worker threads."""
    monkeypatch.setattr(transport, "HASH_OFFLOAD", offload)
    frames = 64

    async def sink(conn):
        h = []
        for i in range(frames):
            m = await conn.recv_message(MsgType.PAGES)
            index, frame = wire.decode_pages(m.payload)
            h.append(_core.xxh3_64(frame, index))
            small = await conn.recv_message(MsgType.FILE_DATA)
            assert small.payload == i.to_bytes(4, "little")
        await conn.send_control(MsgType.FILE_END, {"xxh3": f"{_core.xxh3_64(str(h).encode()):016x}"})
        await conn.recv_message(MsgType.CLOSE)

    async def main():
        server, port = await start(sink)
        async with server:
            conn = await transport.connect("127.0.0.1", port, key=KEY)
            block = bytearray(os.urandom(MiB - 4))
            h = []
            for i in range(frames):
                block[:8] = i.to_bytes(8, "little")
                payload = wire.encode_pages(i, block)
                h.append(_core.xxh3_64(payload[4:], i))
                await conn.send(MsgType.PAGES, payload)
                await conn.send(MsgType.FILE_DATA, i.to_bytes(4, "little"))
            got = await conn.recv_control(MsgType.FILE_END)
            assert got["xxh3"] == f"{_core.xxh3_64(str(h).encode()):016x}"
            assert conn.stats["bytes_out"] > frames * MiB
            await conn.goodbye()
    run(loop_kind, main())


@pytest.mark.parametrize("offload", [None, 512 << 10], ids=["inline-check", "thread-check"])
def test_backpressure_slow_consumer(loop_kind, offload, monkeypatch):
    """A receiver that does not consume: reading stops at RECV_HIGH_WATER, the sender's
    send() blocks, nothing is lost when the consumer catches up."""
    monkeypatch.setattr(transport, "HASH_OFFLOAD", offload)
    total = 160
    seen = {}
    go = asyncio.Event

    async def slow(conn):
        seen["conn"] = conn
        await seen["go"].wait()
        for i in range(total):
            m = await conn.recv_message(MsgType.FILE_DATA)
            assert m.payload[:4] == i.to_bytes(4, "little")
        await conn.send_control(MsgType.CLOSE, {})

    async def main():
        seen["go"] = go()
        server, port = await start(slow)
        async with server:
            conn = await transport.connect("127.0.0.1", port, key=KEY)
            sent = [0]

            async def producer():
                block = bytearray(MiB)
                for i in range(total):
                    block[:4] = i.to_bytes(4, "little")
                    await conn.send(MsgType.FILE_DATA, bytes(block))
                    sent[0] += 1
            task = asyncio.create_task(producer())
            await asyncio.sleep(0.5)
            stalled = sent[0]
            delivered = conn.bytes_delivered
            await asyncio.sleep(0.3)
            assert sent[0] == stalled < total          # send() is blocked in drain
            # what a stalled round's watchdog reads: nothing more reaches a peer that
            # does not read (its window closed), though frames wait in the buffers
            assert conn.bytes_delivered == delivered > 0
            server_p = seen["conn"]._p
            assert server_p._reading_paused
            assert server_p._queued <= transport.RECV_HIGH_WATER + 2 * MiB
            # in flight at most: the receiver's queue, both kernels' socket buffers, the
            # sender's transport buffer
            assert stalled * MiB <= transport.RECV_HIGH_WATER + transport.WRITE_HIGH_WATER + \
                transport.PIPELINE_BYTES + 64 * MiB
            seen["go"].set()
            await task
            await conn.recv_message(MsgType.CLOSE)
            assert conn.bytes_delivered >= total * MiB   # all of it, acknowledged
            conn.close()
    run(loop_kind, main())


def test_peer_error_and_handler_failures(loop_kind, caplog):
    async def handler(conn):
        m = await conn.recv_control(MsgType.FILE)
        if m["name"] == "quota.img":
            await conn.error(ErrorCode.QUOTA, "files per send over 10000")
        elif m["name"] == "boom.img":
            raise RuntimeError("boom")
        else:
            await conn.recv_control(MsgType.COMMIT)       # gets something else: unexpected

    async def main():
        server, port = await start(handler)
        async with server:
            for name, code, says in (("quota.img", "quota", "over 10000"),
                                     ("boom.img", "internal", "RuntimeError: boom"),
                                     ("x.img", "unexpected", "expected COMMIT, got ROUND")):
                conn = await transport.connect("127.0.0.1", port, key=KEY)
                await conn.send_control(MsgType.FILE, {"name": name, "size": 0, "mode": 0})
                if name == "x.img":
                    await conn.send_control(MsgType.ROUND, {"round": 0, "final": False})
                with pytest.raises(PeerError) as e:
                    await conn.recv(timeout=5)
                assert (e.value.code, says in e.value.reason) == (code, True), e.value
                with pytest.raises((PeerError, ConnectionClosed)):
                    await conn.send(MsgType.CLOSE, b"{}")
                    await conn.recv(timeout=5)
                conn.close()
    with caplog.at_level(logging.WARNING, logger="deltaxfer.transport"):
        run(loop_kind, main())
    assert "handler failed for 127.0.0.1:" in caplog.text and "RuntimeError: boom" in caplog.text


def test_bad_payload_from_peer_is_answered(loop_kind):
    async def handler(conn):
        await conn.recv_control(MsgType.FILE)

    async def main():
        server, port = await start(handler)
        async with server:
            conn = await transport.connect("127.0.0.1", port, key=KEY)
            await conn.send(MsgType.FILE, b'{"name": "../../etc/passwd", "size": 1, "mode": 0}')
            with pytest.raises(PeerError) as e:
                await conn.recv(timeout=5)
            assert e.value.code == "name" and "contains a path" in e.value.reason
    run(loop_kind, main())


def test_connection_limit_busy(loop_kind):
    release = {}

    async def held(conn):
        await release["ev"].wait()

    async def main():
        release["ev"] = asyncio.Event()
        server, port = await start(held, max_connections=1)
        async with server:
            first = await transport.connect("127.0.0.1", port, key=KEY)
            with pytest.raises(PeerError) as e:
                await transport.connect("127.0.0.1", port, key=KEY)
            assert e.value.code == "busy" and "1 connections" in e.value.reason
            release["ev"].set()
            await first.wait_closed()
            second = await transport.connect("127.0.0.1", port, key=KEY)   # a slot again
            second.close()
    run(loop_kind, main())


def test_handshake_timeout_and_recv_timeout(loop_kind):
    async def main():
        server, port = await start(echo, handshake_timeout=0.3)
        async with server:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            answer = await reader.read()                 # we say nothing
            writer.close()
            (m,) = wire.Decoder().feed(answer)
            assert wire.decode_control(m)["code"] == "timeout"
            conn = await transport.connect("127.0.0.1", port, key=KEY)
            with pytest.raises(TimeoutError):
                await conn.recv(timeout=0.1)
            conn.close()
    run(loop_kind, main())


def test_truncated_stream_is_reported(loop_kind):
    got = {}

    async def handler(conn):
        try:
            await conn.recv()
        except ProtocolError as e:
            got["e"] = e

    async def main():
        server, port = await start(handler)
        async with server:
            conn = await transport.connect("127.0.0.1", port, key=KEY)
            frame = wire.encode(MsgType.FILE_DATA, b"x" * 1000, 2)
            conn.transport.write(frame[:500])
            conn.transport.write_eof()
            await conn.wait_closed()
            await asyncio.sleep(0.05)
    run(loop_kind, main())
    assert got["e"].code == ErrorCode.TRUNCATED and "500 of 1024 bytes" in got["e"].reason


def _self_signed(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed: cannot make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


def test_tls(loop_kind, tmp_path):
    from deltaxfer import keys
    cert, key = _self_signed(tmp_path)
    # keys.server_tls records the certificate's channel binding, which the proofs include
    server_ctx = keys.server_tls(str(cert), str(key))
    client_ctx = keys.client_tls(str(cert))

    async def main():
        server, port = await start(echo, ssl=server_ctx)
        async with server:
            conn = await transport.connect("127.0.0.1", port, key=KEY, ssl=client_ctx)
            assert "tls" in conn.caps
            assert conn._p._lowat_sock is None    # no receive low-water mark under TLS
            payload = os.urandom(3 * MiB)
            await conn.send(MsgType.PAGES, payload)
            assert (await conn.recv()).payload == payload
            await conn.goodbye()
            with pytest.raises(ssl.SSLError):               # an unknown CA is refused
                await transport.connect("127.0.0.1", port, key=KEY,
                                        ssl=ssl.create_default_context())
    run(loop_kind, main())


def test_close_waits_for_frames_being_checksummed(loop_kind, monkeypatch):
    """goodbye() right after big sends: the frames still being checksummed on worker
    threads go out before CLOSE and the close."""
    monkeypatch.setattr(transport, "HASH_OFFLOAD", 64 << 10)
    got = []

    async def handler(conn):
        while True:
            m = await conn.recv()
            got.append((m.type, len(m.payload)))
            if m.type == MsgType.CLOSE:
                return

    async def main():
        server, port = await start(handler)
        async with server:
            conn = await transport.connect("127.0.0.1", port, key=KEY)
            for _ in range(5):
                await conn.send(MsgType.PAGES, bytes(2 * MiB))
            await conn.goodbye()
            await asyncio.sleep(0.2)
    run(loop_kind, main())
    assert got == [(MsgType.PAGES, 2 * MiB)] * 5 + [(MsgType.CLOSE, 2)]


def test_a_payload_trickling_in_wakes_the_reader_rarely_and_never_stalls(loop_kind, monkeypatch):
    """A 4 MiB PAGES payload arriving in 32 KiB pieces: with the receive low-water mark
    (SO_RCVLOWAT, at most the rest of the payload) the receiver reads it in a few large
    reads, not one per piece, gets it whole, and answers a question sent right after it
    (the last bytes of a payload never wait for bytes the peer does not send)."""
    reads = []
    orig = transport._FrameProtocol.buffer_updated

    def counting(self, n):
        if not self._pre_auth:
            reads.append(n)
        return orig(self, n)
    monkeypatch.setattr(transport._FrameProtocol, "buffer_updated", counting)
    payload = wire.encode_pages(7, os.urandom(4 * MiB - 4 - 1000))   # not a multiple of a piece
    piece = 32 << 10

    async def answer(conn):
        m = await conn.recv_message(MsgType.PAGES)
        assert m.payload == payload
        assert conn._p._lowat_sock is not None          # plain TCP: the mark is in use
        await conn.send_control(MsgType.FILE_END, {"xxh3": f"{len(m.payload):016x}"})
        await conn.recv_message(MsgType.CLOSE)

    async def main():
        server, port = await start(answer)
        async with server:
            conn = await transport.connect("127.0.0.1", port, key=KEY)
            p = conn._p
            header = wire.encode_header(MsgType.PAGES, payload, p._seq_out)
            p._seq_out += 1
            p.transport.write(header)
            pieces = 0
            for off in range(0, len(payload), piece):
                p.transport.write(payload[off:off + piece])
                pieces += 1
                await asyncio.sleep(0.001)
            got = await conn.recv_control(MsgType.FILE_END, timeout=5)
            assert got["xxh3"] == f"{len(payload):016x}"
            await conn.goodbye()
            return pieces
    pieces = run(loop_kind, main())
    assert sum(reads) >= len(payload)
    # without the mark: about one read per piece (128); with it: ~4 of 1 MiB, the last
    # bytes of the payload, the header and the CLOSE
    assert len(reads) < pieces // 4, (len(reads), pieces)
