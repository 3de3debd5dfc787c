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


def _own_pfn(addr: int) -> int:
    """The page frame behind one of our own addresses (0 when not present or hidden)."""
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(addr // PAGE_SIZE * 8)
        entry = int.from_bytes(f.read(8), "little")
    return entry & ((1 << 55) - 1) if entry & (1 << 63) else 0


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
            pfn = _own_pfn(addr)
            del probe
        finally:
            m.close()
        _ZERO_PFN = pfn
    return _ZERO_PFN


_ZERO_PFN: int | None = None


# --------------------------------------------------------------------------- the page set
#
# One definition of which pages move (docs/CORE.md, "The page set"): the pages CRIU dumps
# as a process's private memory (its pagemap-N / pages-N images). The live rounds read
# them (migrated_runs), written-page tracking watches the VMAs that hold them
# (PageRule.trackable, tracking.eligible), and the page sink's freeze leaves the lazy
# ones in the frozen tasks (PageRule.lazy, live._PagesInTasks).

@dataclass(frozen=True)
class PageRule:
    """What happens to one VMA's pages, and why (CRIU's rule it mirrors)."""
    moves: bool          # its pages are in the page set (CRIU's pagemap-N)
    all_pages: bool      # every page, present or not (the vDSO) — else present/swapped ones
    cow_only: bool       # a private file mapping: only pages copied on write
    lazy: bool           # a lazy dump may leave its pages in the task (PE_LAZY)
    trackable: bool      # userfaultfd write-protect can watch it
    why: str


_NOT_MOVED_SPECIAL = {
    "[vvar]": "the kernel's vDSO data: CRIU never dumps it (VMA_AREA_VVAR), the "
              "restored task gets the kernel's own",
    "[vvar_vclock]": "the kernel's vDSO clock data: as [vvar]",
    "[vsyscall]": "above the task size, provided by the kernel (VMA_AREA_VSYSCALL)",
    "[uprobes]": "the kernel's uprobe trampolines (xol area), not the process's memory",
}


def page_rule(v: Vma) -> PageRule:
    """The page set's rule for one VMA of /proc/PID/maps (CRIU: vma_area_is_private,
    should_dump_page, vma_entry_can_be_lazy)."""
    if v.path in _NOT_MOVED_SPECIAL:
        return PageRule(False, False, False, False, False, _NOT_MOVED_SPECIAL[v.path])
    if v.perms[3] != "p":
        return PageRule(False, False, False, False, False,
                        "shared: CRIU dumps anonymous, memfd and SysV shared memory once "
                        "through its shmem/memfd/IPC images (not per process); a shared "
                        "file mapping's pages are the file's")
    if v.path == "[vdso]":
        return PageRule(True, True, False, False, False,
                        "the vDSO: CRIU dumps every page of it (should_dump_entire_vma), "
                        "not lazily; userfaultfd cannot watch a special mapping")
    if v.inode or v.path.startswith("/"):
        return PageRule(True, False, True, False, True,
                        "private file mapping (also memfd, hugetlbfs): CRIU dumps the pages "
                        "copied on write, not those still the file's (PME_FILE)")
    return PageRule(True, False, False, True, True,
                    "private anonymous (heap, stacks, mmaps, PROT_NONE included): every "
                    "present or swapped page not mapped to the zero page")


def page_set_vmas(maps: list[Vma]) -> list[tuple[Vma, PageRule]]:
    """The VMAs whose pages move, with their rule, ascending."""
    out = []
    for v in maps:
        r = page_rule(v)
        if r.moves:
            out.append((v, r))
    return out


def _add_range(run_v: array, run_l: array, start: int, end: int) -> tuple[array, array]:
    """The runs with [start, end) added (runs stay ascending and maximal)."""
    from bisect import bisect_left, bisect_right
    ends = [a + n for a, n in zip(run_v, run_l)]
    lo = bisect_left(ends, start)           # first run ending at or after start
    hi = bisect_right(run_v, end)           # runs starting at or before end
    if lo < hi:
        start = min(start, run_v[lo])
        end = max(end, ends[hi - 1])
    nv = run_v[:lo] + array("Q", [start]) + run_v[hi:]
    nl = run_l[:lo] + array("Q", [end - start]) + run_l[hi:]
    return nv, nl


_SCAN_WHY: list[str | None] = []


def pagemap_scan_unavailable() -> str | None:
    """None when the kernel answers PAGEMAP_SCAN (Linux 6.7+), else why; checked once
    (written-page tracking and the page set both need it)."""
    if not _SCAN_WHY:
        from deltaxfer import _core
        _SCAN_WHY.append(_core.pagemap_scan_probe())
    return _SCAN_WHY[0]


def page_set_scan_ok() -> bool:
    """Whether migrated_runs reads the page set with PAGEMAP_SCAN."""
    return pagemap_scan_unavailable() is None


def migrated_runs(pid: int, impl=native, maps: list[Vma] | None = None,
                  scan: bool | None = None) -> tuple[array, array]:
    """(run_vaddrs, run_lens) of the page set of pid: the pages CRIU dumps as the
    process's private memory (page_rule per VMA). A live round over this set has the
    layout of the final dump's pagemap. PROT_NONE pages count (process_vm_readv cannot
    read them; _core.read_pages reads them through /proc/PID/mem).

    ``scan`` (default: where the kernel has it, with the compiled core): PAGEMAP_SCAN
    returns the set as ranges, the (huge) zero page left out by the kernel, instead of 8
    bytes of /proc/PID/pagemap per page (64 MiB read per round at 8 GiB, most of a live
    round's cost over a large, quiet process); the result is the same runs."""
    if maps is None:
        maps = read_maps(pid)
    chosen = page_set_vmas(maps)
    if scan is None:
        scan = impl is native and page_set_scan_ok()
    try:
        fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY)
    except FileNotFoundError:
        raise ProcessLookupError(f"process {pid} no longer exists") from None
    starts = array("Q", [v.start for v, _ in chosen])
    ends = array("Q", [v.end for v, _ in chosen])
    skip_file = bytes(1 if r.cow_only else 0 for _, r in chosen)
    try:
        if scan:
            from deltaxfer import _core
            run_v, run_l = _core.scan_page_set(fd, starts, ends, skip_file)
        else:
            run_v, run_l = impl.pagemap_runs(fd, starts, ends, skip_file, zero_page_pfn())
            if run_v and (hz := huge_zero_pfn()):
                run_v, run_l = _drop_huge_zero(fd, run_v, run_l, hz)
    finally:
        os.close(fd)
    for v, r in chosen:
        if r.all_pages:
            run_v, run_l = _add_range(run_v, run_l, v.start, v.end)
    at = criu_syscall_page(maps)
    if at is not None:
        run_v, run_l = _add_range(run_v, run_l, at, at + PAGE_SIZE)
    return run_v, run_l


def criu_syscall_page(maps: list[Vma]) -> int | None:
    """The page CRIU's dump writes into: to run syscalls in the task, compel puts a few
    bytes of code at the start of the task's first executable VMA (CRIU's get_exec_start:
    ascending, below the task size) and puts the original bytes back when it is done.
    The write copies the page on write, so every dump holds it -- a private file
    mapping's page that no live round would otherwise read. Counted in the page set
    from the first round on, the final round's layout is the live rounds' (no page
    inserted into the destination's held file inside the freeze) and, its bytes being
    the file's again, the page is not even resent. None when that VMA is not one whose
    pages move (shared, or none)."""
    for v in maps:
        if "x" in v.perms[:3] and v.path != "[vsyscall]" and v.start < 1 << 56:
            r = page_rule(v)
            return v.start if r.moves and r.cow_only else None
    return None


HUGE = 2 * 1024 * 1024      # a PMD-mapped transparent huge page (x86-64)


def huge_zero_pfn() -> int:
    """The first page frame of the kernel's huge zero page (what a read fault maps in a
    2 MiB-aligned range of a transparent-huge-page mapping), found by faulting one in;
    0 when THP or its zero page is off, or frames are hidden. Not cached: the kernel
    frees the huge zero page when nobody maps it and may allocate it elsewhere later
    (while the process looked at maps it, it is the same one)."""
    import ctypes
    import mmap
    try:
        with open("/sys/kernel/mm/transparent_hugepage/use_zero_page") as f:
            if f.read().strip() != "1":
                return 0
    except OSError:
        return 0
    m = mmap.mmap(-1, 2 * HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        probe = ctypes.c_char.from_buffer(m)
        base = ctypes.addressof(probe)
        addr = (base + HUGE - 1) // HUGE * HUGE
        try:
            m.madvise(mmap.MADV_HUGEPAGE, addr - base, HUGE)
        except (AttributeError, OSError):
            del probe
            return 0
        _ = m[addr - base]          # a read fault: the huge zero page when THP allows
        pfn = _own_pfn(addr)
        del probe
    finally:
        m.close()
    # a huge page starts on a 512-frame boundary; the small zero page is not one
    return pfn if pfn and pfn % (HUGE // PAGE_SIZE) == 0 and pfn != zero_page_pfn() else 0


def _drop_huge_zero(fd: int, run_v: array, run_l: array, hz: int) -> tuple[array, array]:
    """The runs less the 2 MiB chunks mapped to the huge zero page (each chunk's first
    pagemap entry tells: a PMD maps the whole chunk to hz..hz+511)."""
    drop = []
    for a, n in zip(run_v, run_l):
        c = (a + HUGE - 1) // HUGE * HUGE
        while c + HUGE <= a + n:
            e = int.from_bytes(os.pread(fd, 8, c // PAGE_SIZE * 8), "little")
            if e & (1 << 63) and e & ((1 << 55) - 1) == hz:
                drop.append(c)
            c += HUGE
    if not drop:
        return run_v, run_l
    nv, nl = array("Q"), array("Q")
    k = 0
    for a, n in zip(run_v, run_l):
        end = a + n
        while k < len(drop) and drop[k] < end:
            if drop[k] > a:
                nv.append(a)
                nl.append(drop[k] - a)
            a = drop[k] + HUGE
            k += 1
        if a < end:
            nv.append(a)
            nl.append(end - a)
    return nv, nl


def criu_runs(pid: int, impl=native) -> tuple[array, array]:
    """The page set of pid (migrated_runs), under its historical name."""
    return migrated_runs(pid, impl=impl)


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


# -- the process tree ------------------------------------------------------------------

class LiveError(RuntimeError):
    """A process of the tree to migrate is gone or cannot be read."""


@dataclass(frozen=True)
class Task:
    host_pid: int
    ns_pid: int     # as the tree's root PID namespace sees it (what CRIU's images use)


def nspids(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    return [int(x) for x in line.split()[1:]]
    except FileNotFoundError:
        raise LiveError(f"process {pid} does not exist") from None
    return [pid]


def _per_thread(pid: int, name: str) -> dict[int, str] | None:
    """{tid: /proc/PID/task/TID/NAME} for each thread of a process (a thread that exited
    meanwhile left out), or None when the process does not exist."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except (FileNotFoundError, ProcessLookupError):
        return None
    out = {}
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/{name}") as f:
                out[int(tid)] = f.read()
        except (FileNotFoundError, ProcessLookupError):
            continue
    return out


def _under_tracer(status: str) -> bool:
    """A thread's status file says: stopped under a tracer (State t with a TracerPid)."""
    state = tracer = None
    for line in status.splitlines():
        if line.startswith("State:"):
            state = line.split()[1]
        elif line.startswith("TracerPid:"):
            tracer = line.split()[1]
            break
    return state == "t" and tracer not in (None, "0")


def threads_under_tracer(pid: int) -> dict[int, bool] | None:
    """{tid: stopped under a tracer now} for each thread of a process; None when the
    process does not exist."""
    status = _per_thread(pid, "status")
    return None if status is None else {tid: _under_tracer(t) for tid, t in status.items()}


def children(pid: int) -> list[int]:
    return [int(x) for text in (_per_thread(pid, "children") or {}).values()
            for x in text.split()]


def alive(pid: int) -> bool:
    """Running or stopped — not gone and not a zombie waiting to be reaped."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


def process_tree(root: int) -> list[Task]:
    """The root and all its descendants (processes, not threads), root first."""
    if not alive(root):
        raise LiveError(f"the process to migrate ({root}) has exited")
    depth = len(nspids(root))
    tasks, todo = [], [root]
    while todo:
        pid = todo.pop(0)
        ns = nspids(pid)
        if len(ns) < depth:
            continue  # left the tree's namespace: not ours to dump
        tasks.append(Task(pid, ns[depth - 1]))
        todo += children(pid)
    return tasks


def ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return int(stat[stat.rindex(b")") + 2:].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def lazy_pages_processes(verb: str = "lazy-pages") -> list[tuple[int, str, tuple[int, int] | None]]:
    """Every `criu lazy-pages` process (deltaxfer's own server too): (pid, its -D argument,
    (st_dev, st_ino) of its working directory or None). The daemon works in its images
    directory, so the working directory follows that directory through a rename (the
    receiver starts it in images.tmp, which its commit renames images: -D then names a
    path that is gone). ``verb="restore"``: every `criu restore` instead (criu/early.py
    starts one in images.tmp too)."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                args = [a.decode(errors="replace") for a in f.read().split(b"\0")]
        except OSError:
            continue
        if verb == "restore":
            # criu's binary, then the command (a private criu runs through its own ld.so:
            # the binary is then an argument)
            if not any(os.path.basename(a) == "criu" and args[i + 1] == "restore"
                       for i, a in enumerate(args[:-1])):
                continue
        elif verb not in args:
            continue
        if "-D" not in args:
            continue
        i = args.index("-D")
        if i + 1 >= len(args):
            continue
        try:
            st = os.stat(f"/proc/{name}/cwd")
            cwd = (st.st_dev, st.st_ino)
        except OSError:
            cwd = None
        out.append((int(name), args[i + 1], cwd))
    return out


def lazy_pages_daemons(images_dir: str, verb: str = "lazy-pages") -> list[int]:
    """PIDs of the `criu lazy-pages` daemons serving images_dir (the receiver starts one
    per lazy restore, see criu/runner.py): started with `-D images_dir` (the path
    exactly), or working in that directory now (started in it under another name).
    ``verb="restore"``: the `criu restore` processes working there."""
    want = os.path.realpath(images_dir)
    try:
        st = os.stat(images_dir)
        here = (st.st_dev, st.st_ino)
    except OSError:
        here = None
    return [pid for pid, d, cwd in lazy_pages_processes(verb)
            if os.path.realpath(d) == want or (here is not None and cwd == here)]


def start_time(pid: int) -> int | None:
    """A process's start time (clock ticks since boot, /proc/PID/stat field 22): with the
    pid, its identity. None when it does not exist."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rpartition(")")[2].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def state(pid: int) -> str | None:
    """The state letter of /proc/PID/stat (R, S, T stopped, t traced, Z ...), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return None


def run_ns(pid: int) -> int | None:
    """Nanoseconds a process's threads have spent on a CPU (their /proc/PID/task/*/
    schedstat summed): grows only while it runs. None when it does not exist."""
    stats = _per_thread(pid, "schedstat")
    return None if stats is None else sum(int(x.split()[0]) for x in stats.values()
                                          if x.split())


def boot_ticks_now() -> int:
    """Now, in the unit of start_time (clock ticks since boot)."""
    with open("/proc/uptime") as f:
        return int(float(f.read().split()[0]) * os.sysconf("SC_CLK_TCK"))


def boot_time() -> float:
    """When this host booted (epoch seconds, /proc/stat btime)."""
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("btime "):
                return float(line.split()[1])
    return 0.0


def started_at(pid: int) -> float | None:
    """When a process started (epoch seconds), or None if there is none."""
    ticks = start_time(pid)
    return None if ticks is None else boot_time() + ticks / os.sysconf("SC_CLK_TCK")


def status(pid: int) -> dict[str, str]:
    """/proc/PID/status as a mapping (Seccomp, TracerPid, NSpid, ...); OSError if gone."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            out[k] = v.strip()
    return out


def exists(pid: int) -> bool:
    """A /proc entry for pid (a zombie included: see alive)."""
    return os.path.exists(f"/proc/{pid}")


def namespace(pid: int | str, kind: str) -> str | None:
    """The namespace of that kind (pid, mnt, net, ...) as /proc/PID/ns/KIND names it,
    e.g. 'pid:[4026531836]'; None if the process is gone."""
    try:
        return os.readlink(f"/proc/{pid}/ns/{kind}")
    except OSError:
        return None


def cwd(pid: int) -> tuple[str, os.stat_result] | None:
    """A process's working directory: its path (as the process's mount namespace has
    it) and stat; None if it is gone."""
    try:
        return os.readlink(f"/proc/{pid}/cwd"), os.stat(f"/proc/{pid}/cwd")
    except OSError:
        return None


def ancestors(pid: int) -> set[int]:
    """pid and its parents up to (not including) init."""
    out = set()
    while pid > 1 and pid not in out:
        out.add(pid)
        parent = ppid(pid)
        if parent is None:
            break
        pid = parent
    return out
