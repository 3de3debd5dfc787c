"""The receiver's session states (receiver.State, receiver.ACCEPTS): a real server driven into
each state refuses a message that state does not accept with ERROR unexpected naming the
message and the state, and keeps serving."""

import pytest

from deltaxfer import _core, transport
from deltaxfer.receiver import ACCEPTS, Receiver, State
from deltaxfer.store import Store
from deltaxfer.transport import PeerError
from deltaxfer.wire import MsgType, encode_pages

from test_serve_refusals import KEY, PAGES, begin, good_transfer, run, send_image, VADDRS


async def _file(conn, name="pstree.img", data=b"tree", end=True):
    await conn.send_control(MsgType.FILE, {"name": name, "size": len(data), "mode": 0o600})
    await conn.send(MsgType.FILE_DATA, data)
    if end:
        await conn.send_control(MsgType.FILE_END, {"xxh3": f"{_core.xxh3_64(data):016x}"})


async def _refused(conn, send, state: State | None, text: str):
    await send(conn)
    with pytest.raises(PeerError) as e:
        while True:
            await conn.recv()
    assert e.value.code == "unexpected", e.value
    assert text in e.value.reason, e.value.reason
    # AWAITING_RESUME is checked by conn.recv_control(RESUME): the transport's reason
    assert state is None or f"session state: {state.name}" in e.value.reason, e.value.reason


def _control(t, body):
    return lambda conn: conn.send_control(t, body)


ROUND = _control(MsgType.ROUND, {"round": 1, "final": True})
COMMIT = _control(MsgType.COMMIT, {"restore": False})
RESUME = _control(MsgType.RESUME, {})
IMAGE = _control(MsgType.IMAGE, {"index": 0, "id": "pid-1", "entries": 1, "pages": 32})
PAGES_MSG = lambda conn: conn.send(MsgType.PAGES, encode_pages(0, _core.encode_round(PAGES, VADDRS)[0]))  # noqa: E731
FILE_DATA = lambda conn: conn.send(MsgType.FILE_DATA, b"x")  # noqa: E731


async def _idle(conn):
    return conn


async def _in_round(conn):
    await ROUND(conn)
    return conn


async def _in_files(conn):
    await send_image(conn)
    await _file(conn)
    return conn


async def _round_in_files(conn):
    await _file(conn)
    await ROUND(conn)
    return conn


async def _after_commit(conn):
    await send_image(conn)
    await _file(conn)
    await COMMIT(conn)
    await conn.recv_control(MsgType.COMMITTED)
    return conn


CASES = [
    ("idle-pages", _idle, PAGES_MSG, State.IDLE, "PAGES outside a round"),
    ("idle-file-data", _idle, FILE_DATA, State.IDLE, "FILE_DATA outside a file"),
    ("idle-commit", _idle, COMMIT, State.IDLE, "COMMIT without image files"),
    ("idle-resume", _idle, RESUME, State.IDLE, "RESUME is not expected here"),
    ("round-round", _in_round, ROUND, State.IN_ROUND, "ROUND inside a round"),
    ("round-commit", _in_round, COMMIT, State.IN_ROUND, "COMMIT inside a round"),
    ("round-file-data", _in_round, FILE_DATA, State.IN_ROUND, "FILE_DATA outside a file"),
    ("files-image", _in_files, IMAGE, State.IN_FILES, "IMAGE outside a round"),
    ("files-pages", _in_files, PAGES_MSG, State.IN_FILES, "PAGES outside a round"),
    ("round-in-files-commit", _round_in_files, COMMIT, State.ROUND_IN_FILES,
     "COMMIT inside a round"),
    ("round-in-files-round", _round_in_files, ROUND, State.ROUND_IN_FILES,
     "ROUND inside a round"),
    ("committed-resume", _after_commit, RESUME, State.IDLE, "RESUME is not expected here"),
]


@pytest.mark.parametrize("name,into,send,state,text", CASES, ids=[c[0] for c in CASES])
def test_refused_in_state(loop_kind, tmp_path, name, into, send, state, text):
    assert send is not None and ACCEPTS[state].get(MsgType.CLOSE) is None

    async def main():
        receiver = Receiver(Store(str(tmp_path / "serve")))
        server = await transport.serve("127.0.0.1", 0, key=KEY, handler=receiver.handle)
        port = server.sockets[0].getsockname()[1]
        async with server:
            conn, _ = await begin(port)
            await _refused(await into(conn), send, state, text)
            # the refused session left nothing open: a whole transfer still goes through
            ok, done = await good_transfer(port, "other")
            assert ok["pages"] == 32 and done["path"].endswith("/other/images")
    run(loop_kind, main())


def test_every_state_is_in_the_table():
    assert set(ACCEPTS) == set(State)
    # CLOSE is taken before the table, in every state; COMMIT only with files, no round
    assert [s for s in State if MsgType.COMMIT in ACCEPTS[s]] == [State.IN_FILES]


class _FakeCriu:
    """A `criu restore` stand-in: the "restored copy" is a stopped sleep."""
    path = "criu"
    lazy_server = "criu"      # started only at a final round after a dump's files (none)

    def __init__(self):
        self.proc = None

    def restore(self, path, **kw):
        import subprocess
        self.proc = subprocess.Popen(["sleep", "60"])
        return self.proc.pid


def test_awaiting_resume_refuses_anything_else(loop_kind, tmp_path):
    criu = _FakeCriu()

    async def main():
        receiver = Receiver(Store(str(tmp_path / "serve")), criu=criu)
        server = await transport.serve("127.0.0.1", 0, key=KEY, handler=receiver.handle)
        port = server.sockets[0].getsockname()[1]
        async with server:
            conn = await transport.connect("127.0.0.1", port, key=KEY)
            await conn.send_control(MsgType.BEGIN, {"session": "m", "mode": "migrate",
                                                    "source": "t", "images": [{"id": "pid-1"}]})
            await conn.recv_control(MsgType.STATE)
            while (await conn.recv()).type != MsgType.STATE_END:
                pass
            await send_image(conn)
            await _file(conn)
            await conn.send_control(MsgType.COMMIT, {"restore": True})
            done = await conn.recv_control(MsgType.COMMITTED)
            assert done["restored_pid"] == criu.proc.pid
            await _refused(conn, ROUND, None, "expected RESUME, got ROUND")
    run(loop_kind, main())
    assert criu.proc.wait(timeout=10) == -9     # no RESUME: the copy was killed
