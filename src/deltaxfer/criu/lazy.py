"""Ending a `criu dump --lazy-pages` without sending it any page.

A lazy dump leaves the pages in CRIU's page pipes and, after the post-dump action
script, waits on --address/--port for a lazy-pages client. deltaxfer reads those pages
itself (from the frozen tasks) while the post-dump hook runs, so afterwards it only has
to tell CRIU to finish: connect, send one page-server CLOSE command, shut down our
sending side (CRIU corks the socket; without the shutdown its reply waits ~200 ms),
read the 4-byte status. CRIU then kills the tasks (migration done) or resumes them (the
hook failed).
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


def end_lazy_dump(host: str, port: int, criu_version: tuple[int, ...], *,
                  timeout: float = 30.0, cancelled=lambda: False) -> int | None:
    """Connect to the lazy dump's page server (retrying until it listens) and close it;
    returns CRIU's status word (0 on success), or None if ``cancelled()`` became true
    first (the dump ended some other way)."""
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
        sock.sendall(close_header(criu_version))
        sock.shutdown(socket.SHUT_WR)
        status = b""
        while len(status) < 4:
            chunk = sock.recv(4 - len(status))
            if not chunk:
                break
            status += chunk
    return struct.unpack("<i", status)[0] if len(status) == 4 else -1
