"""Fuzzing the receiver's state machine through a real connection: a valid send, as
messages, mutated (messages dropped, repeated, swapped; control fields given values of
any JSON type; payloads replaced by random bytes) and sent by an authenticated client.
Whatever arrives, the receiver answers with a protocol error code (never `internal`,
which would be an unhandled exception), keeps no unfinished state, creates nothing but
session directories of valid names, and the next good transfer still succeeds."""
import asyncio
import json
import os
import re
from array import array

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deltaxfer import _core, transport, wire
from deltaxfer.receiver import Receiver
from deltaxfer.store import Store, image_digest
from deltaxfer.transport import PeerError
from deltaxfer.wire import MsgType as T
from test_security_defaults import PAGES, VADDRS, small_send

KEY = b"f" * 32
SESSION_DIR_NAMES = {"held", "images", "meta.json"}


def _frames(out) -> list[bytes]:
    parts, off = [], 0
    while off < len(out):
        n = _core.read_frame_header(out[off:])["frame_len"]
        parts.append(bytes(out[off:off + n]))
        off += n
    return parts


def valid_send() -> list[tuple[T, bytes]]:
    # four frames of 8 pages, one PAGES message each: with apply threads, the frames after
    # the first go to them (receiver.ApplyPool path), in any order
    out, hashes, _ = _core.encode_round(PAGES, VADDRS, frame_size=8 * 4096)
    data = b"tree"
    c = wire.encode_control
    return [
        (T.BEGIN, c(T.BEGIN, {"session": "fz", "mode": "send", "source": "t",
                              "images": [{"id": "pid-1"}]})),
        (T.ROUND, c(T.ROUND, {"round": 1, "final": True})),
        (T.IMAGE, c(T.IMAGE, {"index": 0, "id": "pid-1", "entries": 1, "pages": 32})),
        *[(T.PAGEMAP, p) for p in wire.iter_pagemap(0, array("Q", [VADDRS[0], 32 | 4 << 32]))],
        *[(T.PAGES, wire.encode_pages(0, f)) for f in _frames(out)],
        (T.IMAGE_END, c(T.IMAGE_END, {"index": 0, "digest": f"{image_digest(hashes):016x}"})),
        (T.ROUND_END, c(T.ROUND_END, {"round": 1})),
        (T.FILE, c(T.FILE, {"name": "pstree.img", "size": 4, "mode": 0o600})),
        (T.FILE_DATA, data),
        (T.FILE_END, c(T.FILE_END, {"xxh3": f"{_core.xxh3_64(data):016x}"})),
        (T.COMMIT, c(T.COMMIT, {"restore": False})),
    ]


VALID = valid_send()
json_value = st.one_of(st.none(), st.booleans(), st.integers(-2**64, 2**64),
                       st.text(max_size=80), st.lists(st.integers(0, 10), max_size=3),
                       st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
                       st.sampled_from(["..", "../x", "pid-0", "pid-99999999999", "a" * 200,
                                        "pagemap-1.img", "restored.pid", "/etc/passwd"]))


@st.composite
def mutated(draw):
    msgs = list(VALID)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["drop", "dup", "swap", "field", "bytes"]))
        i = draw(st.integers(0, len(msgs) - 1))
        if kind == "drop" and len(msgs) > 1:
            del msgs[i]
        elif kind == "dup":
            msgs.insert(i, msgs[i])
        elif kind == "swap":
            j = draw(st.integers(0, len(msgs) - 1))
            msgs[i], msgs[j] = msgs[j], msgs[i]
        elif kind == "field" and msgs[i][0] in wire.CONTROL_TYPES:
            try:
                obj = json.loads(msgs[i][1])
            except ValueError:                      # already replaced by random bytes
                continue
            if isinstance(obj, dict) and obj:
                key = draw(st.sampled_from(sorted(obj)))
                obj[key] = draw(json_value)
                msgs[i] = (msgs[i][0], json.dumps(obj).encode())
        elif kind == "bytes":
            msgs[i] = (msgs[i][0], draw(st.binary(max_size=200)))
    return msgs


def check_tree(root: str) -> None:
    for name in os.listdir(root):
        assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name), name
        assert os.path.isdir(os.path.join(root, name)) and \
            not os.path.islink(os.path.join(root, name)), name
        assert set(os.listdir(os.path.join(root, name))) <= SESSION_DIR_NAMES, \
            os.listdir(os.path.join(root, name))


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(msgs=mutated(), threads=st.sampled_from([1, 3]))
def test_mutated_sends_never_break_the_receiver(tmp_path_factory, msgs, threads):
    root = str(tmp_path_factory.mktemp("fz") / "serve")

    async def main():
        store = Store(root)
        server = await transport.serve("127.0.0.1", 0, key=KEY, handler=Receiver(
            store, idle_timeout=2, apply_threads=threads).handle)
        async with server:
            port = server.sockets[0].getsockname()[1]
            conn = await transport.connect("127.0.0.1", port, key=KEY)
            for t, p in msgs:
                try:
                    await conn.send(t, p)
                except transport.TransportError:
                    break
            answers = []
            try:
                while True:
                    m = await conn.recv(timeout=3)
                    answers.append(m.type)
                    if m.type == T.COMMITTED:
                        break
            except PeerError as e:
                assert e.code != "internal", f"the receiver failed: {e.reason}"
                assert e.code in wire.ErrorCode.__members__.values() and e.reason
            except (transport.ConnectionClosed, TimeoutError):
                pass
            conn.close()
            await asyncio.sleep(0.05)
            for _ in range(100):                       # let the handler finish
                if not any(n.endswith(".tmp") for _, d, f in os.walk(root) for n in d + f):
                    break
                await asyncio.sleep(0.02)
            check_tree(root)
            done = await small_send(port, "after", key=KEY)
            assert done["path"].endswith("/after/images")

    async def bounded():
        async with asyncio.timeout(30):
            await main()
    transport.run(bounded())
