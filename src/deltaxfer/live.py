"""The memory of a live (or frozen) process tree as memory images to send.

Live rounds read the pages CRIU would dump of every process (procmem.migrated_runs) with
process_vm_readv while the process keeps running. The final round reads what a lazy
`criu dump --lazy-pages` left in the frozen processes (pagemap entries flagged LAZY only)
and takes the rest from the dump's pages files. Memory images are named like CRIU's
files: ``pid-N`` with N the pid inside the tree's PID namespace.

Nothing here reads the pages themselves: an image carries a reader (``TaskPages``) that
the send pipeline calls window by window on its encoder threads, into per-thread
buffers (source.py). What process_vm_readv cannot read (PROT_NONE pages that hold data:
guard pages, GC heaps) is read through /proc/PID/mem (_core.read_pages).
"""
from __future__ import annotations

import errno
import os
import sys
import threading
import time
from array import array
from bisect import bisect_right
from dataclasses import dataclass

from deltaxfer import PAGE_SIZE, _core
from deltaxfer.core import procmem
from deltaxfer.criu import images as im
from deltaxfer.criu.dumpdir import DumpDir
from deltaxfer.source import SourceImage
from deltaxfer.tracking import Tracking, clean_mask


from deltaxfer.core.procmem import LiveError, Task, alive as _alive, process_tree  # noqa: F401


@dataclass
class TreeSnapshot:
    """A live round's scan of the tree (snapshot_tree); core.procmem.snapshot copies one
    process's pages (MemorySnapshot)."""
    images: list[SourceImage]
    bytes_read: int          # memory of the tree (pages in its images)
    bytes_failed: int        # always 0 here: reads happen as the round is sent (see failed)
    seconds: float           # the round's serial part: maps, tracking scan, clean mask,
                             # write-protection; reading the pages overlaps the sending
    pages_to_read: int = 0   # pages not clean, read by the send pipeline
    written_pages: int = 0   # reported written by tracking (None-tracked processes: 0)

    def readers(self) -> list:
        return [img.reader for img in self.images if isinstance(img.reader, TaskPages)]

    @property
    def pages_read(self) -> int:
        """Pages copied out of the processes so far (complete once the round is sent)."""
        return sum(r.read for r in self.readers())

    @property
    def pages_failed(self) -> int:
        return sum(r.failed for r in self.readers())

    def close(self) -> None:
        for img in self.images:
            img.close()


def _pairs_of_runs(run_v: array, run_l: array, flags: int) -> array:
    """PAGEMAP pairs (vaddr, nr_pages | flags << 32) of runs that are already maximal
    (pagemap_runs merges touching pages), built without a Python object per run."""
    n = len(run_v)
    pairs = array("Q", bytes(16 * n))
    pairs[0::2] = run_v
    pairs[1::2] = array("Q", [ln // PAGE_SIZE | flags << 32 for ln in run_l])
    return pairs


class TaskPages:
    """The pages of one process's image, read window by window (a SourceImage reader).

    ``skip`` (one byte per page, optional): pages not to read from the process — clean
    ones, and in the final round those that come from the pages file: ``file_at`` /
    ``file_len`` / ``file_from`` (ascending page index runs of the image, and where each
    starts in ``file_pages``, the dump's mmapped pages file) are copied from there.
    process_vm_readv reads the rest; what it cannot (PROT_NONE pages) goes through
    /proc/PID/mem, opened here once. ``strict`` (the frozen tree): a page that cannot
    be read at all is an error; otherwise (live rounds: unmapped meanwhile) it is sent as
    zeros and counted, and the next round or the final dump corrects it. Thread-safe for
    disjoint windows."""

    def __init__(self, pid: int, vaddrs: array, skip, *, root: bool, strict: bool = False,
                 file_at: array | None = None, file_len: array | None = None,
                 file_from: array | None = None, file_pages=None):
        self.pid, self.vaddrs, self.skip = pid, vaddrs, skip
        self.root, self.strict = root, strict
        self.file_at, self.file_len, self.file_from = file_at, file_len, file_from
        self.file_pages = file_pages
        self.read = self.failed = self.forced = 0
        self._lock = threading.Lock()
        try:
            self.memfd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self.memfd = -1    # process_vm_readv alone (PROT_NONE pages then fail)

    def __call__(self, lo: int, hi: int, buf) -> memoryview:
        view = memoryview(buf)[:(hi - lo) * PAGE_SIZE]
        skip = None if self.skip is None else memoryview(self.skip)[lo:hi]
        try:
            got, bad, forced = _core.read_pages(self.pid, self.vaddrs[lo:hi], skip, view,
                                                self.memfd)
        except ProcessLookupError:
            if self.root or self.strict:
                raise LiveError(f"the process to migrate ({self.pid}) has exited"
                                if self.root else
                                f"frozen pid {self.pid} is gone (killed?)") from None
            # a child exited during the round: the final dump will not have it
            view[:] = bytes(len(view))
            got, bad, forced = 0, hi - lo, 0
        if bad and self.strict:
            raise LiveError(f"could not read {bad} pages of frozen pid {self.pid}'s memory "
                            f"(neither process_vm_readv nor /proc/{self.pid}/mem)")
        if self.file_at is not None and len(self.file_at):
            self._copy_file_runs(lo, hi, view)
        with self._lock:
            self.read += got
            self.failed += bad
            self.forced += forced
        return view

    def _copy_file_runs(self, lo: int, hi: int, view: memoryview) -> None:
        k = max(bisect_right(self.file_at, lo) - 1, 0)
        while k < len(self.file_at) and self.file_at[k] < hi:
            at, n, src = self.file_at[k], self.file_len[k], self.file_from[k]
            a, b = max(at, lo), min(at + n, hi)
            if a < b:
                s = src + (a - at)
                view[(a - lo) * PAGE_SIZE:(b - lo) * PAGE_SIZE] = \
                    self.file_pages[s * PAGE_SIZE:(s + b - a) * PAGE_SIZE]
            k += 1

    def close(self) -> None:
        if self.memfd >= 0:
            os.close(self.memfd)
            self.memfd = -1


def _shared_layout(vaddrs: array, h) -> array:
    """The held vaddrs array itself when this round's layout is the same (the usual case:
    one compare), so that the round and what the destination holds share one array
    instead of two (16 MiB each at 8 GiB), and the sender finds them the same by identity."""
    if h is not None and h.vaddrs is not vaddrs and h.vaddrs == vaddrs:
        return h.vaddrs
    return vaddrs


def snapshot_tree(tasks: list[Task], tracking: Tracking | None = None,
                  held: dict | None = None) -> TreeSnapshot:
    """The memory images of every task, to be read as they are sent (the tasks keep
    running): every present private page CRIU would dump, with a reader each.

    With ``tracking`` (and ``held``, what the destination holds per image), only the
    pages written since the last round — or not tracked, or not held — will be read;
    the others are marked clean in their image. The order matters: scan, clean mask,
    write-protect what will be read, and only then (in send_round) read."""
    t0 = time.monotonic()
    images, total_bytes, to_read, written = [], 0, 0, 0
    for task in tasks:
        try:
            # the scan comes before the reads (see tracking.ProcessTracker.protect)
            scan = tracking.scan(task.host_pid) if tracking is not None else None
            run_v, run_l = procmem.migrated_runs(task.host_pid)
        except (ProcessLookupError, OSError) as e:
            # ESRCH: the task is exiting (its memory is gone before it is a zombie)
            exiting = e.errno == errno.ESRCH or not _alive(task.host_pid)
            if task.host_pid == tasks[0].host_pid:
                if exiting:
                    raise LiveError(f"the process to migrate ({task.host_pid}) has exited") from None
            elif exiting:
                continue  # a child exited between rounds: the final dump will not have it
            raise LiveError(f"cannot read the memory map of pid {task.host_pid}: {e}") from None
        image_id = f"pid-{task.ns_pid}"
        vaddrs = _core.run_page_vaddrs(run_v, run_l)
        h = held.get(image_id) if held else None
        vaddrs = _shared_layout(vaddrs, h)
        clean = clean_mask(vaddrs, scan, h.vaddrs if h is not None else None)
        if scan is not None:      # protect again what is about to be read
            tracking.protect(task.host_pid, vaddrs, clean, scan)
            written += scan.written_pages
        total_bytes += sum(run_l)
        to_read += len(vaddrs) - (clean.count(1) if clean is not None else 0)
        reader = TaskPages(task.host_pid, vaddrs, clean, root=task is tasks[0])
        images.append(SourceImage(image_id, None, None, vaddrs, clean,
                                  _pairs_of_runs(run_v, run_l, im.PE_PRESENT), reader))
    return TreeSnapshot(images, total_bytes, 0, time.monotonic() - t0, to_read, written)


class _PagesInTasks:
    """A process's pagemap from a dump to deltaxfer's page sink (criu/sink.py): its pages
    were not kept — they are in the frozen task and are read from there. Entries in
    the page set's lazy mappings (procmem.page_rule: private anonymous) are marked lazy,
    as a lazy dump marks them (the destination's lazy restore serves them); the others
    (the vDSO, copied-on-write file pages) stay present, restored before the task runs."""

    in_tasks = True

    def __init__(self, path: str, pid: int):
        pm = im.read_pagemap(path)
        anon = [(v.start, v.end) for v, r in procmem.page_set_vmas(procmem.read_maps(pid))
                if r.lazy]
        anon_starts = [a for a, _ in anon]      # ascending (maps order): one bisect each

        def lazy_ok(e):
            k = bisect_right(anon_starts, e.vaddr) - 1
            return k >= 0 and e.end <= anon[k][1]

        self.pagemap = im.Pagemap(pm.pages_id, [
            im.PagemapEntry(e.vaddr, e.nr_pages, e.flags | im.PE_LAZY)
            if e.present and lazy_ok(e) else e for e in pm.entries])
        self.pages = memoryview(b"")

    def close(self) -> None:
        pass


_IS_PRESENT = bytes(1 if b & im.PE_PRESENT else 0 for b in range(256))
_IS_LAZY_ONLY = bytes(1 if b & im.PE_LAZY and not b & im.PE_PRESENT else 0 for b in range(256))
_KNOWN = bytes(1 if b & ~(im.PE_PRESENT | im.PE_LAZY) == 0 and b else 0 for b in range(256))


@dataclass
class _LazyLayout:
    """A lazy dump's pagemap, as the final round sends it: every page (PRESENT, in the
    pages file, and LAZY, still in the task) as one PRESENT layout."""
    vaddrs: array            # every page's vaddr, ascending
    pairs: array             # PAGEMAP pairs, each entry marked PRESENT
    file_at: array           # per PRESENT entry: its first page's index in vaddrs,
    file_len: array          # its pages,
    file_from: array         # and its first page's index in the pages file
    has_lazy: bool
    file_pages: int


def _low_bytes(f: array) -> bytes | None:
    """The low byte of each u64 of ``f``, or None if any value is 256 or more: slices and
    a byte count in C (``array("B", f)`` converted entry by entry, ~3 ms per 100 000)."""
    raw = f.tobytes()
    low = raw[0::8] if sys.byteorder == "little" else raw[7::8]
    # every value < 256: each u64's seven other bytes are zero
    return low if raw.count(0) == 7 * len(f) + low.count(0) else None


def _lazy_layout(v: array, n: array, f: array) -> _LazyLayout | None:
    """The layout from the pagemap's arrays with C passes (_core.pagemap_pairs,
    pagemap_layout) and byte tables, no Python per entry (a 4 GiB process has ~50 000
    entries: ~0.05 s a pass in Python) except per PRESENT
    entry (file pages, the vDSO: a handful). None if an entry has a flag other than
    PRESENT / LAZY (the per-entry path handles it); ValueError for a bad layout."""
    fb = _low_bytes(f)
    if fb is None or fb.translate(_KNOWN).count(0):
        return None
    pairs = im.interleave_pairs(v, n, f, im.PE_PRESENT)
    if pairs is None:
        return None
    vaddrs = _core.pagemap_layout(pairs)        # checks aligned, ascending, sizes
    file_at, file_len, file_from = array("Q"), array("Q"), array("Q")
    present = fb.translate(_IS_PRESENT)
    at = prev = file_pos = 0
    i = present.find(1)
    while i >= 0:
        at += sum(n[prev:i])                     # pages before entry i (C-level sum)
        file_at.append(at)
        file_len.append(n[i])
        file_from.append(file_pos)
        file_pos += n[i]
        prev = i
        i = present.find(1, i + 1)
    return _LazyLayout(vaddrs, pairs, file_at, file_len, file_from,
                       bool(fb.translate(_IS_LAZY_ONLY).count(1)), file_pos)


def frozen_images(dump: DumpDir, tasks: list[Task], tracking: Tracking | None = None,
                  held: dict | None = None, pages_in_tasks: bool = False,
                  pending: dict | None = None) -> tuple[list[SourceImage], list, int]:
    """The final round's memory images from a (lazy) dump of the frozen tree: LAZY-only
    entries are read from the frozen processes, PRESENT ones from the pages files, both
    window by window as the round is sent (TaskPages). Returns (images, opened
    MemoryImages and readers to close, bytes to read from process memory). With
    ``tracking``, lazy pages not written since the last round (and held by the
    destination) are not read: they are marked clean. ``pending`` (a dict, post-copy):
    the written pages the destination holds an older copy of are not read either --
    the round sends them as held -- and are listed there instead, {image id: (host pid,
    vaddrs)}, for after the resume."""
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
        path = os.path.join(dump.path, name)
        if in_tasks:
            ns_pid = int(m.group(1))
            if ns_pid not in host:
                raise LiveError(f"{name}: a process not in the frozen tree")
            mem = _PagesInTasks(path, host[ns_pid])
        else:
            fast = _fast_lazy_image(path, image_id, host)
            if fast is not None:
                mem, lay = fast
                opened.append(mem)
                if lay.has_lazy:
                    pid = host[int(image_id[4:])]
                    image, reader, n_mem = _lazy_source_image(
                        image_id, pid, lay, mem.pages, tracking, held, pending)
                    opened.append(reader)
                    from_memory += n_mem
                    images.append(image)
                else:
                    images.append(SourceImage(image_id, mem.pagemap, mem.pages, mem.vaddrs()))
                continue
            mem = im.MemoryImage(path)
        opened.append(mem)
        lazy = [e for e in mem.pagemap.entries if not e.present and e.flags & im.PE_LAZY]
        if not lazy and not in_tasks:
            images.append(SourceImage(image_id, mem.pagemap, mem.pages, mem.vaddrs()))
            continue
        if not image_id.startswith("pid-") or int(image_id[4:]) not in host:
            raise LiveError(f"{name}: lazy pages of a process not in the frozen tree")
        pid = host[int(image_id[4:])]
        # one pass over the entries (tens of thousands per GiB: nothing per entry beyond
        # this loop): the pages as runs, the PAGEMAP pairs, and the pages-file runs
        starts, lens, pairs = array("Q"), array("Q"), array("Q")
        file_at, file_len, file_from = array("Q"), array("Q"), array("Q")
        at = file_pos = 0
        for e in mem.pagemap.entries:
            if e.present or e.flags & im.PE_LAZY:
                starts.append(e.vaddr)
                lens.append(e.nr_pages * PAGE_SIZE)
                pairs.append(e.vaddr)
                pairs.append(e.nr_pages | (e.flags | im.PE_PRESENT) << 32)
                if e.present and not in_tasks:
                    file_at.append(at)
                    file_len.append(e.nr_pages)
                    file_from.append(file_pos)
                    file_pos += e.nr_pages
                at += e.nr_pages
        vaddrs = _core.run_page_vaddrs(starts, lens)
        lay = _LazyLayout(vaddrs, pairs, file_at, file_len, file_from, True, file_pos)
        image, reader, n_mem = _lazy_source_image(image_id, pid, lay, mem.pages, tracking,
                                                  held, pending)
        opened.append(reader)
        from_memory += n_mem
        images.append(image)
    return images, opened, from_memory


def _postpone_written(image_id, pid, vaddrs, clean, skip, h, pending):
    """Post-copy: the pages to be read (not skipped) that the destination holds an
    older copy of become clean and skipped (the round sends their held hash), listed in
    ``pending``. Pages the destination does not hold at all still go in the round (it
    has nothing to put there). Whole-mask integer operations, no loop per page."""
    n = len(vaddrs)
    held_mask = _core.clean_mask(vaddrs, array("Q", [0]), array("Q", [1 << 63]),
                                 array("Q"), array("Q"), h.vaddrs)
    s = int.from_bytes(skip, "little")
    p = int.from_bytes(held_mask, "little") & ~s
    if not p:
        return clean, skip
    mask = p.to_bytes(n, "little")
    out = array("Q")
    i = mask.find(1)
    while i >= 0:
        out.append(vaddrs[i])
        i = mask.find(1, i + 1)
    pending[image_id] = (pid, out)
    return (bytearray((int.from_bytes(clean, "little") | p).to_bytes(n, "little")),
            bytearray((s | p).to_bytes(n, "little")))


def _fast_lazy_image(path: str, image_id: str, host: dict):
    """A process's image of a lazy dump through _lazy_layout: (MemoryImage, layout), or
    None to take the per-entry path (unusual flags, a process not in the tree: that path
    names the problem)."""
    if not image_id.startswith("pid-") or int(image_id[4:]) not in host:
        return None
    got = im.read_pagemap_arrays(path)
    if got is None:
        return None
    pages_id, v, n, f = got
    try:
        lay = _lazy_layout(v, n, f)
    except ValueError as e:
        raise LiveError(f"{os.path.basename(path)}: {e}") from None
    if lay is None:
        return None
    # the pages file holds the PRESENT entries' pages; MemoryImage checks its size
    pm = im.ArrayPagemap(pages_id, im.interleave_pairs(v, n, f), lay.file_pages)
    return im.MemoryImage(path, pm), lay


def _lazy_source_image(image_id: str, pid: int, lay: _LazyLayout, file_pages, tracking,
                       held, pending=None) -> tuple[SourceImage, "TaskPages", int]:
    """The final round's image of one frozen process: LAZY pages read from the task (the
    clean ones -- tracked, not written, held by the destination -- not at all), PRESENT
    ones from the dump's pages file. Returns (image, reader, bytes read from memory).
    ``pending`` (post-copy): see frozen_images."""
    scan = tracking.scan(pid) if tracking is not None else None
    h = held.get(image_id) if held else None
    vaddrs = _shared_layout(lay.vaddrs, h)
    clean = clean_mask(vaddrs, scan, h.vaddrs if h is not None else None)
    # pages from the pages file are never clean (their bytes come from the file) and
    # not read from memory
    skip = bytearray(clean) if clean is not None else bytearray(len(vaddrs))
    for a, n in zip(lay.file_at, lay.file_len):
        if clean is not None:
            clean[a:a + n] = bytes(n)
        skip[a:a + n] = b"\x01" * n
    if pending is not None and clean is not None:
        clean, skip = _postpone_written(image_id, pid, vaddrs, clean, skip, h, pending)
    from_memory = (len(vaddrs) - skip.count(1)) * PAGE_SIZE
    reader = TaskPages(pid, vaddrs, skip, root=False, strict=True, file_at=lay.file_at,
                       file_len=lay.file_len, file_from=lay.file_from, file_pages=file_pages)
    return (SourceImage(image_id, None, None, vaddrs, clean, lay.pairs, reader), reader,
            from_memory)
