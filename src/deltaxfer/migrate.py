"""`deltaxfer migrate`: live migration of a process tree to a `deltaxfer serve`.

1. Live rounds, the tree running: read its present private pages (process_vm_readv),
   send what changed since what the destination holds (XOR deltas against a bounded cache
   of what was sent), until the convergence policy says freeze.
2. The freeze: `criu dump --lazy-pages` with deltaxfer's own action script. CRIU freezes
   the tree and writes only the metadata images (the pages stay in the frozen tasks);
   at post-dump the hook hands over to this agent, which reads the frozen memory, sends
   only the residual delta and the images, and has the destination restore. The hook
   exits 0 only when the destination confirmed: otherwise CRIU resumes the tree — the
   rollback. Then the agent ends the lazy dump (no pages are sent through it) and CRIU
   kills the source (migration done) or has resumed it (rolled back).

CRIU's page server (the lazy dump's, or the page sink's stream) runs over a socketpair
handed to criu with --ps-socket: no TCP port. The process is named by a pidfd and its
start time (pidref.py), not by its PID alone, and every wait on criu has a deadline.
"""
from __future__ import annotations

import asyncio
import errno
import functools
import json
import os
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

from deltaxfer import PAGE_SIZE, transport
from deltaxfer.core import procmem
from deltaxfer.criu import pipes
from deltaxfer.criu.dumpdir import DumpDir
from deltaxfer.criu.lazy import close_lazy_dump
from deltaxfer.criu.proclock import CwdLocks, CwdLockTimeout, cwd_keys, left_behind_hint
from deltaxfer.criu.sink import PageSink
from deltaxfer.criu.runner import Criu, dump_args, log_errors
from deltaxfer.pidref import PidRef, ProcessChanged, wait_exited
from deltaxfer.settings import Options
from deltaxfer.live import LiveError, _alive, frozen_images, process_tree, snapshot_tree
from deltaxfer.policy import Convergence, RoundMeasure
from deltaxfer.throttle import LEVELS as THROTTLE_LEVELS, Throttle, ThrottleError
from deltaxfer.sender import SenderSession
from deltaxfer.source import EncoderPool
from deltaxfer.tracking import Tracking
from deltaxfer.tracking import support as tracking_support

from deltaxfer.hook_env import AGENT_ENV, PYTHON_ENV, TIMEOUT_ENV


RESUMED_TIMEOUT = 10.0   # for the destination to confirm that its copy runs
# a live round that sends less than this in round_timeout_s seconds has stalled
STALL_BYTES = 1 << 20
PROGRESS_EVERY = 10.0    # s between the progress lines of a round still going
# for the SIGKILLed source to exit once the destination runs the copy (freeing its
# memory takes ~0.1-0.3 s per GiB here): see Agent.wait_source_gone
SOURCE_EXIT_TIMEOUT = 30.0
# --converge auto ends in post-copy only when the predicted downtime, every throttle level
# used, is over this many times the target (a prediction is rough: measured here, a
# 48 MiB writer over 50 Mbit/s predicted at 1.7x the target froze for 0.76x of it)
POSTCOPY_FACTOR = 3.0
# A lazy dump keeps the tree's pages referenced in pipes until it is ended: ~2048 open
# files per GiB with 1 MiB pipes, ~512 with CRIU's largest (criu/pipes.py), plus CRIU's own.
LAZY_DUMP_FDS_BASE = 1024
# criu may run this much longer than the freeze deadline (the hook waits the deadline +
# 15 s for the agent; then criu resumes or kills the tree): past it, criu is killed
CRIU_MARGIN = 30.0


def lazy_dump_fits(memory_bytes: int, per_gib: int | None = None) -> tuple[bool, str]:
    """Whether a lazy dump of ``memory_bytes`` fits under the open-files limit (criu
    inherits it), and why not. The soft limit is raised to the hard one; where the
    hard one is too low, it is raised too -- root may (CAP_SYS_RESOURCE), up to
    fs.nr_open -- to what the dump needs and a quarter more: a 16 GiB tree needs ~34 000
    files, and hosts commonly cap the hard limit lower (20 000 on the machines this was
    measured on), where a page-server freeze would have taken several seconds instead."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if per_gib is None:
        per_gib = pipes.lazy_dump_fds_per_gib()
    need = LAZY_DUMP_FDS_BASE + int(per_gib * memory_bytes / 2**30)
    if hard == resource.RLIM_INFINITY or need <= hard:
        return True, ""
    want = need + need // 4
    try:
        with open("/proc/sys/fs/nr_open") as f:
            want = min(want, int(f.read()))
    except (OSError, ValueError):
        pass
    if want >= need:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            return True, f"open-files limit raised from {hard} to {want}"
        except (OSError, ValueError):
            pass      # not privileged for it (a user namespace): say what the limit is
    return False, (f"a lazy criu dump of {memory_bytes / 2**30:.1f} GiB needs about "
                   f"{need} open files, the limit is {hard} and could not be raised")


class MigrationError(RuntimeError):
    pass


class NotStarted(MigrationError):
    """Refused before anything touched the process or the destination."""


def connect_failure(host: str, port: int, e: BaseException,
                    timeout: float = transport.HANDSHAKE_TIMEOUT) -> tuple[str, str] | None:
    """(what happened, what to check) when the connection to ``host:port`` could not be
    made, or None when ``e`` is not such a failure (send and migrate alike)."""
    addr = f"{host}:{port}"
    check = (f"check that `deltaxfer serve` runs there and listens on port {port}, and that "
             f"no firewall between the hosts blocks TCP port {port}")
    if isinstance(e, socket.gaierror):
        return (f"cannot resolve the host {host!r} of {addr}: {e.strerror or e}",
                "check the name (or give the destination's IP address)")
    if isinstance(e, ConnectionRefusedError):
        return f"{addr} refused the connection (nothing listens there)", check
    if isinstance(e, TimeoutError) and not str(e):
        return (f"{addr}: no answer within {timeout:g} s (the connection timed out: a "
                "firewall may drop the packets, or the host is down)", check)
    if isinstance(e, OSError) and e.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH,
                                              errno.EADDRNOTAVAIL, errno.ECONNRESET):
        return f"cannot reach {addr}: {e.strerror or e}", f"check the address and the route; {check}"
    return None


async def connect(host: str, port: int, **kw):
    """transport.connect, its failures to connect told as connect_failure says."""
    try:
        return await transport.connect(host, port, **kw)
    except OSError as e:
        why = connect_failure(host, port, e)
        if why is None:
            raise
        raise MigrationError("; ".join(why)) from None


def check_pid(pid: int) -> None:
    """Refuse, before anything touches it, a PID that cannot be migrated: one that does
    not exist, the host's init, this deltaxfer or one of its ancestors (the dump would
    freeze deltaxfer itself)."""
    if pid <= 0:
        raise NotStarted(f"{pid} is not a process ID")
    if pid == 1:
        raise NotStarted("pid 1 is this host's init: it cannot be migrated; give the PID of "
                         "the service (for a service in its own PID namespace, the host PID "
                         "of that namespace's init: docs/OPERATIONS.md, section 6)")
    if not procmem.exists(pid):
        raise NotStarted(f"process {pid} does not exist (check the PID: `ps -p {pid}`; "
                         "give the host PID of the process, as `ps` on this host shows it)")
    if pid in procmem.ancestors(os.getpid()):
        raise NotStarted(f"process {pid} is this `deltaxfer migrate` or one of its parents "
                         "(a shell?): its dump would freeze deltaxfer itself; give the PID "
                         "of the service")


@dataclass
class Report:
    pid: int
    to: str
    session: str
    outcome: str = "failed"
    error: str | None = None
    rounds: list = field(default_factory=list)
    stop_reason: str = ""
    predicted_downtime: float | None = None
    downtime: float | None = None
    freeze: dict = field(default_factory=dict)
    total_seconds: float = 0.0
    source_exit_seconds: float | None = None   # SIGKILL to the source tree's exit
    converge: dict = field(default_factory=dict)   # auto-converge: levels and time throttled
    cpu_seconds: float = 0.0
    wire_bytes_sent: int = 0
    destination_path: str | None = None
    restored_pid: int | None = None
    tracking: dict = field(default_factory=dict)
    container: dict = field(default_factory=dict)   # --runc: id, root, bundle (migrate_runc)
    dump_log: str | None = None      # where criu's dump.log was kept (None: not kept)
    hint: str | None = None          # what the operator does next, when it is not obvious

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def wait_seized(pid: int, stop: threading.Event, timeout: float,
                poll: float = 0.001) -> bool:
    """Whether every thread of the tree under pid was seen stopped under a tracer (CRIU's
    seizure) before ``stop`` was set or ``timeout`` s passed (run on a thread). A thread
    once seen so stays seized until CRIU lets go; CRIU's parasite runs in it meanwhile,
    not the program's own code."""
    seen: set[int] = set()
    deadline = time.monotonic() + timeout
    while not stop.is_set() and time.monotonic() < deadline:
        complete = True
        for t in process_tree(pid):
            for tid, traced in (procmem.threads_under_tracer(t.host_pid) or {}).items():
                if traced:
                    seen.add(tid)
                elif tid not in seen:
                    complete = False
        if complete and seen:
            return True
        time.sleep(poll)
    return False


def progress_line(r: dict) -> str:
    return (f"round {r['round']:>2}: {r['changed']:>8} pages changed of {r['pages']}, "
            f"{r['wire_bytes'] / 2**20:8.2f} MiB in {r['seconds']:.2f} s "
            f"({r['bandwidth_MBps']:.0f} MB/s), dirty {r['dirty_MBps']:.1f} MB/s, "
            f"predicted downtime {r['predicted_downtime'] * 1000:.0f} ms")


class Agent:
    """One migration: the connection, the rounds, and the final freeze."""

    def __init__(self, pid: int, host: str, port: int, key: bytes, criu: Criu, opts: Options):
        self.pid, self.host, self.port, self.key = pid, host, port, key
        self.criu, self.opts = criu, opts
        self.session = opts.session or f"migrate-{socket.gethostname()}-{pid}-{int(time.time())}"
        self.report = Report(pid, f"{host}:{port}", self.session)
        self.policy = Convergence(opts.downtime_target, opts.max_rounds,
                                  throttle_levels=THROTTLE_LEVELS
                                  if opts.converge in ("auto", "throttle") else ())
        self.throttle = Throttle()
        # the encoder threads; their window buffers live across rounds (no fresh memory
        # touched inside the freeze)
        self.pipeline = EncoderPool(opts.encoder_threads)
        # the session's sending side (sender.py): connection, what the destination holds,
        # round numbers, XOR caches; None until begin_session
        self.sender: SenderSession | None = None
        self.confirmed = False      # the destination runs the process (or holds the images)
        self.frozen_tasks = []
        self.final_result: asyncio.Future | None = None
        self.tracking: Tracking | None = None
        self.memory_bytes = 0              # of the tree, as the last live round read it
        self.freeze_mode = "lazy"          # see choose_freeze
        self.sink: PageSink | None = None  # the page sink of a page-server freeze
        self.source: PidRef | None = None  # the process to migrate, taken in run()
        self.frozen_refs: list[PidRef] = []  # the tree's tasks, taken when it was frozen
        self.pipe_size = pipes.PipeSizeRaise()   # fs.pipe-max-size for the dump (grow_pipes)
        self.cwd_locks: CwdLocks | None = None  # see criu/proclock.py; held while CRIU dumps
        self.postcopy = False              # this freeze ends in post-copy (choose_postcopy)
        self.postcopy_why = ""
        self.postcopy_task: asyncio.Task | None = None   # the pages after RESUMED
        self.postcopy_report: dict = {}
        self.frozen_run_ns: dict = {}     # the source's run time once criu let go (post-copy)
        self.seized_task: asyncio.Task | None = None   # the round while CRIU dumps
        self.post_dump_seen = threading.Event()        # stops waiting for the seizure

    def start_tracking(self) -> None:
        """Written-page tracking when asked for and the kernel can (else content hashing,
        and the report says why)."""
        mode = self.opts.tracking
        if mode == "off":
            self.report.tracking = {"mode": "hashing", "reason": "--tracking off"}
            return
        why = tracking_support()
        if why:
            if mode == "on":
                raise MigrationError(f"--tracking on: written-page tracking is not "
                                     f"available here: {why}")
            self.report.tracking = {"mode": "hashing", "reason": why}
            return
        self.tracking = Tracking()

    # -- live rounds -------------------------------------------------------------------------
    @property
    def held(self) -> dict:
        """What the destination holds of each image (after the last confirmed round)."""
        return self.sender.held if self.sender is not None else {}

    @property
    def resume_sent(self) -> bool:
        """RESUME went out: from then on the source must not resume by itself."""
        return self.sender is not None and self.sender.resume_sent

    async def tree_round(self, tasks, timeout: float | None = None):
        """One round of the tree as it is now: snapshot_tree on an encoder thread (scan,
        clean mask, protect), then the round sent -- within ``timeout`` s when given --
        and the snapshot's readers closed. Returns (SentRound, the snapshot)."""
        loop = asyncio.get_running_loop()
        snap = await loop.run_in_executor(self.pipeline.pool, snapshot_tree, tasks,
                                          self.tracking, self.held)
        try:
            rs = await self.unless_stalled(self.sender.round(snap.images, final=False),
                                           timeout)
        finally:
            snap.close()
        return rs, snap

    async def unless_stalled(self, coro, timeout: float | None):
        """Run a live round for as long as the link carries it: it is given up only when
        less than STALL_BYTES reached the destination in the last ``timeout`` s (one that
        stopped reading acknowledges nothing once its socket is full; a link crawling
        below STALL_BYTES per ``timeout``). Counted as the peer's TCP acknowledges them
        (transport.Connection.bytes_delivered), not as they are queued: a whole round can
        sit in the transport's and the socket's buffers. A slow link that keeps
        moving is not a failure: 8 GiB over 100 Mbit/s takes minutes for its first round,
        and an absolute deadline would have ended it."""
        if timeout is None:
            return await coro
        task = asyncio.ensure_future(coro)
        sent = lambda: self.sender.conn.bytes_delivered   # noqa: E731
        mark, t_mark = sent(), time.monotonic()
        start, t_start, t_said, said = mark, t_mark, t_mark, mark
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=min(1.0, timeout / 4))
                if done:
                    return task.result()
                now, b = time.monotonic(), sent()
                if self.opts.progress is not None and now - t_said >= PROGRESS_EVERY:
                    # a long round (a slow link, a big process) says how it goes
                    self.opts.progress(
                        f"round {self.sender.round_no:>2}: {(b - start) / 2**20:.0f} MiB "
                        f"delivered in {now - t_start:.0f} s, "
                        f"{(b - said) / (now - t_said) / 1e6:.1f} MB/s lately")
                    t_said, said = now, b
                if b - mark >= STALL_BYTES:
                    mark, t_mark = b, now
                elif now - t_mark >= timeout:
                    raise MigrationError(
                        f"live round {self.sender.round_no} stalled: {b - mark} bytes reached "
                        f"the destination in {now - t_mark:.1f} s (--round-timeout {timeout:g}: a "
                        "destination that stopped reading, or a link slowed to a crawl)")
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    def round_record(self, rs, snap, seconds: float, **more) -> dict:
        """A round of tree_round as the report lists it (``more``: the kind's own
        fields)."""
        c = rs.counts
        return {"round": self.sender.round_no, **more, "pages": rs.pages,
                "changed": c["changed"] + c["added"], "sent_full": c["sent_full"],
                "sent_xor": c["sent_xor"], "sent_zero": c["sent_zero"], "removed": rs.removed,
                "written_pages": snap.written_pages, "read_pages": snap.pages_read,
                "skipped": c["skipped"], "failed_pages": snap.pages_failed,
                "read_thread_seconds": round(rs.read_seconds, 6),
                # the sending loop's waits: for encoders, in send (link / destination)
                "encode_wait_seconds": round(rs.encode_wait_seconds, 6),
                "send_wait_seconds": round(rs.send_wait_seconds, 6),
                "wire_bytes": c["stored_bytes"], "read_seconds": round(snap.seconds, 6),
                "seconds": round(seconds, 6)}

    async def live_rounds(self) -> None:
        last_read = None
        while True:
            self.source.check()
            tasks = process_tree(self.pid)
            t_read = time.monotonic()
            rs, snap = await self.tree_round(tasks, self.opts.round_timeout)
            self.memory_bytes = snap.bytes_read
            c = rs.counts
            m = RoundMeasure(self.sender.round_no, rs.pages, c["changed"] + c["added"],
                             c["stored_bytes"], time.monotonic() - t_read, snap.seconds,
                             t_read - last_read if last_read else float("inf"))
            last_read = t_read
            d = self.policy.observe(m)
            if d.throttle and not d.stop:
                # auto-converge: slow the tree (its current tasks) one step more
                try:
                    self.throttle.set(d.throttle, [t.host_pid for t in tasks])
                except ThrottleError as e:
                    raise MigrationError(f"auto-converge: {e}") from None
            rec = self.round_record(rs, snap, m.seconds, live=True)
            rec.update({"bandwidth_MBps": (c["stored_bytes"]
                                           / max(m.seconds - snap.seconds, 1e-6) / 1e6),
                        "dirty_MBps": d.dirty_pages_per_s * PAGE_SIZE / 1e6,
                        "predicted_downtime": round(d.predicted_downtime, 6),
                        "decision": d.reason, "throttle": d.throttle})
            self.report.rounds.append(rec)
            if self.opts.progress:
                self.opts.progress(progress_line(rec))
            if d.stop:
                self.report.stop_reason = d.reason
                self.report.predicted_downtime = d.predicted_downtime
                return

    # -- the freeze ------------------------------------------------------------------------
    async def on_hook(self, reader, writer) -> None:
        """The action script's connection: pre-dump (freeze begins) or post-dump."""
        try:
            msg = json.loads(await reader.readline())
            action = msg.get("action")
            if action == "pre-dump":
                reply = {"ok": True}
                # CRIU freezes the tree as soon as the pre-dump script has returned
                self.t_freeze = time.monotonic()
                self.start_seized_round()
            elif action == "post-dump":
                self.t_post = time.monotonic()
                self.post_dump_seen.set()
                if self.cwd_locks is not None:
                    self.cwd_locks.release()   # CRIU's parasites are gone by now
                ok = await self.final_round_within_deadline()
                reply = {"ok": ok, "reason": self.report.error}
            else:
                reply = {"ok": True}
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        finally:
            writer.close()

    # -- overlap: a round while CRIU dumps ----------------------------------------------------
    def start_seized_round(self) -> None:
        """At pre-dump: the round that runs while CRIU dumps (seized_round), where it can
        help and cannot hurt."""
        why = ("--no-overlap-dump" if not self.opts.overlap_dump else
               "not a lazy freeze" if self.freeze_mode != "lazy" else
               "no written-page tracking" if self.tracking is None else
               "post-copy: the written pages follow the resume" if self.postcopy else
               "no session" if self.sender is None else "")
        if why:
            self.report.freeze["overlap"] = {"ran": False, "why": why}
            return
        self.seized_task = asyncio.get_running_loop().create_task(self.seized_round())

    async def seized_round(self) -> None:
        """Issue 17 (overlap): while CRIU dumps the frozen tree -- once it has seized every
        thread, each seen stopped under its tracer, from when on none runs its own code
        until CRIU lets go after post-dump -- one more live round (scan, protect, read,
        send), so that the final round at post-dump carries only what changed during the
        dump (CRIU's code page, the kernel's rseq updates while the parasite runs): the
        residual flows while CRIU works, on the other core. Correctness does not rest on
        the seizure being seen right: the final round still scans and reads every page
        written since this round's scan, as after any live round."""
        loop = asyncio.get_running_loop()
        ov = self.report.freeze["overlap"] = {"ran": False}
        seized = await loop.run_in_executor(None, wait_seized, self.pid, self.post_dump_seen,
                                            self.freeze_timeout)
        if not seized:
            ov["why"] = "CRIU's seizure of every thread was not seen before post-dump"
            return
        t0 = time.monotonic()
        ov["seized_after"] = round(t0 - self.t_freeze, 6)
        # bounded by the freeze deadline: post-dump awaits it inside final_round's
        rs, snap = await self.tree_round(process_tree(self.pid))
        # not live: the tree does not run during it (it is frozen, inside the freeze)
        rec = self.round_record(rs, snap, time.monotonic() - t0, live=False, seized=True)
        rec["decision"] = "while CRIU dumps (every thread seized)"
        self.report.rounds.append(rec)
        ov.update(ran=True, seconds=rec["seconds"], pages=rec["changed"],
                  wire_bytes=rec["wire_bytes"])

    async def join_seized_round(self) -> None:
        """Post-dump: the round sent while CRIU dumped must be complete before the final
        one (its failure is the final round's); how long it ran past the dump is
        recorded."""
        task, self.seized_task = self.seized_task, None
        if task is None:
            return
        t = time.monotonic()
        await task
        ov = self.report.freeze.get("overlap")
        if ov is not None and ov.get("ran"):
            ov["after_dump"] = round(time.monotonic() - t, 6)

    def take_frozen_refs(self) -> None:
        """pidfds for every task of the frozen tree (nothing in it can exit or fork while
        it is frozen): the final SIGKILL goes through them, never through bare PIDs."""
        self.source.check()
        for t in process_tree(self.pid):
            try:
                self.frozen_refs.append(PidRef(t.host_pid, "the task"))
            except ProcessChanged:
                pass   # killed by someone else inside the freeze: nothing to signal

    def signal_frozen_tree(self, sig: int) -> None:
        for ref in self.frozen_refs:
            ref.kill(sig)

    async def wait_source_gone(self) -> None:
        """After the final SIGKILL, wait until the source's tasks have exited: "migrated"
        means the source is gone, not dying. A killed process first frees its memory
        (~0.1-0.3 s per GiB here) and holds its PID and that memory until then; an
        operator or a script that looks right after `migrate` returns (or starts
        something that needs the memory) must not find it. The wait is bounded
        (SOURCE_EXIT_TIMEOUT); a task still there after it is named in the hint."""
        t = time.monotonic()
        left = await asyncio.get_running_loop().run_in_executor(
            None, wait_exited, self.frozen_refs, SOURCE_EXIT_TIMEOUT)
        self.report.source_exit_seconds = round(time.monotonic() - t, 6)
        if left:
            pids = " ".join(str(r.pid) for r in left)
            self.report.hint = (f"the source's task(s) {pids} were sent SIGKILL but had not "
                                f"exited {SOURCE_EXIT_TIMEOUT:.0f} s later (uninterruptible "
                                "sleep?); they cannot run again, check `ps -o stat,wchan`")

    async def begin_session(self) -> None:
        """Connect, name the tree's memory images, and learn what the destination holds.
        BEGIN says whether the destination is to restore: a server that cannot refuses
        the session there, before any round (docs/PROTOCOL.md). A container agent offers
        another capability and names its container (``connect_caps``, ``begin_fields``)."""
        conn = await connect(self.host, self.port, key=self.key, ssl=self.opts.ssl,
                             **self.connect_caps())
        self.sender = SenderSession(conn, self.session, pipeline=self.pipeline,
                                    xor=self.opts.xor, compress=self.opts.compress,
                                    cache_bytes=self.opts.cache_bytes)
        self.check_peer(conn)
        tasks = process_tree(self.pid)
        try:
            await self.sender.begin("migrate", self.source_label(),
                                    [f"pid-{t.ns_pid}" for t in tasks],
                                    restore=self.opts.restore, **self.begin_fields())
        except transport.PeerError as e:
            raise MigrationError(f"the destination {self.host}:{self.port} refused the "
                                 f"session: {e.reason}") from None

    def connect_caps(self) -> dict:
        return {}

    def check_peer(self, conn) -> None:
        """What the destination offered, before BEGIN (a process needs nothing more)."""

    def source_label(self) -> str:
        return f"{socket.gethostname()}:pid {self.pid}"

    def begin_fields(self) -> dict:
        return {}

    def choose_freeze(self) -> None:
        """lazy: `criu dump --lazy-pages`, the pages stay in the frozen tasks (the fast
        path); page-server: a plain `criu dump --page-server` into deltaxfer's page sink,
        which throws the tasks' pages away as they come (criu/sink.py) — for trees a lazy
        dump cannot hold under the open-files limit. auto: lazy when it fits."""
        fits, why = self.lazy_dump_check()
        mode = self.opts.freeze
        if mode == "auto":
            mode = "lazy" if fits else "page-server"
        elif mode == "lazy" and not fits:
            raise MigrationError(f"--freeze lazy: {why}; raise the limit (ulimit -Hn, "
                                 "LimitNOFILE=) or use --freeze page-server; nothing was frozen")
        self.freeze_mode = mode
        self.report.freeze["mode"] = mode if fits or mode != "page-server" else \
            f"{mode} ({why})"

    def lazy_dump_check(self) -> tuple[bool, str]:
        """Before a freeze: CRIU's page pipes let grow (grow_pipes), then whether a lazy
        dump of the tree fits the open-files limit (lazy_dump_fits, which may raise the
        limit: the report's freeze.nofile says so)."""
        self.grow_pipes()
        fits, why = lazy_dump_fits(self.memory_bytes)
        if fits and why:
            self.report.freeze["nofile"] = why
        return fits, why

    def grow_pipes(self) -> None:
        """Let CRIU's page pipes grow to their largest for the dump (criu/pipes.py):
        fewer pipes and open files, a shorter dump inside the freeze."""
        if self.opts.grow_pipes:
            self.note_pipes(self.pipe_size.raise_())

    def note_pipes(self, what: str) -> None:
        """What was done to fs.pipe-max-size, added to the report's freeze.pipes."""
        if what:
            had = self.report.freeze.get("pipes")
            self.report.freeze["pipes"] = f"{had}; {what}" if had else what

    def postcopy_unavailable(self) -> str:
        """Why this migration cannot end in post-copy ('' when it can)."""
        if not self.opts.restore:
            return "--no-restore: post-copy needs the destination to run the copy"
        if self.tracking is None:
            return ("no written-page tracking (" + self.report.tracking.get("reason", "off")
                    + "): without it every page is read inside the freeze anyway")
        if self.sender is None or not self.sender.state.get("postcopy"):
            return ("the destination does not take post-copy (it needs `deltaxfer serve "
                    "--restore` with deltaxfer's lazy-pages server, and a process, not a "
                    "container)")
        return ""

    def choose_postcopy(self) -> None:
        """After the live rounds: whether the freeze ends in post-copy. postcopy: always
        (checked possible before the rounds); auto: when the rounds stopped with the
        residual's transfer still over the downtime budget, every throttle level used
        (policy.over_budget), the predicted downtime over POSTCOPY_FACTOR x the target,
        and post-copy is possible."""
        mode = self.opts.converge
        predicted = self.report.predicted_downtime
        if mode == "postcopy":
            self.postcopy, self.postcopy_why = True, "--converge postcopy"
        elif mode == "auto" and self.policy.over_budget and predicted is not None \
                and predicted > POSTCOPY_FACTOR * self.opts.downtime_target:
            # only where sending the residual (not CRIU's fixed cost) breaks the target
            # with every throttle level used, and by far: post-copy's risk (the memory
            # split between the hosts until the last page arrived) and its brownout (a
            # fast writer waits on its pages at link speed) buy something only then
            why = self.postcopy_unavailable()
            if why:
                self.postcopy_why = f"post-copy not possible: {why}"
            else:
                self.postcopy = True
                self.postcopy_why = (f"predicted downtime {predicted * 1000:.0f} ms over the "
                                     f"target {self.opts.downtime_target * 1000:.0f} ms with "
                                     f"the throttle at {self.policy.throttle:.0%}")
        if self.postcopy and self.freeze_mode != "lazy":
            self.postcopy = False
            self.postcopy_why = "post-copy not possible: the freeze is not a lazy dump"

    def set_freeze_deadline(self, memory_bytes: int) -> None:
        self.freeze_timeout = self.opts.freeze_timeout or 15.0 + 2.0 * memory_bytes / 2**30

    async def final_round_within_deadline(self) -> bool:
        """The final round, bounded (the tree is frozen, whatever the link does). The
        verdict for the hook: True when the destination has the process — or when RESUME
        went out, because then the copy may run and the source must not resume."""
        try:
            async with asyncio.timeout(self.freeze_timeout):
                self.take_frozen_refs()
                await self.final_round()
            return True
        except TimeoutError:
            self.report.error = (f"final round timed out: not done within the freeze "
                                 f"deadline of {self.freeze_timeout:.0f} s (link stalled?)")
        except Exception as e:  # the hook reports it; CRIU resumes the tree
            self.report.error = f"final round failed: {type(e).__name__}: {e}"
        if self.resume_sent:
            # the destination may already run its copy: resuming the source could make two;
            # leave it stopped (--leave-stopped) for the operator
            self.report.error += "; RESUME was sent but not confirmed: the source is left stopped"
            return True
        return False

    async def final_round(self) -> None:
        loop = asyncio.get_running_loop()
        f = self.report.freeze
        f["dump"] = round(self.t_post - self.t_freeze, 6)
        await self.join_seized_round()
        t = time.monotonic()
        dump = DumpDir.open(self.dump_dir)
        tasks = self.frozen_tasks = process_tree(self.pid)
        if self.sink is not None:
            # a dump to the page sink: its pagemaps are written once CRIU closed the stream
            # (before post-dump); they say which pages the tasks hold
            await loop.run_in_executor(None, self.sink.wait, 30.0)
            f["sink"] = dict(self.sink.stats)
        # the dump's other files first: the destination starts its restore's lazy-pages
        # daemon once inventory.img is in, while the final round still arrives
        t_files = time.monotonic()
        await self.sender.files(self.dump_dir, dump.verbatim_files())
        f["files"] = round(time.monotonic() - t_files, 6)
        t = time.monotonic()
        pending = {} if self.postcopy else None
        images, opened, from_memory = await loop.run_in_executor(
            self.pipeline.pool, frozen_images, dump, tasks, self.tracking,
            self.held, self.sink is not None, pending)
        f["read_memory"] = round(time.monotonic() - t, 6)
        f["read_bytes"] = from_memory
        push = None
        try:
            t = time.monotonic()
            rs = await self.sender.round(images, final=True)
            f["residual"] = round(time.monotonic() - t, 6)
            f["read_thread_seconds"] = round(rs.read_seconds, 6)
            c = rs.counts
            self.report.rounds.append({
                "round": self.sender.round_no, "live": False, "pages": rs.pages,
                "changed": c["changed"] + c["added"], "sent_full": c["sent_full"],
                "sent_xor": c["sent_xor"], "sent_zero": c["sent_zero"], "removed": rs.removed,
                "read_pages": from_memory // PAGE_SIZE, "skipped": c["skipped"],
                "wire_bytes": c["stored_bytes"], "seconds": round(rs.seconds, 6),
                "send_seconds": round(rs.send_seconds, 6)})
            if self.postcopy and not pending:
                self.postcopy_why += ("; nothing the destination holds was written since "
                                      "the last round: no page to follow the resume")
            if pending:
                # post-copy: the written pages left out of the round follow the resume
                from deltaxfer.postcopy import PostcopyPush
                push = PostcopyPush(self.sender.conn, pending,
                                    {img.image_id: i for i, img in enumerate(images)},
                                    compress=self.opts.compress, pool=self.pipeline.pool,
                                    held=self.held if self.opts.xor else None,
                                    caches=self.sender.caches)
                await push.send_pending()
                f["postcopy_pages"] = push.pages
            t = time.monotonic()
            if push is None:
                done = await self.sender.commit(self.opts.restore)
            else:
                await self.sender.send_commit(self.opts.restore, push.pages)
                # the pages flow from here, while the destination restores
                # the deadline of a round, plus a second per MB pending (a link that
                # moves less than 1 MB/s is taken for stalled)
                push.start(self.opts.round_timeout + push.pages * PAGE_SIZE / 1e6)
                self.postcopy_task = push.task
                done = await push.committed
            f["commit_restore"] = round(time.monotonic() - t, 6)
            self.report.destination_path = done["path"]
            if done["restored_pid"] is not None:
                # The copy exists, stopped. From RESUME on, the source must never resume
                # by itself: the dump leaves it stopped (--leave-stopped) and it is
                # killed only when the destination confirms that its copy runs.
                t = time.monotonic()
                await self.sender.resume(RESUMED_TIMEOUT, push)
                f["resume"] = round(time.monotonic() - t, 6)
                self.report.restored_pid = done["restored_pid"]
            self.confirmed = True
            self.t_running = time.monotonic()
            self.report.downtime = round(self.t_running - self.t_freeze, 6)
        except BaseException:
            if push is not None and push.task is not None and not self.confirmed:
                push.cancel()          # the source resumes (or is left stopped): no pages
            raise
        finally:
            for m in opened:
                m.close()

    async def wait_dump(self, proc, close_lazy=None) -> tuple[int | None, object]:
        """Wait for the dumping process (criu, or runc driving it) at most the freeze
        deadline + CRIU_MARGIN; with ``close_lazy`` (called with ``timeout`` and
        ``cancelled``), end the lazy dump's page server once post-dump is done, recording
        its status. Returns (exit status, None), or (None, what kill_hung_criu returned)
        for a dump that hung past the deadline."""
        loop = asyncio.get_running_loop()
        stop = threading.Event()
        criu_limit = self.freeze_timeout + CRIU_MARGIN
        deadline = loop.time() + criu_limit
        waiter = loop.create_task(proc.wait())
        try:
            if close_lazy is not None:
                closer = loop.run_in_executor(None, functools.partial(
                    close_lazy, timeout=criu_limit, cancelled=stop.is_set))
                done, _ = await asyncio.wait({waiter, closer}, timeout=criu_limit,
                                             return_when=asyncio.FIRST_COMPLETED)
                if closer in done:
                    try:
                        self.report.freeze["lazy_close_status"] = closer.result()
                    except (OSError, TimeoutError) as e:
                        self.report.freeze["lazy_close_status"] = f"{type(e).__name__}: {e}"
            try:
                return await asyncio.wait_for(asyncio.shield(waiter),
                                              max(deadline - loop.time(), 0.0)), None
            except TimeoutError:
                return None, await self.kill_hung_criu(proc, criu_limit)
        finally:
            stop.set()

    def write_hook_wrapper(self) -> str:
        """The action script CRIU execs (the path as is: no shell, no arguments): the
        compiled one (deltaxfer/_hook_agent, ext/hook/hook_agent.c: ~1 ms inside the
        freeze) when the build made it, else a wrapper that runs the agent-mode hook
        (hook_agent.py: standard library only, `python -I -S`, ~20 ms of interpreter
        start) with this Python. Both hand over to the full hook the same way."""
        here = os.path.dirname(os.path.abspath(__file__))
        compiled = os.path.join(here, "_hook_agent")
        if os.access(compiled, os.X_OK):
            return compiled
        hook = os.path.join(self.work, "deltaxfer-hook")
        script = os.path.join(here, "hook_agent.py")
        with open(hook, "w") as f:
            f.write(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -I -S "
                    f"{shlex.quote(script)}\n")
        os.chmod(hook, 0o700)
        return hook

    async def freeze_and_push(self) -> int:
        self.dump_dir = os.path.join(self.work, "dump")
        os.makedirs(self.dump_dir, mode=0o700)
        sock_path = os.path.join(self.work, "agent.sock")
        server = await asyncio.start_unix_server(self.on_hook, sock_path)
        lazy = self.freeze_mode == "lazy"
        self.set_freeze_deadline(self.memory_bytes)
        env = dict(os.environ, **{AGENT_ENV: sock_path,
                                  TIMEOUT_ENV: str(self.freeze_timeout + 15.0),
                                  PYTHON_ENV: sys.executable})
        hook = self.write_hook_wrapper()
        # CRIU's page server runs over a socketpair (--ps-socket), not a TCP port that
        # another local user could bind first or connect to first
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        if not lazy:
            self.sink = PageSink(self.dump_dir, self.criu.version, ours)
        args = [self.criu.path] + dump_args(
            self.pid, self.dump_dir, leave="stopped", action_script=hook,
            ps_socket=theirs.fileno(), lazy=lazy, page_server=not lazy,
            config=self.opts.criu_config, user_opts=self.opts.criu_opts,
            verbosity=self.opts.criu_verbosity)
        self.source.check()
        # dumps of tasks in their own pid namespace that share a working directory wait
        # for each other (CRIU makes proc.crtools there): before the freeze, not in it
        self.cwd_locks = CwdLocks(cwd_keys(self.pid))
        try:
            await self.cwd_locks.acquire()
        except CwdLockTimeout as e:
            theirs.close()
            ours.close()
            server.close()
            raise MigrationError(str(e)) from None
        if self.cwd_locks.waited > 0.001:
            self.report.freeze["cwd_lock_wait"] = round(self.cwd_locks.waited, 6)
        try:
            proc = await asyncio.create_subprocess_exec(
                *args, env=env, pass_fds=(theirs.fileno(),), stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        finally:
            theirs.close()   # criu holds the only copy: our end sees criu go away
        self.report.freeze["criu_argv"] = args[1:]
        try:
            # after the post-dump hook, CRIU serves lazy pages on the socket: end it
            rc, hung = await self.wait_dump(proc, functools.partial(
                close_lazy_dump, ours, self.criu.version) if lazy else None)
            if rc is None:
                return hung
            self.report.freeze["criu_exit"] = rc
            self.criu_stderr = (await proc.stderr.read()).decode(errors="replace").strip()
            if rc != 0 and not self.report.error:
                log = os.path.join(self.dump_dir, 'dump.log')
                self.report.error = (f"criu dump failed (exit {rc}): "
                                     f"{log_errors(log) or self.criu_stderr}")
                self.report.hint = left_behind_hint(self.pid, log_errors(log, limit=50))
            return rc
        finally:
            self.post_dump_seen.set()          # a seizure no longer to wait for
            task, self.seized_task = self.seized_task, None
            if task is not None:               # the dump failed before post-dump
                if task.done() and not task.cancelled():
                    task.exception()           # the dump's failure is the one reported
                task.cancel()
            self.cwd_locks.release()
            server.close()
            if self.sink is not None:
                self.sink.close()
            else:
                ours.close()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()

    @property
    def postcopy_pending(self) -> bool:
        """Pages the running copy lacks are still to be read from the frozen source."""
        return self.postcopy_task is not None and not self.postcopy_task.done()

    async def note_source_stopped(self) -> None:
        """Once criu let go of the source (its tasks take the SIGSTOP of --leave-stopped,
        which costs them a little run time): each task's run time, while a post-copy
        still reads them. From here a task runs only if something continues it."""
        if not self.postcopy_pending:
            return
        deadline = time.monotonic() + 2.0
        for r in self.frozen_refs:
            while procmem.state(r.pid) not in ("T", "t", None) and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
        self.frozen_run_ns = {r.pid: procmem.run_ns(r.pid) for r in self.frozen_refs}

    def check_still_frozen(self) -> None:
        """After a post-copy: a source task that ran meanwhile (something sent it SIGCONT:
        CRIU leaves it only SIGSTOPped) may have changed pages after they were read, so
        the copy's memory may mix two moments. Nothing can undo that now: say so."""
        ran = [pid for pid, before in self.frozen_run_ns.items()
               if before is not None and (now := procmem.run_ns(pid)) is not None
               and now > before]
        if ran:
            self.postcopy_report["source_ran"] = ran
            self.report.hint = (f"the source's task(s) {' '.join(map(str, ran))} ran during "
                                "the post-copy (continued by something else than deltaxfer): "
                                "pages read after that may be newer than the others in the "
                                "copy; check the service on the destination")

    async def finish_postcopy(self) -> bool:
        """Wait for the post-copy (if any); False (and the report says why) when it
        failed: the destination then kills its copy, and the source stays stopped."""
        if self.postcopy_task is None:
            return True
        try:
            await self.note_source_stopped()
            self.postcopy_report = await self.postcopy_task
            self.check_still_frozen()
            return True
        except (Exception, asyncio.CancelledError) as e:
            what = str(e) if isinstance(e, transport.PeerError) else f"{type(e).__name__}: {e}"
            self.report.error = f"post-copy failed: {what}"
            return False

    def frozen_pids(self) -> str:
        """The source tree's pids, for the operator's `kill -CONT` (or the root's)."""
        return " ".join(str(r.pid) for r in self.frozen_refs) or str(self.pid)

    def stored_hint(self) -> str:
        pids = self.frozen_pids()
        return (f"on the destination, restore the images when you want the process there: "
                f"`criu restore -D {self.report.destination_path} --shell-job -d` (plus the "
                f"restore options the process needs, e.g. --ext-unix-sk); or resume the source "
                f"here instead: `kill -CONT {pids}`. Never both: then the process would run "
                "twice")

    def keep_dump_log(self) -> None:
        """criu's dump.log (and what the hook and criu wrote on stderr) is in the work
        directory, removed on exit: copy it to --log-dir / beside --report, mode 0600, and
        name it in the report's error."""
        src = os.path.join(self.work, "dump", "dump.log")
        path = self.opts.log_path or (os.path.join(self.opts.log_dir, f"{self.session}.dump.log")
                                      if self.opts.log_dir else None)
        if not os.path.exists(src):
            return          # criu never ran: nothing to keep
        if path is None:
            if self.report.error:
                self.report.error += ("; criu's dump.log was not kept (give --log-dir DIR or "
                                      "--report FILE to keep it)")
            return
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as out, open(src, "rb") as f:
                shutil.copyfileobj(f, out)
                stderr = getattr(self, "criu_stderr", "")
                if stderr:
                    out.write(b"\n--- criu's stderr (deltaxfer-hook's messages) ---\n"
                              + stderr.encode() + b"\n")
            self.report.dump_log = path
        except OSError as e:
            note = f"criu's dump.log could not be kept at {path}: {e.strerror or e}"
            self.report.error = f"{self.report.error}; {note}" if self.report.error else None
            return
        if self.report.error:
            self.report.error = self.report.error.replace(src, path)
            if path not in self.report.error:
                self.report.error += f"; criu's log: {path}"

    async def kill_hung_criu(self, proc, limit: float) -> int:
        """criu ran past the freeze deadline + margin (blocked on its page-server socket,
        its hook, a task): kill it. The tree is what matters. Confirmed: the destination
        runs the process, so the source is killed first. RESUME sent but not confirmed:
        the source is stopped first (SIGSTOP, a group stop the tasks keep when criu's
        ptrace lets go), left for the operator. Otherwise: criu's ptrace lets go and the
        tree runs on — the rollback."""
        if self.confirmed and not self.postcopy_pending:
            self.signal_frozen_tree(signal.SIGKILL)
        elif self.resume_sent:
            self.signal_frozen_tree(signal.SIGSTOP)
        proc.kill()
        rc = await proc.wait()
        self.report.freeze["criu_exit"] = rc
        self.report.freeze["criu_killed"] = (f"criu did not finish within {limit:.0f} s (the "
                                             "freeze deadline + margin): killed")
        if not self.confirmed:
            hung = (f"criu dump hung: not finished within {limit:.0f} s (the freeze deadline "
                    f"{self.freeze_timeout:.0f} s + {CRIU_MARGIN:.0f} s); killed it, see "
                    f"{os.path.join(self.dump_dir, 'dump.log')}")
            self.report.error = f"{self.report.error}; {hung}" if self.report.error else hung
        return 0 if self.confirmed else rc

    async def run(self) -> Report:
        t0, cpu0 = time.monotonic(), time.process_time()
        self.work = tempfile.mkdtemp(prefix="deltaxfer-migrate-", dir=self.opts.work_dir)
        os.chmod(self.work, 0o700)
        try:
            # fail fast, in this order, before anything touches the process: the PID, the
            # destination (reachable, same key, restores if asked), then tracking is armed
            # (by the first live round)
            check_pid(self.pid)
            self.source = PidRef(self.pid, "the process to migrate")
            self.start_tracking()
            await self.begin_session()
            why = self.postcopy_unavailable() if self.opts.converge == "postcopy" else ""
            if why:
                raise MigrationError(f"--converge postcopy: {why}; "
                                     "nothing was frozen")
            await self.live_rounds()
            # the freeze must find every task running: a task stopped by the duty cycle
            # would be dumped, and restored, stopped
            self.throttle.release()
            self.choose_freeze()
            self.choose_postcopy()
            rc = await self.freeze_and_push()
            if rc == 0 and self.confirmed and not self.opts.restore \
                    and not self.opts.kill_source:
                # --no-restore: the destination holds the images; the source stays stopped
                # (--leave-stopped) until the operator restores them or resumes it
                self.report.outcome = ("stored: the destination holds the images; the "
                                       "source is left stopped")
                self.report.hint = self.stored_hint()
                await self.sender.goodbye()
            elif rc == 0 and self.confirmed and not await self.finish_postcopy():
                # the copy ran without some of its pages and could not get them: the
                # destination kills it; the source, whose memory is whole but which the
                # copy ran ahead of, stays stopped for the operator
                pids = self.frozen_pids()
                self.report.outcome = ("post-copy failed: the destination's copy is killed; "
                                       "the source is left stopped")
                self.report.hint = (f"the copy ran for a while before it was killed; if "
                                    f"nothing it did matters, resume the source from the "
                                    f"freeze with `kill -CONT {pids}`, else kill it")
            elif rc == 0 and self.confirmed:
                # the destination runs the process (or, --no-restore --kill-source, holds
                # its images): end the (stopped) source, through the pidfds taken while
                # it was frozen (never a reused PID)
                self.signal_frozen_tree(signal.SIGKILL)
                self.report.outcome = ("migrated" if self.opts.restore else
                                       "stored: the destination holds the images; the "
                                       "source was killed (--kill-source)")
                await self.sender.goodbye()
                await self.wait_source_gone()
            elif rc == 0 and self.resume_sent:
                self.report.outcome = ("uncertain: the destination may be running the process; "
                                       f"the source (pid {self.pid}) is left stopped: kill it "
                                       "if the destination runs it, else resume it with SIGCONT")
            else:
                self.report.outcome = "rolled back: the source runs on"
                if not self.report.error:
                    self.report.error = "the final round did not complete"
        except NotStarted as e:
            self.report.error = str(e)
            self.report.outcome = "not started: nothing was done"
        except (LiveError, MigrationError, transport.TransportError, OSError, ValueError) as e:
            self.report.error = (str(e) if type(e) is MigrationError
                                 else f"{type(e).__name__}: {e}")
            if isinstance(e, ProcessChanged):
                source_alive = False
            elif self.source is not None:
                source_alive = not self.source.exited()
            else:
                source_alive = procmem.exists(self.pid) and _alive(self.pid)
            if not source_alive:
                self.report.outcome = "aborted: the source process exited"
            elif "dump" not in self.report.freeze:
                self.report.outcome = "aborted before the freeze: the source runs on"
            else:
                self.report.outcome = "rolled back: the source runs on"
            if self.sender is not None and not isinstance(e, transport.TransportError):
                try:   # tell the destination why, so that its log says so too
                    async with asyncio.timeout(2):
                        await self.sender.error("internal", f"the source gave up: {e}")
                except (TimeoutError, transport.TransportError, OSError):
                    pass
        finally:
            if self.postcopy_task is not None and not self.postcopy_task.done():
                self.postcopy_task.cancel()
            if self.sender is not None:
                self.report.wire_bytes_sent = self.sender.wire_stats["bytes_out"]
                self.sender.close()
            self.throttle.release()     # on every exit path (the guardian also on our death)
            self.note_pipes(self.pipe_size.release())
            self.report.converge = {"mode": self.opts.converge, **self.throttle.summary()}
            if self.postcopy_why:
                self.report.converge["postcopy_reason"] = self.postcopy_why
            if self.postcopy_task is not None:
                self.report.converge["postcopy"] = self.postcopy_report or {
                    "pages": self.report.freeze.get("postcopy_pages"), "completed": False}
            self.pipeline.close()
            if self.tracking is not None:
                # releases the write-protection: the source (if it runs on) is as before
                self.tracking.close()
                self.report.tracking = self.tracking.summary()
            for ref in self.frozen_refs + [self.source]:
                if ref is not None:
                    ref.close()
            self.keep_dump_log()
            shutil.rmtree(self.work, ignore_errors=True)
            self.report.total_seconds = round(time.monotonic() - t0, 6)
            self.report.cpu_seconds = round(time.process_time() - cpu0, 6)
        return self.report


async def migrate(pid: int, host: str, port: int, key: bytes, criu: Criu,
                  opts: Options | None = None) -> Report:
    return await Agent(pid, host, port, key, criu, opts or Options()).run()


# -- the action script on its own (a plain `criu dump --action-script deltaxfer-hook`) -------

def run_standalone_hook(action: str, config: dict, env) -> int:
    """pre-dump: live rounds until converged, the tree running; post-dump (tasks frozen,
    images written): the residual against what the destination holds, the images, and
    the two-step restore. Each is its own process: they meet in the destination's
    session (named by `session`, default hook-HOST-PID). Exit 0 at post-dump only when
    the destination has the process; otherwise CRIU resumes the tasks."""
    from deltaxfer.criu.runner import find_criu
    from deltaxfer.keys import ConfigError, load_key, parse_hostport
    from deltaxfer.settings import BY_NAME, options_from

    init_pid = int(env.get("CRTOOLS_INIT_PID", "0") or 0)
    try:
        # the settings: the same table and checks as `deltaxfer migrate`'s flags
        opts = options_from({k: v for k, v in config.items() if k in BY_NAME},
                            config.get("_sources"),
                            session_default=f"hook-{socket.gethostname()}-{init_pid}",
                            progress=lambda line: print(f"deltaxfer hook: {line}",
                                                        file=sys.stderr), for_hook=True)
        if opts.converge == "postcopy":
            # the hook's process ends when post-dump returns: nothing would be left to
            # send the pages that follow the resume
            raise ConfigError("converge=postcopy needs `deltaxfer migrate` (its agent stays "
                              "up after the resume); the stand-alone hook cannot")
        host, port = parse_hostport(config["to"], what="to")
        key = load_key(config.get("key_file", ""))
        criu = find_criu(config.get("criu"))
    except (ConfigError, OSError, RuntimeError) as e:
        print(f"deltaxfer hook: {action}: {e}", file=sys.stderr)
        return 1 if action == "post-dump" else 0
    agent = Agent(init_pid, host, port, key, criu, opts)
    try:
        ok = transport.run(_standalone(agent, action, env.get("CRTOOLS_IMAGE_DIR", "")))
    except Exception as e:
        print(f"deltaxfer hook: {action} failed: {type(e).__name__}: {e}", file=sys.stderr)
        ok = False
    finally:
        agent.pipeline.close()
    if opts.report:     # two processes: pre-dump's rounds beside post-dump's report
        path = opts.report + (".pre-dump" if action == "pre-dump" else "")
        try:
            with open(path, "w") as f:
                json.dump(agent.report.as_dict(), f, indent=2)
        except OSError as e:
            print(f"deltaxfer hook: {action}: cannot write the report {path}: {e}",
                  file=sys.stderr)
    if action == "post-dump" and not ok:
        print(f"deltaxfer hook: post-dump failed: {agent.report.error}; criu resumes the "
              "tasks", file=sys.stderr)
        return 1
    return 0


async def _standalone(agent: "Agent", action: str, image_dir: str) -> bool:
    try:
        agent.source = PidRef(agent.pid, "the process to migrate")
        await agent.begin_session()
        if action == "pre-dump":
            await agent.live_rounds()
            await agent.sender.goodbye()
            # CRIU dumps next: its page pipes at their largest (criu/pipes.py). This
            # process ends here; the post-dump hook puts the host's value back.
            agent.grow_pipes()
            return True
        agent.note_pipes(agent.pipe_size.release(held_elsewhere=agent.opts.grow_pipes))
        agent.dump_dir = os.path.realpath(image_dir)
        agent.t_freeze = agent.t_post = time.monotonic()
        agent.set_freeze_deadline(sum(len(h.vaddrs) for h in agent.held.values()) * PAGE_SIZE)
        ok = await agent.final_round_within_deadline()
        if ok and agent.confirmed:
            await agent.sender.goodbye()
        return ok
    finally:
        if agent.sender is not None:
            agent.sender.close()
