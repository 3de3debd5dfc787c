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
import sys
import time

from deltaxfer import PAGE_SIZE
from deltaxfer.criu import images as im
from deltaxfer.criu.dumpdir import DumpDir

SOCKET_NAME = "lazy-pages.socket"
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
    """(pages file path, vaddrs, nr_pages, flags, vma starts, vma ends) of image pid
    ``pid``, read from the images in the working directory."""
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
    return f"pages-{pages_id}.img", v, n, f, starts, ends


def add_task(server, pid: int, uffd: int) -> None:
    """Hand task ``pid``'s userfaultfd to the server."""
    try:
        pages, v, n, f, vs, ve = task_layout(pid)
    except BaseException:
        os.close(uffd)
        raise
    fd = os.open(pages, os.O_RDONLY | os.O_CLOEXEC) if os.path.exists(pages) else -1
    try:
        size = os.fstat(fd).st_size if fd >= 0 else 0
        server.add(uffd, pid, fd, size, v, n, f, vs, ve)
    finally:
        if fd >= 0:
            os.close(fd)


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


def _listen() -> socket.socket:
    _unlink_socket()
    ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o077)          # only root (the restore) may connect
    try:
        ls.bind(SOCKET_NAME)
    finally:
        os.umask(old)
    ls.listen(1)
    return ls


def _unlink_socket() -> None:
    try:
        os.unlink(SOCKET_NAME)
    except FileNotFoundError:
        pass


def _parent_gone(parent: int) -> bool:
    return parent > 0 and os.getppid() != parent


def serve(args, log) -> int:
    from deltaxfer import _core

    def say(msg: str) -> None:
        log.write(f"{time.strftime('%H:%M:%S')} {msg}\n")
        log.flush()

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
                return 0
    ls.close()
    _unlink_socket()             # one restore per daemon: nobody else may connect
    conn.settimeout(None)
    workers = args.workers or max(1, min(os.cpu_count() or 1, 8))
    server = _core.LazyServer(workers, args.chunk_pages, args.fault_pages)
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
            add_task(server, value, fds[0])
            ntasks += 1
        lazy = server.stats()["pages_total"]
        say(f"restore finished: {ntasks} task(s), {lazy} lazy pages "
            f"({lazy * PAGE_SIZE / 2**20:.1f} MiB), {workers} worker(s)")
        conn.close()
        last = time.monotonic()
        while not server.wait(1.0):
            if time.monotonic() - last >= 10:
                last = time.monotonic()
                say(f"still serving: {json.dumps(server.stats())}")
        stats = server.stats()
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
