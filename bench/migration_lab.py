"""What the migration benchmark measures with: its links, its workloads, and how it counts
bytes on the wire and CPU seconds (bench/bench_migrate.py drives it; the methods are in
bench/migration_methods.py).

Links (each a context manager giving ``source`` and ``dest`` hosts, ``Host.command(argv)``
running argv in that host's network namespace):

* ``lo``: one private network namespace with only its loopback up; both sides run in it
  and talk over 127.0.0.1. ``host-lo``: the same over the harness's own namespace (for a
  machine without iproute2).
* ``veth``: ``TwoHosts (tests/lab.py)()``, two namespaces joined by an unshaped veth pair.
* ``1gbit`` / ``10gbit``: the same, shaped with ``tc ... tbf rate R burst 1mb latency
  50ms`` on both ends.

Bytes on the wire: the kernel's interface counters (``/proc/net/dev``), read before and
after a migration, in both directions (the payload plus TCP/IP headers, ACKs included):
on a veth, the tx bytes of the source's end plus the tx bytes of the destination's end
(``link_fwd`` keeps the source->destination direction alone); on ``lo``, the loopback's
tx bytes in the link's private namespace (every packet on lo is sent once). Only the
harness and the migration run in these namespaces, so nothing else is counted.

CPU seconds per side: user + system time of every process the side ran for the
migration. A command the harness runs to completion (criu dump, criu restore, rsync, the
tar|lz4 pipelines, `deltaxfer migrate`) is waited for with ``os.wait4`` and its rusage
taken: that includes the children it waited for (criu's action script, the shell's
pipeline stages). A server that runs on (``deltaxfer serve``, the rsync daemon) is read
from /proc: utime + stime + cutime + cstime of it and of each living descendant, after
minus before, leaving the workload's own processes out.
"""
from __future__ import annotations

import os
import secrets
import select
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import workloads  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- links ----------------------------------------------------------------------------------

@dataclass
class NsHost:
    name: str
    addr: str

    def command(self, argv: list[str]) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{self.name}", "--", *argv]


class Loopback:
    """Both sides in one private network namespace, over 127.0.0.1."""

    kind = "lo"

    def __init__(self):
        self.name = f"dx-lo-{secrets.token_hex(3)}"
        self.source = self.dest = NsHost(self.name, "127.0.0.1")

    def __enter__(self):
        subprocess.run(["ip", "netns", "add", self.name], check=True, capture_output=True)
        try:
            subprocess.run(["ip", "-n", self.name, "link", "set", "lo", "up"], check=True,
                           capture_output=True)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


class Veth:
    """TwoHosts (tests/lab.py), shaped to `rate` (tbf) or not."""

    def __init__(self, rate: str | None):
        from lab import TwoHosts  # tests/lab.py

        self.kind = rate or "veth"
        self._lab = TwoHosts(rate=rate)
        self.source, self.dest = self._lab.source, self._lab.dest

    def __enter__(self):
        self._lab.__enter__()
        return self

    def __exit__(self, *exc):
        self._lab.__exit__(*exc)


class HostLoopback:
    """Both sides in the harness's own network namespace, over 127.0.0.1: for a lent
    machine without iproute2 (the scale runs, bench/device-scale.sh). Its loopback counts
    every packet on the host, so run nothing else there."""

    kind = "lo"

    def __init__(self):
        self.source = self.dest = self

    addr = "127.0.0.1"

    @staticmethod
    def command(argv: list[str]) -> list[str]:
        return list(argv)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


LINKS = {"lo": Loopback, "host-lo": HostLoopback, "veth": lambda: Veth(None),
         "1gbit": lambda: Veth("1gbit"),
         "10gbit": lambda: Veth("10gbit")}


def _tx_bytes(host, *, loopback: bool) -> int:
    out = subprocess.run(host.command(["cat", "/proc/net/dev"]), capture_output=True,
                         text=True, check=True).stdout
    total = 0
    for line in out.splitlines()[2:]:
        name, _, fields = line.partition(":")
        if (name.strip() == "lo") == loopback:
            total += int(fields.split()[8])
    return total


def link_counters(link) -> dict:
    """{"total": bytes both ways, "fwd": source->destination or None on lo}."""
    if link.kind == "lo":
        return {"total": _tx_bytes(link.source, loopback=True), "fwd": None}
    fwd = _tx_bytes(link.source, loopback=False)
    return {"total": fwd + _tx_bytes(link.dest, loopback=False), "fwd": fwd}


def link_delta(before: dict, after: dict) -> dict:
    return {"wire_bytes": after["total"] - before["total"],
            "wire_bytes_fwd": None if before["fwd"] is None else after["fwd"] - before["fwd"]}


# -- CPU --------------------------------------------------------------------------------------

@dataclass
class Done:
    returncode: int
    cpu_s: float
    wall_s: float
    t_end: float
    maxrss_mib: float = 0.0     # its peak resident set (or its largest waited-for child's)
    restored_cpu_s: float = 0.0  # a criu restore: CPU its restored tree used (in cpu_s too)


def run_measured(argv: list[str], *, stdout=None, stderr=None, timeout: float = 900,
                 **kw) -> Done:
    """Run argv to completion; its exit status, its rusage (it and the children it
    waited for) and when it ended (time.monotonic())."""
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                            stdout=stdout or subprocess.DEVNULL,
                            stderr=stderr or subprocess.DEVNULL, **kw)
    return wait_measured(proc, t0, timeout)


def wait_measured(proc: subprocess.Popen, t0: float, timeout: float = 900) -> Done:
    """Wait for proc (woken by its pidfd: no polling delay in the timings), then reap it
    with wait4 for its rusage."""
    fd = os.pidfd_open(proc.pid)
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
    finally:
        os.close(fd)
    t_end = time.monotonic()
    if not ready:
        proc.kill()
    _, status, ru = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if not ready:
        raise TimeoutError(f"{proc.args[:4]}... ran over {timeout} s")
    return Done(proc.returncode, ru.ru_utime + ru.ru_stime, t_end - t0, t_end,
                ru.ru_maxrss / 1024)


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()
    except OSError:
        return None


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(workloads._children(p))
    return out


def tree_cpu(pid: int, exclude=()) -> float:
    """utime + stime + cutime + cstime (seconds) of pid and its living descendants, the
    subtrees rooted at `exclude` left out."""
    skip = set()
    for e in exclude:
        skip.update(_tree(e))
    total = 0
    for p in _tree(pid):
        if p in skip:
            continue
        st = _stat(p)
        if st is not None:   # fields 14-17 of stat; [0] here is field 3
            total += sum(int(x) for x in st[11:15])
    return total / CLK_TCK


# -- workloads -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class WorkloadSpec:
    """What a migration moves: memwork (`mib`, `dirty` MiB/s), pyheap (`objects`,
    `mutate` objects/s) or redis (`keys`)."""
    name: str
    kind: str
    mib: int = 0
    dirty: float = 0
    objects: int = 0
    mutate: float = 0
    keys: int = 0
    whole: bool = False     # memwork --whole-pages: every mutation a fresh random page
    mix: int = 0            # scanwork: mixing rounds per word read (the cost of a pass)

    def start(self, link, tmp: Path):
        """Start it in the link's source namespace (its own PID namespace), check it
        once, let it run for SETTLE_S, and return it."""
        prefix = link.source.command([])
        if self.kind == "redis":
            sys.path.insert(0, str(Path(workloads.__file__).parent))
            import rediswork

            wl = rediswork.start(tmpdir=tmp, keys=self.keys, prefix=prefix,
                                 verify_prefix=link.dest.command([]))
        elif self.kind == "scanwork":
            wl = workloads.start("scanwork", mib=self.mib, mix=self.mix, tmpdir=tmp,
                                 prefix=prefix, ready_timeout=600)
        elif self.kind == "pyheap":
            wl = workloads.start("pyheap", objects=self.objects, mutate_per_s=self.mutate,
                                 tmpdir=tmp, prefix=prefix, ready_timeout=600)
        else:
            wl = workloads.start("memwork", mib=self.mib, dirty_mib_per_s=self.dirty,
                                 tmpdir=tmp, prefix=prefix, ready_timeout=600,
                                 whole_pages=self.whole)
        try:
            first = wl.verify(timeout=600)
            assert first["ok"], f"{self.name}: the fresh workload failed its own check: {first}"
            time.sleep(SETTLE_S)
        except BaseException:
            wl.kill()
            raise
        return wl


SETTLE_S = 0.5      # the workload runs (and dirties) this long before a migration starts


def _size_name(mib: int) -> str:
    """A workload size as cell names spell it: 256M, 1G."""
    return f"{mib // 1024}G" if mib >= 1024 and mib % 1024 == 0 else f"{mib}M"


def memwork(mib: int, dirty: float, whole: bool = False) -> WorkloadSpec:
    return WorkloadSpec(f"mem{'w' if whole else ''}{_size_name(mib)}-d{dirty:g}", "memwork",
                        mib=mib, dirty=dirty, whole=whole)


def scanwork(mib: int, mix: int) -> WorkloadSpec:
    return WorkloadSpec(f"scan{_size_name(mib)}-m{mix}", "scanwork", mib=mib, mix=mix)


def wait_gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if workloads.proc_state(pid) in (None, "Z", "X"):
            return True
        time.sleep(0.02)
    return False
