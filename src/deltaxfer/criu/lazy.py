"""Ending a `criu dump --lazy-pages` without sending it any page.

A lazy dump leaves the pages in CRIU's page pipes and, after the post-dump action
script, serves them to a lazy-pages client. deltaxfer reads those pages itself (from the
frozen tasks) while the post-dump hook runs, so afterwards it only has to tell CRIU to
finish. CRIU is given its end of a socketpair with --ps-socket FD (no TCP port that
another local user could take or connect to first; criu/page-xfer.c `cr_page_server`
serves the inherited socket as is). deltaxfer writes one page-server CLOSE command into
its end — CRIU reads it once it serves, after post-dump — and reads the 4-byte status.
CRIU then kills the tasks (migration done) or resumes them (the hook failed). If the
agent dies instead, CRIU reads end-of-file on the socket and ends the dump the same way.

``end_lazy_dump`` does the same over TCP for a dump that listens on --address/--port:
runc's checkpoint cannot hand criu a socket (see docs/CONTAINERS.md). Anyone who can
connect to that port first can hold the dump, so `deltaxfer migrate` does not use it.
"""
from __future__ import annotations

import socket
import struct
import time

PS_IOV_CLOSE = 0x1023


def close_header(criu_version: tuple[int, ...]) -> bytes:
    """struct page_server_iov: cmd u32, nr_pages u32 (u64 from CRIU 4.2), vaddr u64,
    dst_id u64 — 24 bytes in 4.1, 32 in 4.2 (no version handshake on this socket)."""
    if criu_version >= (4, 2):
        return struct.pack("<IIQQQ", PS_IOV_CLOSE, 0, 0, 0, 0)
    return struct.pack("<IIQQ", PS_IOV_CLOSE, 0, 0, 0)


def close_lazy_dump(sock: socket.socket, criu_version: tuple[int, ...], *,
                    timeout: float = 30.0, cancelled=lambda: False) -> int | None:
    """Close the lazy dump's page server on ``sock`` (our end of the --ps-socket pair);
    returns CRIU's status word (0 on success), -1 if CRIU closed the socket without one,
    or None if ``cancelled()`` became true first (the dump ended some other way).
    Raises TimeoutError after ``timeout`` seconds without an answer."""
    deadline = time.monotonic() + timeout
    sock.settimeout(timeout)
    sock.sendall(close_header(criu_version))
    sock.shutdown(socket.SHUT_WR)
    status = b""
    while len(status) < 4:
        if cancelled():
            return None
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"criu's lazy page server did not answer CLOSE within "
                               f"{timeout:.0f} s")
        sock.settimeout(min(left, 0.1))   # wakes up to see cancelled()
        try:
            chunk = sock.recv(4 - len(status))
        except TimeoutError:
            continue
        except OSError:
            if cancelled():        # the agent closed our end: the dump ended some other way
                return None
            raise
        if not chunk:
            break
        status += chunk
    return struct.unpack("<i", status)[0] if len(status) == 4 else -1


def end_lazy_dump(host: str, port: int, criu_version: tuple[int, ...], *,
                  timeout: float = 30.0, cancelled=lambda: False) -> int | None:
    """close_lazy_dump for a lazy dump listening on TCP host:port: connect (retrying until
    it listens, up to ``timeout``), then close it; None if ``cancelled()`` first."""
    deadline = time.monotonic() + timeout
    while True:
        if cancelled():
            return None
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.005)
    with sock:
        return close_lazy_dump(sock, criu_version, timeout=max(deadline - time.monotonic(), 1.0),
                               cancelled=cancelled)
