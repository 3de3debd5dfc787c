"""The source's half of a session (docs/PROTOCOL.md), on one authenticated connection.

    BEGIN -> STATE, HELD..., STATE_END        what the destination already holds
    ROUND, (IMAGE, PAGEMAP..., PAGES..., IMAGE_END)..., ROUND_END -> ROUND_OK
    FILE, FILE_DATA..., FILE_END              the dump's other files, verbatim
    COMMIT -> COMMITTED [, RESUME -> RESUMED]

`SenderSession` holds what this protocol needs between messages: the connection, what
the destination holds after each confirmed round (``held``: vaddrs + content hashes per
image, which decide what the next round leaves out or sends as an XOR delta), the round
number, the encoder threads and the per-image XOR caches. Both commands drive it:
`deltaxfer send` (one final round from a dump directory, send.py) and `deltaxfer migrate`
(live rounds from a running tree, then the final round inside CRIU's freeze, migrate.py);
neither writes a protocol message itself.
"""
from __future__ import annotations

import asyncio
import functools
import os
import time
from array import array
from collections import deque

from deltaxfer import _core
from deltaxfer.core.pipeline import split_payloads
from deltaxfer.criu import images as im
from deltaxfer.source import EncoderPool, Held, SentRound, SourceImage, clean_window
from deltaxfer.store import image_digest
from deltaxfer.wire import MsgType, ProtocolError, decode_held, iter_pagemap
from deltaxfer.wire import iter_file_data


async def receive_state(conn) -> tuple[dict, dict[str, Held]]:
    """STATE, its HELD tables and STATE_END: what the destination holds of each image,
    checked against the digests STATE announced."""
    state = await conn.recv_control(MsgType.STATE)
    ids = [x["id"] for x in state["images"]]
    parts: dict[str, tuple[array, array]] = {i: (array("Q"), array("Q")) for i in ids}
    while True:
        msg = await conn.recv()
        if msg.type == MsgType.STATE_END:
            break
        if msg.type != MsgType.HELD:
            raise ProtocolError("unexpected", f"expected HELD or STATE_END, got {msg.type!r}")
        index, vaddrs, hashes = decode_held(msg.payload)
        if index >= len(ids):
            raise ProtocolError("bad-payload", f"HELD for image index {index} of {len(ids)}")
        parts[ids[index]][0].extend(vaddrs)
        parts[ids[index]][1].extend(hashes)
    held = {}
    for x in state["images"]:
        v, h = parts[x["id"]]
        if len(v) != x["pages"] or f"{image_digest(h):016x}" != x["digest"]:
            raise ProtocolError("digest", f"the receiver's state of {x['id']} is inconsistent")
        held[x["id"]] = Held(v, h)
    return state, held


def image_pairs(img: SourceImage) -> array:
    """The image's pagemap as (vaddr, nr_pages | flags << 32) pairs, as PAGEMAP carries."""
    return img.pairs if img.pairs is not None else pagemap_pairs(img.pagemap)


def pagemap_pairs(pm: im.Pagemap) -> array:
    out = array("Q")
    for e in pm.entries:
        out.append(e.vaddr)
        out.append(e.nr_pages | e.flags << 32)
    return out


def _windows(images: list[SourceImage], window_pages: int, span_pages: int | None = None):
    """(image index, lo, hi, first, last) of every window, in wire order; an image without
    pages has one empty window (it still reports the held pages it removes). A window
    has at most window_pages pages to read; where the image's clean mask leaves few to
    read, it spans up to span_pages (source.SPARSE_SPAN)."""
    for index, img in enumerate(images):
        n = len(img.vaddrs)
        bounds = list(window_bounds(img.clean, n, window_pages, span_pages)) if n \
            else [(0, 0)]
        for k, (lo, hi) in enumerate(bounds):
            yield index, lo, hi, k == 0, k == len(bounds) - 1


def window_bounds(clean, n: int, window_pages: int, span_pages: int | None = None):
    """[lo, hi) of the windows over n pages: window_pages each, or -- with a clean mask
    (nonzero = clean, not read) -- consecutive such spans merged while their pages to
    read stay within window_pages and the span within span_pages. Counting is
    bytearray.count over the mask: no Python step per page."""
    span = span_pages or window_pages
    if clean is None or span <= window_pages:
        for lo in range(0, n, window_pages):
            yield lo, min(lo + window_pages, n)
        return
    lo = 0
    while lo < n:
        hi = min(lo + window_pages, n)
        to_read = clean.count(0, lo, hi)
        while hi < n and hi - lo < span:
            nxt = min(hi + window_pages, n, lo + span)
            more = clean.count(0, hi, nxt)
            if to_read + more > window_pages:
                break
            to_read += more
            hi = nxt
        yield lo, hi
        lo = hi


async def send_round(conn, round_no: int, images: list[SourceImage], held: dict[str, Held], *,
                     final: bool, xor: bool = True, compress: bool = True, pipeline: EncoderPool,
                     caches: dict | None = None) -> SentRound:
    """One round: every memory image's pagemap, then the records of its pages that the
    destination lacks, then its digest; returns when the destination confirmed, with
    ``held`` updated to what the destination now holds.

    The pages are read and encoded window by window on the pipeline's threads, at most
    ``pipeline.inflight`` windows ahead of the one being sent; frames go out strictly in
    window order (ascending vaddrs per image, as the protocol wants)."""
    loop = asyncio.get_running_loop()
    stats = SentRound()
    t0 = time.monotonic()
    new_held: dict[str, Held] = {}
    await conn.send_control(MsgType.ROUND, {"round": round_no, "final": final})
    todo = _windows(images, pipeline.window_pages, pipeline.span_pages)
    pending: deque = deque()
    same_layout: dict[int, bool] = {}   # per image: held vaddrs == its vaddrs (one compare)

    def submit() -> None:
        job = next(todo, None)
        if job is None:
            return
        index, lo, hi, first, _ = job
        img = images[index]
        cache = caches.get(img.image_id) if caches is not None else None
        if first and cache is not None:
            cache.next_round()      # one round per image; its windows share the cache
        h = held.get(img.image_id)
        if cache is not None and h is None and len(img.vaddrs) > cache.slots:
            # the destination holds nothing of this image yet, and the image is larger
            # than the cache: copying every page in would only churn it (most evicted
            # before a later round could XOR against them; 0.17 s of encoder CPU per GiB
            # measured). Pages enter the cache from the round that sends them again.
            cache = None
        if index not in same_layout:
            same_layout[index] = h is not None and (h.vaddrs is img.vaddrs
                                                    or h.vaddrs == img.vaddrs)
        done = clean_window(img, h, lo, hi, aligned=same_layout[index])
        if done is not None:         # nothing to read or encode: no thread hand-off either
            fut = loop.create_future()
            fut.set_result(done)
        else:
            fut = loop.run_in_executor(pipeline.pool, functools.partial(
                pipeline.encode, img, h, lo, hi, xor=xor, compress=compress, cache=cache,
                pages_index=index))
        pending.append((job, fut))

    try:
        for _ in range(pipeline.inflight):
            submit()
        hashes = array("Q")
        while pending:
            (index, lo, hi, first, last), fut = pending[0]
            img = images[index]
            if first:
                pairs = image_pairs(img)
                await conn.send_control(MsgType.IMAGE, {"index": index, "id": img.image_id,
                                                        "entries": len(pairs) // 2,
                                                        "pages": len(img.vaddrs)})
                for payload in iter_pagemap(index, pairs):
                    await conn.send(MsgType.PAGEMAP, payload)
                hashes = array("Q")
            t = time.monotonic()
            frames, window_hashes, st, read_s, encode_s = await fut
            t_sent = time.monotonic()
            stats.encode_wait_seconds += t_sent - t
            pending.popleft()
            submit()
            # whole PAGES payloads (index, frame) as the encoder wrote them: no copy here
            for payload in split_payloads(frames):
                await conn.send(MsgType.PAGES, payload)
            stats.send_wait_seconds += time.monotonic() - t_sent
            hashes.extend(window_hashes)
            stats.add(st)
            stats.removed += st.get("removed", 0)
            stats.read_seconds += read_s
            stats.encode_seconds += encode_s
            stats.windows += 1
            if last:
                await conn.send_control(MsgType.IMAGE_END, {
                    "index": index, "digest": f"{image_digest(hashes):016x}"})
                # what the destination will hold once the round is confirmed
                # (the round's own vaddrs array, not a copy: 16 MiB at 8 GiB)
                new_held[img.image_id] = Held(img.vaddrs if isinstance(img.vaddrs, array)
                                              else array("Q", img.vaddrs), hashes)
                stats.images += 1
                stats.pages += len(img.vaddrs)
    finally:
        for _, fut in pending:     # an error or a cancellation: drop what is queued
            fut.cancel()
    await conn.send_control(MsgType.ROUND_END, {"round": round_no})
    stats.send_seconds = time.monotonic() - t0
    ok = await conn.recv_control(MsgType.ROUND_OK)
    stats.seconds = time.monotonic() - t0
    stats.wire_bytes = ok["bytes"]
    held.clear()
    held.update(new_held)
    return stats


async def send_files(conn, image_dir: str, names: list[str]) -> tuple[int, int]:
    """Each named file of image_dir, verbatim, with its mode and XXH3; (count, bytes)."""
    total = 0
    for name in names:
        path = os.path.join(image_dir, name)
        with open(path, "rb") as f:
            data = f.read()
        mode = os.stat(path).st_mode & 0o777
        await conn.send_control(MsgType.FILE, {"name": name, "size": len(data), "mode": mode})
        for chunk in iter_file_data(data):
            await conn.send(MsgType.FILE_DATA, chunk)
        await conn.send_control(MsgType.FILE_END, {"xxh3": f"{_core.xxh3_64(data):016x}"})
        total += len(data)
    return len(names), total


class SenderSession:
    """One session's sending side. ``cache_bytes``: an XOR cache of that size per image
    (live rounds; XOR deltas against the source's own previous copy of a page), None for
    none. The encoder pool is the caller's (its buffers outlive a session's rounds)."""

    def __init__(self, conn, name: str, *, pipeline: EncoderPool, xor: bool = True,
                 compress: bool = True, cache_bytes: int | None = None):
        self.conn, self.name = conn, name
        self.pipeline = pipeline
        self.xor, self.compress = xor, compress
        self.cache_bytes = cache_bytes if xor else None
        self.held: dict[str, Held] = {}
        self.caches: dict = {}
        self.round_no = 0
        self.state: dict = {}
        self.resume_sent = False

    async def begin(self, mode: str, source: str, image_ids: list[str], **fields) -> dict:
        """BEGIN (``fields``: restore, container, ... as docs/PROTOCOL.md has them), then
        what the destination holds. A refusal comes back as transport.PeerError."""
        await self.conn.send_control(MsgType.BEGIN, {
            "session": self.name, "mode": mode, "source": source,
            "images": [{"id": i} for i in image_ids], **fields})
        self.state, self.held = await receive_state(self.conn)
        self.round_no = self.state["round"]
        return self.state

    def _caches_for(self, images: list[SourceImage]) -> dict | None:
        if self.cache_bytes is None:
            return None
        for img in images:
            if img.image_id not in self.caches:
                self.caches[img.image_id] = _core.XorCache(self.cache_bytes)
        return self.caches

    async def round(self, images: list[SourceImage], *, final: bool) -> SentRound:
        """The next round of these images; ``held`` is what the destination holds after."""
        self.round_no += 1
        return await send_round(self.conn, self.round_no, images, self.held, final=final,
                                xor=self.xor, compress=self.compress,
                                pipeline=self.pipeline, caches=self._caches_for(images))

    async def files(self, image_dir: str, names: list[str]) -> tuple[int, int]:
        return await send_files(self.conn, image_dir, names)

    async def commit(self, restore: bool) -> dict:
        """COMMIT; COMMITTED's body: where the images are, and the restored (stopped)
        copy's pid when the destination restored."""
        await self.send_commit(restore)
        return await self.conn.recv_control(MsgType.COMMITTED)

    async def send_commit(self, restore: bool, postcopy_pages: int | None = None) -> None:
        """COMMIT alone (post-copy: ``postcopy_pages``, the pages PENDING named; its
        PostcopyPush then reads COMMITTED)."""
        body = {"restore": restore}
        if postcopy_pages is not None:
            body["postcopy_pages"] = postcopy_pages
        await self.conn.send_control(MsgType.COMMIT, body)

    async def resume(self, timeout: float, postcopy=None) -> dict:
        """RESUME the destination's copy and wait for RESUMED (``postcopy``: a
        PostcopyPush, which reads the connection and sends the rest of the pages from
        now on). From the moment RESUME is written the copy may run: ``resume_sent`` says
        so to the caller's rollback."""
        self.resume_sent = True
        await self.conn.send_control(MsgType.RESUME, {})
        if postcopy is not None:
            postcopy.resume_sent()
            return await asyncio.wait_for(asyncio.shield(postcopy.resumed), timeout)
        return await self.conn.recv_control(MsgType.RESUMED, timeout=timeout)

    async def error(self, code: str, reason: str) -> None:
        await self.conn.error(code, reason)

    async def goodbye(self) -> None:
        await self.conn.goodbye()

    @property
    def wire_stats(self) -> dict:
        return self.conn.stats

    def close(self) -> None:
        self.conn.close()
