"""A reference to one process that outlives its PID: a pidfd plus its start time.

A PID names whichever process holds it now: once the process exits and is reaped, the
kernel may give the number to another one. Between the live rounds, the dump and the
final SIGKILL, the agent must act on the process it was asked to migrate, never on a
stranger that inherited its number. ``PidRef`` is taken once (``pidfd_open`` and the
start time from /proc/PID/stat, read while the pidfd shows the process alive, so both
name the same process); ``check()`` says whether the PID still names it; ``kill()``
signals through the pidfd, which can only ever reach the process it was opened on.
"""
from __future__ import annotations

import logging
import os
import select
import signal
import time

from deltaxfer.core import procmem
from deltaxfer.core.procmem import LiveError, ppid, process_tree

log = logging.getLogger("deltaxfer.pidref")


class ProcessChanged(ProcessLookupError):
    """The referenced process exited, or its PID now names another process."""


def start_time(pid: int) -> int:
    """Field 22 of /proc/PID/stat: when the process started, in clock ticks since boot.
    Raises ProcessLookupError when there is no such process."""
    t = procmem.start_time(pid)
    if t is None:
        raise ProcessLookupError(f"process {pid} does not exist")
    return t


class PidRef:
    def __init__(self, pid: int, what: str = "the process"):
        self.pid, self.what = pid, what
        try:
            self.fd = os.pidfd_open(pid)
        except ProcessLookupError:
            raise ProcessChanged(f"{what} ({pid}) does not exist") from None
        try:
            self.start = start_time(pid)
            if self.exited():
                raise ProcessChanged(f"{what} ({pid}) has exited")
        except ProcessLookupError as e:
            os.close(self.fd)
            self.fd = -1
            raise ProcessChanged(str(e)) from None

    def exited(self) -> bool:
        """True once the process has exited (a zombie too): its pidfd is readable."""
        return bool(select.select([self.fd], [], [], 0)[0])

    def check(self) -> None:
        """Raise ProcessChanged if the process exited or its PID names another process."""
        if self.fd < 0:
            raise ProcessChanged(f"{self.what} ({self.pid}): the reference was closed")
        if self.exited():
            raise ProcessChanged(f"{self.what} ({self.pid}) has exited")
        try:
            now = start_time(self.pid)
        except ProcessLookupError:
            raise ProcessChanged(f"{self.what} ({self.pid}) has exited") from None
        if now != self.start:
            raise ProcessChanged(
                f"pid {self.pid} now names another process (started at tick {now}; "
                f"{self.what} started at tick {self.start}): {self.what} exited and its "
                "pid was reused; nothing was done to the new process")

    def kill(self, sig: int = signal.SIGKILL) -> bool:
        """Send sig to the referenced process (never to a later holder of its PID);
        False when it has already exited."""
        try:
            signal.pidfd_send_signal(self.fd, sig)
            return True
        except ProcessLookupError:
            return False

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "PidRef":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<PidRef {self.what} {self.pid} start={self.start} fd={self.fd}>"


def wait_exited(refs: list[PidRef], timeout: float) -> list[PidRef]:
    """Wait until every referenced process has exited (its pidfd readable: a zombie
    counts, its parent reaps it), at most ``timeout`` s; the ones still running after
    it. A SIGKILLed process is not gone at once: the kernel first frees its memory,
    ~0.1-0.3 s per GiB here, and until then it holds that memory and its PID."""
    deadline = time.monotonic() + timeout
    left = [r for r in refs if r.fd >= 0]
    while left:
        wait = deadline - time.monotonic()
        if wait <= 0:
            break
        ready, _, _ = select.select(left, [], [], wait)
        left = [r for r in left if r not in ready]
    return left


def signal_tree(root: int, sig: int, start: int | None) -> int:
    """Signal every process of a restored tree (SIGCONT reaches all its threads), through
    pidfds: the root only if it still has the recorded start time (``start``; None: the
    tree is not signalled at all), each descendant only if, with its pidfd open, its
    parent is still a member of the tree -- never a process that inherited a number.
    Returns how many were signalled."""
    if start is None:
        log.warning("restored process %d: no start time recorded, not signalled", root)
        return 0
    try:
        ref = PidRef(root, "restored process")
    except ProcessChanged:
        return 0
    refs = [ref]
    try:
        if ref.start != start:
            log.warning("pid %d now names another process (started at tick %d, the restored "
                        "copy at %d): not signalled", root, ref.start, start)
            return 0
        try:
            pids = [t.host_pid for t in process_tree(root)][1:]
        except LiveError:
            pids = []
        members = {root}
        for pid in pids:                       # parents come before their children
            try:
                r = PidRef(pid, "restored process")
            except ProcessChanged:
                continue
            if ppid(pid) in members and not r.exited():
                refs.append(r)
                members.add(pid)
            else:
                r.close()
        return sum(1 for r in refs if r.kill(sig))
    finally:
        for r in refs:
            r.close()
