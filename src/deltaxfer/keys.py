"""Pre-shared keys, addresses and TLS contexts for `serve`, `send` and `migrate`."""
from __future__ import annotations

import errno
import hashlib
import ipaddress
import os
import socket
import ssl
import stat
import sys

MIN_KEY_BYTES = 32
KEY_HOWTO = "head -c 32 /dev/urandom > {path}; chmod 600 {path}"

# The key of `serve --insecure` (loopback only). It is published, so it proves nothing:
# there the handshake still runs (same protocol, same framing), and the server admits
# only peers whose socket belongs to its own user (see loopback_peer_uid); a client
# proving it (`--insecure`) likewise talks only to a listener of root or its own user.
# It is all printable, so no key file can hold it: only --insecure uses it.
INSECURE_KEY = b"deltaxfer-insecure-loopback-only"


class ConfigError(ValueError):
    """A key file, address or TLS setting an operator must fix; the message says how."""


def read_owned_file(path: str, what: str, *, private: bool, limit: int = 1 << 16) -> bytes:
    """The contents of a file that only root or this user can have written: opened with
    O_NOFOLLOW (a symbolic link is refused, not followed), a regular file owned by root
    or the effective uid, not writable by group or others; ``private``: not readable by
    them either (a key). At most ``limit`` bytes are read."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK   # a FIFO: no hang
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ConfigError(f"{what} {path} is a symbolic link; name the file itself") \
                from None
        raise ConfigError(f"{what} {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        mode = stat.S_IMODE(st.st_mode)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{what} {path} is not a regular file")
        if st.st_uid not in (0, os.geteuid()):
            raise ConfigError(f"{what} {path} belongs to uid {st.st_uid}, not to root or to "
                              f"uid {os.geteuid()} (who runs this): whoever owns it decides "
                              f"what it says; run: chown {os.geteuid()} {path}")
        if private and mode & 0o077:
            raise ConfigError(f"{what} {path} is readable by group or others (mode "
                              f"{mode:04o}); run: chmod 600 {path}")
        if mode & 0o022:
            raise ConfigError(f"{what} {path} is writable by group or others (mode "
                              f"{mode:04o}); run: chmod go-w {path}")
        chunks, n = [], 0
        while n < limit:
            chunk = os.read(fd, limit - n)
            if not chunk:
                break
            chunks.append(chunk)
            n += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _printable(data: bytes) -> bool:
    return all(32 <= b < 127 or b in (9, 10, 13) for b in data)


def load_key(path: str) -> bytes:
    """The key file's contents are the key: at least MIN_KEY_BYTES random bytes (one
    trailing newline is not part of it when what remains is still long enough). A key
    file that others can read or write, that another user owns, or a symbolic link is
    refused, as ssh refuses such private keys; so is a key of printable characters only
    (a passphrase: guessable offline from one recorded handshake)."""
    key = read_owned_file(path, "key file", private=True)
    for newline in (b"\r\n", b"\n"):
        if key.endswith(newline) and len(key) - len(newline) >= MIN_KEY_BYTES:
            key = key[:-len(newline)]
            break
    howto = KEY_HOWTO.format(path=path)
    if len(key) < MIN_KEY_BYTES:
        raise ConfigError(f"key file {path} holds {len(key)} bytes; a key is at least "
                          f"{MIN_KEY_BYTES} random bytes: {howto}")
    if _printable(key):
        raise ConfigError(f"key file {path} holds only printable characters, like a "
                          f"passphrase (which one recorded handshake lets anyone guess "
                          f"offline); a key is {MIN_KEY_BYTES} random bytes: {howto}")
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


class ServerTLSContext(ssl.SSLContext):
    """A server context that knows its certificate's channel binding (``end_point``:
    SHA-256 of the certificate's DER), which the handshake's proofs include."""
    end_point: bytes | None = None


class ClientTLSContext(ssl.SSLContext):
    """A client context with deltaxfer's checks: ``server_name`` (None: the host of
    --to) is the name or IP address the certificate must carry; ``pin`` (None: any
    certificate the CA signed) the SHA-256 of the one certificate accepted."""
    server_name: str | None = None
    pin: bytes | None = None


def _first_cert_der(path: str) -> bytes:
    """DER of the first certificate in a PEM file (the server's own; a chain follows)."""
    begin, end = "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----"
    try:
        with open(path) as f:
            text = f.read(1 << 20)
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read TLS certificate {path}: {e}") from None
    i = text.find(begin)
    j = text.find(end, i)
    if i < 0 or j < 0:
        raise ConfigError(f"TLS certificate {path} holds no PEM certificate")
    return ssl.PEM_cert_to_DER_cert(text[i:j + len(end)])


def server_tls(cert: str | None, key: str | None) -> ServerTLSContext | None:
    if not cert and not key:
        return None
    if not (cert and key):
        raise ConfigError("TLS needs both --tls-cert and --tls-key")
    ctx = ServerTLSContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"cannot load TLS certificate {cert} / key {key}: {e}") from None
    ctx.end_point = hashlib.sha256(_first_cert_der(cert)).digest()
    return ctx


def parse_pin(text: str) -> bytes:
    """``sha256:HEX`` (colons between bytes allowed) -> the 32 bytes."""
    algo, sep, digits = text.partition(":")
    try:
        value = bytes.fromhex(digits.replace(":", "")) if sep else b""
    except ValueError:
        value = b""
    if algo.lower() != "sha256" or len(value) != 32:
        raise ConfigError(f"--tls-pin {text!r} is not sha256:<64 hex digits>; the server "
                          "certificate's: openssl x509 -in CERT -outform DER | sha256sum")
    return value


def client_tls(ca: str | None, server_name: str | None = None,
               pin: str | None = None) -> ClientTLSContext | None:
    """TLS that trusts only the CA in ``ca`` (not the system's store), TLS >= 1.2, and
    checks the server's name (``server_name``, else the host the client connects to; an
    IP address matches an IP SAN) and, with ``pin``, the certificate itself."""
    if not ca:
        if server_name or pin:
            raise ConfigError("--tls-server-name and --tls-pin need --tls-ca (the CA that "
                              "signed the server's certificate)")
        return None
    ctx = ClientTLSContext(ssl.PROTOCOL_TLS_CLIENT)     # verifies and checks the name
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_verify_locations(ca)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"cannot load TLS CA {ca}: {e}") from None
    ctx.server_name = server_name or None
    ctx.pin = parse_pin(pin) if pin else None
    return ctx
