"""The migration methods the benchmark compares, each moving one fresh workload from the
link's source host to its destination host and returning what it measured.

Every method returns ``downtime_s``, ``total_s``, ``wire_bytes`` (+ ``wire_bytes_fwd``),
``cpu_src_s``, ``cpu_dst_s`` (with ``cpu_restored_s``, the restored tree's own CPU when
its restore returned: CRIU's restorer works inside it), ``rounds`` and ``verified`` (the
restored copy checked its own memory / answered correctly), plus its own breakdown. A method that did not move the
workload, or whose restored copy fails its check, raises: a failure fails the run.

* ``deltaxfer`` (and ``dx-noxor``, ``dx-nolz4``, ``dx-notrack``: the same with
  ``--no-xor`` / ``--no-lz4`` / ``--tracking off``; the other ``dx-*`` in DX_FLAGS):
  ``python -m deltaxfer serve --listen DEST:0 --key-file K --dir D --restore`` in the
  destination namespace (started before the clock), ``python -m deltaxfer migrate PID
  --to DEST:PORT --key-file K --report R`` in the source namespace. Downtime is the
  report's ``downtime`` (the pre-dump hook, just before CRIU freezes the tree -> the
  destination's copy runs); total is the command's wall time (start -> exit). Rounds: the
  report's live rounds + the final one.
* ``rsync`` (the seed's scheme): ``criu dump -t PID -D SRC --leave-stopped --shell-job``,
  ``rsync -a --stats SRC/ rsync://DEST:PORT/dx/`` to an rsync daemon in the destination
  namespace (started before the clock), ``criu restore -D DST -d --shell-job``.
* ``page-server`` (CRIU's disk-less migration): ``criu page-server -D DST --port P`` in
  the destination namespace (started and ready before the clock), ``criu dump
  --page-server --address DEST --port P --leave-stopped`` (pages go straight to the
  page-server), the remaining images (every file but logs) as ``tar | socket``, restore.
* ``tar-lz4``: ``criu dump`` to a directory, then ``tar -c | lz4 -1 | socket`` into
  ``socket | lz4 -d | tar -x`` in the destination namespace (the socket ends are a
  small Python relay, listening before the clock), restore.

For the CRIU baselines a plain dump freezes the tree at its start, so downtime = dump
start -> ``criu restore -d`` returned (the restored tree runs), and total time is the same
interval (the listeners started before the clock, as deltaxfer's serve). The frozen
original is killed afterwards.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from migration_lab import (link_counters, link_delta, run_measured, tree_cpu, wait_gone,
                           wait_measured)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import workloads  # noqa: E402
from servers import ServeProcess  # noqa: E402
from deltaxfer.core import procmem  # noqa: E402
from deltaxfer.criu.pipes import PipeSizeRaise  # noqa: E402

METHODS = ("deltaxfer", "dx-noxor", "dx-nolz4", "dx-noconverge", "dx-criulazy", "dx-notrack",
           "dx-pagesink", "dx-nooverlap", "dx-noearly", "dx-apply1", "dx-apply8", "dx-throttle",
           "dx-postcopy", "dx-keep", "rsync",
           "page-server", "tar-lz4", "lazy-floor", "lazy-floor-4m", "memory-floor")
BASELINES = ("rsync", "page-server", "tar-lz4", "lazy-floor", "lazy-floor-4m")


class MethodFailed(AssertionError):
    pass


class Ctx:
    """What every method needs: the link, a scratch directory, the key, the criu."""

    def __init__(self, link, tmp: Path, key_file: str, criu, ports):
        self.link, self.tmp, self.key_file, self.criu, self.ports = \
            link, tmp, key_file, criu, ports

    def src(self, argv):
        return self.link.source.command(argv)

    def dst(self, argv):
        return self.link.dest.command(argv)


def log_tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def app_pause(res: dict) -> float | None:
    """The longest pause the workload's own (real-time) clock saw: memwork only."""
    return res["maxgap_us"] / 1e6 if "maxgap_us" in res else None


def check_restored(wl, restored: int, method: str) -> dict:
    wl.adopt(restored)
    res = wl.verify(pid=restored, timeout=600)
    if not res["ok"]:
        raise MethodFailed(f"{method}: the restored process {restored} failed its check: "
                           f"{res.get('line', res)}")
    return res



# -- deltaxfer --------------------------------------------------------------------------------

DX_FLAGS = {"deltaxfer": [], "dx-noxor": ["--no-xor"], "dx-nolz4": ["--no-lz4"],
            "dx-noconverge": ["--converge", "off"], "dx-criulazy": [],
            "dx-throttle": ["--converge", "throttle"], "dx-postcopy": ["--converge", "postcopy"],
            # content hashing instead of written-page tracking: CRIU's dump of a process
            # without userfaultfd write-protection, inside deltaxfer's freeze
            "dx-notrack": ["--tracking", "off"],
            # the freeze a tree too large for a lazy dump's open files gets (a plain dump
            # whose pages deltaxfer's sink throws away), forced at any size
            "dx-pagesink": ["--freeze", "page-server"],
            # no round while CRIU dumps: the final round only after the dump
            "dx-nooverlap": ["--no-overlap-dump"], "dx-noearly": [], "dx-apply1": [],
            "dx-apply8": [], "dx-keep": []}
# serve's own flags per method: dx-criulazy restores through `criu lazy-pages` instead of
# deltaxfer's lazy-pages server (the A/B of the restore's brownout)
# dx-noearly starts the copy's `criu restore` at the commit (criu/early.py's A/B)
DX_SERVE_FLAGS = {"dx-criulazy": ["--lazy-pages-server", "criu"],
                  "dx-noearly": ["--no-early-restore"],
                  # the receiver's frames applied by the session's one worker, in order
                  "dx-apply1": ["--apply-threads", "1"],
                  # eight apply threads whatever the cores (what a 16-core destination
                  # runs): their memory, measurable on a small machine
                  "dx-apply8": ["--apply-threads", "8"],
                  # the session keeps the copy's memory images once it runs: no page
                  # cache given back while the lazy-pages server places the pages
                  "dx-keep": ["--keep-pages"]}


def _first_round(r: dict) -> dict:
    secs = r["seconds"]
    return {"pages": r["pages"], "seconds": secs, "wire_bytes": r["wire_bytes"],
            "memory_GBps": round(r["pages"] * 4096 / secs / 1e9, 3) if secs else None,
            "wire_GBps": round(r["wire_bytes"] / secs / 1e9, 3) if secs else None,
            "read_thread_seconds": r.get("read_thread_seconds"),
            # where the source's sending loop waited: encoders, or send (link/destination)
            "encode_wait_seconds": r.get("encode_wait_seconds"),
            "send_wait_seconds": r.get("send_wait_seconds")}


def run_deltaxfer(ctx: Ctx, wl, tag: str, method: str) -> dict:
    server = ServeProcess(ctx.tmp / f"serve-{tag}", ctx.key_file, host=ctx.link.dest.addr,
                          prefix=ctx.dst([]),
                          extra=["--restore", *DX_SERVE_FLAGS.get(method, [])])
    try:
        report_path = ctx.tmp / f"report-{tag}.json"
        err_path = ctx.tmp / f"migrate-{tag}.err"
        # a normal full pass over the workload's memory (its own check reads every page),
        # to compare the first pass after the move with: the brownout of a lazy restore
        t = time.monotonic()
        normal = wl.verify(timeout=600)
        normal_pass = time.monotonic() - t
        if not normal.get("ok"):
            raise MethodFailed(f"{method}: the workload failed its check before the move")
        if wl.kind == "scanwork":       # its own passes: three clean ones (after the check)
            scan_before = wait_passes(wl, after=time.time(), count=3)
        cpu_dst0 = tree_cpu(server.proc.pid)
        before = link_counters(ctx.link)
        with open(err_path, "wb") as err:
            done = run_measured(ctx.src(
                [sys.executable, "-m", "deltaxfer", "migrate", str(wl.pid),
                 "--to", f"{server.host}:{server.port}", "--key-file", ctx.key_file,
                 "--report", str(report_path), *DX_FLAGS[method]]), stderr=err)
        wire = link_delta(before, link_counters(ctx.link))
        if not report_path.exists():
            raise MethodFailed(f"{method}: no report (exit {done.returncode}): "
                               f"{log_tail(err_path)}\nserve: {server.log()[-2000:]}")
        report = json.loads(report_path.read_text())
        if report["outcome"] != "migrated":
            raise MethodFailed(f"{method}: {report['outcome']}: {report.get('error')}\n"
                               f"{log_tail(err_path)}\nserve: {server.log()[-2000:]}")
        restored = report["restored_pid"]
        cpu_restored = restored_cpu(restored)
        scan = None
        if wl.kind == "scanwork":       # before the check, which would slow a pass
            wl.adopt(restored)
            scan = scan_brownout(wl, scan_before, downtime=report["downtime"])
        t = time.monotonic()
        res = check_restored(wl, restored, method)
        first_pass = time.monotonic() - t
        lazy = lazy_done(report.get("destination_path")) or {}
        placed = lazy.get("seconds_to_placed")
        # after the check, which faulted every page in: the lazy-pages daemon's work counts
        cpu_dst = tree_cpu(server.proc.pid, exclude=[restored]) - cpu_dst0 + cpu_restored
        rss = {"migrate": round(done.maxrss_mib, 1),
               "serve": workloads.peak_rss_mib(server.proc.pid)}
        if not wait_gone(wl.pid):
            raise MethodFailed(f"{method}: the source {wl.pid} is still there")
        rounds = report["rounds"]
        t, trace = 0.0, []
        for r in rounds:
            t += r["seconds"]
            trace.append({"t": round(t, 4), "wire_bytes": r["wire_bytes"],
                          "changed": r["changed"], "live": bool(r.get("live"))})
        return {
            "downtime_s": report["downtime"], "total_s": done.wall_s,
            "report_total_s": report["total_seconds"], **wire,
            "cpu_src_s": done.cpu_s, "cpu_dst_s": cpu_dst, "cpu_restored_s": cpu_restored,
            # pages whose page cache deltaxfer's lazy-pages server gave back as it placed
            # them (serve without --keep-pages; None with criu's daemon)
            "lazy_recycled_pages": lazy.get("pages_recycled"),
            # peak RSS, MiB: `deltaxfer migrate` (or the largest child it waited for:
            # its criu), the receiving `serve` (its lazy-pages server not counted)
            "peak_rss_mib": rss,
            "rounds": len(rounds), "verified": res["ok"], "app_pause_s": app_pause(res),
            "stream_bytes": report["wire_bytes_sent"],
            "tracking": report.get("tracking", {}).get("mode"),
            "predicted_downtime_s": report["predicted_downtime"],
            "stop_reason": report["stop_reason"],
            "converge": report.get("converge"),
            # the first full pass over memory after the resume (pages still arriving
            # through the lazy restore) against one before the move
            "brownout": {"normal_pass_s": round(normal_pass, 4),
                         "first_pass_s": round(first_pass, 4),
                         # deltaxfer's lazy-pages server: from the restore's end until
                         # every page was in place (None with criu's daemon)
                         "all_resident_s": placed,
                         "ratio": round(first_pass / normal_pass, 3) if normal_pass else None,
                         # scanwork: its own passes (scan_brownout)
                         "scan": scan},
            "freeze": {k: v for k, v in report["freeze"].items() if isinstance(v, float)},
            # the round sent while CRIU dumped (migrate.Agent.seized_round): ran or why not
            "overlap": report["freeze"].get("overlap"),
            "round_trace": trace,
            # the first round (all of memory): process memory it covered per second
            "first_round": _first_round(rounds[0]),
        }
    finally:
        server.stop()


def wait_passes(wl, *, after: float, count: int, timeout: float = 300) -> list[dict]:
    """scanwork: wait until `count` passes that started after wall-clock time `after`
    are logged; returns them."""
    deadline = time.monotonic() + timeout
    while True:
        got = [p for p in workloads.scan_passes(wl) if p["start"] >= after]
        if len(got) >= count:
            return got[:count]
        if time.monotonic() > deadline:
            raise MethodFailed(f"scanwork: {len(got)} of {count} passes in {timeout} s")
        time.sleep(0.05)


def scan_brownout(wl, before: list[dict], *, downtime: float) -> dict:
    """scanwork's passes around a move: the pass during which it was frozen (the one
    holding a stretch of at least half the migration's `downtime` without running; that
    stretch, at most `downtime`, subtracted) and the first pass after it, each against the median of the
    clean passes before the move. Waits for both."""
    normal = sorted(p["seconds"] for p in before)[len(before) // 2]
    deadline = time.monotonic() + 300
    while True:
        passes = [p for p in workloads.scan_passes(wl) if p["end"] > before[-1]["end"]]
        frozen = next((p for p in passes if p["maxgap"] >= downtime / 2), None)
        after = [p for p in passes if frozen and p["start"] >= frozen["end"]]
        if after:
            break
        if time.monotonic() > deadline:
            raise MethodFailed(f"scanwork: no pass after the move logged: {passes}")
        time.sleep(0.05)
    # the freeze as the workload saw it, but no more than the migration's own downtime:
    # a stall right after the resume (a fault waiting) is brownout, not freeze
    freeze = min(frozen["maxgap"], downtime)
    spanning = frozen["seconds"] - freeze
    return {"normal_pass_s": round(normal, 4), "frozen_s": round(freeze, 4),
            "spanning_pass_s": round(spanning, 4), "spanning_ratio": round(spanning / normal, 3),
            "next_pass_s": round(after[0]["seconds"], 4),
            "next_ratio": round(after[0]["seconds"] / normal, 3)}


def lazy_done(images_dir) -> dict | None:
    """deltaxfer's lazy-pages server's statistics, its log's last line (it writes it when
    done: waits up to 30 s for it); None with criu's daemon."""
    from deltaxfer import lazyserve

    if not images_dir:
        return None
    log = Path(images_dir) / "lazy-pages.log"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        stats = lazyserve.done_stats(images_dir)
        if stats is not None:
            return stats
        try:
            if "restore finished:" not in log.read_text(errors="replace"):
                return None          # criu's daemon's log: no such line
        except OSError:
            return None
        time.sleep(0.05)
    return None


# -- the CRIU baselines -----------------------------------------------------------------------

# One end of a byte pipe over TCP: `recv HOST PORT READYFILE` listens, then copies the one
# connection to stdout; `send HOST PORT` copies stdin to a connection.
RELAY = r"""
import os, socket, sys
mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
buf = bytearray(1 << 20)
if mode == "recv":
    ls = socket.create_server((host, port))
    open(sys.argv[4], "w").close()
    conn, _ = ls.accept()
    out = sys.stdout.buffer
    while (n := conn.recv_into(buf)):
        out.write(memoryview(buf)[:n])
    out.flush()
else:
    s = socket.create_connection((host, port))
    fd = sys.stdin.buffer.fileno()
    while (n := os.readv(fd, [buf])):
        s.sendall(memoryview(buf)[:n])
    s.shutdown(socket.SHUT_WR)
"""


def _relay(mode: str, host: str, port: int, *extra: str) -> str:
    import shlex

    return " ".join(shlex.quote(x) for x in
                    (sys.executable, "-c", RELAY, mode, host, str(port), *extra))


def _wait_file(path: Path, proc: subprocess.Popen, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise MethodFailed(f"{what} did not start (exit {proc.poll()})")
        time.sleep(0.01)


class ImagePipe:
    """`tar -c SRC [| lz4 -1] | socket` -> `socket [| lz4 -d] | tar -x -C DST`: the
    receiving end is started (listening) by the constructor, before the clock."""

    def __init__(self, ctx: Ctx, src: Path, dst: Path, *, lz4: bool, exclude=("*.log",)):
        self.ctx, self.src, self.lz4 = ctx, src, lz4
        self.exclude = [f"--exclude={x}" for x in exclude]
        port = next(ctx.ports)
        self.addr = (ctx.link.dest.addr, port)
        ready = ctx.tmp / f"relay-{port}.ready"
        unz = "lz4 -d -c |" if lz4 else ""
        self.err = open(ctx.tmp / f"relay-{port}.err", "wb")
        self.t0 = time.monotonic()
        self.recv = subprocess.Popen(ctx.dst(
            ["bash", "-c", f"set -o pipefail; {_relay('recv', *self.addr, str(ready))} | "
                           f"{unz} tar -x -f - -C {dst}"]),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self.err)
        _wait_file(ready, self.recv, "the image receiver")

    def send(self):
        """(sender Done, receiver Done): both ends have finished."""
        z = "lz4 -1 -c |" if self.lz4 else ""
        sent = run_measured(self.ctx.src(
            ["bash", "-c", f"set -o pipefail; tar -c -f - -C {self.src} "
                           f"{' '.join(self.exclude)} . | {z} {_relay('send', *self.addr)}"]),
            stderr=self.err)
        got = wait_measured(self.recv, self.t0, timeout=900)
        if sent.returncode or got.returncode:
            self.err.flush()
            raise MethodFailed(f"image pipe: sender exit {sent.returncode}, receiver exit "
                               f"{got.returncode}: {log_tail(Path(self.err.name))}")
        return sent, got

    def close(self):
        if self.recv.poll() is None:
            self.recv.kill()
            self.recv.wait()
        self.err.close()


def criu_dump(ctx: Ctx, pid: int, directory: Path, *extra: str):
    from deltaxfer.criu.runner import log_errors

    done = run_measured(ctx.src([ctx.criu.path, "dump", "-t", str(pid), "-D", str(directory),
                                 "--leave-stopped", "--shell-job", "-o", "dump.log",
                                 *extra]))
    if done.returncode:
        raise MethodFailed(f"criu dump: {log_errors(str(directory / 'dump.log'))}")
    return done


def criu_restore(ctx: Ctx, directory: Path):
    from deltaxfer.criu.runner import log_errors

    pidfile = directory / "restored.pid"
    done = run_measured(ctx.dst([ctx.criu.path, "restore", "-D", str(directory), "-d",
                                 "--shell-job", "--pidfile", str(pidfile),
                                 "-o", "restore.log"]))
    if done.returncode:
        raise MethodFailed(f"criu restore: {log_errors(str(directory / 'restore.log'))}")
    restored = int(pidfile.read_text().strip())
    # CRIU's restorer fills the copy's memory inside the restored task itself (its pages
    # read into fresh anonymous memory): part of the restore's cost, though not criu's
    done.restored_cpu_s = restored_cpu(restored)
    done.cpu_s += done.restored_cpu_s
    return done, restored


def restored_cpu(restored: int) -> float:
    """CPU seconds the restored tree has used so far, sampled the moment its restore
    returned (before its check): what restoring it cost inside the restored tasks (CRIU's
    restorer runs there, and its CPU is not criu's), plus the few ms it has run since."""
    return tree_cpu(restored)


def _finish(ctx: Ctx, wl, method, t0, before, restore, restored, cpu_src, cpu_dst,
            **breakdown) -> dict:
    wire = link_delta(before, link_counters(ctx.link))
    res = check_restored(wl, restored, method)
    state = workloads.proc_state(wl.pid)
    if state not in ("T", "t"):
        raise MethodFailed(f"{method}: the source is {state}, not stopped by the dump")
    return {"downtime_s": restore.t_end - t0, "total_s": restore.t_end - t0, **wire,
            "cpu_src_s": cpu_src, "cpu_dst_s": cpu_dst,
            "cpu_restored_s": restore.restored_cpu_s, "rounds": 1, "verified": res["ok"],
            "app_pause_s": app_pause(res),
            **breakdown}


def _pipe_then_restore(ctx: Ctx, wl, method, t0, before, dump, pipe: ImagePipe, dst: Path,
                       image_dir: Path, cpu_dst: float = 0.0) -> dict:
    """After the dump: the image pipe, then the restore; `cpu_dst` adds what the
    destination already spent (the page-server)."""
    t_copy = time.monotonic()
    sent, got = pipe.send()
    copy_s = time.monotonic() - t_copy
    restore, restored = criu_restore(ctx, dst)
    return _finish(ctx, wl, method, t0, before, restore, restored, dump.cpu_s + sent.cpu_s,
                   cpu_dst + got.cpu_s + restore.cpu_s, dump_s=dump.wall_s, copy_s=copy_s,
                   restore_s=restore.wall_s, image_bytes=_dir_bytes(image_dir))


RSYNCD_CONF = """use chroot = no
[dx]
path = {path}
read only = false
uid = root
gid = root
"""


def run_rsync(ctx: Ctx, wl, tag: str, method: str = "rsync") -> dict:
    src, dst = ctx.tmp / f"src-{tag}", ctx.tmp / f"dst-{tag}"
    src.mkdir()
    dst.mkdir()
    conf = ctx.tmp / f"rsyncd-{tag}.conf"
    conf.write_text(RSYNCD_CONF.format(path=dst))
    port = next(ctx.ports)
    url = f"rsync://{ctx.link.dest.addr}:{port}/dx/"
    daemon = subprocess.Popen(ctx.dst(["rsync", "--daemon", "--no-detach", "--config",
                                       str(conf), "--address", ctx.link.dest.addr,
                                       "--port", str(port)]),
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while subprocess.run(ctx.src(["rsync", url]), capture_output=True).returncode:
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise MethodFailed(f"rsync daemon did not start (exit {daemon.poll()})")
            time.sleep(0.05)
        cpu_d0 = tree_cpu(daemon.pid)
        before = link_counters(ctx.link)
        t0 = time.monotonic()
        dump = criu_dump(ctx, wl.pid, src)
        stats = ctx.tmp / f"rsync-{tag}.out"
        with open(stats, "wb") as out:
            copy = run_measured(ctx.src(["rsync", "-a", "--stats", "--exclude=*.log",
                                         f"{src}/", url]), stdout=out, stderr=out)
        if copy.returncode:
            raise MethodFailed(f"rsync exit {copy.returncode}: {log_tail(stats)}")
        restore, restored = criu_restore(ctx, dst)
        time.sleep(0.05)    # let the daemon reap its connection's child
        cpu_d = tree_cpu(daemon.pid) - cpu_d0
        return _finish(ctx, wl, method, t0, before, restore, restored,
                       dump.cpu_s + copy.cpu_s, cpu_d + restore.cpu_s,
                       dump_s=dump.wall_s, copy_s=copy.wall_s, restore_s=restore.wall_s,
                       image_bytes=_dir_bytes(src))
    finally:
        if daemon.poll() is None:
            daemon.terminate()
            daemon.wait()
        shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(dst, ignore_errors=True)


def run_tar_lz4(ctx: Ctx, wl, tag: str, method: str = "tar-lz4") -> dict:
    src, dst = ctx.tmp / f"src-{tag}", ctx.tmp / f"dst-{tag}"
    src.mkdir()
    dst.mkdir()
    pipe = ImagePipe(ctx, src, dst, lz4=True)
    try:
        before = link_counters(ctx.link)
        t0 = time.monotonic()
        dump = criu_dump(ctx, wl.pid, src)
        return _pipe_then_restore(ctx, wl, method, t0, before, dump, pipe, dst, src)
    finally:
        pipe.close()
        shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(dst, ignore_errors=True)


def run_page_server(ctx: Ctx, wl, tag: str, method: str = "page-server") -> dict:
    from deltaxfer.criu.runner import log_errors
    import select

    src, dst = ctx.tmp / f"src-{tag}", ctx.tmp / f"dst-{tag}"
    src.mkdir()
    dst.mkdir()
    ps = pipe = None
    try:
        port = next(ctx.ports)
        rfd, wfd = os.pipe()
        try:
            t_ps = time.monotonic()
            ps = subprocess.Popen(ctx.dst(
                [ctx.criu.path, "page-server", "-D", str(dst), "--port", str(port),
                 "--address", ctx.link.dest.addr, "--status-fd", str(wfd),
                 "-o", "page-server.log"]),
                pass_fds=[wfd], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL)
            os.close(wfd)
            wfd = -1
            r, _, _ = select.select([rfd], [], [], 30)
            if not (r and os.read(rfd, 1) == b"\0"):
                raise MethodFailed(f"criu page-server not ready: "
                                   f"{log_tail(dst / 'page-server.log')}")
        finally:
            os.close(rfd)
            if wfd >= 0:
                os.close(wfd)
        pipe = ImagePipe(ctx, src, dst, lz4=False)
        before = link_counters(ctx.link)
        t0 = time.monotonic()
        dump = criu_dump(ctx, wl.pid, src, "--page-server", "--address",
                         ctx.link.dest.addr, "--port", str(port))
        served = wait_measured(ps, t_ps, timeout=300)
        if served.returncode:
            raise MethodFailed(f"criu page-server exit {served.returncode}: "
                               f"{log_errors(str(dst / 'page-server.log'))}")
        return _pipe_then_restore(ctx, wl, method, t0, before, dump, pipe, dst, dst,
                                  cpu_dst=served.cpu_s)
    finally:
        if pipe is not None:
            pipe.close()
        if ps is not None and ps.poll() is None:
            ps.kill()
            ps.wait()
        shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(dst, ignore_errors=True)


TIMING_SCRIPT = """#!/bin/sh
echo "$CRTOOLS_SCRIPT_ACTION $(date +%s.%N)" >> "{out}"
"""


def _actions(path: Path) -> dict[str, float]:
    out = {}
    if path.exists():
        for line in path.read_text().splitlines():
            action, _, t = line.partition(" ")
            out.setdefault(action, float(t))
    return out


def run_lazy_floor(ctx: Ctx, wl, tag: str, method: str = "lazy-floor") -> dict:
    """CRIU's floor under deltaxfer's freeze (issue 17), in two measured halves of the
    same workload, because CRIU's own lazy migration cannot run here (its page server's
    tee(2) of the page pipes fails with EPERM on this kernel: "Lazy pages transfer
    FAILED"):

    * ``freeze_dump_s``: ``criu dump --lazy-pages`` with an action script that only
      records the time: pre-dump (CRIU freezes right after it) -> post-dump, i.e. what
      deltaxfer's freeze starts with before it does anything. With --leave-running the
      tree runs on; the dump, then waiting for a lazy-pages client, is killed.
    * ``restore_s``: a plain dump of the same workload, its images piped across, then
      ``criu lazy-pages`` + ``criu restore --lazy-pages`` from them: restore start ->
      the restored tree runs (its pages are then served on demand by the local daemon),
      what deltaxfer's commit ends with.

    ``downtime_s`` = the sum: the least a lazy CRIU migration can freeze here."""
    from deltaxfer.criu.runner import log_errors

    lazy_dir, src, dst = (ctx.tmp / f"{d}-{tag}" for d in ("lazy", "src", "dst"))
    for d in (lazy_dir, src, dst):
        d.mkdir()
    times = ctx.tmp / f"actions-{tag}.txt"
    script = ctx.tmp / f"action-{tag}.sh"
    script.write_text(TIMING_SCRIPT.format(out=times))
    script.chmod(0o700)
    lazy = pipe = lazy_dump = None
    raised = PipeSizeRaise()     # lazy-floor-4m: CRIU's pipes at their largest, as deltaxfer's
    try:
        if method == "lazy-floor-4m":
            raised.raise_(needed=True)
        t_ld = time.monotonic()
        lazy_dump = subprocess.Popen(ctx.src(
            [ctx.criu.path, "dump", "-t", str(wl.pid), "-D", str(lazy_dir), "--lazy-pages",
             "--address", ctx.link.source.addr, "--port", str(next(ctx.ports)),
             "--shell-job", "--leave-running", "--action-script", str(script),
             "-o", "dump.log"]),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while "post-dump" not in _actions(times):
            if lazy_dump.poll() is not None or time.monotonic() > deadline:
                raise MethodFailed(f"criu dump --lazy-pages (exit {lazy_dump.poll()}) did "
                                   f"not reach post-dump: "
                                   f"{log_errors(str(lazy_dir / 'dump.log'))}")
            time.sleep(0.002)
        lazy_dump.kill()
        lazy_done = wait_measured(lazy_dump, t_ld, timeout=30)
        raised.release()
        acts = _actions(times)
        freeze_dump_s = acts["post-dump"] - acts["pre-dump"]
        time.sleep(0.2)
        if workloads.proc_state(wl.pid) in ("T", "t", None):
            raise MethodFailed("the workload did not run on after the lazy dump")
        pipe = ImagePipe(ctx, src, dst, lz4=False)
        before = link_counters(ctx.link)
        dump = criu_dump(ctx, wl.pid, src)
        sent, got = pipe.send()
        t_lazy = time.monotonic()
        lazy = subprocess.Popen(ctx.dst(
            [ctx.criu.path, "lazy-pages", "-D", str(dst), "-o", "lazy-pages.log"]),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        sock, deadline = dst / "lazy-pages.socket", time.monotonic() + 30
        while not sock.exists():
            if lazy.poll() is not None or time.monotonic() > deadline:
                raise MethodFailed(f"criu lazy-pages (exit {lazy.poll()}): "
                                   f"{log_errors(str(dst / 'lazy-pages.log'))}")
            time.sleep(0.002)
        pidfile = dst / "restored.pid"
        restore = run_measured(ctx.dst([ctx.criu.path, "restore", "-D", str(dst), "-d",
                                        "--shell-job", "--lazy-pages", "--pidfile",
                                        str(pidfile), "-o", "restore.log"]))
        if restore.returncode:
            raise MethodFailed(f"criu restore --lazy-pages: "
                               f"{log_errors(str(dst / 'restore.log'))}; lazy-pages: "
                               f"{log_errors(str(dst / 'lazy-pages.log'))}")
        restored = int(pidfile.read_text().strip())
        cpu_restored = restored_cpu(restored)
        res = check_restored(wl, restored, method)     # faults every page in
        served = wait_measured(lazy, t_lazy, timeout=300)
        wire = link_delta(before, link_counters(ctx.link))
        return {"downtime_s": freeze_dump_s + restore.wall_s,
                "total_s": freeze_dump_s + restore.wall_s, **wire,
                "cpu_src_s": lazy_done.cpu_s,
                "cpu_dst_s": served.cpu_s + restore.cpu_s + cpu_restored,
                "cpu_restored_s": cpu_restored,
                "rounds": 1, "verified": res["ok"], "app_pause_s": None,
                "freeze_dump_s": freeze_dump_s, "restore_s": restore.wall_s,
                "plain_dump_s": dump.wall_s, "lazy_rc": served.returncode,
                "image_bytes": _dir_bytes(src)}
    finally:
        raised.release()
        if pipe is not None:
            pipe.close()
        for p in (lazy, lazy_dump):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        for d in (lazy_dir, src, dst):
            shutil.rmtree(d, ignore_errors=True)


def run_memory_floor(ctx: Ctx, wl, tag: str, method: str = "memory-floor") -> dict:
    """Not a migration: the destination's memory floor for the workload's size
    (bench/memory_floor.py in the destination's namespace: its pages written into a new
    file's page cache, the same amount of fresh anonymous memory filled), while the
    workload runs on the source as it does for the methods (the size: its resident
    memory). ``cpu_dst_s`` is the floor's CPU; time fields are its wall time; nothing
    crosses the link."""
    rss_kib = int(procmem.status(wl.pid)["VmRSS"].split()[0])
    mib = -(-rss_kib // 1024)
    d = ctx.tmp / f"floor-{tag}"
    d.mkdir()
    out = ctx.tmp / f"floor-{tag}.json"
    try:
        with open(out, "wb") as f:
            done = run_measured(ctx.dst([sys.executable, str(Path(__file__).with_name(
                "memory_floor.py")), "--mib", str(mib), "--dir", str(d)]), stdout=f)
        if done.returncode:
            raise MethodFailed(f"memory_floor.py exit {done.returncode}")
        r = json.loads(out.read_text())
        return {"downtime_s": done.wall_s, "total_s": done.wall_s, "wire_bytes": 0,
                "cpu_src_s": 0.0, "cpu_dst_s": done.cpu_s, "rounds": 0, "verified": None,
                "app_pause_s": None, **r}
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.iterdir() if p.is_file() and p.suffix == ".img")


RUNNERS = {"deltaxfer": run_deltaxfer, "dx-noxor": run_deltaxfer, "dx-nolz4": run_deltaxfer,
           "dx-noconverge": run_deltaxfer, "dx-criulazy": run_deltaxfer,
           "dx-notrack": run_deltaxfer, "dx-pagesink": run_deltaxfer,
           "dx-nooverlap": run_deltaxfer, "dx-noearly": run_deltaxfer,
           "dx-apply1": run_deltaxfer, "dx-apply8": run_deltaxfer, "dx-keep": run_deltaxfer,
           "dx-throttle": run_deltaxfer, "dx-postcopy": run_deltaxfer,
           "rsync": run_rsync, "page-server": run_page_server, "tar-lz4": run_tar_lz4,
           "lazy-floor": run_lazy_floor, "lazy-floor-4m": run_lazy_floor,
           "memory-floor": run_memory_floor}


def migrate(method: str, ctx: Ctx, spec, tag: str) -> dict:
    """A fresh workload of `spec`, moved by `method`, checked on the destination; killed
    (original and copy) afterwards."""
    wl = spec.start(ctx.link, ctx.tmp)
    try:
        return RUNNERS[method](ctx, wl, tag, method)
    finally:
        wl.kill()
