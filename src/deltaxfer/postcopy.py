"""Post-copy of the residual (docs/ARCHITECTURE.md "Post-copy of the residual"), both
halves.

A migration whose rounds do not converge can end in post-copy: inside the freeze the
final round leaves out the pages written since the last round that the destination
holds an older copy of (they are sent as held: no read, no bytes); PENDING names them;
the destination commits, restores lazily and writes their vaddrs beside the images for
deltaxfer's lazy-pages server, which places no such page until it has arrived. The copy
resumes at once. From COMMIT on, over the same connection:

    source -> POSTCOPY_PAGES...   until RESUME only the pages asked for, then every
                                  pending page in address order, read from the
                                  still-frozen source (process_vm_readv); XOR deltas
                                  against the destination's copy where known, lz4 if
                                  it helps
    destination -> FETCH          a fault (the restore's too) on a pending page: those
                                  pages go next
    source -> POSTCOPY_END        every page was sent
    destination -> POSTCOPY_DONE  every page is in the pages file (and the server told)

The source stays frozen until POSTCOPY_DONE, then is killed. The risk: from the resume
until POSTCOPY_DONE the only complete memory is split between the two hosts. If the link
(or either side) fails then, the destination kills its copy (it cannot run without the
missing pages, and would wait on them forever) and the source is left stopped, not
resumed: the copy ran meanwhile and may have acted on the world, so resuming the source
from the freeze is the operator's call (`kill -CONT`), never deltaxfer's.

``PostcopyReceiver`` is the destination's half (the receiver's POSTCOPY state),
``PostcopyPush`` the source's.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from array import array
from bisect import bisect_left, bisect_right
from collections import deque
from typing import NamedTuple

from deltaxfer import PAGE_SIZE, _core
from deltaxfer.lazyserve import PENDING_FILE, POSTCOPY_RECORD, POSTCOPY_SOCKET
from deltaxfer.pidref import signal_tree
from deltaxfer.store import StoreError
from deltaxfer.wire import (MsgType, decode_control, decode_postcopy_pages, decode_runs,
                            encode_postcopy_pages, iter_runs)
from deltaxfer.wire.binary import PC_LZ4, PC_XOR

log = logging.getLogger("deltaxfer.serve")

BATCH_PAGES = 128          # pages per POSTCOPY_PAGES message: 512 KiB
# bytes the source lets wait unsent (its socket's send queue) before the next message: a
# fault's pages go out behind at most this much (~4 ms at 1 Gbit/s, 80 ms at 50 Mbit/s)
# instead of behind the several MiB a tuned TCP buffer holds
MAX_QUEUED = 512 * 1024
# once the copy runs, the destination gives up after this long without a message (before
# that, during the restore, the source's freeze deadline bounds the wait)
POSTCOPY_IDLE = 30.0


def unsent_bytes(conn) -> int:
    """What the connection still holds unsent: its transport's buffer and its socket's
    send queue (TIOCOUTQ)."""
    import fcntl
    import struct
    import termios
    t = conn.transport
    if t is None:
        return 0
    n = t.get_write_buffer_size()
    sock = t.get_extra_info("socket")
    if sock is not None:
        try:
            n += struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ,
                                                b"\0\0\0\0"))[0]
        except OSError:
            pass
    return n


def page_runs(vaddrs: array, limit: int = BATCH_PAGES) -> tuple[array, array]:
    """Sorted page vaddrs as runs (start, pages) of contiguous pages, at most ``limit``
    pages each."""
    starts, counts = array("Q"), array("Q")
    for v in vaddrs:
        if counts and v == starts[-1] + counts[-1] * PAGE_SIZE and counts[-1] < limit:
            counts[-1] += 1
        else:
            starts.append(v)
            counts.append(1)
    return starts, counts


# -- the destination ------------------------------------------------------------------------

class _Image:
    def __init__(self, index: int, image_id: str, vaddrs: array, hashes: array, fd: int):
        self.index, self.image_id, self.pid = index, image_id, int(image_id[4:])
        self.vaddrs, self.hashes, self.fd = vaddrs, hashes, fd
        self.mask = bytearray(len(vaddrs))      # 1: pending
        self.left = 0
        self.changed = array("Q")              # (index, count) pairs written

    def span(self, vaddr: int, count: int, what: str, *, pending: bool = True) -> int:
        """The layout index of pages [vaddr, +count): held pages that must all be
        pending (``pending``), or none of them (PENDING naming them)."""
        i = bisect_left(self.vaddrs, vaddr)
        if (i + count > len(self.vaddrs) or self.vaddrs[i] != vaddr
                or self.vaddrs[i + count - 1] != vaddr + (count - 1) * PAGE_SIZE
                or self.mask.count(1, i, i + count) != (count if pending else 0)):
            raise StoreError("bad-payload", f"{what}: pages at 0x{vaddr:x} (+{count}) of "
                                            f"{self.image_id} are not "
                                            + ("pending" if pending else
                                               "held pages (or are named twice)"))
        return i


class PostcopyReceiver:
    """One session's post-copy on the destination (created at a post-copy COMMIT)."""

    def __init__(self, rcv, round_ids: dict[int, str], pending: dict[int, list]):
        self.rcv, self.conn, self.session = rcv, rcv.conn, rcv.session
        self.round_ids, self.pending = round_ids, pending
        self.images: dict[int, _Image] = {}
        self.by_pid: dict[int, _Image] = {}
        self.left = 0
        self.reader = self.writer = None
        self.requests = 0
        self.bytes_in = 0
        self.pid = self.start = None           # the restored tree, once restored
        # the lazy-pages server's count of the copy's faults that waited on a page
        self.blocked = {"fault_waits": None, "fault_wait_s": None, "fault_wait_max_s": None}
        self.blocked_known = asyncio.Event()
        self.resume = asyncio.get_running_loop().create_future()   # RESUME came

    def write_pending_files(self, path: str) -> None:
        """On the session's worker, after the commit made ``path``: each process
        image's pending vaddrs as postcopy-pending-PID.bin (for the lazy-pages server),
        and the pages file opened for the arrivals (the committed images link the held
        files: the held state is completed too)."""
        held = self.session.held()
        for index, runs in self.pending.items():
            image_id = self.round_ids[index]
            vaddrs, hashes = self.session.held_hashes(image_id)
            img = _Image(index, image_id, vaddrs, array("Q", hashes), -1)
            pv = array("Q")
            for starts, counts in runs:
                for a, c in zip(starts, counts):
                    i = img.span(a, c, "PENDING", pending=False)
                    img.mask[i:i + c] = b"\x01" * c
                    pv.extend(range(a, a + c * PAGE_SIZE, PAGE_SIZE))
            img.left = len(pv)
            pv = array("Q", sorted(pv))
            with open(os.path.join(path, PENDING_FILE.format(pid=img.pid)), "wb") as f:
                f.write(pv.tobytes())
            img.fd = os.open(os.path.join(path, os.path.basename(held[image_id].pages_path)),
                             os.O_RDWR | os.O_CLOEXEC)
            self.images[index] = img
            self.by_pid[img.pid] = img
            self.left += img.left

    async def connect(self, path: str) -> None:
        """The lazy-pages server's post-copy socket, before the restore (which may
        itself fault on a pending page)."""
        # through the directory's fd: a store's path may be longer than a socket
        # address may be (108 bytes)
        dfd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            self.reader, self.writer = await asyncio.open_unix_connection(
                f"/proc/self/fd/{dfd}/{POSTCOPY_SOCKET}")
        except OSError as e:
            self.close()
            raise StoreError("restore", f"post-copy: cannot reach the lazy-pages server "
                                        f"({e.strerror or e})") from None
        finally:
            os.close(dfd)

    def set_tree(self, pid: int, start: int | None) -> None:
        """The restored (stopped) tree: killed if the post-copy fails from now on; the
        lazy-pages server is told too (it kills it if this receiver goes away)."""
        self.pid, self.start = pid, start
        if self.writer is not None:
            self.writer.write(POSTCOPY_RECORD.pack(-1, 0, pid) +
                              POSTCOPY_RECORD.pack(-2, 0, start or 0))

    def _apply(self, payload) -> bytes:
        """On the worker: one POSTCOPY_PAGES into the pages file; the records for the
        lazy-pages server (sent once the pages are written)."""
        import lz4.block
        index, starts, counts, flags, raw, data = decode_postcopy_pages(payload)
        img = self.images.get(index)
        if img is None:
            raise StoreError("bad-payload", f"POSTCOPY_PAGES for image index {index}, which "
                                            "has no pending pages")
        if flags & PC_LZ4:
            try:
                data = lz4.block.decompress(data, uncompressed_size=raw)
            except lz4.block.LZ4BlockError as e:
                raise StoreError("bad-payload", f"POSTCOPY_PAGES: {e}") from None
        if len(data) != raw:
            raise StoreError("bad-payload", "POSTCOPY_PAGES: the body's size is not its "
                                            "header's")
        # every run checked (all pending) before anything is read or written
        at = [img.span(a, c, "POSTCOPY_PAGES") for a, c in zip(starts, counts)]
        if flags & PC_XOR:
            data = self._undelta(img, at, counts, memoryview(data))
        view = memoryview(data)
        out = bytearray()
        off = 0
        for i, c in zip(at, counts):
            chunk = view[off:off + c * PAGE_SIZE]
            done = 0
            while done < len(chunk):
                done += os.pwrite(img.fd, chunk[done:], i * PAGE_SIZE + done)
            hashes, _, _ = _core.hash_pages(chunk)
            img.hashes[i:i + c] = hashes
            img.mask[i:i + c] = bytes(c)
            img.changed.extend((i, c))
            img.left -= c
            self.left -= c
            out += POSTCOPY_RECORD.pack(img.pid, c, i)
            off += c * PAGE_SIZE
        return bytes(out)

    def _undelta(self, img: _Image, at, counts, body: memoryview) -> bytearray:
        """The pages of an XOR body for runs of ``counts`` pages at layout indexes
        ``at``: the pages in the file (the destination's older copies, checked against
        their held hashes) patched by the deltas, and the whole pages put in."""
        npages = sum(counts)
        lengths = array("q", body[:8 * npages].tobytes())
        if sys.byteorder != "little":
            lengths.byteswap()
        if min(lengths, default=0) < -1:
            raise StoreError("bad-payload", "POSTCOPY_PAGES: a negative delta length")
        dsum = sum(x for x in lengths if x > 0)
        deltas = body[8 * npages:8 * npages + dsum]
        whole = body[8 * npages + dsum:]
        if len(deltas) != dsum or len(whole) != lengths.count(-1) * PAGE_SIZE:
            raise StoreError("bad-payload", "POSTCOPY_PAGES: the deltas and whole pages do "
                                            "not add up")
        pages = bytearray(npages * PAGE_SIZE)
        k = 0
        base_hashes = array("Q")
        for i, c in zip(at, counts):
            got = os.preadv(img.fd, [memoryview(pages)[k * PAGE_SIZE:(k + c) * PAGE_SIZE]],
                            i * PAGE_SIZE)
            if got != c * PAGE_SIZE:
                raise StoreError("internal", f"{img.image_id}: the pages file is short")
            base_hashes.extend(img.hashes[i:i + c])
            k += c
        hashes, _, _ = _core.hash_pages(pages)
        for k in range(npages):
            if lengths[k] != -1 and hashes[k] != base_hashes[k]:
                raise StoreError("digest", f"POSTCOPY_PAGES: an XOR delta for a page of "
                                           f"{img.image_id} whose copy here is not the one "
                                           "the source names")
        try:
            _core.xor_decode_pages(pages, deltas, lengths)
        except ValueError as e:
            raise StoreError("bad-payload", f"POSTCOPY_PAGES: {e}") from None
        w = 0
        for k in range(npages):
            if lengths[k] == -1:
                pages[k * PAGE_SIZE:(k + 1) * PAGE_SIZE] = whole[w * PAGE_SIZE:(w + 1) * PAGE_SIZE]
                w += 1
        return pages

    async def _relay(self) -> None:
        """Fault requests from the lazy-pages server -> FETCH to the source (the pages
        still pending among them)."""
        size = POSTCOPY_RECORD.size
        buf = b""
        while True:
            chunk = await self.reader.read(256 * size)
            if not chunk:
                return
            buf += chunk
            k = len(buf) - len(buf) % size
            want: dict[int, tuple[array, array]] = {}
            for pid, n, p in POSTCOPY_RECORD.iter_unpack(buf[:k]):
                if pid == -3:
                    self.blocked["fault_waits"] = n
                    self.blocked["fault_wait_s"] = round(p / 1e9, 6)
                    continue
                if pid == -4:
                    self.blocked["fault_wait_max_s"] = round(p / 1e9, 6)
                    self.blocked_known.set()
                    continue
                img = self.by_pid.get(pid)
                if img is None or p + n > len(img.vaddrs) or not img.mask.count(1, p, p + n):
                    continue
                v, c = want.setdefault(img.index, (array("Q"), array("Q")))
                v.append(img.vaddrs[p])
                c.append(n)
                self.requests += 1
            buf = buf[k:]
            for index, (v, c) in want.items():
                for payload in iter_runs(index, v, c, "FETCH"):
                    await self.conn.send(MsgType.FETCH, payload)

    async def run(self) -> dict:
        """From COMMIT: receive every pending page (while the copy is restored, then
        runs) and RESUME (``self.resume``); POSTCOPY_DONE. Any failure kills the copy:
        without its pending pages it cannot go on."""
        loop = asyncio.get_running_loop()
        t0 = time.monotonic()
        relay = loop.create_task(self._relay())
        end = None
        try:
            # until POSTCOPY_END and RESUME (after COMMITTED: either may come first)
            while end is None or not self.resume.done():
                msg = await self.conn.recv(
                    timeout=POSTCOPY_IDLE if self.resume.done() else None)
                if msg.type == MsgType.RESUME and not self.resume.done():
                    decode_control(msg)
                    self.resume.set_result(True)
                elif msg.type == MsgType.POSTCOPY_PAGES:
                    self.bytes_in += len(msg.payload)
                    recs = await loop.run_in_executor(self.rcv.worker, self._apply,
                                                      msg.payload)
                    self.writer.write(recs)
                    await self.writer.drain()
                elif msg.type == MsgType.POSTCOPY_END and end is None:
                    end = decode_control(msg)
                    if self.left:
                        raise StoreError("missing-page", f"POSTCOPY_END with {self.left} "
                                                         "pending pages not sent")
                else:
                    raise StoreError("unexpected", f"{msg.type.name} in post-copy (session "
                                                   "state: POSTCOPY)")
            self.writer.write(POSTCOPY_RECORD.pack(0, 0, 0))
            await self.writer.drain()
            await loop.run_in_executor(self.rcv.worker, self._save_hashes)
            try:      # the server's answer to the end record: how long faults waited
                await asyncio.wait_for(self.blocked_known.wait(), 2.0)
            except TimeoutError:
                pass
            pages = end["pages"]
            await self.conn.send_control(MsgType.POSTCOPY_DONE,
                                         {"pages": pages, "requests": self.requests,
                                          **{k: v for k, v in self.blocked.items()
                                             if v is not None}})
            report = {"pages": pages, "requests": self.requests, "bytes": self.bytes_in,
                      "seconds": round(time.monotonic() - t0, 6), **self.blocked}
            log.info("%s: session %s: post-copy done: %d pages (%.1f MiB on the wire) in "
                     "%.3f s, %d fault requests", self.rcv.peer, self.rcv.name, pages,
                     self.bytes_in / 2**20, report["seconds"], self.requests)
            return report
        except BaseException as e:
            killed = signal_tree(self.pid, signal.SIGKILL, self.start) if self.pid else 0
            if not self.resume.done():
                self.resume.set_exception(RuntimeError(f"post-copy failed: {e!r}"))
            log.warning("%s: session %s: post-copy failed (%s) with %d pages still on the "
                        "source: killed the restored copy (%d tasks), which cannot run "
                        "without them; the source is left stopped", self.rcv.peer,
                        self.rcv.name, type(e).__name__ if not str(e) else e, self.left,
                        killed)
            raise
        finally:
            relay.cancel()
            self.close()

    def _save_hashes(self) -> None:
        for img in self.images.values():
            self.session.write_hashes(img.image_id, img.hashes, img.changed)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        for img in self.images.values():
            if img.fd >= 0:
                os.close(img.fd)
                img.fd = -1


# -- the source -----------------------------------------------------------------------------

class _Runs(NamedTuple):
    """One image's pending pages on the source, as the runs they go in."""
    index: int            # the image's index in the final round
    pid: int              # the frozen task (host pid)
    starts: array
    counts: array
    sent: bytearray       # one byte per run: queued for sending

class PostcopyPush:
    """The source's half: PENDING before COMMIT, the pages after RESUMED. ``pending``:
    {image id: (host pid, sorted vaddrs)} from the final round (live.frozen_images);
    ``index``: {image id: its index in that round}."""

    def __init__(self, conn, pending: dict, index: dict[str, int], *, compress: bool,
                 pool, held: dict | None = None, caches: dict | None = None):
        self.conn, self.compress, self.pool = conn, compress, pool
        # XOR deltas against the destination's older copy: its hashes (``held``, as the
        # final round left them) and the source's copy of what it sent (the XOR caches)
        self.held, self.caches = held or {}, caches or {}
        self.id_of = {i: image_id for image_id, i in index.items()}
        self.xor_pages = 0
        self.images: list[_Runs] = []
        for image_id, (pid, vaddrs) in sorted(pending.items(), key=lambda x: index[x[0]]):
            starts, counts = page_runs(vaddrs)
            self.images.append(_Runs(index[image_id], pid, starts, counts,
                                     bytearray(len(starts))))
        self.by_index = {x.index: x for x in self.images}
        self.pages = sum(len(v) for _, v in pending.values())
        self.fetches = self.fetched_pages = 0
        self.bytes = 0
        self.task = self.reader = None

    async def send_pending(self) -> None:
        """PENDING: each image's pending pages, as the runs the pages will go in (any
        runs would do: the destination expands them to pages)."""
        for img in self.images:
            for payload in iter_runs(img.index, img.starts, img.counts, "PENDING"):
                await self.conn.send(MsgType.PENDING, payload)

    def _read(self, index: int, pid: int, starts, counts) -> tuple[bytes, bool, int]:
        """On an encoder thread: the pages of these runs from the frozen task, as XOR
        deltas where the destination's copy is known here, lz4 when that saves a tenth
        or more. (body, lz4, raw size of an XOR body or 0)."""
        import lz4.block
        lens = array("Q", (c * PAGE_SIZE for c in counts))
        buf = bytearray(sum(lens))
        failed, nbytes = _core.read_process_memory(pid, array("Q", starts), lens, buf)
        if failed:
            raise OSError(f"post-copy: {nbytes} bytes of process {pid} could not be read "
                          f"(first at 0x{failed[0][0]:x})")
        body, xor_raw = self._deltas(index, starts, counts, buf)
        if self.compress:
            packed = lz4.block.compress(bytes(body), store_size=False)
            if len(packed) < 0.9 * len(body):
                return packed, True, xor_raw
        return bytes(body), False, xor_raw

    def _deltas(self, index: int, starts, counts, buf: bytearray):
        """(body, raw size) of an XOR body for these pages, or (buf, 0) when no page
        has a known base: a page's base is the XOR cache's copy when its hash is the
        destination's (the final round's held hash of that vaddr)."""
        image_id = self.id_of.get(index)
        cache, held = self.caches.get(image_id), self.held.get(image_id)
        if cache is None or held is None:
            return buf, 0
        npages = len(buf) // PAGE_SIZE
        old = bytearray(len(buf))
        want = array("Q")
        k = 0
        for a, c in zip(starts, counts):
            i = bisect_left(held.vaddrs, a)
            want.extend(held.hashes[i:i + c])
            for j in range(c):
                page = cache.lookup(a + j * PAGE_SIZE)
                if page is not None:
                    old[(k + j) * PAGE_SIZE:(k + j + 1) * PAGE_SIZE] = page
            k += c
        hashes, _, _ = _core.hash_pages(old)
        based = [k for k in range(npages) if hashes[k] == want[k]]
        if not based:
            return buf, 0
        mv, ov = memoryview(buf), memoryview(old)
        sel_new = b"".join(mv[k * PAGE_SIZE:(k + 1) * PAGE_SIZE] for k in based)
        sel_old = b"".join(ov[k * PAGE_SIZE:(k + 1) * PAGE_SIZE] for k in based)
        deltas, dl = _core.xor_encode_pages(sel_old, sel_new)
        lengths = array("q", [-1]) * npages
        out = bytearray()
        dv = memoryview(deltas)
        at = 0
        for k, n in zip(based, dl):
            lengths[k] = n
            if n > 0:
                out += dv[at:at + n]
                at += n
        for k in range(npages):
            if lengths[k] == -1:
                out += mv[k * PAGE_SIZE:(k + 1) * PAGE_SIZE]
        if sys.byteorder != "little":
            lengths.byteswap()
        body = lengths.tobytes() + out
        self.xor_pages += sum(1 for n in dl if n >= 0)
        return body, len(body)

    def start(self, timeout: float) -> None:
        """Right after COMMIT: from now on this is the connection's only reader (COMMITTED
        and RESUMED come back through ``committed`` and ``resumed``), and the pages flow
        -- the destination's restore may itself wait on one. ``task`` ends with the
        report once POSTCOPY_DONE came (within ``timeout`` seconds)."""
        loop = asyncio.get_running_loop()
        self.committed = loop.create_future()
        self.resumed = loop.create_future()
        self.done = loop.create_future()
        self.queue: deque = deque()
        # until RESUME went out only fault requests are sent (the restore may wait on a
        # page): COMMITTED and RESUME must not queue behind the pages
        self.background = False
        self.wake = asyncio.Event()
        self.reader = loop.create_task(self._reader())
        self.task = loop.create_task(self._push(timeout))

    def resume_sent(self) -> None:
        """RESUME is on its way: the rest of the pages may follow it."""
        self.background = True
        self.wake.set()

    def cancel(self) -> None:
        for t in (self.task, self.reader):
            if t is not None:
                t.cancel()

    async def _reader(self) -> None:
        try:
            while True:
                msg = await self.conn.recv()
                if msg.type == MsgType.FETCH:
                    index, v, c = decode_runs(msg.payload, "FETCH")
                    img = self.by_index.get(index)
                    if img is None:
                        continue
                    starts, counts, sent = img.starts, img.counts, img.sent
                    for a, n in zip(v, c):
                        self.fetches += 1
                        k = max(bisect_right(starts, a) - 1, 0)
                        while k < len(starts) and starts[k] < a + n * PAGE_SIZE:
                            if not sent[k] and starts[k] + counts[k] * PAGE_SIZE > a:
                                self.queue.append((index, k))
                            k += 1
                    self.wake.set()
                elif msg.type == MsgType.COMMITTED and not self.committed.done():
                    self.committed.set_result(decode_control(msg))
                elif msg.type == MsgType.RESUMED and not self.resumed.done():
                    self.resumed.set_result(decode_control(msg))
                    if self.done.done():
                        return
                elif msg.type == MsgType.POSTCOPY_DONE and not self.done.done():
                    self.done.set_result(decode_control(msg))
                    if self.resumed.done():
                        return
                else:
                    raise RuntimeError(f"{msg.type.name} from the destination in post-copy")
        except BaseException as e:
            self._fail(e)
            raise

    def _next_batch(self, cursor: list):
        """(image, run ids) of the next message: fault requests first, then address
        order; at most BATCH_PAGES pages of one image."""
        queue = self.queue
        while queue:
            index, k = queue.popleft()
            img = self.by_index[index]
            if not img.sent[k]:
                ids, pages = [k], img.counts[k]
                img.sent[k] = 1
                while queue and queue[0][0] == index and pages < BATCH_PAGES:
                    _, k2 = queue.popleft()
                    if not img.sent[k2]:
                        img.sent[k2] = 1
                        ids.append(k2)
                        pages += img.counts[k2]
                self.fetched_pages += pages
                return img, ids
        while cursor[0] < len(self.images):
            img = self.images[cursor[0]]
            sent = img.sent
            k = sent.find(0, cursor[1])
            if k < 0:
                cursor[0], cursor[1] = cursor[0] + 1, 0
                continue
            ids, pages = [], 0
            while k >= 0 and k < len(sent) and pages + img.counts[k] <= BATCH_PAGES:
                sent[k] = 1
                ids.append(k)
                pages += img.counts[k]
                k = sent.find(0, k + 1)
            cursor[1] = ids[-1] + 1
            return img, ids
        return None

    def _fail(self, e: BaseException) -> None:
        """Whoever waits for COMMITTED, RESUMED or POSTCOPY_DONE learns of ``e``."""
        err = e if isinstance(e, Exception) else RuntimeError("post-copy cancelled")
        for f in (self.committed, self.resumed, self.done):
            if not f.done():
                f.set_exception(err)
                f.add_done_callback(lambda f: f.exception())   # not reported as unseen

    async def _push(self, timeout: float) -> dict:
        try:
            return await self._push_all(timeout)
        except BaseException as e:
            self._fail(e)
            raise

    async def _push_all(self, timeout: float) -> dict:
        """Every pending page to the destination, fault requests first; returns when
        POSTCOPY_DONE says it has them all."""
        loop = asyncio.get_running_loop()
        t0 = time.monotonic()
        cursor = [0, 0]
        async with asyncio.timeout(timeout):
            while True:
                if self.done.done():
                    self.done.result()               # raises what ended the reader
                if not self.background and not self.queue:
                    self.wake.clear()
                    await self.wake.wait()
                    continue
                # keep the link's queue short: a fault's request overtakes the rest
                while unsent_bytes(self.conn) > MAX_QUEUED:
                    await asyncio.sleep(0.001)
                nxt = self._next_batch(cursor)
                if nxt is None:
                    break
                img, ids = nxt
                s = array("Q", (img.starts[k] for k in ids))
                c = array("Q", (img.counts[k] for k in ids))
                data, packed, xor_raw = await loop.run_in_executor(
                    self.pool, self._read, img.index, img.pid, s, c)
                payload = encode_postcopy_pages(img.index, s, c, data, packed, xor_raw)
                self.bytes += len(payload)
                await self.conn.send(MsgType.POSTCOPY_PAGES, payload)
            t_sent = time.monotonic()
            await self.conn.send_control(MsgType.POSTCOPY_END, {"pages": self.pages})
            body = await asyncio.shield(self.done)
        return {"pages": self.pages, "bytes": self.bytes, "batch_pages": BATCH_PAGES,
                "seconds": round(time.monotonic() - t0, 6),
                "send_seconds": round(t_sent - t0, 6), "fetch_requests": self.fetches,
                "fetched_pages": self.fetched_pages, "xor_pages": self.xor_pages,
                "destination_requests": body.get("requests", 0),
                # the copy's faults that waited on a page still on the source, and how
                # long (summed, and the longest), as the destination's server timed them
                "fault_waits": body.get("fault_waits"),
                "fault_wait_s": body.get("fault_wait_s"),
                "fault_wait_max_s": body.get("fault_wait_max_s")}
