"""The transport's answers to the security review (docs/SECURITY.md): TLS that trusts only
its CA, checks the name and binds the handshake to the certificate (a TLS-terminating
relay fails on both sides); `--insecure` clients that refuse another user's listener; a
connection flood that leaves the daemon's descriptors and memory bounded while a key
holder still gets in; key files and the hook's configuration that must be private and
random; an unauthenticated peer's text logged only as a short repr; `deltaxfer-hook
--help`. Each test reproduces the attack and checks that it fails."""
import asyncio
import logging
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deltaxfer import keys, transport
from deltaxfer.transport import AuthError, PeerError
from deltaxfer.wire import ErrorCode, MsgType
from deltaxfer.wire import handshake as hs
from servers import KEY, Server, run_bounded, write_key

HOOK = str(Path(sys.executable).parent / "deltaxfer-hook")


def run(kind, coro, timeout=30):
    return run_bounded(kind, coro, timeout)


# -- certificates (openssl CLI: the `cryptography` package is not a dependency) -------------

def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(d: Path, name: str) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed: cannot make test certificates")
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-days", "1", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
             "-out", f"{name}.pem", cwd=d)
    return d / f"{name}.pem"


def make_cert(d: Path, ca: Path, name: str, san: str) -> tuple[str, str]:
    """A certificate for ``san`` (e.g. IP:127.0.0.1) signed by ``ca``: (cert, key) paths."""
    (d / f"{name}.ext").write_text(f"subjectAltName={san}\nbasicConstraints=CA:FALSE\n")
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", str(ca),
             "-CAkey", str(ca.with_suffix(".key")), "-set_serial", str(os.getpid() + len(name)),
             "-days", "1", "-extfile", f"{name}.ext", "-out", f"{name}.pem", cwd=d)
    return str(d / f"{name}.pem"), str(d / f"{name}.key")


@pytest.fixture
def pki(tmp_path):
    """CA "ours" signing the server's certificate and an attacker's (both for 127.0.0.1,
    so the client trusts either); CA "public" standing for any public CA."""
    ca = make_ca(tmp_path, "ours")
    public = make_ca(tmp_path, "public")
    return {"ca": str(ca), "public": str(public),
            "server": make_cert(tmp_path, ca, "server", "IP:127.0.0.1"),
            "attacker": make_cert(tmp_path, ca, "attacker", "IP:127.0.0.1"),
            "named": make_cert(tmp_path, ca, "named", "DNS:dest.example"),
            "by_public": make_cert(tmp_path, public, "bypublic", "IP:127.0.0.1")}


async def echo(conn):
    while (m := await conn.recv()).type != MsgType.CLOSE:
        await conn.send(m.type, m.payload)


async def tls_server(cert_key, handler=echo):
    ctx = keys.server_tls(*cert_key)
    server = await transport.serve("127.0.0.1", 0, key=KEY, handler=handler, ssl=ctx)
    return server, server.sockets[0].getsockname()[1]


# -- item 1: TLS ----------------------------------------------------------------------------

def test_client_tls_trusts_only_the_given_ca(pki, loop_kind, monkeypatch):
    """A certificate signed by a CA that the system trusts (here: OpenSSL's default
    store, pointed at the "public" CA) but that is not --tls-ca is refused."""
    monkeypatch.setenv("SSL_CERT_FILE", pki["public"])     # what the system store trusts

    async def main():
        server, port = await tls_server(pki["by_public"])
        async with server:
            with pytest.raises(ssl.SSLCertVerificationError):
                await transport.connect("127.0.0.1", port, key=KEY,
                                        ssl=keys.client_tls(pki["ca"]))
    run(loop_kind, main())
    ctx = keys.client_tls(pki["ca"])
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2 and ctx.check_hostname
    assert [c["subject"] for c in ctx.get_ca_certs()] == [((("commonName", "ours"),),)]


def test_client_tls_checks_the_server_name(pki, loop_kind):
    """The certificate must name the host of --to (an IP SAN for an address), or
    --tls-server-name; --tls-pin accepts only the one certificate."""
    async def main():
        server, port = await tls_server(pki["named"])      # DNS:dest.example only
        async with server:
            with pytest.raises(ssl.SSLCertVerificationError, match="127.0.0.1"):
                await transport.connect("127.0.0.1", port, key=KEY,
                                        ssl=keys.client_tls(pki["ca"]))
            conn = await transport.connect("127.0.0.1", port, key=KEY, ssl=keys.client_tls(
                pki["ca"], server_name="dest.example"))
            await conn.goodbye()
        server, port = await tls_server(pki["server"])     # IP:127.0.0.1
        async with server:
            conn = await transport.connect("127.0.0.1", port, key=KEY,
                                           ssl=keys.client_tls(pki["ca"]))
            assert "tls" in conn.caps
            await conn.goodbye()
            attacker_pin = "sha256:" + hs.tls_server_end_point(_der(pki["attacker"][0])).hex()
            with pytest.raises(AuthError, match="not the pinned"):
                await transport.connect("127.0.0.1", port, key=KEY, ssl=keys.client_tls(
                    pki["ca"], pin=attacker_pin))
            good_pin = hs.tls_server_end_point(_der(pki["server"][0])).hex()
            conn = await transport.connect("127.0.0.1", port, key=KEY, ssl=keys.client_tls(
                pki["ca"], pin="sha256:" + good_pin.upper()))
            await conn.goodbye()
    run(loop_kind, main())
    with pytest.raises(keys.ConfigError, match="sha256"):
        keys.client_tls(pki["ca"], pin="md5:00")
    with pytest.raises(keys.ConfigError, match="need --tls-ca"):
        keys.client_tls(None, pin="sha256:" + "00" * 32)


def _der(pem_path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(Path(pem_path).read_text())


async def _tls_relay(cert_key, ca, target_port):
    """A man in the middle holding a certificate the client trusts: terminates the
    client's TLS, opens its own TLS connection to the server, and copies the bytes."""
    ctx = keys.server_tls(*cert_key)
    up_ctx = ssl.create_default_context(cafile=ca)
    relayed = {"connections": 0}

    async def pipe(r, w):
        try:
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            w.close()

    async def handle(cr, cw):
        relayed["connections"] += 1
        sr, sw = await asyncio.open_connection("127.0.0.1", target_port, ssl=up_ctx,
                                               server_hostname="127.0.0.1")
        await asyncio.gather(pipe(cr, sw), pipe(sr, cw))

    relay = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    return relay, relay.sockets[0].getsockname()[1], relayed


def test_tls_relay_with_another_certificate_fails_authentication(pki, loop_kind, caplog):
    """Both ends hold the key and both TLS connections verify, but the proofs bind the
    certificate each side sees: the client refuses the server's proof, and the server
    refuses a client proof made for the relay's certificate."""
    caplog.set_level(logging.WARNING, logger="deltaxfer.transport")
    served = []

    async def handler(conn):
        served.append(conn.peer)
        await echo(conn)

    async def main():
        server, port = await tls_server(pki["server"], handler)
        relay, relay_port, relayed = await _tls_relay(pki["attacker"], pki["ca"], port)
        async with server, relay:
            # through the relay: the client sees the attacker's certificate
            with pytest.raises(AuthError, match="TLS certificate we were shown") as e:
                await transport.connect("127.0.0.1", relay_port, key=KEY,
                                        ssl=keys.client_tls(pki["ca"]))
            assert hs.tls_server_end_point(_der(pki["attacker"][0])).hex() in str(e.value)
            # a client that skips the check of the server's proof (or a relay that
            # forges the client's side): the server refuses its proof
            loop = asyncio.get_running_loop()
            _, proto = await loop.create_connection(
                transport._FrameProtocol, "127.0.0.1", relay_port,
                ssl=keys.client_tls(pki["ca"]), server_hostname="127.0.0.1")
            conn = transport.Connection(proto)
            seen = hs.tls_server_end_point(
                proto.transport.get_extra_info("ssl_object").getpeercert(binary_form=True))
            nonce_c = hs.new_nonce()
            await conn.send_control(MsgType.HELLO, hs.hello(nonce_c))
            w = await conn.recv_control(MsgType.WELCOME)
            await conn.send_control(MsgType.AUTH, hs.auth(KEY, nonce_c,
                                                          bytes.fromhex(w["nonce"]), seen))
            with pytest.raises(PeerError) as refused:
                await conn.recv(timeout=10)
            assert refused.value.code == ErrorCode.AUTH
            assert "TLS certificate" in refused.value.reason
            conn.close()
            await asyncio.sleep(0.1)
            assert relayed["connections"] == 2
            # directly, the same key and CA work
            conn = await transport.connect("127.0.0.1", port, key=KEY,
                                           ssl=keys.client_tls(pki["ca"]))
            await conn.goodbye()
    run(loop_kind, main())
    assert len(served) == 1                    # only the direct connection got a session
    log = caplog.text
    assert "does not hold our key (or saw another TLS certificate)" in log
    assert "our TLS certificate" in log


def test_binding_is_empty_without_tls_and_changes_the_proofs():
    nc, ns = hs.new_nonce(), hs.new_nonce()
    assert hs.server_proof(KEY, nc, ns) == hs.server_proof(KEY, nc, ns, b"")
    bound = hs.server_proof(KEY, nc, ns, hs.tls_server_end_point(b"cert A"))
    assert bound != hs.server_proof(KEY, nc, ns)
    assert bound != hs.server_proof(KEY, nc, ns, hs.tls_server_end_point(b"cert B"))
    with pytest.raises(ValueError):
        hs.client_proof(KEY, nc, ns, b"short")


def test_a_tls_server_context_must_carry_its_binding(pki):
    plain = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    plain.load_cert_chain(*pki["server"])

    async def main():
        with pytest.raises(ValueError, match="server_tls"):
            await transport.serve("127.0.0.1", 0, key=KEY, handler=echo, ssl=plain)
    run("asyncio", main())


# -- item 3: --insecure clients check who listens ------------------------------------------

LISTENER = r"""
import socket, sys
s = socket.socket()
s.bind(("127.0.0.1", 0)); s.listen(4)
print(s.getsockname()[1], flush=True)
c, _ = s.accept()
c.settimeout(3)
got = b""
try:
    while chunk := c.recv(65536):
        got += chunk
except (socket.timeout, OSError):
    pass
print(len(got), flush=True)
"""


def test_insecure_client_refuses_another_users_listener(loop_kind):
    """Another local user listens on the port a `serve --insecure` would use: the client
    proving the published key sends nothing and names the listener's uid."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run a listener as uid 65534")
    proc = subprocess.Popen(["setpriv", "--reuid", "65534", "--regid", "65534",
                             "--clear-groups", sys.executable, "-I", "-c", LISTENER],
                            stdout=subprocess.PIPE, text=True, cwd="/")
    try:
        port = int(proc.stdout.readline())

        async def main():
            with pytest.raises(AuthError, match="uid 65534") as e:
                await transport.connect("127.0.0.1", port, key=keys.INSECURE_KEY,
                                        handshake_timeout=3)
            assert "--key-file" in str(e.value)
        run(loop_kind, main())
        received = int(proc.stdout.readline())
    finally:
        proc.kill()
        proc.wait()
    assert received == 0, f"the client sent {received} bytes to uid 65534's listener"


def test_insecure_client_reaches_its_own_users_server(loop_kind):
    async def main():
        server = await transport.serve("127.0.0.1", 0, key=keys.INSECURE_KEY, handler=echo)
        async with server:
            port = server.sockets[0].getsockname()[1]
            conn = await transport.connect("127.0.0.1", port, key=keys.INSECURE_KEY)
            await conn.goodbye()
    run(loop_kind, main())


# -- item 5: connection floods -------------------------------------------------------------

def _fds(pid) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _rss_kib(pid) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


FLOOD = 2000


def test_connection_flood_keeps_the_daemon_bounded(tmp_path):
    """2000 connections from 127.0.0.2, each sending a byte, held open: the daemon keeps
    at most its socket cap (8 sessions + 16 handshakes + 8) of them and a bounded amount
    of memory, and a key holder from 127.0.0.1 completes a handshake meanwhile."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < FLOOD + 256:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {FLOOD + 256}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, FLOOD + 256), hard))
    flood: list[socket.socket] = []
    with Server(tmp_path) as server:
        pid = server.proc.pid
        time.sleep(0.5)
        fds0, rss0 = _fds(pid), _rss_kib(pid)
        peak_fds = peak_rss = 0
        try:
            for i in range(FLOOD):
                s = socket.socket()
                s.setblocking(False)
                s.bind(("127.0.0.2", 0))
                s.connect_ex(("127.0.0.1", server.port))
                flood.append(s)
                if i % 100 == 99:
                    server.log()                      # keep its stderr pipe drained
                    peak_fds = max(peak_fds, _fds(pid))
                    peak_rss = max(peak_rss, _rss_kib(pid))
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:        # SYNs beyond the backlog are retried
                for s in flood:
                    try:
                        s.send(b"\xd8")
                    except OSError:
                        pass
                server.log()
                peak_fds = max(peak_fds, _fds(pid))
                peak_rss = max(peak_rss, _rss_kib(pid))
                time.sleep(0.2)

            async def key_holder():
                conn = await transport.connect("127.0.0.1", server.port, key=KEY)
                await conn.goodbye()
                return conn.version
            assert run("uvloop", key_holder(), timeout=20) == 1   # while the flood holds
            peak_fds = max(peak_fds, _fds(pid))
            peak_rss = max(peak_rss, _rss_kib(pid))
        finally:
            for s in flood:
                s.close()
        log = server.log()
        assert server.alive()
    cap = 16 + 8 + 8
    print(f"flood of {FLOOD}: daemon fds {fds0} -> peak {peak_fds}; RSS {rss0} KiB -> "
          f"peak {peak_rss} KiB")
    assert peak_fds <= fds0 + cap + 4, (fds0, peak_fds)
    # at most cap receive buffers (256 KiB each) plus slack for the interpreter
    assert peak_rss - rss0 <= cap * 256 + 16 * 1024, (rss0, peak_rss)
    assert "127.0.0.1" in log and "authenticated" in log


def test_connections_over_the_socket_cap_are_closed_at_once(loop_kind, caplog):
    """Silent connections fill the handshake slots; those over the socket cap are closed
    as soon as they are accepted (they never get a handshake slot, a task or a buffer)."""
    caplog.set_level(logging.WARNING, logger="deltaxfer.transport")

    async def main():
        server = await transport.serve("127.0.0.1", 0, key=KEY, handler=echo,
                                       max_connections=1, max_handshakes=4,
                                       max_handshakes_per_host=4, max_sockets=4)
        async with server:
            port = server.sockets[0].getsockname()[1]
            conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(10)]
            await asyncio.sleep(0.5)
            closed = 0
            for r, w in conns:
                try:
                    closed += await asyncio.wait_for(r.read(1), 0.05) == b""
                except TimeoutError:
                    pass
                except ConnectionError:
                    closed += 1
                w.close()
            return closed
    assert run(loop_kind, main()) == 6
    assert "dropped 1 connection(s)" in caplog.text


def test_refused_peer_is_dropped_at_once(loop_kind):
    """A connection refused before the handshake (admit) is closed at once, not kept
    open for a linger period; the peer still reads the reason on loopback."""
    refused = []

    def admit(tp):
        refused.append(tp)
        return "not you"

    async def main():
        server = await transport.serve("127.0.0.1", 0, key=KEY, handler=echo, admit=admit)
        async with server:
            port = server.sockets[0].getsockname()[1]
            r, w = await asyncio.open_connection("127.0.0.1", port)
            data = await asyncio.wait_for(r.read(), 5)     # until the server's end
            assert b"not you" in data
            await asyncio.sleep(0.2)          # we keep our end open: the server must not
            closed = refused[0].is_closing()  # wait for it (ERROR_LINGER is 1 s)
            w.close()
            return closed
    assert run(loop_kind, main()), "the refused connection is still open on the server"


# -- item 8: keys and the hook's configuration ---------------------------------------------

def test_weak_or_exposed_key_files_are_refused(tmp_path):
    passphrase = write_key(tmp_path / "pass", b"correct horse battery staple 1234")
    with pytest.raises(keys.ConfigError, match="printable.*head -c 32 /dev/urandom"):
        keys.load_key(passphrase)
    short = write_key(tmp_path / "short", os.urandom(16).replace(b"\n", b"\0"))
    with pytest.raises(keys.ConfigError, match="at least 32"):
        keys.load_key(short)
    insecure = write_key(tmp_path / "insecure", keys.INSECURE_KEY)
    with pytest.raises(keys.ConfigError, match="printable"):
        keys.load_key(insecure)                  # the published key only via --insecure
    good = write_key(tmp_path / "good", KEY)
    assert keys.load_key(good) == KEY
    link = tmp_path / "link"
    link.symlink_to(good)
    with pytest.raises(keys.ConfigError, match="symbolic link"):
        keys.load_key(str(link))
    os.chmod(good, 0o640)
    with pytest.raises(keys.ConfigError, match="chmod 600"):
        keys.load_key(good)
    os.chmod(good, 0o600)
    if os.geteuid() == 0:
        os.chown(good, 65534, -1)
        with pytest.raises(keys.ConfigError, match="uid 65534"):
            keys.load_key(good)


def test_a_random_key_ending_in_a_newline_keeps_its_32_bytes(tmp_path):
    key = os.urandom(31) + b"\n"                 # head -c 32 /dev/urandom, 1 time in 256
    path = tmp_path / "k"
    path.write_bytes(key)
    os.chmod(path, 0o600)
    assert keys.load_key(str(path)) == key


def _hook(env, *args):
    return subprocess.run([HOOK, *args], env=env, capture_output=True, text=True, timeout=60)


def test_hook_config_must_be_owned_and_not_writable(tmp_path):
    """The hook's configuration names the criu that runs as root: a group-writable file,
    another user's file or a symbolic link is refused (post-dump fails, so CRIU resumes)."""
    conf = tmp_path / "hook.conf"
    conf.write_text(f"to = 127.0.0.1:1\nkey_file = {tmp_path / 'k'}\ncriu = /tmp/evil\n")
    os.chmod(conf, 0o664)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DELTAXFER_", "CRIU_"))}
    env.update(CRTOOLS_SCRIPT_ACTION="post-dump", DELTAXFER_CONFIG=str(conf),
               CRTOOLS_IMAGE_DIR=str(tmp_path))
    p = _hook(env)
    assert p.returncode == 1 and "writable by group or others" in p.stderr, p.stderr
    link = tmp_path / "link.conf"
    link.symlink_to(conf)
    os.chmod(conf, 0o644)
    p = _hook(dict(env, DELTAXFER_CONFIG=str(link)))
    assert p.returncode == 1 and "symbolic link" in p.stderr, p.stderr
    if os.geteuid() == 0:
        os.chown(conf, 65534, -1)
        p = _hook(env)
        assert p.returncode == 1 and "uid 65534" in p.stderr, p.stderr
    from deltaxfer.hook import hook_config
    os.chown(conf, os.geteuid(), -1)
    assert hook_config({"DELTAXFER_CONFIG": str(conf)})["criu"] == "/tmp/evil"


def test_hook_help_and_misuse():
    p = _hook(dict(os.environ), "--help")
    assert p.returncode == 0 and "CRTOOLS_SCRIPT_ACTION" in p.stdout
    assert "DELTAXFER_CONFIG" in p.stdout and "key_file" in p.stdout and not p.stderr
    # the keys it lists are the settings table's, less those a hook cannot honour
    from deltaxfer.settings import SETTINGS
    listed = set(p.stdout.split("a hook can honour")[1].split("`# deltaxfer")[0]
                 .replace(",", " ").split())
    assert all(s.name in listed for s in SETTINGS if not s.not_hook), listed
    assert not any(s.name in listed for s in SETTINGS if s.not_hook), listed
    env = {k: v for k, v in os.environ.items() if k != "CRTOOLS_SCRIPT_ACTION"}
    p = _hook(env)
    assert p.returncode == 2 and "not by hand" in p.stderr
    p = _hook(env, "--bogus")
    assert p.returncode == 2 and "unexpected arguments" in p.stderr


# -- item 9a: an unauthenticated peer's text in the log -------------------------------------

def test_unauthenticated_error_text_is_logged_as_a_short_repr(loop_kind, caplog):
    """A peer without the key answers WELCOME with ERROR whose reason is 60 KiB with
    newlines (a forged log line among them): the log gets a truncated repr."""
    caplog.set_level(logging.WARNING, logger="deltaxfer.transport")
    forged = "x\n2026-01-01 deltaxfer serve: 10.0.0.9 authenticated\n" + "y" * (60 << 10)

    async def main():
        server = await transport.serve("127.0.0.1", 0, key=KEY, handler=echo)
        async with server:
            port = server.sockets[0].getsockname()[1]
            loop = asyncio.get_running_loop()
            _, proto = await loop.create_connection(transport._FrameProtocol, "127.0.0.1",
                                                    port)
            conn = transport.Connection(proto)
            await conn.send_control(MsgType.HELLO, hs.hello(hs.new_nonce()))
            await conn.recv_control(MsgType.WELCOME)
            # sent raw: Connection.error would cut the reason to 2000 characters
            await conn.send_control(MsgType.ERROR, {"code": "busy\nforged", "reason": forged})
            await asyncio.sleep(0.3)
            conn.close()
    run(loop_kind, main())
    lines = [r.getMessage() for r in caplog.records if "ended the handshake" in r.getMessage()]
    assert len(lines) == 1, caplog.text
    assert "\n" not in lines[0] and len(lines[0]) < 600
    assert r"\n2026-01-01" in lines[0] and f"({len(forged)} characters)" in lines[0]


def test_decoder_of_an_unauthenticated_peer_is_small_until_it_authenticates():
    """Issue 15 item 5: a peer that has not proved the key gets the smallest linear
    buffer (header + one small payload), grown to the full one after authentication,
    with the bytes already received kept in order."""
    from deltaxfer.wire import HEADER_SIZE, MsgType, encode
    from deltaxfer.wire.framing import LINEAR_CAPACITY, SMALL_PAYLOAD, Decoder

    d = Decoder(HEADER_SIZE + SMALL_PAYLOAD)
    assert d.capacity == HEADER_SIZE + SMALL_PAYLOAD < LINEAR_CAPACITY
    a = encode(MsgType.HELLO, b"{}", 0)
    b = encode(MsgType.AUTH, b'{"x": 1}', 1)
    got = d.feed(a + b[:10])                 # a frame and a part of the next one pending
    assert [m.type for m in got] == [MsgType.HELLO]
    d.grow()
    assert d.capacity >= LINEAR_CAPACITY
    got = d.feed(b[10:])
    assert [(m.type, bytes(m.payload)) for m in got] == [(MsgType.AUTH, b'{"x": 1}')]
    with pytest.raises(ValueError):
        Decoder(1024)
