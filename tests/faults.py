"""Fault injection for migration tests: a frame-aware TCP proxy on loopback.

``LinkProxy(upstream_port)`` listens on a free loopback port and forwards every
connection to ``127.0.0.1:upstream_port``, both ways. It parses the deltaxfer frame
headers as they pass (24 bytes: magic, type, flags, u32 length, seq, check; the tests
run without TLS), records what went by, and asks ``rule(direction, type, payload)``
before forwarding each frame ("c2s": client to server, "s2c": the other way). The
payload is given for small frames (control messages) and None for big ones. The rule
returns None (forward it), ``"cut"`` (reset both connections, nothing more passes: the
link is gone and both ends know), ``"stall"`` (stop forwarding and hold both
connections open: the link is silent, neither end hears anything), ``"truncate"``
(forward the header and half of this frame's payload, then end that direction with a
FIN and drop whatever else that side sends: the stream stops inside a frame, while the
other direction still carries the answer) or ``"corrupt"`` (flip one bit in the middle
of this frame's payload — in its check field when it has none — and go on forwarding:
the receiver's integrity check must catch it). ``cut()`` and ``stall()`` do the same
from outside, at any time.

One thread per proxied connection multiplexes both directions with select, so every
action happens on the thread that owns the sockets.

Also here: running `deltaxfer migrate` as a subprocess with a deadline (killing it and the
criu it started when it overruns), and what the tests check afterwards: restored copies
of a workload (processes with its command line outside the source's PID namespace),
unfinished *.tmp state in a receiver's directory, the source's state.
"""
from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

import pytest

from deltaxfer.core import procmem

HEADER = struct.Struct("<2sBBIQQ")        # magic, type, flags, length, seq, check
HEADER_SIZE = HEADER.size                 # 24
SMALL = 64 * 1024                          # frames up to this size are held whole for the rule


def _rst_close(sock: socket.socket) -> None:
    """Close with a TCP reset (SO_LINGER 0): the peer's next read fails at once."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class _Direction:
    def __init__(self, name: str, src: socket.socket, dst: socket.socket):
        self.name, self.src, self.dst = name, src, dst
        self.pending = bytearray()      # received, not yet forwarded
        self.frame_left = 0             # bytes of the current (already ruled) frame to forward
        self.flip_at = -1               # "corrupt": frame_left value at which to flip a bit
        self.truncated = False          # "truncate": this direction is over, drop the rest
        self.truncate_keep = 0          # "truncate": bytes of the frame never forwarded
        self.eof = False
        self.bytes = 0


class LinkProxy:
    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1", rule=None):
        self.upstream = (upstream_host, upstream_port)
        self.rule = rule
        self.frames: list[tuple[float, str, int, int]] = []   # (time, direction, type, length)
        self.actions: list[tuple[float, str, str]] = []        # (time, action, why)
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        self._command: str | None = None
        self._closing = False
        self._threads: list[threading.Thread] = []
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(8)
        self.port = self._listener.getsockname()[1]
        self.triggered = threading.Event()   # set when a cut or stall happened
        t = threading.Thread(target=self._accept, name="proxy-accept", daemon=True)
        t.start()
        self._threads.append(t)

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    # -- control from the test ------------------------------------------------------
    def cut(self) -> None:
        self._signal("cut")

    def stall(self) -> None:
        self._signal("stall")

    def _signal(self, what: str) -> None:
        with self._lock:
            if self._command is None:
                self._command = what
        os.write(self._wake_w, b"x")

    def seen(self, direction: str, type_: int) -> bool:
        return any(d == direction and t == type_ for _, d, t, _ in self.frames)

    def close(self) -> None:
        if getattr(self, "_closed", False):
            return
        self._closed = True
        self._closing = True
        os.write(self._wake_w, b"x")
        for t in self._threads:
            t.join(5)
        self._listener.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- the proxy --------------------------------------------------------------------
    def _accept(self) -> None:
        while not self._closing:
            r, _, _ = select.select([self._listener, self._wake_r], [], [], 0.5)
            if self._listener not in r:
                continue
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=10)
            except OSError:
                _rst_close(client)
                continue
            server.settimeout(None)
            t = threading.Thread(target=self._pump, args=(client, server),
                                 name="proxy-pump", daemon=True)
            t.start()
            self._threads.append(t)

    def _pump(self, client: socket.socket, server: socket.socket) -> None:
        dirs = [_Direction("c2s", client, server), _Direction("s2c", server, client)]
        stalled = False
        try:
            while not self._closing:
                with self._lock:
                    command = self._command
                if command == "cut":
                    self.actions.append((time.monotonic(), "cut", "requested"))
                    self.triggered.set()
                    return
                if command == "stall" and not stalled:
                    self.actions.append((time.monotonic(), "stall", "requested"))
                    self.triggered.set()
                    stalled = True
                if stalled:
                    # hold both ends open and read nothing: the link is silent
                    select.select([self._wake_r], [], [], 0.5)
                    continue
                readable = [d.src for d in dirs if not d.eof]
                if not readable:
                    return
                r, _, _ = select.select(readable + [self._wake_r], [], [], 0.5)
                if self._wake_r in r:
                    os.read(self._wake_r, 64)
                for d in dirs:
                    if d.src not in r:
                        continue
                    try:
                        chunk = d.src.recv(1 << 20)
                    except OSError:
                        chunk = b""
                    if not chunk:
                        d.eof = True
                        try:
                            d.dst.shutdown(socket.SHUT_WR)
                        except OSError:
                            pass
                        continue
                    d.bytes += len(chunk)
                    if d.truncated:
                        continue
                    d.pending += chunk
                    action = self._forward(d)
                    if action == "cut":
                        self.triggered.set()
                        return
                    if action == "stall":
                        self.triggered.set()
                        stalled = True
                        break
        finally:
            _rst_close(client)
            _rst_close(server)

    def _forward(self, d: _Direction) -> str | None:
        """Forward whole frames (and the parts of a ruled frame) from d.pending."""
        while d.pending:
            if d.frame_left:
                n = min(d.frame_left, len(d.pending))
                if d.frame_left >= d.flip_at > d.frame_left - n:
                    d.pending[d.frame_left - d.flip_at] ^= 0x10
                    d.flip_at = -1
                if d.truncated and d.frame_left - n < d.truncate_keep:
                    n = d.frame_left - d.truncate_keep
                    d.dst.sendall(d.pending[:n])
                    d.pending.clear()
                    try:
                        d.dst.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    return None
                d.dst.sendall(d.pending[:n])
                del d.pending[:n]
                d.frame_left -= n
                continue
            if len(d.pending) < HEADER_SIZE:
                return None
            _, type_, _, length, _, _ = HEADER.unpack_from(d.pending)
            payload = None
            if length <= SMALL:
                if len(d.pending) < HEADER_SIZE + length:
                    return None               # hold a small frame until it is whole
                payload = bytes(d.pending[HEADER_SIZE:HEADER_SIZE + length])
            action = self.rule(d.name, type_, payload) if self.rule else None
            if action in ("cut", "stall"):
                self.actions.append((time.monotonic(), action,
                                     f"before {d.name} frame type 0x{type_:02x}"))
                return action
            self.frames.append((time.monotonic(), d.name, type_, length))
            d.frame_left = HEADER_SIZE + length
            if action == "corrupt":
                # a payload byte in the middle, or the check field of an empty frame
                at = HEADER_SIZE + length // 2 if length else 20
                d.flip_at = d.frame_left - at
            elif action == "truncate":
                d.truncated = True
                # half the payload never goes (half the header, for an empty frame)
                d.truncate_keep = length - length // 2 if length else HEADER_SIZE // 2
            if action in ("corrupt", "truncate"):
                self.actions.append((time.monotonic(), action,
                                     f"{d.name} frame type 0x{type_:02x} of {length} bytes"))
                self.triggered.set()
        return None


# -- running `deltaxfer migrate` and checking both sides afterwards -----------------------------


def descendants(pid: int) -> list[int]:
    """Every process below pid (children first seen first), from /proc/*/task/*/children."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop(0)
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except FileNotFoundError:
            continue
        for t in tids:
            try:
                with open(f"/proc/{p}/task/{t}/children") as f:
                    kids = [int(x) for x in f.read().split()]
            except FileNotFoundError:
                continue
            out += kids
            todo += kids
    return out


class Held:
    """Processes held by pidfd (no kill can hit a reused pid); kill() SIGKILLs and waits."""

    def __init__(self, pids=()):
        self.fds: dict[int, int] = {}
        for p in pids:
            self.add(p)

    def add(self, pid: int) -> None:
        if pid not in self.fds:
            try:
                self.fds[pid] = os.pidfd_open(pid)
            except OSError:
                pass

    def alive(self) -> list[int]:
        out = []
        for pid, fd in self.fds.items():
            r, _, _ = select.select([fd], [], [], 0)
            if not r:
                out.append(pid)
        return out

    def kill(self, timeout: float = 10) -> None:
        for fd in self.fds.values():
            try:
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        for fd in self.fds.values():
            select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            os.close(fd)
        self.fds.clear()


@dataclass
class Migration:
    rc: int | None            # None: it did not end in time and was killed
    report: dict | None
    stdout: str
    stderr: str
    seconds: float
    state_at_timeout: str | None = None   # of watch_pid, when it was killed


def migrate_cmd(pid: int, to: str, key_file: str, report_path, *extra) -> list[str]:
    return [sys.executable, "-m", "deltaxfer", "migrate", str(pid), "--to", to,
            "--key-file", str(key_file), "--report", str(report_path), "--json", *extra]


def start_migrate(pid, to, key_file, report_path, *extra, env=None) -> subprocess.Popen:
    return subprocess.Popen(migrate_cmd(pid, to, key_file, report_path, *extra),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def finish_migrate(proc: subprocess.Popen, report_path, t0: float, timeout: float,
                   watch_pid: int | None = None) -> Migration:
    """Wait for a `deltaxfer migrate`; past the timeout, kill it and everything it started
    (criu dump included, which would otherwise keep the source frozen), noting the state
    of watch_pid first."""
    state = None
    try:
        out, err = proc.communicate(timeout=max(0.1, timeout - (time.monotonic() - t0)))
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        state = _proc_state(watch_pid) if watch_pid else None
        kids = Held(descendants(proc.pid))
        proc.kill()
        kids.kill()
        out, err = proc.communicate()
        rc = None
    report = None
    try:
        with open(report_path) as f:
            report = json.load(f)
    except (OSError, ValueError):
        pass
    return Migration(rc, report, out, err, time.monotonic() - t0, state)


def run_migrate(pid, to, key_file, report_path, *extra, timeout: float = 120,
                env=None) -> Migration:
    t0 = time.monotonic()
    proc = start_migrate(pid, to, key_file, report_path, *extra, env=env)
    return finish_migrate(proc, report_path, t0, timeout)


def migrate_adopting(wl, to: str, tmp_path, agent_dir, *extra, timeout: float = 180
                     ) -> Migration:
    """`deltaxfer migrate` of workload wl to ``to`` (a key written in tmp_path, the
    agent's work under agent_dir), its restored copy adopted by wl whatever the outcome,
    so that the test's end kills it; the caller asserts on the result."""
    from servers import write_key
    key = write_key(tmp_path / "client.key")
    m = run_migrate(wl.pid, to, key, tmp_path / "report.json", *extra,
                    env=agent_env(agent_dir), timeout=timeout)
    if m.report and m.report.get("restored_pid"):
        wl.adopt(m.report["restored_pid"])
    return m


@pytest.fixture
def agent_tmp():
    """A short directory for the migration agent's work directory (its unix socket path
    must fit in 108 bytes, which pytest's tmp_path does not promise); removed afterwards,
    with whatever a killed agent left there."""
    path = tempfile.mkdtemp(prefix="dxt-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def agent_leftovers(tmpdir) -> list[str]:
    """Work directories a migration agent left in tmpdir (it removes its own when it ends)."""
    return [p for p in os.listdir(tmpdir) if p.startswith("deltaxfer-migrate-")]


def agent_env(tmpdir) -> dict:
    """The environment for a migrate subprocess: its work directory (agent socket, hook
    wrapper, dump) under tmpdir, so that what a killed agent leaves is found and removed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DELTAXFER_", "CRIU_"))}
    env["TMPDIR"] = str(tmpdir)
    return env


def pid_ns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def _looks_like_a_copy(pid: int, wl) -> bool:
    """A lazily restored copy reads an empty /proc/PID/cmdline until the page holding its
    argv has been filled in: recognise it by its command name and by being PID 1 of its
    own namespace, as the workload is."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            comm = f.read().strip()
        with open(f"/proc/{pid}/status") as f:
            status = f.read().splitlines()
        state = next(line.split()[1] for line in status if line.startswith("State:"))
        nspid = next(line.split()[1:] for line in status if line.startswith("NSpid:"))
    except (OSError, StopIteration):
        return False
    if state in ("Z", "X"):
        return False   # a dead copy of an earlier test, not reaped yet (empty cmdline too)
    if wl.kind in ("memwork", "shmwork"):
        # the same program built elsewhere (another checkout's tests running on this
        # machine restore their own memwork) is not ours: compare the executable
        try:
            if os.readlink(f"/proc/{pid}/exe") != os.path.realpath(wl.argv[0]):
                return False
        except OSError:
            return False
    want = "memwork" if wl.kind == "memwork" else "shmwork" if wl.kind == "shmwork" \
        else os.path.basename(wl.argv[0])[:15]
    return comm == want and len(nspid) > 1 and nspid[-1] == "1"


def adopt_the_one_copy(wl, timeout: float = 10) -> int:
    """Wait for the single restored copy of wl (copies_of), adopt it, check its memory
    with the workload's own verify; returns its pid."""
    deadline = time.monotonic() + timeout
    while not (copies := copies_of(wl)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(copies) == 1, copies
    wl.adopt(copies[0])
    assert wl.verify(pid=copies[0])["ok"]
    return copies[0]


def copies_of(wl) -> list[int]:
    """Processes running the workload's program with its result file, outside the source's
    PID namespace (and not its `unshare`): copies restored by CRIU. (The namespace is read
    now: a dead namespace's inode number is reused by the next one created.)"""
    needle = str(wl.result_path).encode()
    source_ns = pid_ns(wl.pid)
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        if pid == wl.unshare_pid:
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if needle not in cmdline and (cmdline or not _looks_like_a_copy(pid, wl)):
            continue
        ns = pid_ns(pid)
        if ns is None or (source_ns is not None and ns == source_ns):
            continue
        out.append(pid)
    return sorted(out)


def tmp_leftovers(root) -> list[str]:
    """Paths under root whose name ends in .tmp (unfinished rounds, file sets, commits)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        out += [os.path.join(dirpath, n) for n in dirnames + filenames if n.endswith(".tmp")]
    return out


def wait_stopped(pid: int, timeout: float = 5) -> str | None:
    """The process's state once it is stopped (or the last one seen): CRIU's
    --leave-stopped sends SIGSTOP as it lets go, and the task takes the stop when it next
    runs, so just after criu exits it may still read R."""
    deadline = time.monotonic() + timeout
    while True:
        state = _proc_state(pid)
        if state in ("T", "t") or time.monotonic() > deadline:
            return state
        time.sleep(0.01)


def wait_not_frozen(pid: int, timeout: float = 15) -> str | None:
    """The process's state once it is no longer stopped/traced (or the last one seen)."""
    deadline = time.monotonic() + timeout
    while True:
        state = _proc_state(pid)
        if state not in ("T", "t") or time.monotonic() > deadline:
            return state
        time.sleep(0.02)


def wait_gone(pid: int, timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while _proc_state(pid) not in (None, "Z", "X"):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _proc_state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0]
    except OSError:
        return None


def _stopped_by_criu(pid: int) -> bool:
    """Stopped, and not by the migration agent's own ptrace (written-page tracking
    injects a syscall into the source during live rounds): by a `criu dump`, or stopped
    with no tracer (left stopped)."""
    # State and TracerPid from one read of status: read apart, a stop by the agent's own
    # ptrace could be seen as the state and its detach a moment later as "no tracer"
    try:
        st = procmem.status(pid)
        if st["State"].split()[0] not in ("T", "t"):
            return False
        tracer = int(st["TracerPid"])
        if not tracer:
            return True
        with open(f"/proc/{tracer}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except (OSError, KeyError, IndexError, ValueError):
        return False
    return b"dump" in argv and any(a.endswith(b"criu") for a in argv)


def freeze_watcher(pid: int, on_freeze, stop: threading.Event) -> threading.Thread:
    """Poll the source's state (every ms) and call on_freeze() when CRIU stops it."""
    def watch():
        while not stop.is_set():
            if _stopped_by_criu(pid):
                on_freeze()
                return
            time.sleep(0.001)
    t = threading.Thread(target=watch, name="freeze-watcher", daemon=True)
    t.start()
    return t


def wait_log(server, *texts: str, timeout: float = 10) -> str:
    """The server's log once it holds every one of texts (or as it is at the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        log = server.log()
        if all(t in log for t in texts) or time.monotonic() > deadline:
            return log
        time.sleep(0.05)


def host_pipe_max() -> tuple[int, bool]:
    """The host's fs.pipe-max-size as a migration will put it back: the sysctl's value, or
    the one an earlier killed agent saved (criu/pipes.py); and whether it was such a
    leftover (then the first migration restores it and notes no raise of its own)."""
    from deltaxfer.criu import pipes
    saved = pipes.PipeSizeRaise().saved_path
    if os.path.exists(saved):
        with open(saved) as f:
            return int(f.read()), True
    with open(pipes.SYSCTL) as f:
        return int(f.read()), False
