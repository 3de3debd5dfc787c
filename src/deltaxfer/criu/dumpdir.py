"""A CRIU image directory as a whole: its processes, their VMAs and memory images,
and rebuilding it with memory images written by deltaxfer."""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field

from deltaxfer import PAGE_SIZE
from deltaxfer.criu import images as im
from deltaxfer.criu.images import ImageError
from deltaxfer.criu.protobuf import packed_or_repeated_varints


@dataclass(frozen=True)
class DumpVma:
    """A VMA as CRIU's mm image records it (core.procmem.Vma is a /proc/PID/maps line)."""
    start: int
    end: int
    prot: int
    flags: int
    status: int
    shmid: int

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def kind(self) -> str:
        for bit, name in _VMA_KINDS:
            if self.status & bit:
                return name
        return "other"


# first match wins: the special areas, then sharing, then what a private area holds
_VMA_KINDS = ((im.VMA_AREA_VDSO, "vdso"), (im.VMA_AREA_VVAR, "vvar"),
              (im.VMA_AREA_VSYSCALL, "vsyscall"), (im.VMA_AREA_SYSVIPC, "sysv-shm"),
              (im.VMA_ANON_SHARED, "anon-shared"), (im.VMA_FILE_SHARED, "file-shared"),
              (im.VMA_FILE_PRIVATE, "file-private"), (im.VMA_AREA_HEAP, "heap"),
              (im.VMA_AREA_STACK, "stack"), (im.VMA_ANON_PRIVATE, "anon-private"))


@dataclass(frozen=True)
class Process:
    pid: int
    ppid: int
    pgid: int
    sid: int
    threads: tuple[int, ...]


@dataclass
class DumpDir:
    """Read-only view of a CRIU image directory."""
    path: str
    processes: list[Process] = field(default_factory=list)

    @classmethod
    def open(cls, path) -> "DumpDir":
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise im.ImageError(path, "not a directory (expected a CRIU image directory)")
        pstree = os.path.join(path, "pstree.img")
        procs = []
        for i, payload in enumerate(im.read_entries(pstree, im.PSTREE_MAGIC)):
            f = im.decode(pstree, payload, f"pstree_entry #{i}")
            threads = packed_or_repeated_varints(f.get(5, []))
            procs.append(Process(pid=im._required(pstree, f, 1, "pstree_entry"),
                                 ppid=f.get(2, [0])[-1], pgid=f.get(3, [0])[-1],
                                 sid=f.get(4, [0])[-1], threads=tuple(threads)))
        if not procs:
            raise im.ImageError(pstree, "holds no process")
        return cls(path, procs)

    def image(self, name: str) -> str:
        return os.path.join(self.path, name)

    def verbatim_files(self) -> list[str]:
        """The files of the dump that travel as they are, sorted: every regular file
        (not a symlink) except the memory images deltaxfer sends as rounds
        (``images.is_memory_image``) and CRIU's logs. The one rule for `send` and for
        migrate's final round."""
        out = []
        for name in sorted(os.listdir(self.path)):
            path = os.path.join(self.path, name)
            if im.is_memory_image(name) or name.endswith(".log") or os.path.islink(path) \
                    or not os.path.isfile(path):
                continue
            out.append(name)
        return out

    def comm(self, pid: int) -> str:
        """The task's command name from core-PID.img (task_core_entry.comm)."""
        path = self.image(f"core-{pid}.img")
        entries = im.read_entries(path, im.CORE_MAGIC)
        if not entries:
            raise im.ImageError(path, "no core_entry")
        core = im.decode(path, entries[0], "core_entry")
        tc = core.get(3)
        if not tc:
            return ""
        task = im.decode(path, tc[-1], "task_core_entry")
        comm = task.get(6)
        return bytes(comm[-1]).decode("utf-8", "replace") if comm else ""

    def vmas(self, pid: int) -> list[DumpVma]:
        path = self.image(f"mm-{pid}.img")
        entries = im.read_entries(path, im.MM_MAGIC)
        if not entries:
            raise im.ImageError(path, "no mm_entry")
        mm = im.decode(path, entries[0], "mm_entry")
        out = []
        for i, raw in enumerate(mm.get(14, [])):
            v = im.decode(path, raw, f"vma_entry #{i}")
            get = lambda n: v.get(n, [0])[-1]  # noqa: E731
            out.append(DumpVma(start=get(1), end=get(2), shmid=get(4), prot=get(5),
                           flags=get(6), status=get(7)))
        return out

    def memory(self, pid: int) -> im.MemoryImage:
        return im.MemoryImage(self.image(f"pagemap-{pid}.img"))

    def shmem_ids(self) -> list[int]:
        ids = []
        for name in os.listdir(self.path):
            m = im.SHMEM_PAGEMAP_RE.match(name)
            if m:
                ids.append(int(m.group(1)))
        return sorted(ids)

    def shmem(self, shmid: int) -> im.MemoryImage:
        return im.MemoryImage(self.image(f"pagemap-shmem-{shmid}.img"))

    def memory_images(self) -> list[tuple[str, im.MemoryImage]]:
        """Every memory image of the dump, labelled ``pid N`` or ``shmem N``."""
        out = [(f"pid {p.pid}", self.memory(p.pid)) for p in self.processes]
        out += [(f"shmem {s}", self.shmem(s)) for s in self.shmem_ids()]
        return out


def _copy_file(src: str, dst: str, size: int) -> None:
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        done = 0
        while done < size:
            n = os.copy_file_range(fi.fileno(), fo.fileno(), size - done)
            if n == 0:
                raise ImageError(src, f"shrank while being copied ({done} of {size} bytes)")
            done += n


@dataclass
class RewriteReport:
    pagemaps: int = 0
    entries_before: int = 0
    entries_after: int = 0
    pages: int = 0
    bytes: int = 0
    copied_files: int = 0


def rewrite(src, dst, *, coalesce: bool = True, first_pages_id: int | None = None) -> RewriteReport:
    """Rebuild the dump at ``src`` into the new directory ``dst``.

    Every non-memory file is copied verbatim; each pagemap is written anew (coalesced
    when asked) with a fresh ``pages_id`` and its pages copied into the new pages file.
    The result is what the destination of a migration materializes, so restoring it is
    the proof that our image writer is right.
    """
    src, dst = os.fspath(src), os.fspath(dst)
    dump = DumpDir.open(src)  # validate before anything is written
    for proc in dump.processes:
        pagemap = dump.image(f"pagemap-{proc.pid}.img")
        if not os.path.isfile(pagemap):
            raise ImageError(pagemap, f"missing: pstree.img lists pid {proc.pid}, "
                                      "so criu restore would need it")
    os.makedirs(dst, mode=0o700, exist_ok=False)
    report = RewriteReport()
    pagemap_names = []
    old_ids = []
    for name in sorted(os.listdir(src)):
        if im.PAGEMAP_RE.match(name) or im.SHMEM_PAGEMAP_RE.match(name):
            pagemap_names.append(name)
            continue
        m = im.PAGES_RE.match(name)
        if m:
            old_ids.append(int(m.group(1)))
            continue
        s = os.path.join(src, name)
        if os.path.islink(s):
            os.symlink(os.readlink(s), os.path.join(dst, name))
        elif os.path.isfile(s):
            shutil.copy2(s, os.path.join(dst, name))
            report.copied_files += 1
    next_id = first_pages_id if first_pages_id is not None else max(old_ids, default=0) + 1
    for name in pagemap_names:
        mem = im.MemoryImage(os.path.join(src, name))
        try:
            if any(e.in_parent for e in mem.pagemap.entries) and not os.path.islink(
                    os.path.join(src, "parent")):
                raise im.ImageError(mem.pagemap_path, "has in-parent entries but the dump "
                                                      "has no 'parent' link")
            new = mem.pagemap.coalesced() if coalesce else im.Pagemap(0, list(mem.pagemap.entries))
            new.pages_id = next_id
            next_id += 1
            # Same pages in the same order: the kernel copies the file (no user-space pass).
            _copy_file(mem.pages_path, os.path.join(dst, f"pages-{new.pages_id}.img"),
                       mem.nr_pages * PAGE_SIZE)
            im.write_pagemap(os.path.join(dst, name), new)
            report.pagemaps += 1
            report.entries_before += len(mem.pagemap.entries)
            report.entries_after += len(new.entries)
            report.pages += mem.nr_pages
            report.bytes += mem.nr_pages * PAGE_SIZE
        finally:
            mem.close()
    return report
