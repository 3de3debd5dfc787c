"""The receiver (`deltaxfer serve`'s handler and store) refuses bad transfers with a
reason both sides can read, discards what it had received of them, and keeps serving."""
import asyncio
import logging
import os
from array import array

import pytest

from deltaxfer import PAGE_SIZE, _core, transport
from deltaxfer.receiver import Receiver
from deltaxfer.store import Store, image_digest
from deltaxfer.transport import PeerError
from deltaxfer.wire import MsgType, encode_header, encode_pages, iter_pagemap

from servers import run_bounded

KEY = b"r" * 32
VADDRS = array("Q", [0x400000 + i * PAGE_SIZE for i in range(32)])
PAGES = b"".join(bytes([i + 1]) * PAGE_SIZE for i in range(32))


def run(kind, coro, timeout=30):
    return run_bounded(kind, coro, timeout)


async def start(tmp_path):
    receiver = Receiver(Store(str(tmp_path / "serve")))
    server = await transport.serve("127.0.0.1", 0, key=KEY, handler=receiver.handle)
    return server, server.sockets[0].getsockname()[1]


async def begin(port, session="s"):
    conn = await transport.connect("127.0.0.1", port, key=KEY)
    await conn.send_control(MsgType.BEGIN, {"session": session, "mode": "send", "source": "t",
                                            "images": [{"id": "pid-1"}]})
    state = await conn.recv_control(MsgType.STATE)
    while (await conn.recv()).type != MsgType.STATE_END:
        pass
    return conn, state


async def send_image(conn, *, digest=None, frames=True, round_no=1):
    out, hashes, _ = _core.encode_round(PAGES, VADDRS)
    await conn.send_control(MsgType.ROUND, {"round": round_no, "final": True})
    await conn.send_control(MsgType.IMAGE, {"index": 0, "id": "pid-1", "entries": 1, "pages": 32})
    for p in iter_pagemap(0, array("Q", [VADDRS[0], 32 | 4 << 32])):
        await conn.send(MsgType.PAGEMAP, p)
    if frames:
        await conn.send(MsgType.PAGES, encode_pages(0, out))
    d = image_digest(hashes) if digest is None else digest
    await conn.send_control(MsgType.IMAGE_END, {"index": 0, "digest": f"{d:016x}"})
    await conn.send_control(MsgType.ROUND_END, {"round": round_no})
    return await conn.recv_control(MsgType.ROUND_OK)


async def commit_files(conn) -> dict:
    """After a round: one small file, COMMIT without restore, goodbye; COMMITTED's body."""
    data = b"tree"
    await conn.send_control(MsgType.FILE, {"name": "pstree.img", "size": 4, "mode": 0o600})
    await conn.send(MsgType.FILE_DATA, data)
    await conn.send_control(MsgType.FILE_END, {"xxh3": f"{_core.xxh3_64(data):016x}"})
    await conn.send_control(MsgType.COMMIT, {"restore": False})
    done = await conn.recv_control(MsgType.COMMITTED)
    await conn.goodbye()
    return done


async def good_transfer(port, session="s"):
    """A complete small send; proves the server still serves."""
    conn, state = await begin(port, session)
    ok = await send_image(conn, round_no=state["round"] + 1)
    return ok, await commit_files(conn)


def leftovers(tmp_path):
    return [os.path.join(d, n) for d, dirs, files in os.walk(tmp_path / "serve")
            for n in dirs + files if n.endswith(".tmp")]


def check_refused(kind, tmp_path, caplog, bad_client, code, reason_part):
    caplog.set_level(logging.INFO)

    async def main():
        server, port = await start(tmp_path)
        async with server:
            with pytest.raises(PeerError) as e:
                await bad_client(port)
            assert e.value.code == code and reason_part in e.value.reason
            await asyncio.sleep(0.05)
            assert leftovers(tmp_path) == []
            ok, done = await good_transfer(port)
            assert ok["pages"] == 32 and done["path"].endswith("/s/images")
    run(kind, main())
    assert reason_part in caplog.text  # the server logged the same reason


def test_bad_digest(loop_kind, tmp_path, caplog):
    async def bad(port):
        conn, _ = await begin(port)
        await send_image(conn, digest=1234)
    check_refused(loop_kind, tmp_path, caplog, bad, "digest", "do not match the source's")


def test_missing_pages(loop_kind, tmp_path, caplog):
    async def bad(port):
        conn, _ = await begin(port)
        await send_image(conn, frames=False)
    check_refused(loop_kind, tmp_path, caplog, bad, "missing-page", "32 pages are new to the destination but were not sent")


@pytest.mark.parametrize("name", ["../../etc/passwd", "a/b", "..", "pagemap-1.img"])
def test_bad_file_name(loop_kind, tmp_path, caplog, name):
    async def bad(port):
        conn, _ = await begin(port)
        await send_image(conn)
        # bypass the sender-side schema check: a hostile client sends raw JSON
        payload = ('{"name": "%s", "size": 1, "mode": 384}' % name).encode()
        await conn.send(MsgType.FILE, payload)
        await conn.recv()
    check_refused(loop_kind, tmp_path, caplog, bad, "name", f"{name!r}")


def test_oversize_length_and_truncated_stream(loop_kind, tmp_path, caplog):
    caplog.set_level(logging.INFO)

    async def main():
        server, port = await start(tmp_path)
        async with server:
            # a header announcing 1 GiB of PAGES: refused from the header alone
            conn, _ = await begin(port)
            await asyncio.sleep(0)
            hdr = bytearray(encode_header(MsgType.PAGES, b"", conn.stats["frames_out"]))
            hdr[4:8] = (1 << 30).to_bytes(4, "little")
            conn.transport.write(bytes(hdr))
            with pytest.raises(PeerError) as e:
                await conn.recv()
            assert e.value.code == "too-large"
            # a sender that dies in the middle of a round: the round is discarded
            conn, _ = await begin(port)
            await conn.send_control(MsgType.ROUND, {"round": 1, "final": True})
            await conn.send_control(MsgType.IMAGE, {"index": 0, "id": "pid-1", "entries": 1,
                                                    "pages": 32})
            await asyncio.sleep(0)       # let the coalesced control frames go out first
            seq = conn.stats["frames_out"]
            conn.transport.write(encode_header(MsgType.PAGEMAP, b"x" * 100, seq) + b"x" * 50)
            await asyncio.sleep(0.05)
            conn.transport.abort()  # dies mid-frame: nothing else reaches the server
            await asyncio.sleep(0.2)
            assert leftovers(tmp_path) == []
            ok, _ = await good_transfer(port)
            assert ok["round"] == 1
    run(loop_kind, main())
    assert "truncated" in caplog.text


def test_second_connection_to_a_busy_session(loop_kind, tmp_path):
    async def main():
        server, port = await start(tmp_path)
        async with server:
            first, _ = await begin(port, "same")
            second = await transport.connect("127.0.0.1", port, key=KEY)
            await second.send_control(MsgType.BEGIN, {"session": "same", "mode": "send",
                                                      "source": "t", "images": []})
            with pytest.raises(PeerError) as e:
                await second.recv()
            assert e.value.code == "busy"
            await first.goodbye()
    run(loop_kind, main())
