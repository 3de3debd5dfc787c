"""Secure defaults of the destination (docs/SECURITY.md): no key means no service unless
on loopback with --insecure (and then only this user's local processes get in); nothing
but the handshake before authentication; private directories and files; names the
receiver writes itself cannot be planted; quotas per session; a silent client is
dropped; what a killed receiver left is cleaned when it starts again."""
import asyncio
import json
import os
import stat
import subprocess
import sys
import time

import pytest

from deltaxfer import _core, keys, transport, wire
from deltaxfer.cli import main
from deltaxfer.receiver import Receiver
from deltaxfer.serve import serve
from deltaxfer.store import Store, StoreError
from deltaxfer.transport import PeerError
from deltaxfer.wire import MsgType
from servers import wait_listening, write_key
from test_serve_refusals import PAGES, VADDRS, leftovers  # noqa: F401  (shared fixtures)

KEY = b"s" * 31 + b"\x00"       # a key file refuses printable-only keys


def run(coro, timeout=30):
    async def bounded():
        async with asyncio.timeout(timeout):
            return await coro
    return transport.run(bounded())


async def small_send(port, session="s", key=KEY, file_size=4):
    """One complete send of 32 pages and a pstree.img of file_size bytes."""
    from array import array
    from deltaxfer.store import image_digest
    conn = await transport.connect("127.0.0.1", port, key=key)
    await conn.send_control(MsgType.BEGIN, {"session": session, "mode": "send", "source": "t",
                                            "images": [{"id": "pid-1"}]})
    state = await conn.recv_control(MsgType.STATE)
    while (await conn.recv()).type != MsgType.STATE_END:
        pass
    out, hashes, _ = _core.encode_round(PAGES, VADDRS)
    rnd = state["round"] + 1
    await conn.send_control(MsgType.ROUND, {"round": rnd, "final": True})
    await conn.send_control(MsgType.IMAGE, {"index": 0, "id": "pid-1", "entries": 1, "pages": 32})
    for p in wire.iter_pagemap(0, array("Q", [VADDRS[0], 32 | 4 << 32])):
        await conn.send(MsgType.PAGEMAP, p)
    await conn.send(MsgType.PAGES, wire.encode_pages(0, out))
    await conn.send_control(MsgType.IMAGE_END, {"index": 0, "digest": f"{image_digest(hashes):016x}"})
    await conn.send_control(MsgType.ROUND_END, {"round": rnd})
    await conn.recv_control(MsgType.ROUND_OK)
    data = b"t" * file_size
    await conn.send_control(MsgType.FILE, {"name": "pstree.img", "size": len(data), "mode": 0o644})
    await conn.send(MsgType.FILE_DATA, data)
    await conn.send_control(MsgType.FILE_END, {"xxh3": f"{_core.xxh3_64(data):016x}"})
    await conn.send_control(MsgType.COMMIT, {"restore": False})
    done = await conn.recv_control(MsgType.COMMITTED)
    await conn.goodbye()
    return done


def start_serve(tmp_path, *args):
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "deltaxfer", "serve", "--dir",
                             str(tmp_path / "serve"), *args], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=log)
    log.close()
    read = (tmp_path / "serve.log").read_text
    try:
        return proc, wait_listening(proc, read), read
    except BaseException:
        proc.kill()
        proc.wait()
        raise


def stop(proc):
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# -- no key, no service ------------------------------------------------------------------

@pytest.mark.parametrize("args, says", [
    (["--listen", "127.0.0.1:0"], "serve needs --key-file"),
    (["--listen", "0.0.0.0:0", "--insecure"], "only on a loopback address"),
    (["--listen", ":0", "--insecure"], "only on a loopback address"),
    (["--listen", "[::]:0", "--insecure"], "only on a loopback address"),
])
def test_serve_refuses_to_start_without_a_key(tmp_path, capsys, args, says):
    rc = main(["serve", "--dir", str(tmp_path / "serve"), *args])
    err = capsys.readouterr().err
    assert rc == 2 and says in err, err
    assert not (tmp_path / "serve").exists()


def test_insecure_and_a_key_file_exclude_each_other(tmp_path, capsys):
    key = write_key(tmp_path / "k")
    rc = main(["serve", "--listen", "127.0.0.1:0", "--insecure", "--key-file", key,
               "--dir", str(tmp_path / "serve")])
    assert rc == 2 and "exclude each other" in capsys.readouterr().err


def test_loopback_detection():
    assert keys.is_loopback("127.0.0.1") and keys.is_loopback("127.3.4.5")
    assert keys.is_loopback("::1") and keys.is_loopback("localhost")
    for host in ("", "0.0.0.0", "::", "10.0.0.1", "192.168.1.1", "no-such-host.invalid"):
        assert not keys.is_loopback(host), host


def raw_exchange_as(uid: int, port: int, data: bytes) -> bytes:
    """Connect from a forked child running as ``uid``, send data, return all it read."""
    import socket
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(data)
            s.settimeout(10)
            while True:
                try:
                    b = s.recv(65536)
                except (ConnectionResetError, socket.timeout):
                    break
                if not b:
                    break
                os.write(w, b)
        finally:
            os._exit(0)
    os.close(w)
    out = b""
    while chunk := os.read(r, 65536):
        out += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return out


def test_insecure_admits_only_this_users_local_processes(tmp_path):
    """--insecure on loopback: the published key completes the handshake for a process of
    the daemon's uid; a process of another uid is refused before the handshake."""
    proc, port, read_log = start_serve(tmp_path, "--listen", "127.0.0.1:0", "--insecure")
    try:
        assert "WITHOUT A KEY" in read_log()
        done = run(small_send(port, key=keys.INSECURE_KEY))
        assert done["path"].endswith("/s/images")
        # a wrong key is still refused (the handshake runs as with any key)
        with pytest.raises(transport.AuthError):
            run(transport.connect("127.0.0.1", port, key=KEY))
        # uid 65534 (nobody) sends a HELLO: answered with ERROR auth, nothing else
        hello = wire.encode(MsgType.HELLO, wire.encode_control(MsgType.HELLO, {
            "protocol": "deltaxfer", "versions": [1], "caps": [], "nonce": "00" * 32,
            "software": "nobody"}), 0)
        got = wire.Decoder().feed(raw_exchange_as(65534, port, hello))
        assert [m.type for m in got] == [MsgType.ERROR], got
        err = wire.decode_control(got[0])
        assert err["code"] == "auth" and "uid 65534" in err["reason"], err
        deadline = time.monotonic() + 5
        while "uid 65534" not in read_log() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "refusing" in read_log() and "uid 65534" in read_log()
    finally:
        stop(proc)


# -- nothing before authentication ----------------------------------------------------------

def test_nothing_but_the_handshake_before_auth(tmp_path):
    """A client that sends BEGIN where AUTH is due gets ERROR unexpected; the handler never
    runs, so nothing touches the store."""
    calls = []

    async def main_():
        async def handler(conn):
            calls.append(conn)
        server = await transport.serve("127.0.0.1", 0, key=KEY, handler=handler)
        async with server:
            port = server.sockets[0].getsockname()[1]
            loop = asyncio.get_running_loop()
            _, proto = await loop.create_connection(transport._FrameProtocol, "127.0.0.1", port)
            conn = transport.Connection(proto)
            from deltaxfer.wire import handshake as hs
            await conn.send_control(MsgType.HELLO, hs.hello(hs.new_nonce(), [], "t", [1]))
            await conn.recv_control(MsgType.WELCOME)
            await conn.send_control(MsgType.BEGIN, {"session": "x", "mode": "send",
                                                    "source": "t", "images": []})
            with pytest.raises(PeerError) as e:
                await conn.recv()
            assert e.value.code == "unexpected" and "expected AUTH" in e.value.reason
    run(main_())
    assert calls == []


def test_a_header_announcing_16_mib_before_auth_is_refused():
    """Before authentication a frame may carry at most a control message's 64 KiB: a
    24-byte header announcing 16 MiB of PAGES ends the connection with ERROR too-large
    before any buffer is reserved for it."""
    async def main_():
        async def handler(conn):
            raise AssertionError("the handler must not run")
        server = await transport.serve("127.0.0.1", 0, key=KEY, handler=handler)
        async with server:
            port = server.sockets[0].getsockname()[1]
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            hdr = bytearray(wire.encode_header(MsgType.PAGES, b"", 0))
            hdr[4:8] = wire.PAGES_LIMIT.to_bytes(4, "little")
            writer.write(bytes(hdr))
            data = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            msgs = wire.Decoder().feed(data)
            assert [m.type for m in msgs] == [MsgType.ERROR], msgs
            return wire.decode_control(msgs[0])
    err = run(main_())
    assert err["code"] == "too-large" and "before authentication" in err["reason"], err


class _FakeTransport(asyncio.Transport):
    def __init__(self):
        super().__init__()
        self.out = bytearray()
        self.closed = False

    def set_write_buffer_limits(self, high=None, low=None):
        pass

    def get_extra_info(self, name, default=None):
        return ("127.0.0.9", 9) if name == "peername" else default

    def write(self, data):
        self.out += data

    def writelines(self, lines):
        for x in lines:
            self.out += x

    def is_closing(self):
        return self.closed

    def can_write_eof(self):
        return True

    def write_eof(self):
        pass

    def close(self):
        self.closed = True

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass


def test_a_peer_without_the_key_may_send_only_so_much():
    """However the bytes arrive, more than 256 KiB before authentication (here: control-
    sized frames that nobody consumes) ends the stream with ERROR too-large; after
    authentication the protocol's own limits apply."""
    async def main_():
        results = {}
        for authed in (False, True):
            p = transport._FrameProtocol()
            t = _FakeTransport()
            p.connection_made(t)
            if authed:
                p.authenticated()
            blob = wire.encode(MsgType.FILE_DATA, b"x" * (60 << 10), 0)
            stream = b"".join(wire.encode(MsgType.FILE_DATA, b"x" * (60 << 10), i)
                              for i in range(8))
            assert len(stream) == 8 * len(blob)
            pos = 0
            while pos < len(stream) and not p.closing:
                buf = p.get_buffer(-1)
                n = min(len(buf), len(stream) - pos, 32 << 10)
                buf[:n] = stream[pos:pos + n]
                p.buffer_updated(n)
                pos += n
            await asyncio.sleep(0)
            results[authed] = (p.closing, bytes(t.out), len(p._queue))
        return results
    res = run(main_())
    closing, out, _ = res[False]
    assert closing
    err = wire.decode_control(wire.Decoder().feed(out)[0])
    assert err["code"] == "too-large" and "before authentication" in err["reason"], err
    closing, out, queued = res[True]
    assert not closing and out == b"" and queued == 8


# -- private files, reserved names, session names ----------------------------------------------

def test_serve_directory_is_private(tmp_path):
    """Every directory the receiver creates is 0700 and no file it keeps is readable by
    group or others, whatever the sender asked (mode 0644 here) and whatever the umask."""
    old = os.umask(0o022)
    try:
        proc, port, _ = start_serve(tmp_path, "--listen", "127.0.0.1:0", "--key-file",
                                    write_key(tmp_path / "k", KEY))
    finally:
        os.umask(old)
    try:
        run(small_send(port, "one"))
        run(small_send(port, "one"))          # a second round: the in-place path
        run(small_send(port, "two"))
    finally:
        stop(proc)
    root = tmp_path / "serve"
    seen = 0
    for dirpath, dirnames, filenames in os.walk(root):
        assert stat.S_IMODE(os.lstat(dirpath).st_mode) == 0o700, dirpath
        for n in filenames:
            mode = stat.S_IMODE(os.lstat(os.path.join(dirpath, n)).st_mode)
            assert mode & 0o077 == 0, (os.path.join(dirpath, n), oct(mode))
            seen += 1
    assert seen >= 8 and (root / "one" / "images" / "pstree.img").exists()


@pytest.mark.parametrize("name", ["parent", "restored.pid", "lazy-pages.socket",
                                  "restore.log", "dump.log", "..", "a/b", "dx-hashes-1.bin",
                                  "postcopy.socket", "postcopy-pending-1.bin"])
def test_names_the_receiver_writes_cannot_be_sent(tmp_path, name):
    store = Store(str(tmp_path / "serve"))
    files = store.session("s").begin_files()
    with pytest.raises(StoreError) as e:
        files.begin(name, 1)
    assert e.value.code == "name"
    files.discard()


@pytest.mark.parametrize("name", [".", "..", "-x", ".hidden", "a/b", "x" * 65, ""])
def test_store_refuses_session_names(tmp_path, name):
    store = Store(str(tmp_path / "serve"))
    with pytest.raises(StoreError) as e:
        store.session(name)
    assert e.value.code == "name"
    assert os.listdir(tmp_path / "serve") == []


def test_store_refuses_a_directory_it_does_not_own(tmp_path):
    d = tmp_path / "theirs"
    d.mkdir()
    os.chown(d, 65534, 65534)
    with pytest.raises(StoreError, match="belongs to uid 65534, not to this receiver's uid 0"):
        Store(str(d))
    assert os.stat(d).st_uid == 65534 and (os.stat(d).st_mode & 0o777) == 0o755  # untouched
    link = tmp_path / "link"
    (tmp_path / "mine").mkdir()
    link.symlink_to(tmp_path / "mine")
    with pytest.raises(StoreError):
        Store(str(link))


def test_the_only_program_run_is_criu_restore_on_the_directory_it_built(tmp_path):
    """A COMMIT asking for a restore, with extra fields naming another directory and
    arguments, makes the receiver run criu (recorded by a stand-in that fails the restore)
    only as `restore -D <dir>/<session>/images ...` (and `lazy-pages -D` the same): no
    path or argument from the network reaches the command line."""
    calls = tmp_path / "calls"
    fake = tmp_path / "criu"
    fake.write_text('#!/bin/sh\n'
                    'if [ "$1" = --version ]; then echo "Version: 4.1.1"; exit 0; fi\n'
                    f'printf "%s\\n" "$*" >> "{calls}"\n'
                    'exit 1\n')
    fake.chmod(0o755)
    proc, port, read_log = start_serve(tmp_path, "--listen", "127.0.0.1:0", "--key-file",
                                       write_key(tmp_path / "k", KEY), "--restore",
                                       "--no-lazy-restore", "--criu", str(fake))

    try:
        run(small_send(port, "s"))            # a session with images to restore

        async def again():
            c = await transport.connect("127.0.0.1", port, key=KEY)
            await c.send(MsgType.BEGIN, json.dumps(
                {"session": "s", "mode": "send", "source": "t", "images": [], "path": "/etc",
                 "args": ["--action-script=/x"]}).encode())
            await c.recv_control(MsgType.STATE)
            while (await c.recv()).type != MsgType.STATE_END:
                pass
            data = b"t"
            await c.send_control(MsgType.FILE, {"name": "pstree.img", "size": 1, "mode": 384})
            await c.send(MsgType.FILE_DATA, data)
            await c.send_control(MsgType.FILE_END, {"xxh3": f"{_core.xxh3_64(data):016x}"})
            await c.send(MsgType.COMMIT, json.dumps(
                {"restore": True, "path": "/etc", "args": ["--action-script", "/bin/sh"],
                 "criu": "/bin/sh"}).encode())
            with pytest.raises(PeerError) as e:
                await c.recv()
            return e.value
        err = run(again())
    finally:
        stop(proc)
    assert err.code == "restore", err
    lines = calls.read_text().splitlines()
    images = str(tmp_path / "serve" / "s" / "images")
    assert len(lines) == 1 and lines[0].startswith(f"restore -d -D {images} "), lines
    assert "/etc" not in lines[0] and "action-script" not in lines[0] and "/bin/sh" not in lines[0]


# -- quotas and isolation -----------------------------------------------------------------------

def test_session_quota_refuses_one_session_and_not_the_others(tmp_path):
    """A session over its quota gets ERROR quota and keeps nothing of the refused send;
    another session goes on, at the same time or after."""
    async def main_():
        store = Store(str(tmp_path / "serve"), session_quota_bytes=300 << 10)
        receiver = Receiver(store)
        server = await transport.serve("127.0.0.1", 0, key=KEY, handler=receiver.handle)
        async with server:
            port = server.sockets[0].getsockname()[1]
            ok = await small_send(port, "small")             # 128 KiB of pages: fits
            big = small_send(port, "big", file_size=200 << 10)
            other = small_send(port, "other")
            results = await asyncio.gather(big, other, return_exceptions=True)
            assert isinstance(results[0], PeerError) and results[0].code == "quota", results
            assert "session 'big'" in results[0].reason and "quota" in results[0].reason
            assert results[1]["path"].endswith("/other/images")
            assert ok["path"].endswith("/small/images")
            await asyncio.sleep(0.1)
        assert leftovers(tmp_path) == []
        assert not (tmp_path / "serve" / "big" / "images").exists()
    run(main_())


def test_session_count_is_capped(tmp_path):
    """--max-sessions: a new session beyond the limit is refused (quota); an existing one
    goes on."""
    proc, port, read_log = start_serve(tmp_path, "--listen", "127.0.0.1:0", "--key-file",
                                       write_key(tmp_path / "k", KEY), "--max-sessions", "2")
    try:
        run(small_send(port, "a"))
        run(small_send(port, "b"))
        with pytest.raises(PeerError) as e:
            run(small_send(port, "c"))
        assert e.value.code == "quota" and "2 sessions are kept here" in e.value.reason
        assert run(small_send(port, "a"))["path"].endswith("/a/images")
    finally:
        stop(proc)
    assert sorted(os.listdir(tmp_path / "serve")) == ["a", "b"]


def test_silent_client_is_dropped(tmp_path, caplog):
    """An authenticated client that stops sending in the middle of a round loses its
    session after the idle timeout; the partial round is gone and a slot is free."""
    async def main_():
        server = await serve("127.0.0.1", 0, key=KEY, directory=str(tmp_path / "serve"),
                             idle_timeout=0.5, max_connections=1)
        async with server:
            port = server.sockets[0].getsockname()[1]
            conn = await transport.connect("127.0.0.1", port, key=KEY)
            await conn.send_control(MsgType.BEGIN, {"session": "quiet", "mode": "send",
                                                    "source": "t", "images": [{"id": "pid-1"}]})
            await conn.recv_control(MsgType.STATE)
            await conn.recv_message(MsgType.STATE_END)
            await conn.send_control(MsgType.ROUND, {"round": 1, "final": False})
            await conn.send_control(MsgType.IMAGE, {"index": 0, "id": "pid-1", "entries": 1,
                                                    "pages": 32})
            t0 = time.monotonic()
            with pytest.raises(PeerError) as e:
                await conn.recv()
            assert e.value.code == "timeout" and "nothing received for 0.5 s" in e.value.reason
            assert 0.4 < time.monotonic() - t0 < 5
            for _ in range(100):             # the receiver discards it once the link is gone
                if not leftovers(tmp_path):
                    break
                await asyncio.sleep(0.02)
            assert leftovers(tmp_path) == []
            assert (await small_send(port, "next"))["path"].endswith("/next/images")
    run(main_())


# -- a receiver that died ---------------------------------------------------------------------

def test_restart_removes_what_a_killed_receiver_left(tmp_path):
    root = tmp_path / "serve"
    store = Store(str(root))
    run(small_send_in_process(store))
    s = root / "s"
    for d in ("round.tmp", "files.tmp", "images.tmp", "final.tmp", "images.old"):
        (s / d).mkdir()
        (s / d / "x").write_bytes(b"x")
    (s / "meta.json.tmp").write_text("{")
    meta = json.loads((s / "meta.json").read_text())
    meta["restoring"] = {"since": 0}               # killed inside criu restore, no copy
    (s / "meta.json").write_text(json.dumps(meta))
    again = Store(str(root))
    assert sorted(os.listdir(s)) == ["held", "images", "meta.json"]
    # the interrupted restore is the receiver's to finish (no copy, no daemon: cleared)
    assert again.sessions()[0].interrupted_restore() == {
        "pid": None, "start": None, "images": str(s / "images")}
    from deltaxfer.receiver import recover_restores
    assert recover_restores(again) == {}
    assert "restoring" not in json.loads((s / "meta.json").read_text())
    assert "s" in again.recovered and any("round.tmp" in x for x in again.recovered["s"])
    assert (s / "images" / "pstree.img").exists()     # what was committed stays


async def small_send_in_process(store):
    server = await transport.serve("127.0.0.1", 0, key=KEY, handler=Receiver(store).handle)
    async with server:
        return await small_send(server.sockets[0].getsockname()[1])


@pytest.mark.parametrize("cmd", ["send", "migrate"])
def test_clients_reach_an_insecure_server_only_on_loopback(tmp_path, capsys, cmd):
    target = [str(tmp_path)] if cmd == "send" else ["1"]
    rc = main([cmd, *target, "--to", "10.0.0.1:1", "--insecure"])
    assert rc == 2 and "only a `serve --insecure` on a loopback" in capsys.readouterr().err
    rc = main([cmd, *target, "--to", "127.0.0.1:1"])
    assert rc == 2 and "--key-file is required" in capsys.readouterr().err
    key = write_key(tmp_path / "k")
    rc = main([cmd, *target, "--to", "127.0.0.1:1", "--insecure", "--key-file", key])
    assert rc == 2 and "exclude each other" in capsys.readouterr().err
    assert keys.client_key(None, True, "127.0.0.1") == keys.INSECURE_KEY
