"""The memory of a live (or frozen) process tree as memory images to send.

Live rounds read the present pages of every process's private writable anonymous VMAs
with process_vm_readv (the process keeps running). The final round reads what a lazy
`criu dump --lazy-pages` left in the frozen processes (pagemap entries flagged LAZY only)
and takes the rest from the dump's pages files. Memory images are named like CRIU's
files: ``pid-N`` with N the pid inside the tree's PID namespace.
"""
from __future__ import annotations

import os
import time
from array import array
from dataclasses import dataclass

from deltaxfer import PAGE_SIZE, _core
from deltaxfer.core import procmem
from deltaxfer.criu import images as im
from deltaxfer.criu.dumpdir import DumpDir
from deltaxfer.source import SourceImage
from deltaxfer.tracking import Tracking, clean_mask


class LiveError(RuntimeError):
    pass


@dataclass(frozen=True)
class Task:
    host_pid: int
    ns_pid: int     # as the tree's root PID namespace sees it (what CRIU's images use)


def _nspids(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    return [int(x) for x in line.split()[1:]]
    except FileNotFoundError:
        raise LiveError(f"process {pid} does not exist") from None
    return [pid]


def _children(pid: int) -> list[int]:
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    out += [int(x) for x in f.read().split()]
            except FileNotFoundError:
                pass
    except FileNotFoundError:
        pass
    return out


def _alive(pid: int) -> bool:
    """Running or stopped — not gone and not a zombie waiting to be reaped."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


def process_tree(root: int) -> list[Task]:
    """The root and all its descendants (processes, not threads), root first."""
    if not _alive(root):
        raise LiveError(f"the process to migrate ({root}) has exited")
    depth = len(_nspids(root))
    tasks, todo = [], [root]
    while todo:
        pid = todo.pop(0)
        ns = _nspids(pid)
        if len(ns) < depth:
            continue  # left the tree's namespace: not ours to dump
        tasks.append(Task(pid, ns[depth - 1]))
        todo += _children(pid)
    return tasks


@dataclass
class Snapshot:
    images: list[SourceImage]
    bytes_read: int          # memory of the tree (pages in its images)
    bytes_failed: int
    seconds: float
    pages_read: int = 0      # pages actually copied out of the processes
    written_pages: int = 0   # reported written by tracking (None-tracked processes: 0)


def _pairs_of_runs(run_v: array, run_l: array, flags: int) -> array:
    """PAGEMAP pairs (vaddr, nr_pages | flags << 32) of runs that are already maximal
    (pagemap_runs merges touching pages), built without a Python object per run."""
    n = len(run_v)
    pairs = array("Q", bytes(16 * n))
    pairs[0::2] = run_v
    pairs[1::2] = array("Q", [ln // PAGE_SIZE | flags << 32 for ln in run_l])
    return pairs


READ_THREADS = min(4, os.cpu_count() or 1)
_readers = None


def _reader_pool():
    global _readers
    if _readers is None:
        from concurrent.futures import ThreadPoolExecutor
        _readers = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="deltaxfer-read")
    return _readers


def read_masked(pid: int, vaddrs: array, skip, view: memoryview) -> tuple[int, int]:
    """process_vm_readv of the pages of vaddrs not marked in ``skip`` (all when None) into
    their slots of view (page i at i * PAGE_SIZE), split across threads when there is
    much to read: the kernel's copy into our buffer is the bound (~1.5 GB/s per core
    here) and the core releases the GIL. Returns (pages read, pages failed)."""
    n = len(vaddrs)
    todo = n - (skip.count(1) if skip is not None else 0)
    if READ_THREADS < 2 or todo * PAGE_SIZE < (64 << 20):
        return _core.read_pages_masked(pid, vaddrs, skip, view)
    cuts = [n * k // READ_THREADS for k in range(READ_THREADS + 1)]
    futures = [_reader_pool().submit(_core.read_pages_masked, pid, vaddrs[a:b],
                                     None if skip is None else memoryview(skip)[a:b],
                                     view[a * PAGE_SIZE:b * PAGE_SIZE])
               for a, b in zip(cuts, cuts[1:]) if b > a]
    got = failed = 0
    for f in futures:
        g, bad = f.result()
        got += g
        failed += bad
    return got, failed


def _buffer(buffers: dict | None, image_id: str, size: int) -> bytearray:
    """A buffer of at least ``size`` bytes for an image, reused between rounds: memory
    touched for the first time costs page faults and zeroing (~1 s per GiB here), which
    must not happen inside the freeze. New buffers get 1/16 headroom, as the final dump
    has a few more pages than the live rounds saw (e.g. a vdso page)."""
    buf = buffers.get(image_id) if buffers is not None else None
    if buf is None or len(buf) < size:
        buf = bytearray(size + max(size // 16, 1 << 20))
        if buffers is not None:
            buffers[image_id] = buf
    return buf


def snapshot_tree(tasks: list[Task], buffers: dict | None = None,
                  tracking: Tracking | None = None, held: dict | None = None) -> Snapshot:
    """Read every present private anonymous page of every task, without freezing them.

    ``buffers`` (image id -> bytearray) are reused between rounds to avoid faulting in
    fresh memory each time. With ``tracking`` (and ``held``, what the destination holds
    per image), only the pages written since the last round — or not tracked, or not
    held — are read; the others are marked clean in their image."""
    t0 = time.monotonic()
    images, read, failed, pages_read, written = [], 0, 0, 0, 0
    for task in tasks:
        try:
            # the scan comes before the reads (see tracking.ProcessTracker.protect)
            scan = tracking.scan(task.host_pid) if tracking is not None else None
            run_v, run_l = procmem.criu_runs(task.host_pid)
        except (ProcessLookupError, OSError) as e:
            if task.host_pid == tasks[0].host_pid or not _alive(task.host_pid):
                if task.host_pid == tasks[0].host_pid:
                    raise LiveError(f"the process to migrate ({task.host_pid}) has exited") from None
                continue  # a child exited between rounds: the final dump will not have it
            raise LiveError(f"cannot read the memory map of pid {task.host_pid}: {e}") from None
        total = sum(run_l)
        image_id = f"pid-{task.ns_pid}"
        buf = _buffer(buffers, image_id, total)
        view = memoryview(buf)[:total]
        vaddrs = _core.run_page_vaddrs(run_v, run_l)
        h = held.get(image_id) if held else None
        clean = clean_mask(vaddrs, scan, h.vaddrs if h is not None else None)
        if scan is not None:      # protect again what is about to be read, then read it
            tracking.protect(task.host_pid, vaddrs, clean, scan)
        got, bad_pages = read_masked(task.host_pid, vaddrs, clean, view)
        pages_read += got
        if scan is not None:
            written += scan.written_pages
        read += total
        failed += bad_pages * PAGE_SIZE
        images.append(SourceImage(image_id, None, view, vaddrs, clean,
                                  _pairs_of_runs(run_v, run_l, im.PE_PRESENT)))
    return Snapshot(images, read, failed, time.monotonic() - t0, pages_read, written)


class _PagesInTasks:
    """A process's pagemap from a dump to deltaxfer's page sink (criu/sink.py): its pages
    were not kept — they are in the frozen task and are read from there. Entries in
    private anonymous mappings are marked lazy, as a lazy dump marks them (the
    destination's lazy restore serves them); the others (the vDSO, copied-on-write file
    pages) stay present, restored before the task runs."""

    in_tasks = True

    def __init__(self, path: str, pid: int):
        pm = im.read_pagemap(path)
        anon = [(v.start, v.end) for v in procmem.read_maps(pid)
                if v.perms[3] == "p" and v.inode == 0 and not v.path.startswith("/")
                and v.path not in procmem.SPECIAL_MAPPINGS]

        def lazy_ok(e):
            return any(a <= e.vaddr and e.end <= b for a, b in anon)

        self.pagemap = im.Pagemap(pm.pages_id, [
            im.PagemapEntry(e.vaddr, e.nr_pages, e.flags | im.PE_LAZY)
            if e.present and lazy_ok(e) else e for e in pm.entries])
        self.pages = memoryview(b"")

    def close(self) -> None:
        pass


def frozen_images(dump: DumpDir, tasks: list[Task], buffers: dict | None = None,
                  tracking: Tracking | None = None, held: dict | None = None,
                  pages_in_tasks: bool = False) -> tuple[list[SourceImage], list, int]:
    """The final round's memory images from a (lazy) dump of the frozen tree: LAZY-only
    entries are read from the frozen processes, PRESENT ones from the pages files.
    ``buffers`` are the live rounds' (reused: touching fresh memory inside the freeze
    costs page faults). Returns (images, opened MemoryImages to close, bytes read from
    process memory). With ``tracking``, lazy pages not written since the last round (and
    held by the destination) are not read: they are marked clean."""
    host = {t.ns_pid: t.host_pid for t in tasks}
    images, opened, from_memory = [], [], 0
    for name in sorted(os.listdir(dump.path)):
        image_id = None
        m = im.PAGEMAP_RE.match(name)
        if m:
            image_id = f"pid-{m.group(1)}"
        elif im.SHMEM_PAGEMAP_RE.match(name):
            image_id = f"shmem-{im.SHMEM_PAGEMAP_RE.match(name).group(1)}"
        if image_id is None:
            continue
        in_tasks = bool(pages_in_tasks and m)
        if in_tasks:
            ns_pid = int(m.group(1))
            if ns_pid not in host:
                raise LiveError(f"{name}: a process not in the frozen tree")
            mem = _PagesInTasks(os.path.join(dump.path, name), host[ns_pid])
        else:
            mem = im.MemoryImage(os.path.join(dump.path, name))
        opened.append(mem)
        lazy = [e for e in mem.pagemap.entries if not e.present and e.flags & im.PE_LAZY]
        if not lazy and not in_tasks:
            images.append(SourceImage(image_id, mem.pagemap, mem.pages, mem.vaddrs()))
            continue
        if not image_id.startswith("pid-") or int(image_id[4:]) not in host:
            raise LiveError(f"{name}: lazy pages of a process not in the frozen tree")
        pid = host[int(image_id[4:])]
        # one buffer in pagemap order: pages-file pages copied in, the others read from
        # the frozen process straight into their places. One pass over the entries: the
        # pages as runs, the PAGEMAP pairs, and where the pages-file runs go (tens of
        # thousands of entries per GiB: nothing per entry beyond this loop)
        starts, lens, pairs, from_file = array("Q"), array("Q"), array("Q"), []
        at = 0
        for e in mem.pagemap.entries:
            if e.present or e.flags & im.PE_LAZY:
                starts.append(e.vaddr)
                lens.append(e.nr_pages * PAGE_SIZE)
                pairs.append(e.vaddr)
                pairs.append(e.nr_pages | (e.flags | im.PE_PRESENT) << 32)
                if e.present and not in_tasks:
                    from_file.append((at, e.nr_pages))
                at += e.nr_pages
        total = at * PAGE_SIZE
        buf = view = memoryview(_buffer(buffers, image_id, total))[:total]
        vaddrs = _core.run_page_vaddrs(starts, lens)
        scan = tracking.scan(pid) if tracking is not None else None
        h = held.get(image_id) if held else None
        clean = clean_mask(vaddrs, scan, h.vaddrs if h is not None else None)
        # pages from the pages file are never clean (their bytes come from the file) and
        # not read from memory
        skip = bytearray(clean) if clean is not None else bytearray(len(vaddrs))
        for at, n in from_file:
            if clean is not None:
                clean[at:at + n] = bytes(n)
            skip[at:at + n] = b"\x01" * n
        got, bad = read_masked(pid, vaddrs, skip, view)
        if bad:
            raise LiveError(f"could not read {bad} pages of frozen pid {pid}'s memory")
        file_at = 0
        for at, n in from_file:
            buf[at * PAGE_SIZE:(at + n) * PAGE_SIZE] = \
                mem.pages[file_at * PAGE_SIZE:(file_at + n) * PAGE_SIZE]
            file_at += n
        from_memory += got * PAGE_SIZE
        images.append(SourceImage(image_id, None, view, vaddrs, clean, pairs))
    return images, opened, from_memory
