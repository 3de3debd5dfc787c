"""A page server for a plain `criu dump --page-server` that keeps only what it must.

The freeze for trees too large for a lazy dump (which holds ~2048 open files per GiB):
CRIU sends every page through this socket while the tree is frozen. The pages of
processes are thrown away as they arrive (spliced into /dev/null: no copy into our
memory) — the migration agent reads the ones the destination lacks from the frozen
processes at post-dump, as with a lazy dump. Shared-memory pages cannot be read that way,
so they are kept in a pages file. Either way the pagemaps the page server must write are
written into the dump directory (a dump to a page server writes none itself), process
images with PE_PRESENT entries and no pages file ("in the tasks").

CRIU reaches the sink through its end of a socketpair (``criu dump --page-server
--ps-socket FD``): no TCP listener that another local user could connect to first or
bind before us. With an inherited socket CRIU ends the stream with FORCE_CLOSE.

Protocol (criu/page-xfer.c, server side): 24-byte commands in CRIU 4.1 (cmd u32 with the
flags in its upper 16 bits, nr_pages u32, vaddr u64, dst_id u64; nr_pages is u64 from
4.2: 32 bytes); OPEN2 is answered with one byte (has a parent: 0), PARENT with an int,
ADD_F with PE_PRESENT is followed by its pages, CLOSE / FORCE_CLOSE with an int status.
"""
from __future__ import annotations

import os
import socket
import struct
import threading
import time

from deltaxfer import PAGE_SIZE
from deltaxfer.criu import images as im

PS_IOV_ADD, PS_IOV_HOLE, PS_IOV_OPEN, PS_IOV_OPEN2, PS_IOV_PARENT, PS_IOV_ADD_F, PS_IOV_GET = \
    1, 2, 3, 4, 5, 6, 7
PS_IOV_CLOSE, PS_IOV_FORCE_CLOSE = 0x1023, 0x1024
PS_TYPE_PID, PS_TYPE_SHMEM = 1, 2
MAX_PAGES_PER_IOV = 1 << 30


class SinkError(RuntimeError):
    pass


class PageSink:
    """Serves one page stream on ``sock``, our end of the socketpair whose other end
    CRIU gets with --ps-socket; the sink owns (and closes) ``sock``."""

    def __init__(self, image_dir: str, criu_version: tuple[int, ...], sock: socket.socket):
        self.image_dir = image_dir
        self.header = struct.Struct("<IQQQ" if criu_version >= (4, 2) else "<IIQQ")
        self.sock = sock
        self.error: str | None = None
        self.done = threading.Event()
        self.stats = {"pages_discarded": 0, "pages_kept": 0, "seconds": 0.0}
        self._images: dict[int, tuple[int, int, list]] = {}   # dst_id -> (type, id, entries)
        self._thread = threading.Thread(target=self._run, name="deltaxfer-page-sink",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.sock.settimeout(None)
            t0 = time.monotonic()
            self._serve(self.sock)
            self.stats["seconds"] = round(time.monotonic() - t0, 6)
            self._write_pagemaps()
        except Exception as e:   # reported to the agent, which fails the freeze
            self.error = f"{type(e).__name__}: {e}"
        finally:
            self.done.set()

    def _recv_exact(self, conn, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = conn.recv(n - len(buf))
            if not chunk:
                raise SinkError("criu closed the page-server connection mid-command")
            buf += chunk
        return bytes(buf)

    def _serve(self, conn) -> None:
        current = None
        null = os.open(os.devnull, os.O_WRONLY)
        r, w = os.pipe()
        shmem_files: dict[int, object] = {}
        try:
            while True:
                raw, nr, vaddr, dst = self.header.unpack(self._recv_exact(conn, self.header.size))
                cmd, flags = raw & 0xFFFF, raw >> 16
                if cmd in (PS_IOV_OPEN, PS_IOV_OPEN2):
                    kind, ident = dst & 0xFF, dst >> 8
                    if kind not in (PS_TYPE_PID, PS_TYPE_SHMEM):
                        raise SinkError(f"unknown pagemap type {kind} in OPEN")
                    self._images.setdefault(dst, (kind, ident, []))
                    current = dst
                    if cmd == PS_IOV_OPEN2:
                        conn.sendall(b"\0")           # no parent images
                elif cmd == PS_IOV_PARENT:
                    conn.sendall(struct.pack("<i", 0))
                elif cmd in (PS_IOV_ADD, PS_IOV_ADD_F, PS_IOV_HOLE):
                    if current is None or dst != current:
                        raise SinkError("pages for an image that was not opened")
                    if cmd == PS_IOV_ADD:
                        flags = im.PE_PRESENT
                    elif cmd == PS_IOV_HOLE:
                        flags = im.PE_PARENT
                    if not 0 < nr <= MAX_PAGES_PER_IOV or vaddr % PAGE_SIZE:
                        raise SinkError(f"bad iov: {nr} pages at {vaddr:#x}")
                    kind, ident, entries = self._images[dst]
                    entries.append(im.PagemapEntry(vaddr, nr, flags))
                    if flags & im.PE_PRESENT:
                        n = nr * PAGE_SIZE
                        if kind == PS_TYPE_SHMEM:
                            f = shmem_files.get(ident)
                            if f is None:
                                f = shmem_files[ident] = open(
                                    os.path.join(self.image_dir, f"pages-sink-{ident}.tmp"), "wb")
                            while n:      # in chunks: a shared region may be GiBs
                                chunk = self._recv_exact(conn, min(n, 1 << 20))
                                f.write(chunk)
                                n -= len(chunk)
                            self.stats["pages_kept"] += nr
                        else:
                            self._discard(conn, r, w, null, n)
                            self.stats["pages_discarded"] += nr
                elif cmd in (PS_IOV_CLOSE, PS_IOV_FORCE_CLOSE):
                    conn.sendall(struct.pack("<i", 0))
                    return
                else:
                    raise SinkError(f"unexpected page-server command {cmd:#x}")
        finally:
            for f in shmem_files.values():
                f.close()
            os.close(null)
            os.close(r)
            os.close(w)

    @staticmethod
    def _discard(conn, r: int, w: int, null: int, n: int) -> None:
        fd = conn.fileno()
        while n:
            got = os.splice(fd, w, min(n, 1 << 20))
            if got == 0:
                raise SinkError("criu closed the page-server connection inside a page run")
            left = got
            while left:
                left -= os.splice(r, null, left)
            n -= got

    def _write_pagemaps(self) -> None:
        pages_id = 1
        for kind, ident, entries in self._images.values():
            if kind == PS_TYPE_PID:
                name = f"pagemap-{ident}.img"
                pm = im.Pagemap(0, entries)      # pages in the tasks: no pages file
            else:
                name = f"pagemap-shmem-{ident}.img"
                pm = im.Pagemap(pages_id, entries)
                tmp = os.path.join(self.image_dir, f"pages-sink-{ident}.tmp")
                if os.path.exists(tmp):
                    os.rename(tmp, os.path.join(self.image_dir, f"pages-{pages_id}.img"))
                pages_id += 1
            im.write_pagemap(os.path.join(self.image_dir, name), pm)

    def wait(self, timeout: float) -> None:
        if not self.done.wait(timeout):
            raise SinkError(f"criu's page stream did not end within {timeout:.0f} s")
        if self.error:
            raise SinkError(self.error)

    def close(self) -> None:
        """Ends a stream still in progress (CRIU sees the socket close) and frees it."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)   # wakes the thread if it waits in recv
        except OSError:
            pass
        self._thread.join(5.0)
        self.sock.close()
