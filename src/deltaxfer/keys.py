"""Pre-shared keys, addresses and TLS contexts for `serve`, `send` and `migrate`."""
from __future__ import annotations

import ipaddress
import os
import socket
import ssl
import stat
import sys

MIN_KEY_BYTES = 16

# The key of `serve --insecure` (loopback only). It is published, so it proves nothing:
# there the handshake still runs (same protocol, same framing), and the server admits
# only peers whose socket belongs to its own user (see loopback_peer_uid). A client
# reaches such a server with a key file holding exactly these bytes.
INSECURE_KEY = b"deltaxfer-insecure-loopback-only"


class ConfigError(ValueError):
    """A key file, address or TLS setting an operator must fix; the message says how."""


def load_key(path: str) -> bytes:
    """The key file's contents are the key (one trailing newline is not part of it).
    A key file that others can read is refused, as ssh refuses such private keys."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise ConfigError(f"key file {path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"key file {path} is not a regular file")
    if st.st_mode & 0o077:
        raise ConfigError(f"key file {path} is readable by group or others (mode "
                          f"{stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}")
    with open(path, "rb") as f:
        key = f.read(1 << 16)
    if key.endswith(b"\r\n"):
        key = key[:-2]
    elif key.endswith(b"\n"):
        key = key[:-1]
    if len(key) < MIN_KEY_BYTES:
        raise ConfigError(f"key file {path} holds {len(key)} bytes; use at least "
                          f"{MIN_KEY_BYTES}, e.g.: head -c 32 /dev/urandom > {path}; "
                          f"chmod 600 {path}")
    return key


def is_loopback(host: str) -> bool:
    """Whether every address ``host`` stands for is a loopback address (127/8, ::1).
    A name is resolved; an empty host (all interfaces) is not loopback."""
    if not host or host in ("0.0.0.0", "::"):
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


def client_key(key_file: str | None, insecure: bool, host: str) -> bytes:
    """The key `send`/`migrate` prove: the key file's, or with --insecure the published
    key of a `serve --insecure`, which only listens on loopback."""
    if key_file:
        if insecure:
            raise ConfigError("--insecure and --key-file exclude each other")
        return load_key(key_file)
    if not insecure:
        raise ConfigError("--key-file is required (the destination's pre-shared key); "
                          "--insecure only reaches a `serve --insecure` on loopback")
    if not is_loopback(host):
        raise ConfigError(f"--insecure reaches only a `serve --insecure` on a loopback "
                          f"address, not {host!r}; use --key-file")
    return INSECURE_KEY


def server_key(key_file: str | None, insecure: bool, host: str) -> bytes:
    """The key `serve` authenticates clients with. Without a key file the server starts
    only on a loopback address and only when the operator said --insecure."""
    if key_file:
        if insecure:
            raise ConfigError("--insecure and --key-file exclude each other: with a key "
                              "file, drop --insecure")
        return load_key(key_file)
    if not insecure:
        raise ConfigError("serve needs --key-file (a pre-shared key, mode 0600): "
                          "head -c 32 /dev/urandom > key; chmod 600 key. Without a key it "
                          "runs only on a loopback address with --insecure")
    if not is_loopback(host):
        raise ConfigError(f"--insecure serves only on a loopback address (127.0.0.1, ::1), "
                          f"not {host or 'all interfaces'!r}: anyone who can reach the port "
                          "could have this root daemon restore a process; use --key-file")
    return INSECURE_KEY


def _proc_net_addr(host: str, port: int) -> str:
    """An address as /proc/net/tcp{,6} prints it: the address as native-endian 32-bit
    words in hex, a colon, the port in hex."""
    try:
        raw = socket.inet_pton(socket.AF_INET, host)
    except OSError:
        raw = socket.inet_pton(socket.AF_INET6, host)
    words = [raw[i:i + 4] for i in range(0, len(raw), 4)]
    native = "".join(int.from_bytes(w, sys.byteorder).to_bytes(4, "big").hex() for w in words)
    return f"{native.upper()}:{port:04X}"


def loopback_peer_uid(sock: socket.socket) -> int | None:
    """The uid owning the other end of a TCP connection on this host (a loopback peer),
    read from /proc/net/tcp{,6}: the socket whose local address is our peer and whose
    remote address is us. None if it cannot be found (not a local peer)."""
    try:
        ours = sock.getsockname()[:2]
        theirs = sock.getpeername()[:2]
    except OSError:
        return None
    want_local, want_remote = _proc_net_addr(*theirs), _proc_net_addr(*ours)
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    cols = line.split()
                    if len(cols) > 7 and cols[1] == want_local and cols[2] == want_remote:
                        return int(cols[7])
        except (OSError, StopIteration, ValueError):
            continue
    return None


def parse_hostport(text: str, *, what: str = "address") -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"{what} {text!r} is not HOST:PORT")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


def server_tls(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    if not cert and not key:
        return None
    if not (cert and key):
        raise ConfigError("TLS needs both --tls-cert and --tls-key")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"cannot load TLS certificate {cert} / key {key}: {e}") from None
    return ctx


def client_tls(ca: str | None, server_name: str | None = None) -> ssl.SSLContext | None:
    if not ca:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    try:
        ctx.load_verify_locations(ca)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"cannot load TLS CA {ca}: {e}") from None
    if server_name is None:
        ctx.check_hostname = False  # the pre-shared key authenticates the server's identity
    return ctx
