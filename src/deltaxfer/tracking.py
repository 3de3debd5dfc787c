"""Which pages a running process wrote since the last round, without soft-dirty.

The kernel tracks it for us once the process's memory is registered with a userfaultfd
for asynchronous write-protection: a write to a protected page is resolved by the kernel
itself (no monitor: if we die, the process runs on) and leaves the page unprotected;
``PAGEMAP_SCAN`` on /proc/PID/pagemap lists the unprotected ("written") pages; those
about to be read are protected again (``UFFDIO_WRITEPROTECT``) before they are read. The userfaultfd has to belong to the target's mm,
so it is created inside the target: one ``userfaultfd()`` system call run in one of its
threads under ptrace (at a ``syscall`` instruction of its vDSO, registers saved and
restored) by a child process of ours that outlives us if it must (``inject_detached``),
taken over with ``pidfd_getfd`` and closed in the target. From then on everything
happens from our side. Closing our fd releases the registration.

Per round (``ProcessTracker.scan``): scan every registered VMA (which also proves that it
is still registered: the scan fails on a VMA that is not); register and protect the
VMAs that are not (new mappings, remapped ones) — their pages count as written this
round; a VMA that cannot be registered stays "untracked" and its pages are read and
hashed every round. A page may be skipped (not read, not hashed) only when it lies in a
VMA tracked since the previous round, was not reported written, and the destination
holds it: see ``clean_mask``. Content hashes on what is read still skip pages that were
written with the same bytes.

What it cannot see: writes that take no page fault — DMA into pages pinned before they
were protected (O_DIRECT reads in flight, io_uring fixed buffers, RDMA). See
docs/TRACKING.md.
"""
from __future__ import annotations

import json
import os
import platform
import socket
import time
from array import array
from dataclasses import dataclass, field

from deltaxfer import _core
from deltaxfer.core import procmem

O_CLOEXEC = 0o2000000
O_NONBLOCK = 0o4000


class TrackingUnavailable(RuntimeError):
    pass


_support: tuple[str | None] | None = None


def support() -> str | None:
    """None when written-page tracking works on this machine, else why not (checked
    once: userfaultfd with asynchronous write-protect, and PAGEMAP_SCAN)."""
    global _support
    if _support is None:
        _support = (_probe(),)
    return _support[0]


def _probe() -> str | None:
    if platform.machine() != "x86_64":
        return f"injecting a system call is implemented for x86-64 only (this is {platform.machine()})"
    try:
        fd = _core.uffd_create(O_CLOEXEC | O_NONBLOCK)
    except OSError as e:
        return f"userfaultfd() is not available: {e.strerror}"
    try:
        got = _core.uffd_api(fd, _core.UFFD_FEATURE_WP_ASYNC)
        if not got & _core.UFFD_FEATURE_WP_ASYNC:
            return "the kernel's userfaultfd lacks asynchronous write-protect (Linux >= 6.7)"
    except OSError as e:
        return f"userfaultfd asynchronous write-protect is not available (Linux >= 6.7): {e.strerror}"
    finally:
        os.close(fd)
    why = procmem.pagemap_scan_unavailable()
    if why:
        return f"{why} (PAGEMAP_SCAN needs Linux >= 6.7)"
    return None


def _syscall_ip(pid: int, maps: list[procmem.Vma]) -> int:
    """An executable `syscall` instruction (0f 05) in the target: its vDSO has some."""
    for v in maps:
        if v.path == "[vdso]" and v.perms[2] == "x":
            with open(f"/proc/{pid}/mem", "rb", buffering=0) as f:
                f.seek(v.start)
                code = f.read(v.end - v.start)
            at = code.find(b"\x0f\x05")
            if at >= 0:
                return v.start + at
    raise TrackingUnavailable("no syscall instruction found in the target's vDSO")


INJECT_TIMEOUT = 10.0      # seconds to wait for the injecting child's answer


def inject_detached(pid: int, tid: int, syscall_ip: int, flags: int) -> tuple[int, dict]:
    """``_core.inject_userfaultfd`` run in a child process in a session of its own, the fd
    handed back over a socket (SCM_RIGHTS). While the target's thread is under ptrace
    with its registers changed, a SIGKILL of the tracer detaches it with them changed:
    it would run on with them and die (seen: an agent killed at the moment it armed
    tracking took the workload with it). The child finishes whatever becomes of us --
    registers restored, thread detached, the target's copy of the fd closed -- and
    exits; an fd nobody receives closes with it. Raises OSError as the injection does."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        child = os.fork()
    except BaseException:
        ours.close()
        theirs.close()
        raise
    if child == 0:                                  # the child: no return from here
        code = 0
        try:
            ours.close()
            os.setsid()       # not in the agent's process group, nor its session
            try:
                fd, info = _core.inject_userfaultfd(pid, tid, syscall_ip, flags)
            except OSError as e:
                theirs.sendmsg([json.dumps({"errno": e.errno, "strerror": e.strerror,
                                            "info": getattr(e, "info", {})}).encode()])
            else:
                socket.send_fds(theirs, [json.dumps({"info": info}).encode()], [fd])
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    theirs.close()
    try:
        ours.settimeout(INJECT_TIMEOUT)
        what = f"injecting userfaultfd() into pid {pid}"
        try:
            msg, fds, _, _ = socket.recv_fds(ours, 1 << 16, 1)
        except TimeoutError:
            raise OSError(0, f"{what}: no answer from the injecting process in "
                             f"{INJECT_TIMEOUT:g} s") from None
        answer = json.loads(msg) if msg else None
        if answer is not None and "errno" not in answer and len(fds) == 1:
            return fds[0], answer["info"]
        for fd in fds:
            os.close(fd)
        if answer is None:
            raise OSError(0, f"{what}: the injecting process ended without an answer")
        if "errno" in answer:
            e = OSError(answer["errno"], answer["strerror"])
            e.info = answer["info"]
            raise e
        raise OSError(0, f"{what}: no fd came back")
    finally:
        ours.close()
        try:                       # it exits right after its answer; else reaped later
            for _ in range(100):
                if os.waitpid(child, os.WNOHANG)[0]:
                    break
                time.sleep(0.001)
        except ChildProcessError:
            pass


def eligible(v: procmem.Vma) -> bool:
    """The VMAs tracked: those of the page set (procmem.page_rule, what the live rounds
    read) that userfaultfd can watch — all but the vDSO, whose few pages are read every
    round. PROT_NONE ones included: their pages are in the page set too."""
    return procmem.page_rule(v).trackable


@dataclass
class Scan:
    tracked_starts: array       # VMAs tracked since the previous scan (clean pages possible)
    tracked_ends: array
    written_starts: array       # pages written since the previous scan, inside those
    written_ends: array
    written_pages: int
    registered_now: int         # VMAs (re-)registered this time: all their pages count
    untracked: int              # VMAs that cannot be tracked: hashed every round
    seconds: float


@dataclass
class ProcessTracker:
    """Written-page tracking of one process (all its threads share the mm)."""
    pid: int
    uffd: int = -1
    pagemap: int = -1
    armed_seconds: float = 0.0
    inject: dict = field(default_factory=dict)
    untracked_reasons: dict = field(default_factory=dict)
    protect_failures: int = 0

    def arm(self) -> None:
        """Create the userfaultfd in the target and take it over. Raises
        TrackingUnavailable with the reason (the target is untouched then)."""
        t0 = time.monotonic()
        try:
            st = procmem.status(self.pid)
        except FileNotFoundError:
            raise ProcessLookupError(f"process {self.pid} no longer exists") from None
        if st.get("Seccomp", "0") != "0":
            raise TrackingUnavailable("the process runs under a seccomp filter: a system call "
                                      "injected into it could be refused or kill it")
        if st.get("TracerPid", "0") != "0":
            raise TrackingUnavailable(f"the process is traced by pid {st['TracerPid']}")
        maps = procmem.read_maps(self.pid)
        ip = _syscall_ip(self.pid, maps)
        try:
            fd, self.inject = inject_detached(self.pid, self.pid, ip,
                                              O_CLOEXEC | O_NONBLOCK)
        except OSError as e:
            raise TrackingUnavailable(str(e)) from None
        try:
            got = _core.uffd_api(fd, _core.UFFD_FEATURE_WP_ASYNC)
            if not got & _core.UFFD_FEATURE_WP_ASYNC:
                raise TrackingUnavailable("userfaultfd without asynchronous write-protect")
            self.pagemap = os.open(f"/proc/{self.pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        except (OSError, TrackingUnavailable) as e:
            os.close(fd)
            raise TrackingUnavailable(str(e)) from None
        self.uffd = fd
        self.armed_seconds = time.monotonic() - t0

    def _register(self, v: procmem.Vma) -> bool:
        """Register v for asynchronous write-protect and protect its populated pages
        (only those: protecting unpopulated ranges would allocate page tables for all of
        a sparse reservation; a page populated later is unprotected, i.e. written)."""
        try:
            _core.uffd_register_wp(self.uffd, v.start, v.end)
        except OSError as e:
            self.untracked_reasons[(v.start, v.end)] = f"{v.path or 'anonymous'}: {e.strerror}"
            return False
        run_v, run_l = _core.pagemap_runs(self.pagemap, array("Q", [v.start]),
                                          array("Q", [v.end]))
        for a, n in zip(run_v, run_l):
            _core.uffd_writeprotect(self.uffd, a, a + n, True)
        return True

    def scan(self) -> Scan:
        """Pages written since the last scan (re-protected now), per tracked VMA."""
        t0 = time.monotonic()
        vmas = [v for v in procmem.read_maps(self.pid) if eligible(v)]
        starts = array("Q", [v.start for v in vmas])
        ends = array("Q", [v.end for v in vmas])
        # the scan re-protects nothing (PM_SCAN_WP_MATCHING would also turn the empty
        # entries it reports into uffd-wp markers, which pagemap and CRIU count as
        # swapped pages): the pages to be read are protected by protect()
        ws, we, pages, failed = _core.scan_written(self.pagemap, starts, ends)
        failed = set(failed)
        ts, te = array("Q"), array("Q")
        registered = untracked = 0
        for k, v in enumerate(vmas):
            if k not in failed:
                ts.append(v.start)
                te.append(v.end)
            elif self._register(v):
                registered += 1
            else:
                untracked += 1
        return Scan(ts, te, ws, we, pages, registered, untracked, time.monotonic() - t0)

    def protect(self, vaddrs: array, clean, scan: "Scan") -> None:
        """Write-protect the pages about to be read (not clean) in the VMAs tracked by
        ``scan`` — after the scan, before the read: a write after this is reported by the
        next scan; one before it is read now."""
        if len(scan.tracked_starts):
            _, failed = _core.protect_unclean(self.uffd, vaddrs, clean, scan.tracked_starts,
                                              scan.tracked_ends)
            self.protect_failures += failed

    def close(self) -> None:
        """Release the registration (closing the only reference to the userfaultfd does;
        the target keeps running as before)."""
        for fd in (self.uffd, self.pagemap):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.uffd = self.pagemap = -1


def clean_mask(vaddrs: array, scan: Scan, held_vaddrs: array | None) -> bytearray | None:
    """One byte per page of vaddrs: 1 = known unchanged since the destination's copy."""
    if scan is None or held_vaddrs is None or not len(held_vaddrs):
        return None
    return _core.clean_mask(vaddrs, scan.tracked_starts, scan.tracked_ends,
                            scan.written_starts, scan.written_ends, held_vaddrs)


class Tracking:
    """Tracking for every process of a tree, armed on first sight of each; a process
    that cannot be armed falls back to content hashing (and says why)."""

    def __init__(self):
        self.trackers: dict[int, ProcessTracker] = {}
        self.failed: dict[int, str] = {}
        self.scans = 0
        self.scan_seconds = 0.0

    def scan(self, pid: int) -> Scan | None:
        if pid in self.failed:
            return None
        t = self.trackers.get(pid)
        if t is None:
            t = ProcessTracker(pid)
            try:
                t.arm()
            except TrackingUnavailable as e:
                self.failed[pid] = str(e)
                return None
            self.trackers[pid] = t
        try:
            s = t.scan()
        except ProcessLookupError:
            raise
        except OSError as e:
            if not procmem.exists(pid):
                raise ProcessLookupError(f"process {pid} no longer exists") from None
            self.failed[pid] = f"scan failed: {e}"
            t.close()
            del self.trackers[pid]
            return None
        self.scans += 1
        self.scan_seconds += s.seconds
        return s

    def protect(self, pid: int, vaddrs: array, clean, scan: Scan) -> None:
        t = self.trackers.get(pid)
        if t is not None:
            t.protect(vaddrs, clean, scan)

    def close(self) -> None:
        for t in self.trackers.values():
            t.close()

    def summary(self) -> dict:
        untracked = {}
        for pid, t in self.trackers.items():
            for (a, b), why in t.untracked_reasons.items():
                untracked[f"{pid}:{a:#x}-{b:#x}"] = why
        return {"mode": "uffd-wp" if self.trackers else "hashing",
                "armed": sorted(self.trackers), "not_armed": {str(k): v for k, v in
                                                            self.failed.items()},
                "arm_seconds": round(sum(t.armed_seconds for t in self.trackers.values()), 6),
                "signals_requeued": sum(t.inject.get("signals_requeued", 0)
                                        for t in self.trackers.values()),
                "untracked_vmas": untracked, "scans": self.scans,
                "scan_seconds": round(self.scan_seconds, 6)}
