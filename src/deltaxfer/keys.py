"""Pre-shared keys, addresses and TLS contexts for `serve`, `send` and `migrate`."""
from __future__ import annotations

import os
import ssl
import stat

MIN_KEY_BYTES = 16


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
