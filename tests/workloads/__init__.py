"""Self-checking workloads for real-CRIU tests and benchmarks.

A workload proves that a process restored by CRIU has its memory intact by
checking *itself*: on SIGUSR1 it recomputes the expected content of all of its
memory and writes ``OK ...`` or ``BAD ...`` to a result file.

Import (tests/ has no __init__.py on purpose, so this package is a top-level
module named ``workloads``):

* from a test file in tests/: ``import workloads`` -- pytest's default
  ("prepend") import mode puts the test file's directory, tests/, on sys.path.
* from bench/ or a script: first
  ``sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))``.

Typical use::

    with workloads.start("memwork", mib=256, dirty_mib_per_s=20, tmpdir=tmp_path) as w:
        ...criu dump --leave-stopped -t w.pid; criu restore -d ... -> new_pid
        w.adopt(new_pid)            # so that kill() cleans it up too
        assert w.verify(new_pid)["ok"]

Kinds: "memwork" (private anon memory, mixed page kinds, optional dirtying),
"shmwork" (MAP_SHARED memory, a child process, a second thread), "pyheap" (a
CPython heap of small objects, optional mutation).  Each runs as
``unshare --pid --fork setsid PROGRAM`` so it is PID 1 of its own PID
namespace: CRIU can then restore a copy while the frozen original still exists
(the copy's PIDs are those of a new PID namespace, so they cannot collide with the
original's).
"""

from __future__ import annotations

import itertools
import os
import select
import shutil
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

__all__ = [
    "KINDS", "WorkloadError", "Workload", "build", "start", "parse_result", "poke",
    "proc_state", "scan_passes",
]

HERE = Path(__file__).resolve().parent
BIN_DIR = HERE / "bin"  # gitignored
KINDS = ("memwork", "shmwork", "pyheap", "scanwork")
_C_FLAGS = {"memwork": [], "shmwork": ["-pthread"], "protnone": [], "pagekinds": [],
            "lazyops": [], "scanwork": []}
_counter = itertools.count()


class WorkloadError(RuntimeError):
    """A workload could not be built, started, or did not answer."""


# --------------------------------------------------------------------------- build

def build(kind: str, static: bool = False) -> Path:
    """Return the path of the program for `kind`, compiling C workloads with gcc
    into tests/workloads/bin/ when the binary is missing or was built from a
    source with another mtime.  pyheap needs no build: its .py path is returned.
    static=True links with -static (bin/KIND-static): for a container rootfs that
    holds no libc (tests/containers.py)."""
    if kind == "pyheap":
        if static:
            raise ValueError("pyheap is a Python script: no static build")
        return HERE / "pyheap.py"
    if kind not in _C_FLAGS:
        raise ValueError(f"unknown workload kind {kind!r}; expected one of {KINDS}")
    src = HERE / f"{kind}.c"
    out = BIN_DIR / (f"{kind}-static" if static else kind)
    src_mtime = src.stat().st_mtime_ns
    try:
        if out.stat().st_mtime_ns == src_mtime:
            return out
    except FileNotFoundError:
        pass
    gcc = shutil.which("gcc")
    if gcc is None:
        raise WorkloadError(
            f"cannot build workload {kind!r}: gcc not found on PATH "
            "(install gcc, e.g. `apt-get install gcc`)")
    BIN_DIR.mkdir(parents=True, exist_ok=True)
    # Build under a private name and rename: parallel builders never see a
    # half-written binary.
    tmp = BIN_DIR / f".{kind}.{os.getpid()}.{next(_counter)}"
    cmd = [gcc, "-O2", "-Wall", *_C_FLAGS[kind], *(["-static"] if static else []),
           "-o", str(tmp), str(src)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise WorkloadError(f"building {kind!r} failed: {' '.join(cmd)}\n{r.stderr}")
    # The binary carries its source's mtime: that is the cache key.
    os.utime(tmp, ns=(src_mtime, src_mtime))
    os.replace(tmp, out)
    return out


# --------------------------------------------------------------------------- helpers

def parse_result(line: str) -> dict:
    """Parse ``STATUS key=value ...`` into a dict: ``status``, ``ok`` (status is
    OK), ``line``, and each field (decimal and 0x-hex values become ints; the
    comma list ``first`` becomes a list of ints)."""
    line = line.strip()
    words = line.split()
    if not words:
        raise WorkloadError("empty result line")
    d: dict = {"status": words[0], "ok": words[0] == "OK", "line": line}
    for w in words[1:]:
        k, sep, v = w.partition("=")
        if not sep:
            continue
        if k == "first":
            d[k] = [int(x) for x in v.split(",") if x]
        elif v.startswith("0x"):
            try:
                d[k] = int(v, 16)
            except ValueError:
                d[k] = v
        elif v.lstrip("-").isdigit():
            d[k] = int(v)
        else:
            d[k] = v
    return d


def proc_state(pid: int) -> str | None:
    """The state letter of /proc/PID/stat (R, S, T stopped, t traced, Z ...),
    or None when the process does not exist."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rpartition(")")[2].split()[0]


def peak_rss_mib(pid: int) -> float | None:
    """VmHWM of a running process, MiB (None when it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def poke(pid: int, vaddr: int, data: bytes) -> None:
    """Write `data` into process `pid` at `vaddr` through /proc/PID/mem (works on
    read-only-to-us mappings too, as ptrace would).  Used to corrupt a workload
    on purpose."""
    fd = os.open(f"/proc/{pid}/mem", os.O_RDWR)
    try:
        n = os.pwrite(fd, data, vaddr)
    finally:
        os.close(fd)
    if n != len(data):
        raise WorkloadError(f"short write into /proc/{pid}/mem at {vaddr:#x}: {n}/{len(data)}")


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return kids
    for t in tasks:
        try:
            with open(f"/proc/{pid}/task/{t}/children") as f:
                kids.extend(int(x) for x in f.read().split())
        except FileNotFoundError:
            pass
    return kids


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (ProcessLookupError, OSError):
        return None


class _Procs:
    """What must die with a Workload.  Kept apart from the Workload object so
    that weakref.finalize can kill it at garbage collection / interpreter exit
    (a leaked 1 GiB workload would otherwise outlive the test run).
    Processes that are not our children are held by pidfd, so a kill can never
    hit an unrelated process that reused a PID."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.pidfds: dict[int, int] = {}  # pid -> pidfd
        self.killed = False

    def hold(self, pid: int) -> None:
        if pid not in self.pidfds:
            fd = _pidfd(pid)
            if fd is not None:
                self.pidfds[pid] = fd

    def kill(self) -> None:
        if self.killed:
            return
        self.killed = True
        # SIGKILL works on stopped (criu dump --leave-stopped) and traced tasks,
        # and killing the init of a PID namespace kills everything inside it.
        for fd in self.pidfds.values():
            try:
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            except (ProcessLookupError, OSError):
                pass
        # Let unshare reap its dead child and exit by itself: killing it first
        # would leave the namespace init a zombie for whoever adopts it.
        try:
            self.proc.wait(timeout=5 if self.pidfds else 0)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        # Adopted copies are not our children (nobody here can reap them): wait
        # until each has exited, i.e. its pidfd turns readable.
        deadline = time.monotonic() + 10
        for fd in self.pidfds.values():
            left = deadline - time.monotonic()
            if left > 0:
                select.select([fd], [], [], left)
            os.close(fd)
        self.pidfds.clear()


# --------------------------------------------------------------------------- Workload

class Workload:
    """A running workload.  `pid` is the host PID of the workload process (PID 1
    of its namespace); `unshare_pid` its parent; `result_path` the result file;
    `ready` the parsed READY line."""

    def __init__(self, kind: str, argv: list[str], result_path: Path):
        self.kind = kind
        self.argv = argv
        self.result_path = result_path
        self.proc: subprocess.Popen | None = None
        self.unshare_pid: int | None = None
        self.prefix: list[str] = []     # e.g. nsenter --net=... -- (see start)
        self.pid: int | None = None
        self.ready: dict = {}
        self.adopted: list[int] = []
        self._procs: _Procs | None = None

    # -- lifecycle ----------------------------------------------------------------
    def _launch(self, timeout: float) -> None:
        for tool in ("unshare", "setsid"):
            if shutil.which(tool) is None:
                raise WorkloadError(f"{tool} not found on PATH (util-linux)")
        self.result_path.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            [*self.prefix, "unshare", "--pid", "--fork", "setsid", *self.argv],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            close_fds=True, start_new_session=True)
        self.unshare_pid = self.proc.pid
        self._procs = _Procs(self.proc)
        weakref.finalize(self, self._procs.kill)
        deadline = time.monotonic() + timeout
        try:
            self.pid = self._find_init(deadline)
            self._procs.hold(self.pid)
            self._wait_ready(deadline)
        except BaseException:
            self.kill()
            raise

    def _died(self, what: str) -> WorkloadError:
        rc = self.proc.poll()
        return WorkloadError(
            f"{self.kind} {what}: `unshare --pid --fork setsid {' '.join(self.argv)}` "
            f"exited with status {rc} (unshare --pid needs root or CAP_SYS_ADMIN; "
            f"run the command by hand to see its stderr)")

    def _find_init(self, deadline: float) -> int:
        # The namespace init is unshare's only child (--fork); /proc/.../children
        # lists it once fork() has returned.
        while True:
            kids = _children(self.unshare_pid)
            if kids:
                return kids[0]
            if self.proc.poll() is not None:
                raise self._died("died before starting")
            if time.monotonic() > deadline:
                raise WorkloadError(f"{self.kind}: unshare {self.unshare_pid} has no child")
            time.sleep(0.005)

    def _wait_ready(self, deadline: float) -> None:
        while True:
            line = self._read_result()
            if line is not None and line.startswith("READY"):
                self.ready = parse_result(line)
                return
            if self.proc.poll() is not None:
                raise self._died("died before READY")
            if time.monotonic() > deadline:
                raise WorkloadError(
                    f"{self.kind} pid {self.pid} not READY in time "
                    f"(state {proc_state(self.pid)}, result file {self.result_path})")
            time.sleep(0.01)

    def _read_result(self) -> str | None:
        try:
            return self.result_path.read_text()
        except FileNotFoundError:
            return None

    def adopt(self, pid: int) -> None:
        """Register another process (e.g. the host PID of a CRIU-restored copy,
        the init of its new PID namespace) to be killed by kill()."""
        if pid not in self.adopted:
            self.adopted.append(pid)
        self._procs.hold(pid)

    def kill(self) -> None:
        """SIGKILL the whole tree (namespace init, unshare, adopted copies) and
        wait for it; idempotent, fine on stopped (frozen) tasks."""
        if self._procs is not None:
            self._procs.kill()

    def __enter__(self) -> "Workload":
        return self

    def __exit__(self, *exc) -> None:
        self.kill()

    # -- requests -----------------------------------------------------------------
    def _ask(self, sig: int, pid: int | None, timeout: float, what: str) -> dict:
        target = self.pid if pid is None else pid
        # Remove first: a result file present afterwards is the answer.
        self.result_path.unlink(missing_ok=True)
        try:
            os.kill(target, sig)
        except ProcessLookupError:
            raise WorkloadError(f"{what}: process {target} does not exist") from None
        deadline = time.monotonic() + timeout
        while True:
            line = self._read_result()
            if line:
                return parse_result(line)
            state = proc_state(target)
            if state in (None, "Z", "X"):
                raise WorkloadError(f"{what}: process {target} died (state {state})")
            if time.monotonic() > deadline:
                hint = " -- it is stopped (frozen by criu?)" if state in ("T", "t") else ""
                raise WorkloadError(
                    f"{what}: no answer from process {target} in {timeout} s "
                    f"(state {state}){hint}")
            time.sleep(0.005)

    def verify(self, pid: int | None = None, timeout: float = 30) -> dict:
        """Ask process `pid` (default: the original) to check all its memory.
        Returns the parsed line: {"ok": True/False, "status": "OK"/"BAD", ...}."""
        return self._ask(signal.SIGUSR1, pid, timeout, f"{self.kind} verify")

    def region(self, pid: int | None = None, timeout: float = 10) -> dict:
        """memwork: {"start": vaddr, "pages": n, "seed": s, "page_size": ...};
        shmwork adds "private_start"/"private_pages" ("start" is the shared
        region, its page 0 a header); pyheap: {"obj", "addr", "len"} of a bytes
        object's payload."""
        return self._ask(signal.SIGUSR2, pid, timeout, f"{self.kind} region")

    def __repr__(self) -> str:
        return f"<Workload {self.kind} pid={self.pid} unshare={self.unshare_pid}>"


def scan_passes(w: "Workload") -> list[dict]:
    """scanwork: every pass it logged so far, oldest first: {"start", "end", "seconds",
    "maxgap"} (wall-clock seconds; maxgap: the longest stretch the pass did not run,
    e.g. a freeze inside it)."""
    out = []
    try:
        text = w.result_path.with_suffix(".scan").read_text()
    except FileNotFoundError:
        return out
    for line in text.splitlines():
        f = line.split()
        if len(f) == 4:
            start, end, gap = float(f[0]), float(f[1]), float(f[2])
            out.append({"start": start, "end": end, "seconds": end - start, "maxgap": gap})
    return out


def start(kind: str, *, tmpdir, mib: float = 64, objects: int = 10000,
          dirty_mib_per_s: float = 0, mutate_per_s: float = 0,
          private_mib: float | None = None, seed: int = 1,
          ready_timeout: float = 120, prefix: tuple = (), whole_pages: bool = False,
          mix: int = 0) -> Workload:
    """Start a workload in its own PID namespace and wait until it is READY.

    memwork: `mib` of private memory, dirtied at `dirty_mib_per_s` (0 = idle).
    shmwork: `mib` of shared memory (+1 header page) and `private_mib`
             (default `mib`) of private memory; a child and a thread.
    pyheap:  `objects` Python objects, `mutate_per_s` replaced per second.
    scanwork: `mib` of private memory read over and over, each word mixed `mix` times
             (the cost of a pass); every pass logged to `scan_log_path(w)`.
    The result file lives in `tmpdir`. `prefix` runs it through another command that
    execs its arguments, e.g. `nsenter --net=/run/netns/NAME --` to start it in a host
    of tests/lab.py."""
    if kind not in KINDS:
        raise ValueError(f"unknown workload kind {kind!r}; expected one of {KINDS}")
    if dirty_mib_per_s and kind != "memwork":
        raise ValueError("dirty_mib_per_s is for memwork (pyheap: mutate_per_s)")
    if mutate_per_s and kind != "pyheap":
        raise ValueError("mutate_per_s is for pyheap")
    if private_mib is not None and kind != "shmwork":
        raise ValueError("private_mib is for shmwork")
    tmpdir = Path(tmpdir)
    tmpdir.mkdir(parents=True, exist_ok=True)
    result = tmpdir / f"{kind}-{os.getpid()}-{next(_counter)}.result"
    prog = build(kind)
    if kind == "memwork":
        argv = [str(prog), "--mib", f"{mib:g}", "--dirty-mib-per-s", f"{dirty_mib_per_s:g}"]
        if whole_pages:   # each mutation rewrites a whole page with fresh random words
            argv.append("--whole-pages")
    elif kind == "scanwork":
        argv = [str(prog), "--mib", f"{mib:g}", "--mix", str(int(mix)),
                "--scan-log", str(result.with_suffix(".scan"))]
    elif kind == "shmwork":
        argv = [str(prog), "--mib", f"{mib:g}"]
        if private_mib is not None:
            argv += ["--private-mib", f"{private_mib:g}"]
    else:
        # -I: no user site or PYTHON* variables -- the heap depends on nothing
        # but this file.
        argv = [sys.executable, "-I", str(prog), "--objects", str(objects),
                "--mutate-per-s", f"{mutate_per_s:g}"]
    argv += ["--seed", str(seed), "--result", str(result)]
    w = Workload(kind, argv, result)
    w.prefix = list(prefix)
    w._launch(ready_timeout)
    return w
