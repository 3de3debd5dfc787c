"""`deltaxfer send`: ship a CRIU image directory over one stream; a later send of a newer
dump in the same session sends only what changed since what the receiver holds. The
protocol is sender.SenderSession's; this module is the command around it."""
from __future__ import annotations

import os
import socket
import time

from deltaxfer import PAGE_SIZE, transport
from deltaxfer.criu import images as im
from deltaxfer.criu.dumpdir import DumpDir
from deltaxfer.sender import SenderSession
from deltaxfer.source import EncoderPool, base_for, dump_images
from deltaxfer.store import pagemap_name


def source_label(image_dir: str) -> str:
    """Where a send came from: the receiver records it so the next send from the same
    host can use that dump as the base for XOR deltas."""
    return f"{socket.gethostname()}:{os.path.abspath(image_dir)}"


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
    sender = SenderSession(conn, session, pipeline=pipeline, xor=xor, compress=compress)
    try:
        state = await sender.begin("send", source_label(image_dir),
                                   [i.image_id for i in images])
        phase("state")
        # XOR deltas need the pages the receiver holds: the previous dump, if it is still
        # here (named by --base, or the receiver's record of the last send from this host).
        if base is None and state["source"].startswith(socket.gethostname() + ":"):
            prev_dir = state["source"].split(":", 1)[1]
            if os.path.isdir(prev_dir) and os.path.abspath(prev_dir) != os.path.abspath(image_dir):
                base = prev_dir
        based = 0
        for image_id, h in sender.held.items():
            b = open_base(base, image_id)
            if b is not None:
                bases.append(b)
                h.base = base_for(h, b)
                based += h.base is not None
        phase("base")
        rs = await sender.round(images, final=True)
        phase("round")
        nfiles, file_bytes = await sender.files(image_dir, files)
        phase("files")
        committed = await sender.commit(restore)
        phase("commit")
        await sender.goodbye()
        seconds = time.monotonic() - t_start
        image_bytes = sum(len(i.vaddrs) for i in images) * PAGE_SIZE
        stats = sender.wire_stats
        return {
            "session": session, "round": sender.round_no, "to": f"{host}:{port}",
            "destination_path": committed["path"], "restored_pid": committed["restored_pid"],
            "base": base if based else None,
            "pages": rs.as_dict(), "files": nfiles, "file_bytes": file_bytes,
            "image_bytes": image_bytes, "wire_bytes_sent": stats["bytes_out"],
            "wire_bytes_received": stats["bytes_in"], "seconds": round(seconds, 6),
            "wire_rate_MBps": round(stats["bytes_out"] / seconds / 1e6, 3) if seconds else None,
            "image_rate_MBps": round(image_bytes / seconds / 1e6, 3) if seconds else None,
            "cpu_seconds": round(time.process_time() - cpu0, 6),
            "phases": phases,
        }
    finally:
        sender.close()
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
