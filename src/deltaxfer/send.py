"""`deltaxfer send`: ship a CRIU image directory over one stream; a later send of a newer
dump in the same session sends only what changed since what the receiver holds."""
from __future__ import annotations

import asyncio
import functools
import os
import socket
import time
from array import array
from collections import deque

from deltaxfer import PAGE_SIZE, _core, transport
from deltaxfer.criu import images as im
from deltaxfer.criu.dumpdir import DumpDir
from deltaxfer.core.pipeline import split_frames
from deltaxfer.source import (EncoderPool, Held, SentRound, SourceImage, base_for,
                              clean_window, dump_images)
from deltaxfer.store import image_digest, pagemap_name
from deltaxfer.wire import MsgType, ProtocolError, decode_held, encode_pages, iter_pagemap
from deltaxfer.wire import iter_file_data


class SendError(RuntimeError):
    pass


def source_label(image_dir: str) -> str:
    """Where a send came from: the receiver records it so the next send from the same
    host can use that dump as the base for XOR deltas."""
    return f"{socket.gethostname()}:{os.path.abspath(image_dir)}"


async def receive_state(conn) -> tuple[dict, dict[str, Held]]:
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


def _windows(images: list[SourceImage], window_pages: int):
    """(image index, lo, hi, first, last) of every window, in wire order; an image without
    pages has one empty window (it still reports the held pages it removes)."""
    for index, img in enumerate(images):
        n = len(img.vaddrs)
        los = range(0, n, window_pages) if n else [0]
        for k, lo in enumerate(los):
            yield index, lo, min(lo + window_pages, n), k == 0, k == len(los) - 1


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
    todo = _windows(images, pipeline.window_pages)
    pending: deque = deque()

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
        done = clean_window(img, h, lo, hi)
        if done is not None:         # nothing to read or encode: no thread hand-off either
            fut = loop.create_future()
            fut.set_result(done)
        else:
            fut = loop.run_in_executor(pipeline.pool, functools.partial(
                pipeline.encode, img, h, lo, hi, xor=xor, compress=compress, cache=cache))
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
            frames, window_hashes, st, read_s, encode_s = await fut
            pending.popleft()
            submit()
            for frame in split_frames(frames):
                await conn.send(MsgType.PAGES, encode_pages(index, frame))
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
                new_held[img.image_id] = Held(array("Q", img.vaddrs), hashes)
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


def open_base(base_dir: str | None, image_id: str) -> im.MemoryImage | None:
    if not base_dir:
        return None
    path = os.path.join(base_dir, pagemap_name(image_id))
    if not os.path.exists(path):
        return None
    try:
        return im.MemoryImage(path)
    except im.ImageError:
        return None


async def send_dump(image_dir: str, host: str, port: int, key: bytes, session: str, *,
                    ssl=None, restore: bool = False, base: str | None = None, xor: bool = True,
                    compress: bool = True) -> dict:
    """Send the dump at ``image_dir``; returns the report printed by `deltaxfer send`."""
    t_start = time.monotonic()
    cpu0 = time.process_time()
    phases = {}

    def phase(name, since=[t_start]):  # noqa: B006 (a running clock)
        t = time.monotonic()
        phases[name] = round(t - since[0], 6)
        since[0] = t

    dump = DumpDir.open(image_dir)
    images, opened, files = dump_images(dump)
    pipeline = EncoderPool()
    bases = []
    phase("open_dump")
    conn = await transport.connect(host, port, key=key, ssl=ssl)
    phase("connect")
    try:
        me = source_label(image_dir)
        await conn.send_control(MsgType.BEGIN, {"session": session, "mode": "send", "source": me,
                                                "images": [{"id": i.image_id} for i in images]})
        state, held = await receive_state(conn)
        phase("state")
        # XOR deltas need the pages the receiver holds: the previous dump, if it is still
        # here (named by --base, or the receiver's record of the last send from this host).
        if base is None and state["source"].startswith(socket.gethostname() + ":"):
            prev_dir = state["source"].split(":", 1)[1]
            if os.path.isdir(prev_dir) and os.path.abspath(prev_dir) != os.path.abspath(image_dir):
                base = prev_dir
        based = 0
        for image_id, h in held.items():
            b = open_base(base, image_id)
            if b is not None:
                bases.append(b)
                h.base = base_for(h, b)
                based += h.base is not None
        phase("base")
        rs = await send_round(conn, state["round"] + 1, images, held, final=True, xor=xor,
                              compress=compress, pipeline=pipeline)
        phase("round")
        nfiles, file_bytes = await send_files(conn, image_dir, files)
        phase("files")
        await conn.send_control(MsgType.COMMIT, {"restore": restore})
        committed = await conn.recv_control(MsgType.COMMITTED)
        phase("commit")
        await conn.goodbye()
        seconds = time.monotonic() - t_start
        image_bytes = sum(len(i.vaddrs) for i in images) * PAGE_SIZE
        return {
            "session": session, "round": state["round"] + 1, "to": f"{host}:{port}",
            "destination_path": committed["path"], "restored_pid": committed["restored_pid"],
            "base": base if based else None,
            "pages": rs.as_dict(), "files": nfiles, "file_bytes": file_bytes,
            "image_bytes": image_bytes, "wire_bytes_sent": conn.stats["bytes_out"],
            "wire_bytes_received": conn.stats["bytes_in"], "seconds": round(seconds, 6),
            "wire_rate_MBps": round(conn.stats["bytes_out"] / seconds / 1e6, 3) if seconds else None,
            "image_rate_MBps": round(image_bytes / seconds / 1e6, 3) if seconds else None,
            "cpu_seconds": round(time.process_time() - cpu0, 6),
            "phases": phases,
        }
    finally:
        conn.close()
        pipeline.close()
        for b in bases:
            b.close()
        for m in opened:
            m.close()


def render(report: dict) -> str:
    p = report["pages"]
    lines = [
        f"sent {report['image_bytes'] / 2**20:.1f} MiB of pages in {p['images']} memory "
        f"image(s) + {report['files']} files to {report['to']} (session {report['session']}, "
        f"round {report['round']})",
        f"  pages: {p['pages']} scanned, {p['unchanged']} unchanged, {p['sent_full']} full, "
        f"{p['sent_xor']} xor-delta, {p['sent_zero']} zero, {p['removed']} removed"
        + (f" (XOR base: {report['base']})" if report["base"] else ""),
        f"  wire: {report['wire_bytes_sent'] / 2**20:.2f} MiB sent, "
        f"{report['wire_bytes_received'] / 2**20:.2f} MiB received in {report['seconds']:.2f} s "
        f"({report['wire_rate_MBps']} MB/s on the wire, {report['image_rate_MBps']} MB/s of image)",
        f"  destination: {report['destination_path']}"
        + (f", restored as pid {report['restored_pid']}" if report["restored_pid"] else ""),
    ]
    return "\n".join(lines) + "\n"
