"""Live memory of another process: which pages CRIU would dump, and reading them.

/proc/PID/maps is parsed here (one line per VMA); the per-page work, reading pagemap
entries and process_vm_readv, is in the compiled core.
"""
from __future__ import annotations

import os
from array import array
from dataclasses import dataclass

from . import native

PAGE_SIZE = 4096
# kernel-provided special mappings that CRIU does not dump as memory
SPECIAL_MAPPINGS = ("[vvar]", "[vvar_vclock]", "[vdso]", "[vsyscall]", "[uprobes]")


@dataclass(frozen=True)
class Vma:
    start: int
    end: int
    perms: str
    offset: int
    inode: int
    path: str

    @property
    def private_writable_anonymous(self) -> bool:
        """Private, writable and not file-backed: heap, stack, anonymous mmaps."""
        anonymous = self.inode == 0 and (self.path in ("", "[heap]") or
                                         self.path.startswith(("[stack", "[anon:")))
        return (self.perms[1] == "w" and self.perms[3] == "p" and anonymous
                and self.path not in SPECIAL_MAPPINGS)


def parse_maps(text: str) -> list[Vma]:
    vmas = []
    for line in text.splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) < 5:
            continue
        start, end = (int(x, 16) for x in parts[0].split("-"))
        vmas.append(Vma(start, end, parts[1], int(parts[2], 16), int(parts[4]),
                        parts[5].strip() if len(parts) > 5 else ""))
    return vmas


def read_maps(pid: int) -> list[Vma]:
    try:
        with open(f"/proc/{pid}/maps") as f:
            return parse_maps(f.read())
    except FileNotFoundError:
        raise ProcessLookupError(f"process {pid} no longer exists") from None


def present_runs(pid: int, vmas: list[Vma] | None = None, impl=native) -> tuple[array, array]:
    """(run_vaddrs, run_lens) of present or swapped pages in the private writable
    anonymous VMAs of pid: the pages CRIU will dump."""
    if vmas is None:
        vmas = [v for v in read_maps(pid) if v.private_writable_anonymous]
    try:
        fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY)
    except FileNotFoundError:
        raise ProcessLookupError(f"process {pid} no longer exists") from None
    except PermissionError:
        raise PermissionError(f"cannot open /proc/{pid}/pagemap: needs CAP_SYS_ADMIN "
                              f"(run as root) to see which pages are present") from None
    try:
        return impl.pagemap_runs(fd, array("Q", [v.start for v in vmas]),
                                 array("Q", [v.end for v in vmas]))
    finally:
        os.close(fd)


def zero_page_pfn() -> int:
    """The page frame of the kernel's shared zero page — what a read fault of a private
    anonymous page maps — found as CRIU does: fault one in, read its pagemap entry.
    0 when page frames are hidden (without CAP_SYS_ADMIN): then nothing is filtered."""
    global _ZERO_PFN
    if _ZERO_PFN is None:
        import ctypes
        import mmap
        m = mmap.mmap(-1, PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        try:
            probe = ctypes.c_char.from_buffer(m)
            addr = ctypes.addressof(probe)
            _ = m[0]  # a read fault only: the zero page gets mapped
            with open("/proc/self/pagemap", "rb") as f:
                f.seek(addr // PAGE_SIZE * 8)
                entry = int.from_bytes(f.read(8), "little")
            del probe
        finally:
            m.close()
        _ZERO_PFN = entry & ((1 << 55) - 1) if entry & (1 << 63) else 0
    return _ZERO_PFN


_ZERO_PFN: int | None = None
_NOT_DUMPED = tuple(m for m in SPECIAL_MAPPINGS if m != "[vdso]")   # CRIU dumps the vDSO


def criu_runs(pid: int, impl=native) -> tuple[array, array]:
    """(run_vaddrs, run_lens) of the pages CRIU dumps as the process's private memory:
    every present or swapped page of its private mappings, except pages of private file
    mappings not yet copied-on-write and pages mapped to the shared zero page. A live
    round over this set has the layout of the final dump's pagemap. PROT_NONE mappings
    count (CRIU dumps their pages: guard pages, GC heaps); process_vm_readv cannot read
    them, _core.read_pages reads them through /proc/PID/mem."""
    vmas = [v for v in read_maps(pid) if v.perms[3] == "p" and v.path not in _NOT_DUMPED]
    file_backed = bytes(1 if (v.inode or v.path.startswith("/")) else 0 for v in vmas)
    try:
        fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY)
    except FileNotFoundError:
        raise ProcessLookupError(f"process {pid} no longer exists") from None
    try:
        return impl.pagemap_runs(fd, array("Q", [v.start for v in vmas]),
                                 array("Q", [v.end for v in vmas]), file_backed,
                                 zero_page_pfn())
    finally:
        os.close(fd)


@dataclass(frozen=True)
class MemorySnapshot:
    pages: bytearray      # the pages back to back
    vaddrs: array         # one per page, ascending
    failed: list          # (vaddr, length) pieces unreadable (zero-filled in pages)
    bytes_failed: int


def snapshot(pid: int, impl=native) -> MemorySnapshot:
    """Read every page CRIU would dump from a running process, without freezing it."""
    run_v, run_l = present_runs(pid, impl=impl)
    buf = bytearray(sum(run_l))
    failed, bytes_failed = impl.read_process_memory(pid, run_v, run_l, buf)
    return MemorySnapshot(buf, impl.run_page_vaddrs(run_v, run_l), failed, bytes_failed)
