"""deltaxfer's lazy-pages daemon: serves the page faults of a `criu restore --lazy-pages`
in place of `criu lazy-pages`, and copies every other page in the background.

    python -m deltaxfer.lazyserve lazy-pages -D IMAGES_DIR [--workers N] [--parent PID]

It speaks the restore's side of CRIU's lazy-pages protocol (criu/uffd.c): it listens on
``lazy-pages.socket`` in the images directory (the restore connects to that name in its
working directory, which is the images directory); the restore sends, for every task it
restores, the task's pid in the images (a 4-byte int; negative for a zombie, which has no
memory) and then that task's userfaultfd (SCM_RIGHTS, one dummy byte); once every task is
restored it sends the 4-byte mark 0x52535446 ("ReSTore Finished") and the tasks run.

Where `criu lazy-pages` serves a fault with one page read from the pages file into a
buffer and copied in, resetting its background transfer to 64 KiB at every fault, this
daemon (ext/c/lazy.c) copies straight from the mapped pages file: a faulted page and up
to --fault-pages after it at once, and everything else on --workers threads in
--chunk-pages batches from the moment the restore finishes. It follows the tree's forks
(a child is served its own copy), mremaps, munmaps and madvise(DONTNEED)s as criu's
daemon does. It exits once every page of every task is in place (or its task exited);
before a restore connects it exits with the --parent process (the receiver that started
it), so a killed `serve` leaves none behind; once it serves a restored tree it finishes
that work, whatever happens to its parent: the tree's memory is only complete once it has.

Post-copy (docs/ARCHITECTURE.md "Post-copy of the residual"): when the receiver restores a tree whose
last written pages are still on the frozen source, it leaves ``postcopy-pending-PID.bin``
(the pages' vaddrs, sorted u64) beside the images and connects to ``postcopy.socket``
before the restore starts (the restore itself may touch such a page: the kernel writes a
thread's rseq area when the restorer registers it). Those pages are placed by no fault
and no worker: a fault on one sends a request (int32 pid, uint32 pages, uint64 first
page's index in the pages file) back over that socket, and the receiver's records say
what arrived (pages that arrive before their task was handed over are placed when it
is):

    (pid > 0, n, p)    the pages file of image pid holds pages [p, p+n) now: place them
    (-1, 0, pid)       the restored tree's root (-2, 0, start: its start time)
    (0, 0, 0)          every pending page arrived; answered with (-3, faults that
                       waited on a page, ns waited in all) and (-4, 0, longest wait ns)

The socket closing before that record means the pages can never come (the source or the
receiver was lost): the restored tree, which cannot run without them, is killed; before
the receiver named it (the restore still running), this daemon exits, so that the
restore, which may be waiting on one of those pages, ends, and the receiver kills what
it restored.

Its log (-o, default lazy-pages.log in the images directory) ends with one JSON line of
statistics: pages placed by faults and by the workers, the time from the restore's end
to the last page.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import signal
import sys
import threading
import time
from array import array

from deltaxfer import PAGE_SIZE
from deltaxfer.criu import images as im
from deltaxfer.criu.dumpdir import DumpDir

SOCKET_NAME = "lazy-pages.socket"
POSTCOPY_SOCKET = "postcopy.socket"
PENDING_FILE = "postcopy-pending-{pid}.bin"
POSTCOPY_RECORD = struct.Struct("<iIQ")
RESTORE_FINISHED = 0x52535446
_INT = struct.Struct("<i")


class LazyPagesError(RuntimeError):
    pass


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            return buf
        buf += chunk
    return buf


def task_layout(pid: int):
    """(pages id, vaddrs, nr_pages, flags, vma starts, vma ends) of image pid ``pid``,
    read from the images in the working directory (its pages are in pages-ID.img)."""
    from array import array

    path = f"pagemap-{pid}.img"
    got = im.read_pagemap_arrays(path)
    if got is None:
        pm = im.read_pagemap(path)
        pages_id = pm.pages_id
        v = array("Q", (e.vaddr for e in pm.entries))
        n = array("Q", (e.nr_pages for e in pm.entries))
        f = array("Q", (e.flags for e in pm.entries))
    else:
        pages_id, v, n, f = got
    vmas = sorted(DumpDir(".").vmas(pid), key=lambda x: x.start)
    starts = array("Q", (x.start for x in vmas))
    ends = array("Q", (x.end for x in vmas))
    return pages_id, v, n, f, starts, ends


def page_hashes_name(pages_id: int) -> str:
    """The file the receiver's commit puts beside pages-ID.img in the images directory:
    the XXH3-64 of each of its pages, in file order (array('Q') as the store writes it,
    native byte order: the same machine reads it). Not a CRIU image: CRIU never opens
    it."""
    return f"dx-hashes-{int(pages_id)}.bin"


def page_hashes(pages_id: int, npages: int):
    """The receiver's hash of every page of pages-ID.img, from the file the commit put
    beside it (page_hashes_name), as array('Q'); None without one, or with one of
    another length (the server then reads each page to find the zeros)."""
    try:
        with open(page_hashes_name(pages_id), "rb") as f:
            raw = f.read(npages * 8 + 1)
    except OSError:
        return None
    if len(raw) != npages * 8:
        return None
    out = array("Q")
    out.frombytes(raw)
    return out


def add_task(server, pid: int, uffd: int) -> None:
    """Hand task ``pid``'s userfaultfd to the server."""
    try:
        pages_id, v, n, f, vs, ve = task_layout(pid)
    except BaseException:
        os.close(uffd)
        raise
    pending = read_pending(pid)
    pages = f"pages-{pages_id}.img"
    fd = _open_pages(pages) if os.path.exists(pages) else -1
    try:
        size = os.fstat(fd).st_size if fd >= 0 else 0
        server.add(uffd, pid, fd, size, v, n, f, vs, ve, pending,
                   page_hashes(pages_id, size // PAGE_SIZE))
    finally:
        if fd >= 0:
            os.close(fd)


def _open_pages(path: str) -> int:
    """The pages file, open for writing where it can be (recycling punches it: see
    Recycler), else read-only."""
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except PermissionError:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)


class Recycler:
    """SIGUSR1 from the receiver: the migration is committed (the restored copy runs,
    the source is gone) and the session no longer offers these pages files as a copy
    of the process: from now on the server punches every 2 MiB block whose pages are
    all placed out of its file, so that the page cache it held is free memory for the
    pages placed next (LazyServer.recycle). Asked before the server exists, it applies
    once there is one."""

    def __init__(self):
        self.asked = False
        self.server = None
        self.done = False
        signal.signal(signal.SIGUSR1, self._on_signal)

    def _on_signal(self, _sig, _frame) -> None:
        self.asked = True
        self.apply()

    def attach(self, server) -> None:
        self.server = server
        self.apply()

    def apply(self) -> None:
        if self.asked and self.server is not None and not self.done:
            self.done = True
            self.server.recycle()


def read_pending(pid: int) -> array | None:
    """The post-copy pending vaddrs of image pid (None: none)."""
    try:
        with open(PENDING_FILE.format(pid=pid), "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    if len(data) % 8:
        raise LazyPagesError(f"{PENDING_FILE.format(pid=pid)}: a partial entry")
    out = array("Q")
    out.frombytes(data)
    if sys.byteorder != "little":
        out.byteswap()
    return out


class PostcopyRelay(threading.Thread):
    """The receiver's post-copy connection: arrivals in, fault requests out (the
    server writes those itself, on the same socket)."""

    def __init__(self, say):
        super().__init__(name="dx-postcopy", daemon=True)
        self.say = say
        self.server = None                 # set before the thread starts
        self.lock = threading.Lock()       # arrivals vs handing a task over
        self.early: dict[int, list] = {}   # arrivals for tasks not handed over yet
        self.stop = threading.Event()
        self.ended = False                 # the end record came
        self.connected = False
        self.root = self.start_time = None
        self.arrivals = 0
        self.ls = _listen(POSTCOPY_SOCKET, backlog=1)
        self.ls.settimeout(0.2)

    def run(self) -> None:
        try:
            conn = None
            while not self.stop.is_set():
                try:
                    conn, _ = self.ls.accept()
                    break
                except (TimeoutError, socket.timeout):
                    continue
            if conn is None:
                return
            self.connected = True
            self.server.set_request_fd(conn.fileno())
            try:
                self._serve(conn)
            finally:
                self.server.set_request_fd(-1)
                conn.close()
        except Exception as e:       # logged; the main thread finds the relay over
            self.say(f"Error (deltaxfer lazyserve): post-copy relay: {type(e).__name__}: {e}")
            self._lost()

    def _serve(self, conn) -> None:
        size = POSTCOPY_RECORD.size
        buf = b""
        while True:
            chunk = conn.recv(64 * size)
            if not chunk:
                if not self.ended:
                    self._lost()
                return
            buf += chunk
            k = len(buf) - len(buf) % size
            for pid, n, value in POSTCOPY_RECORD.iter_unpack(buf[:k]):
                if pid > 0:
                    with self.lock:
                        try:
                            self.server.arrived(pid, value, n)
                        except ValueError:   # its task is not handed over yet
                            self.early.setdefault(pid, []).append((value, n))
                    self.arrivals += n
                elif pid == 0:
                    self.ended = True
                    self.say(f"post-copy: every pending page arrived ({self.arrivals})")
                    # how long the copy's faults waited on pages (QEMU's "blocktime"):
                    # every pending page is placed by now (dx_lazy_arrived places it)
                    self.server.set_request_fd(-1)
                    st = self.server.stats()
                    conn.sendall(POSTCOPY_RECORD.pack(-3, st["fault_waits"],
                                                      round(st["fault_wait_s"] * 1e9))
                                 + POSTCOPY_RECORD.pack(-4, 0,
                                                        round(st["fault_wait_max_s"] * 1e9)))
                elif pid == -1:
                    self.root = value
                elif pid == -2:
                    self.start_time = value
            buf = buf[k:]

    def _lost(self) -> None:
        """The pending pages can never come: the restored tree cannot run correctly
        without them (its threads wait on them forever): kill it, and end this daemon --
        nothing is left to serve, and nothing else would end it (its workers wait on the
        pending pages, and a killed task's userfaultfd says nothing; before 2026-11-30
        such daemons stayed, one per failed post-copy)."""
        if self.ended:
            return
        from deltaxfer.pidref import signal_tree
        if self.root:
            n = signal_tree(int(self.root), signal.SIGKILL, self.start_time)
            self.say(f"Error (deltaxfer lazyserve): the post-copy connection closed before "
                     f"every pending page arrived: killed the restored tree {self.root} "
                     f"({n} tasks); exiting")
        else:
            # the restore may be waiting on a pending page: end it (the receiver kills
            # whatever it restored, still stopped)
            self.say("Error (deltaxfer lazyserve): the post-copy connection closed before "
                     "every pending page arrived, during the restore: exiting")
        _unlink_socket(POSTCOPY_SOCKET)
        os._exit(1)

    def add_task(self, server, pid: int, uffd: int) -> None:
        """add_task, then the pages of that image that arrived before it."""
        with self.lock:
            add_task(server, pid, uffd)
            for first, n in self.early.pop(pid, ()):
                server.arrived(pid, first, n)

    def close(self) -> None:
        self.stop.set()
        self.ls.close()
        _unlink_socket(POSTCOPY_SOCKET)


def done_stats(images_dir) -> dict | None:
    """The statistics a finished server wrote as its log's last line (``done {...}``);
    None while it has not (or for `criu lazy-pages`' log)."""
    try:
        with open(os.path.join(images_dir, "lazy-pages.log"), errors="replace") as f:
            for line in f:
                if " done {" in line:
                    return json.loads(line.split(" done ", 1)[1])
    except (OSError, ValueError):
        pass
    return None


def _listen(name: str = SOCKET_NAME, backlog: int = 1) -> socket.socket:
    _unlink_socket(name)
    ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o077)          # only root (the restore, the receiver) may connect
    try:
        ls.bind(name)
    finally:
        os.umask(old)
    ls.listen(backlog)
    return ls


def _unlink_socket(name: str = SOCKET_NAME) -> None:
    try:
        os.unlink(name)
    except FileNotFoundError:
        pass


def _parent_gone(parent: int) -> bool:
    return parent > 0 and os.getppid() != parent


def serve(args, log) -> int:
    from deltaxfer import _core

    def say(msg: str) -> None:
        log.write(f"{time.strftime('%H:%M:%S')} {msg}\n")
        log.flush()

    recycler = Recycler()
    relay = PostcopyRelay(say)
    ls = _listen()
    ls.settimeout(0.2)
    while True:
        try:
            conn, _ = ls.accept()
            break
        except (TimeoutError, socket.timeout):
            if _parent_gone(args.parent):
                say("the receiver that started this daemon is gone before any restore "
                    "connected: exiting")
                ls.close()
                _unlink_socket()
                relay.close()
                return 0
    ls.close()
    _unlink_socket()             # one restore per daemon: nobody else may connect
    conn.settimeout(None)
    workers = args.workers or max(1, min(os.cpu_count() or 1, 8))
    server = _core.LazyServer(workers, args.chunk_pages, args.fault_pages)
    relay.server = server
    recycler.attach(server)
    relay.start()
    t0 = time.monotonic()
    ntasks = 0
    try:
        while True:
            head = _recv_exact(conn, 4)
            if len(head) < 4:
                raise LazyPagesError("the restore closed the lazy-pages socket before it "
                                     f"finished ({ntasks} task(s) received): it failed")
            (value,) = _INT.unpack(head)
            if value == RESTORE_FINISHED:
                server.prefetch()
                break
            if value < 0:          # a zombie: no memory to serve
                continue
            _msg, fds, _flags, _addr = socket.recv_fds(conn, 1, 1)
            if not fds:
                raise LazyPagesError(f"no userfaultfd came with pid {value}")
            for extra in fds[1:]:
                os.close(extra)
            relay.add_task(server, value, fds[0])
            ntasks += 1
        st = server.stats()
        lazy = st["pages_total"]
        say(f"restore finished: {ntasks} task(s), {lazy} lazy pages "
            f"({lazy * PAGE_SIZE / 2**20:.1f} MiB), {workers} worker(s)"
            + (f", {st['pages_pending']} of them still on the source (post-copy)"
               if st["pages_pending"] else ""))
        conn.close()
        last = time.monotonic()
        # short waits: the receiver's SIGUSR1 (Recycler) is handled between them
        while not server.wait(0.05):
            if time.monotonic() - last >= 10:
                last = time.monotonic()
                say(f"still serving: {json.dumps(server.stats())}")
        # everything is in place: what is left (the log line, unmapping the pages files,
        # exiting) yields to the restored tree, which may still be on its first pass
        os.nice(10)
        stats = server.stats()
        stats["postcopy"] = {"connected": relay.connected, "ended": relay.ended,
                             "arrived": relay.arrivals} if stats["pages_pending"] else None
        # from the restore's end to the last page in place (the daemon then waits 0.1 s
        # for a late fork event before it closes the last userfaultfd)
        stats["seconds_to_placed"] = round((stats["placed_ns"] - stats["prefetch_ns"])
                                           / 1e9, 4) if stats["placed_ns"] else None
        stats["seconds_total"] = round(time.monotonic() - t0, 4)
        if stats["error"]:
            say(f"Error (deltaxfer lazyserve): {stats['error_what']}")
        say("done " + json.dumps(stats))
        return 1 if stats["error"] else 0
    finally:
        relay.close()
        server.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deltaxfer.lazyserve",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("action", choices=["lazy-pages"])
    ap.add_argument("-D", dest="dir", required=True, help="the images directory")
    ap.add_argument("-o", dest="log", default="lazy-pages.log",
                    help="log file, relative to the images directory")
    ap.add_argument("--workers", type=int, default=0,
                    help="background copy threads (0: one per core, at most 8)")
    ap.add_argument("--chunk-pages", type=int, default=64,
                    help="pages per background UFFDIO_COPY (default 64 = 256 KiB: a fault "
                         "waits for the copies in flight)")
    ap.add_argument("--fault-pages", type=int, default=64,
                    help="pages placed from a faulting address on (default 64)")
    ap.add_argument("--parent", type=int, default=0,
                    help="exit if this process (the receiver) goes away before a "
                         "restore connects")
    args = ap.parse_args(argv)
    os.chdir(args.dir)
    with open(args.log, "a") as log:
        try:
            return serve(args, log)
        except (LazyPagesError, OSError, ValueError) as e:
            log.write(f"{time.strftime('%H:%M:%S')} Error (deltaxfer lazyserve): {e}\n")
            return 1


if __name__ == "__main__":
    sys.exit(main())
