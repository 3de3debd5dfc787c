"""The handshake's pure parts: nonces, HMAC proofs, version and capability negotiation.

    proof_s = HMAC-SHA256(key, "deltaxfer/1 server" || nonce_c || nonce_s || binding)
    proof_c = HMAC-SHA256(key, "deltaxfer/1 client" || nonce_c || nonce_s || binding)

Different labels, so neither side's proof can be obtained from the other as an oracle.
``binding`` ties the proofs to the TLS connection they travel in: over TLS it is the
"tls-server-end-point" value (RFC 5929; here always SHA-256 of the server certificate's
DER), which the client computes from the certificate it was shown and the server from its
own. A relay that terminates TLS with another certificate makes the two sides compute
different proofs, so it cannot pass the handshake along. Without TLS it is empty.
"""
import hashlib
import hmac
import secrets

from .messages import CAPS, DEFINED_CAPS, PROTOCOL_NAME, VERSIONS, ErrorCode, ProtocolError

NONCE_SIZE = 32
BINDING_SIZE = 32                # SHA-256 of the server certificate; b"" without TLS
_SERVER_LABEL = b"deltaxfer/1 server"
_CLIENT_LABEL = b"deltaxfer/1 client"


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_SIZE)


def _check_key(key) -> bytes:
    if not isinstance(key, (bytes, bytearray)) or not key:
        raise ValueError("the pre-shared key must be non-empty bytes")
    return bytes(key)


def tls_server_end_point(cert_der: bytes) -> bytes:
    """The channel binding of a TLS connection: SHA-256 of the server certificate (DER)."""
    return hashlib.sha256(cert_der).digest()


def _proof(label: bytes, key: bytes, nonce_c: bytes, nonce_s: bytes,
           binding: bytes = b"") -> bytes:
    if len(nonce_c) != NONCE_SIZE or len(nonce_s) != NONCE_SIZE:
        raise ValueError(f"nonces are {NONCE_SIZE} bytes")
    if len(binding) not in (0, BINDING_SIZE):
        raise ValueError(f"the channel binding is {BINDING_SIZE} bytes, or empty without TLS")
    return hmac.new(_check_key(key), label + nonce_c + nonce_s + bytes(binding),
                    hashlib.sha256).digest()


def server_proof(key: bytes, nonce_c: bytes, nonce_s: bytes, binding: bytes = b"") -> bytes:
    return _proof(_SERVER_LABEL, key, nonce_c, nonce_s, binding)


def client_proof(key: bytes, nonce_c: bytes, nonce_s: bytes, binding: bytes = b"") -> bytes:
    return _proof(_CLIENT_LABEL, key, nonce_c, nonce_s, binding)


def proof_matches(expected: bytes, received_hex: str) -> bool:
    """Constant-time comparison of a proof with the hex one the peer sent."""
    try:
        received = bytes.fromhex(received_hex)
    except ValueError:
        return False
    return hmac.compare_digest(expected, received)


def choose_version(offered, supported=VERSIONS) -> int:
    """The highest version both sides speak; ProtocolError(version) naming ours if none."""
    common = set(offered) & set(supported)
    if not common:
        raise ProtocolError(ErrorCode.VERSION,
                            f"no protocol version in common: the client offers "
                            f"{sorted(set(offered))}, this server speaks "
                            f"{sorted(supported)}")
    return max(common)


def common_caps(ours, theirs) -> list[str]:
    """The capabilities both sides list (only those version 1 defines), sorted."""
    return sorted(set(ours) & set(theirs) & set(DEFINED_CAPS))


def hello(nonce_c: bytes, caps=CAPS, software: str = "", versions=VERSIONS) -> dict:
    return {"protocol": PROTOCOL_NAME, "versions": list(versions), "caps": list(caps),
            "nonce": nonce_c.hex(), "software": software}


def welcome(key: bytes, version: int, caps, nonce_c: bytes, nonce_s: bytes,
            binding: bytes = b"") -> dict:
    return {"version": version, "caps": list(caps), "nonce": nonce_s.hex(),
            "proof": server_proof(key, nonce_c, nonce_s, binding).hex()}


def auth(key: bytes, nonce_c: bytes, nonce_s: bytes, binding: bytes = b"") -> dict:
    return {"proof": client_proof(key, nonce_c, nonce_s, binding).hex()}
