"""runc test containers: a bundle holding a static busybox and a static self-checking
workload (tests/workloads, built with -static: the rootfs has no libc), started with
`runc run --detach`, stdio on pipes (CRIU checkpoints a container's pipe stdio; a file
or a terminal outside the container would be an unknown external file to it).

    b = make_bundle(tmp_path / "bundle", mib=16, dirty_mib_per_s=2)
    with RuncContainer.run(runc, criu, root, "c1", b) as c:
        c.verify()                     # {"ok": True, ...} from the workload itself
        c.verify(pid=restored_pid)     # the copy, same result file (rootfs/tmp/result)

Import as `import containers` from a test file in tests/ (like `workloads`).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import workloads

RESULT = "/tmp/result"  # inside the container; the host reads BUNDLE/rootfs/tmp/result
BUSYBOX = "/bin/busybox"


def busybox() -> str | None:
    """The static busybox (Debian's busybox-static installs /bin/busybox)."""
    for p in (BUSYBOX, shutil.which("busybox") or ""):
        if p and os.path.isfile(p):
            r = subprocess.run(["file", "-L", p], capture_output=True, text=True) \
                if shutil.which("file") else None
            if r is None or "statically linked" in r.stdout or "static-pie" in r.stdout:
                return p
    return None


def spec(args: list[str], *, annotations: dict | None = None,
         cgroups_path: str | None = None) -> dict:
    """An OCI config.json like `runc spec`'s (pid, net, ipc, uts, mount namespaces: the
    network namespace is a new one holding only lo), without a terminal, a writable
    rootfs, `args` as the process."""
    caps = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]
    c = {
        "ociVersion": "1.0.2-dev",
        "process": {
            "terminal": False, "user": {"uid": 0, "gid": 0}, "args": args,
            "env": ["PATH=/bin"], "cwd": "/",
            "capabilities": {k: caps for k in ("bounding", "effective", "permitted",
                                               "ambient")},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": False},
        "hostname": "dx",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
        ],
        "linux": {
            "resources": {"devices": [{"allow": False, "access": "rwm"}]},
            "namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount")],
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list",
                            "/sys/firmware"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys",
                              "/proc/sysrq-trigger"],
        },
    }
    if annotations:
        c["annotations"] = dict(annotations)
    if cgroups_path:
        c["linux"]["cgroupsPath"] = cgroups_path
    return c


def make_bundle(path, *, mib: float = 16, dirty_mib_per_s: float = 2, seed: int = 1,
                annotations: dict | None = None, cgroups_path: str | None = None) -> Path:
    """A bundle at `path`: rootfs/bin/busybox (+ sh), rootfs/memwork (static), config.json
    running `/memwork --mib MIB ... --result /tmp/result`."""
    bb = busybox()
    if bb is None:
        raise workloads.WorkloadError("no static busybox: install busybox-static (make runc)")
    prog = workloads.build("memwork", static=True)
    path = Path(path)
    rootfs = path / "rootfs"
    for d in ("bin", "tmp", "proc", "sys", "dev"):
        (rootfs / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(bb, rootfs / "bin" / "busybox")
    if not (rootfs / "bin" / "sh").exists():
        os.symlink("busybox", rootfs / "bin" / "sh")
    shutil.copy2(prog, rootfs / "memwork")
    args = ["/memwork", "--mib", f"{mib:g}", "--dirty-mib-per-s", f"{dirty_mib_per_s:g}",
            "--seed", str(seed), "--result", RESULT]
    (path / "config.json").write_text(json.dumps(
        spec(args, annotations=annotations, cgroups_path=cgroups_path), indent=1))
    return path


class Pipes:
    """stdin, stdout, stderr pipes for a container: the container (and runc) get the
    far ends; we keep stdin's write end and the read ends open for the container's life
    (closing them would hand it EOF / EPIPE)."""

    def __init__(self):
        self.stdin_r, self.stdin_w = os.pipe()
        self.stdout_r, self.stdout_w = os.pipe()
        self.stderr_r, self.stderr_w = os.pipe()
        for fd in (self.stdout_r, self.stderr_r):
            os.set_blocking(fd, False)

    def child_ends(self) -> dict:
        return {"stdin": self.stdin_r, "stdout": self.stdout_w, "stderr": self.stderr_w}

    def close_child_ends(self) -> None:
        for name in ("stdin_r", "stdout_w", "stderr_w"):
            fd = getattr(self, name)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)

    def read_stderr(self) -> str:
        out = b""
        while True:
            try:
                chunk = os.read(self.stderr_r, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            out += chunk
        return out.decode(errors="replace")

    def close(self) -> None:
        self.close_child_ends()
        for name in ("stdin_w", "stdout_r", "stderr_r"):
            fd = getattr(self, name)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)


def run_with_pipes(args: list[str], pipes: Pipes, timeout: float = 120,
                   env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a runc command whose container (run/restore) gets `pipes` as stdio; runc's own
    error message comes through the stderr pipe: returned as .stderr."""
    ends = pipes.child_ends()
    r = subprocess.run(args, stdin=ends["stdin"], stdout=ends["stdout"],
                       stderr=ends["stderr"], timeout=timeout, env=env)
    return subprocess.CompletedProcess(args, r.returncode, "", pipes.read_stderr())


class RuncContainer:
    """A container this test started (or restored): `runc delete --force` at exit."""

    def __init__(self, runc: str, root: str, id: str, bundle: Path, pipes: Pipes):
        self.runc, self.root, self.id, self.pipes = runc, root, id, pipes
        self.bundle = Path(bundle)

    @property
    def result_path(self) -> Path:
        return self.bundle / "rootfs" / RESULT.lstrip("/")

    @classmethod
    def run(cls, runc: str, criu: str, root: str, id: str, bundle: Path,
            ready_timeout: float = 60) -> "RuncContainer":
        pipes = Pipes()
        c = cls(runc, root, id, Path(bundle), pipes)
        c.result_path.unlink(missing_ok=True)
        r = run_with_pipes([runc, "--criu", criu, "--root", root, "run", "--detach",
                            "--bundle", str(bundle), id], pipes)
        if r.returncode != 0:
            pipes.close()
            raise workloads.WorkloadError(f"runc run {id} failed (exit {r.returncode}): "
                                          f"{r.stderr.strip()}")
        c.wait_ready(ready_timeout)
        return c

    def state(self) -> dict:
        r = subprocess.run([self.runc, "--root", self.root, "state", self.id],
                           capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise workloads.WorkloadError(f"runc state {self.id}: {r.stderr.strip()}")
        return json.loads(r.stdout)

    @property
    def pid(self) -> int:
        return int(self.state()["pid"])

    def wait_ready(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.result_path.read_text()
            except FileNotFoundError:
                line = ""
            if line.startswith("READY"):
                return workloads.parse_result(line)
            if time.monotonic() > deadline:
                raise workloads.WorkloadError(
                    f"container {self.id}: workload not READY in {timeout} s "
                    f"(stderr: {self.pipes.read_stderr().strip()!r})")
            time.sleep(0.02)

    def verify(self, pid: int | None = None, timeout: float = 30) -> dict:
        """SIGUSR1 to the workload (host PID `pid`, default this container's init): it
        checks all of its memory and writes OK/BAD to the result file."""
        target = self.pid if pid is None else pid
        self.result_path.unlink(missing_ok=True)
        os.kill(target, signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.result_path.read_text()
            except FileNotFoundError:
                line = ""
            if line:
                return workloads.parse_result(line)
            state = workloads.proc_state(target)
            if state in (None, "Z", "X") or time.monotonic() > deadline:
                raise workloads.WorkloadError(
                    f"container {self.id}: no answer from pid {target} (state {state})")
            time.sleep(0.01)

    def delete(self) -> None:
        subprocess.run([self.runc, "--root", self.root, "delete", "--force", self.id],
                       capture_output=True, timeout=60)
        self.pipes.close()

    def __enter__(self) -> "RuncContainer":
        return self

    def __exit__(self, *exc) -> None:
        self.delete()
