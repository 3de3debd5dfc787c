"""The destination's half of a session (docs/PROTOCOL.md): each authenticated connection
runs one session's protocol against the destination store, as an explicit state machine
(State, ACCEPTS: which message each state accepts; one handler per message); anything
wrong is answered with ERROR, the partial round or send is discarded, and the server
keeps serving. Restores (criu, runc) and the two-step commit with the source's RESUME
live here too. `deltaxfer serve` (serve.py) is the command around it."""
from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import functools
import errno
import logging
import os
import signal
import subprocess
import time

from deltaxfer import _core
from deltaxfer.core import procmem
from deltaxfer.criu.runner import CriuError
from deltaxfer.pidref import signal_tree
from deltaxfer.store import Store, StoreError, image_digest
from deltaxfer.wire.framing import held_bytes
from deltaxfer.wire import (MsgType, ProtocolError, decode_control, decode_pagemap,
                            decode_pages, iter_held)

log = logging.getLogger("deltaxfer.serve")

RESUME_TIMEOUT = 30.0   # after COMMITTED, how long the restored copy waits for the source
# after authentication, how long a client may stay silent before its session is dropped
# (a migration's longest silence is the source reading its memory between rounds)
IDLE_TIMEOUT = 300.0


PAGES_BATCH = 64      # frames handed to a session's worker thread at once, at most
PAGES_BATCH_BYTES = 8 << 20   # and buffer bytes (framing.POOL_BYTES counts on this bound)
# free receive buffers kept after a live round: the rounds after the first carry what was
# written since the last (a few MiB to tens of MiB); a buffer allocated again costs its
# page faults once
ROUND_KEEP_BYTES = 16 << 20


def _apply_frames(rnd, batch) -> dict:
    """Apply (image index, frame) pairs in order on the session's worker thread."""
    counts = {"zero": 0, "xor": 0, "full": 0}
    for index, frame in batch:
        for k, v in rnd.add_pages(index, frame).items():
            counts[k] += v
    return counts


class State(enum.Enum):
    """Where one receiving session is (docs/ARCHITECTURE.md, "Session states"). CLOSE is
    accepted in every state; anything else a state does not accept is ERROR unexpected."""
    IDLE = "idle"                        # between rounds: no round, no files open
    IN_ROUND = "in a round"              # ROUND .. ROUND_END (images open and close inside)
    IN_FILES = "in files"                # after FILE, until COMMIT (a file opens and closes inside)
    ROUND_IN_FILES = "in a round, files open"   # a round while the file set is open
    AWAITING_RESUME = "awaiting RESUME"  # COMMITTED a stopped copy; RESUME lets it run
    POSTCOPY = "in post-copy"            # the copy runs; its pending pages still arrive
    CLOSED = "closed"                    # CLOSE, ERROR or a lost connection: the session ended


_ROUND_MESSAGES = (MsgType.IMAGE, MsgType.PAGEMAP, MsgType.PAGES, MsgType.IMAGE_END,
                   MsgType.ROUND_END)
_FILE_MESSAGES = (MsgType.FILE, MsgType.FILE_DATA, MsgType.FILE_END)

# which message each state accepts, and the handler (a _Receiving method) that takes it
ACCEPTS: dict[State, dict[MsgType, str]] = {
    State.IDLE: {MsgType.ROUND: "_round", MsgType.FILE: "_file"},
    State.IN_ROUND: {**{t: "_" + t.name.lower() for t in _ROUND_MESSAGES},
                     MsgType.FILE: "_file"},      # opens the file set inside the round
    State.IN_FILES: {**{t: "_" + t.name.lower() for t in _FILE_MESSAGES},
                     MsgType.ROUND: "_round", MsgType.COMMIT: "_commit",
                     MsgType.PENDING: "_pending"},
    State.ROUND_IN_FILES: {t: "_" + t.name.lower() for t in _ROUND_MESSAGES + _FILE_MESSAGES},
    State.AWAITING_RESUME: {},     # RESUME only, taken by Receiver._await_resume
    State.POSTCOPY: {},            # POSTCOPY_PAGES and POSTCOPY_END, taken by postcopy.py
    State.CLOSED: {},
}

# messages whose payload is binary: decoded by their handler, not as a control body
_BINARY = frozenset({MsgType.PAGES, MsgType.PAGEMAP, MsgType.FILE_DATA, MsgType.PENDING,
                     MsgType.POSTCOPY_PAGES, MsgType.FETCH})


def _refusal(state: State, t: MsgType) -> str:
    """The reason of ERROR unexpected for message ``t`` in ``state``."""
    if t in _ROUND_MESSAGES:
        what = f"{t.name} outside a round"
    elif t in (MsgType.FILE_DATA, MsgType.FILE_END):
        what = f"{t.name} outside a file"
    elif t in (MsgType.ROUND, MsgType.COMMIT) and state in (State.IN_ROUND,
                                                            State.ROUND_IN_FILES):
        what = f"{t.name} inside a round"
    elif t == MsgType.COMMIT and state == State.IDLE:
        what = "COMMIT without image files"
    else:
        what = f"{t.name} is not expected here"
    return f"{what} (session state: {state.name})"


class _Receiving:
    """One session's protocol after STATE_END: the state, what it has open (``rnd``, a
    round; ``files``, a FileSet) and one handler per accepted message (see ACCEPTS)."""

    def __init__(self, receiver: "Receiver", conn, begin: dict, session, worker, t0: float,
                 apply_pool=None):
        self.r, self.conn, self.begin, self.session = receiver, conn, begin, session
        self.peer, self.name = getattr(conn, "peer", "?"), begin["session"]
        self.container = begin.get("container")
        self.loop = asyncio.get_running_loop()
        self.worker, self.t0 = worker, t0
        # frames of a whole image (at-index: any order, each page once) go to the C
        # threads of an ApplyPool, up to apply_limit bytes of buffers in flight;
        # everything else waits for them (_settle)
        self.apply_pool = apply_pool
        self.apply_threads = receiver.apply_threads if apply_pool is not None else 1
        # (a frame is 4 MiB raw, ~2 MiB of buffer: two per thread keep each one busy)
        self.apply_limit = PAGES_BATCH_BYTES + self.apply_threads * (4 << 20)
        self.applying: dict[int, tuple[int, int]] = {}   # token -> (image index, bytes)
        self.applying_bytes = 0
        self.apply_failed: StoreError | None = None
        self.applied = asyncio.Event()
        self.parallel_batches = 0            # payloads handed to the apply threads
        self.apply_wait = 0.0                # the round's loop waiting for applies
        if apply_pool is not None:
            self.loop.add_reader(apply_pool.fd, self._on_applied)
        self.state = State.IDLE
        self.rnd = self.files = None
        self.final_round = False
        self.drop_session = False
        self.records = {"zero": 0, "xor": 0, "full": 0}
        # the lazy restore's `criu lazy-pages`, started during the final round
        self.lazy_daemon: asyncio.Future | None = None
        # `criu restore` started with the first round, waiting at its first image
        # (criu/early.py): fed at COMMIT, its start-up out of the freeze
        self.early = None
        # post-copy: the last round's image ids by index, and PENDING's runs by index
        self.round_ids: dict[int, str] = {}
        self.pending: dict[int, list] = {}
        self.pending_pages = 0

    def _set(self, state: State) -> None:
        self.state = state

    async def run(self) -> None:
        """Read and dispatch messages until CLOSE (or an error, raised)."""
        conn = self.conn
        while True:
            try:
                msg = await conn.recv(timeout=self.r.idle_timeout)
            except TimeoutError:
                raise StoreError("timeout", f"nothing received for {self.r.idle_timeout:g} s: "
                                            "the session is dropped") from None
            t = msg.type
            if t == MsgType.CLOSE:
                self._set(State.CLOSED)
                return
            body = msg if t in _BINARY else decode_control(msg)
            handler = ACCEPTS[self.state].get(t)
            if handler is None:
                raise StoreError("unexpected", _refusal(self.state, t))
            if (self.applying or self.apply_failed) and t != MsgType.PAGES:
                await self._settle()        # (its failure is the session's, first)
            await getattr(self, handler)(body)

    # --- rounds: IDLE / IN_FILES --ROUND--> IN_ROUND / ROUND_IN_FILES --ROUND_END--> back
    async def _round(self, body: dict) -> None:
        begin = self.begin
        # optionally, a migration's final round links to the held pages instead of
        # rewriting them (see Receiver._restore for the cost)
        self.final_round = bool(body["final"])
        self.t_round = time.monotonic()
        parent_linked = (self.r.parent_linked_final and body["final"]
                         and begin["mode"] == "migrate")
        self.rnd = self.session.begin_round(body["round"], begin["source"],
                                            parent_linked=parent_linked)
        files_first = self.state == State.IN_FILES
        self._set(State.ROUND_IN_FILES if files_first else State.IN_ROUND)
        if (self.final_round and files_first) or (
                self.r.criu is not None and self.r.criu.lazy_server == "deltaxfer"):
            self._prestart_lazy_pages()

    def _prestart_lazy_pages(self) -> None:
        """A migration that asked for a restore (BEGIN.restore) runs a lazy restore at
        COMMIT, and its lazy-pages server must be up by then: `criu lazy-pages` takes
        40-55 ms to start here and reads the dump's metadata (inventory.img, pstree.img)
        when it starts, so it is started at the final ROUND (the agent sends the dump's
        files before the final round: files, round, COMMIT) in the directory the commit
        will fill, those files linked in, its start overlapping the round. deltaxfer's
        server (a Python process, ~0.1 s to start under load) reads nothing until a
        restore connects: it is started with the first round. Not for
        containers (runc runs its own restore), parent-linked finals (restored eagerly)
        or without lazy restore; a daemon that no restore uses is killed (cleanup, or a
        COMMIT without restore); one whose receiver dies first exits by itself."""
        r = self.r
        if self.lazy_daemon is not None or not (
                self.begin["mode"] == "migrate" and self.begin.get("restore")
                and r.criu is not None and r.lazy_restore and not r.parent_linked_final
                and self.container is None):
            return
        # deltaxfer's server needs no file at its start: it is started with the first
        # round, its start (~0.1 s under load) long over by the commit
        needs_files = r.criu.lazy_server != "deltaxfer"
        if needs_files and not os.path.exists(os.path.join(self.files.path, "pstree.img")):
            return                              # not a dump's file set: nothing to start
        tmp = self.session.prepare_images_dir()
        if needs_files:
            for name in os.listdir(self.files.path):
                os.link(os.path.join(self.files.path, name), os.path.join(tmp, name))
        log.info("%s: session %s: starting the lazy-pages server (%s) for the restore while "
                 "the %s round arrives", self.peer, self.name, r.criu.lazy_server,
                 "final" if needs_files else "first")
        self.lazy_daemon = self.loop.run_in_executor(None, functools.partial(
            r.criu.start_lazy_pages, tmp, verbosity=r.criu_verbosity))
        if r.early_restore and not needs_files:
            # (`criu lazy-pages` reads inventory.img when it starts: no FIFO there)
            self._start_early_restore(tmp)

    def _start_early_restore(self, tmp: str) -> None:
        """`criu restore` of this migration's copy, started now in the directory the commit
        fills, waiting at its first image until the commit feeds it (criu/early.py): the
        options are the ones Receiver._restore gives, all known from BEGIN and serve's own.
        Its inventory.img is a FIFO this process holds open: should the receiver die, CRIU
        reads an empty inventory and exits, having made nothing."""
        from deltaxfer.criu.early import EarlyRestore
        r = self.r
        try:
            self.early = EarlyRestore.start(
                r.criu, tmp, lazy=True, extra=r.restore_extra(stopped=True),
                config=r.restore_config, user_opts=r.restore_opts,
                verbosity=r.criu_verbosity)
        except (OSError, subprocess.SubprocessError) as e:
            log.warning("%s: session %s: `criu restore` not started early (%s); the commit "
                        "starts it", self.peer, self.name, e)

    async def _give_memory(self, session, daemon) -> None:
        """The migration's copy runs and the source is gone: the session's memory images
        are no copy of anything any more (no round will diff against them, nobody should
        restore them again). Unless serve --keep-pages, they are removed
        (Session.release_memory) and deltaxfer's lazy-pages server, still placing pages
        from them, is told to punch each 2 MiB block out of its file once it is placed
        (SIGUSR1, lazyserve.Recycler): the page cache those blocks held becomes the
        memory of the pages placed next, so the destination holds about one copy of the
        process rather than two. Not with `criu lazy-pages`, which may open the files
        by name. A failure here is logged: the migration has succeeded."""
        r = self.r
        if r.keep_pages or (r.criu is not None and r.criu.lazy_server != "deltaxfer"):
            return
        try:
            freed = await self.loop.run_in_executor(self.worker, session.release_memory)
        except OSError as e:
            log.warning("%s: session %s: its memory images were not removed (%s)",
                        self.peer, self.name, e)
            return
        told = False
        if daemon is not None and daemon.poll() is None:
            try:
                daemon.send_signal(signal.SIGUSR1)
                told = True
            except (ProcessLookupError, OSError):
                pass
        log.info("%s: session %s: memory images (%.1f MiB) given to the restored copy%s",
                 self.peer, self.name, freed / 2**20,
                 "; the lazy-pages server gives their page cache back as it places them"
                 if told else "")

    async def _drop_lazy_daemon(self) -> None:
        """A pre-started daemon that no restore will use: killed, and the directory it was
        started in removed if no commit took it."""
        started = self.lazy_daemon is not None or self.early is not None
        early, self.early = self.early, None
        if early is not None:
            await self.loop.run_in_executor(None, early.kill)
        daemon = await self._take_lazy_daemon()
        if daemon is not None:
            daemon.kill()
            await self.loop.run_in_executor(None, daemon.wait)
        if started:
            self.session.discard_prepared()

    async def _take_lazy_daemon(self):
        """The pre-started daemon (None if there is none or it failed to start: the
        restore then starts its own)."""
        fut, self.lazy_daemon = self.lazy_daemon, None
        if fut is None:
            return None
        try:
            return await fut
        except (CriuError, OSError) as e:
            log.warning("%s: session %s: lazy-pages did not start early (%s); the restore "
                        "starts it", self.peer, self.name, e)
            return None

    async def _image(self, body: dict) -> None:
        self.rnd.begin_image(body["index"], body["id"], body["entries"], body["pages"])

    async def _pagemap(self, msg) -> None:
        pm = decode_pagemap(msg.payload)
        self.rnd.add_pagemap(pm.index, pm.entries)     # u64 pairs, kept as arrays

    async def _pages(self, msg) -> None:
        index, frame = first = decode_pages(msg.payload)
        t = time.monotonic()
        applier = self.rnd.unordered_applier(index) if self.apply_pool is not None else None
        if applier is not None:
            # a whole image's frame: to the pool's C threads, no Python per frame there
            if self.apply_failed is not None:
                raise self.apply_failed
            size = held_bytes(msg.payload)
            while self.applying_bytes + size > self.apply_limit and self.applying:
                await self._applied_some()
            token = self.apply_pool.submit(applier, frame)
            self.applying[token] = (index, size)
            self.applying_bytes += size
            self.parallel_batches += 1
            self.apply_wait += time.monotonic() - t
            return
        # the frames already received go to the worker in one hand-off: a thread switch
        # per frame costs more than applying a small frame
        batch = [first]
        size = held_bytes(msg.payload)
        while len(batch) < PAGES_BATCH and size < PAGES_BATCH_BYTES and \
                (nxt := self.conn.recv_ready(MsgType.PAGES)) is not None:
            batch.append(decode_pages(nxt.payload))
            size += held_bytes(nxt.payload)
        if self.applying:
            await self._settle()
        self._count(await self.loop.run_in_executor(self.worker, _apply_frames,
                                                    self.rnd, batch))
        self.apply_wait += time.monotonic() - t

    def _count(self, counts: dict) -> None:
        for k, v in counts.items():
            self.records[k] += v

    def _on_applied(self) -> None:
        """The pool's eventfd: finished jobs counted, the first failure kept (raised by
        the next PAGES or _settle)."""
        for token, result in self.apply_pool.done():
            index, size = self.applying.pop(token)
            self.applying_bytes -= size
            if isinstance(result, BaseException):
                if self.apply_failed is None:
                    self.apply_failed = (self.rnd.apply_error(index, result)
                                         if self.rnd is not None else
                                         StoreError("internal", str(result)))
            else:
                self._count(dict(zip(("zero", "xor", "full"), result)))
        self.applied.set()

    async def _applied_some(self) -> None:
        self.applied.clear()
        await self.applied.wait()

    async def _settle(self) -> None:
        """Wait for every apply in flight; raises the first failure."""
        while self.applying:
            await self._applied_some()
        if self.apply_failed is not None:
            raise self.apply_failed

    async def _image_end(self, body: dict) -> None:
        await self.loop.run_in_executor(self.worker, self.rnd.end_image, body["index"],
                                        int(body["digest"], 16))

    async def _round_end(self, body: dict) -> None:
        conn = self.conn
        t_end = time.monotonic()
        self.round_ids = {i: x.image_id for i, x in self.rnd.images.items()}
        self.pending.clear()
        self.pending_pages = 0
        done = await self.loop.run_in_executor(self.worker, self.rnd.finish)
        t_done = time.monotonic()
        self.rnd = None
        self._set(State.IN_FILES if self.files is not None else State.IDLE)
        await conn.send_control(MsgType.ROUND_OK, {
            "round": done["round"], "pages": done["pages"],
            "bytes": conn.stats["bytes_in"]})
        if not self.final_round:
            # after a live round (the first is the bulk), what its frames needed goes
            # back: the apply threads' work areas (up to 4 MiB each), the receive buffers
            # beyond ROUND_KEEP_BYTES. Not after the final round: the freeze goes on.
            conn.trim_buffers(ROUND_KEEP_BYTES)
            if self.apply_pool is not None:
                self.apply_pool.trim()
        log.info("%s: session %s round %d complete: %d pages held (%.3f s from ROUND, "
                 "%.3f s of it finishing after ROUND_END, %.3f s of it waiting for the "
                 "applies)", self.peer, self.name, done["round"], done["pages"],
                 t_done - self.t_round, t_done - t_end, self.apply_wait)
        self.apply_wait = 0.0

    # --- post-copy: PENDING (IN_FILES, after the final round) names the pages whose
    # content comes after RESUMED
    async def _pending(self, msg) -> None:
        from deltaxfer.wire import decode_runs
        index, vaddrs, counts = decode_runs(msg.payload, "PENDING")
        image_id = self.round_ids.get(index)
        if image_id is None or not image_id.startswith("pid-"):
            raise StoreError("bad-payload", f"PENDING for image index {index}: not a process "
                                            "image of the last round")
        if not self.r.postcopy_ok(self.begin):
            raise StoreError("unexpected", "PENDING: this server does not take post-copy")
        self.pending.setdefault(index, []).append((vaddrs, counts))
        self.pending_pages += sum(counts)

    # --- files: FILE opens the set (IN_FILES / ROUND_IN_FILES) until COMMIT
    async def _file(self, body: dict) -> None:
        self.files = self.files or self.session.begin_files()
        self.files.begin(body["name"], body["size"], body["mode"])
        if self.state == State.IDLE:
            self._set(State.IN_FILES)
        elif self.state == State.IN_ROUND:
            self._set(State.ROUND_IN_FILES)

    async def _file_data(self, msg) -> None:
        self.files.data(msg.payload)

    async def _file_end(self, body: dict) -> None:
        self.files.end(int(body["xxh3"], 16))

    # --- COMMIT (IN_FILES): -> AWAITING_RESUME (a migration's stopped copy) -> IDLE
    async def _commit(self, body: dict) -> None:
        r, conn, session, loop = self.r, self.conn, self.session, self.loop
        peer, name, container = self.peer, self.name, self.container
        postcopy = pc_report = None
        if body.get("postcopy_pages") is not None or self.pending:
            from deltaxfer.postcopy import PostcopyReceiver
            if not (body["restore"] and r.postcopy_ok(self.begin)):
                raise StoreError("unexpected", "a post-copy COMMIT needs a migration restored "
                                               "here by deltaxfer's lazy-pages server")
            if body.get("postcopy_pages") != self.pending_pages:
                raise StoreError("missing-page", f"COMMIT names {body.get('postcopy_pages')} "
                                                 f"pending pages, PENDING named "
                                                 f"{self.pending_pages}")
            postcopy = PostcopyReceiver(self, self.round_ids, self.pending)
        daemon = early = None
        if body["restore"] and container is None:
            # started in images.tmp: it must be up before the commit renames that
            daemon = await self._take_lazy_daemon()
            early, self.early = self.early, None
            # the commit renames the real inventory.img over the early restore's FIFO:
            # only once criu holds the FIFO (a short final connection can commit while
            # its criu still starts)
            if early is not None and not await loop.run_in_executor(None, early.ready):
                early = None
        else:
            await self._drop_lazy_daemon()
        try:
            path = session.commit(self.files)
        except BaseException:
            if early is not None:
                await loop.run_in_executor(None, early.kill)
            if daemon is not None:
                daemon.kill()
                await loop.run_in_executor(None, daemon.wait)
            raise
        self.files = None
        self._set(State.IDLE)
        pc_task = None
        if postcopy is not None:
            # the restore's lazy-pages server reads these as it takes each task; the pages
            # flow from now on (the restore itself may wait on one), read by postcopy.run,
            # the connection's only reader until the post-copy ends
            await loop.run_in_executor(self.worker, postcopy.write_pending_files, path)
            await postcopy.connect(path)
            self._set(State.POSTCOPY)
            pc_task = loop.create_task(postcopy.run())
        pid = None
        # a migration's copy is restored stopped and runs only once the source has
        # confirmed (RESUME) that it will not resume itself
        two_phase = self.begin["mode"] == "migrate"
        if body["restore"] and container is not None:
            session.mark_restoring()
            try:
                pid = await loop.run_in_executor(
                    None, r._restore_container, path, container, two_phase)
            except StoreError:
                self.drop_session = True   # nothing of this container stays here
                raise
            session.restored(pid if two_phase else None)
        elif body["restore"]:
            session.mark_restoring()
            try:
                pid = await loop.run_in_executor(None, r._restore, path, two_phase, daemon,
                                                 early)
            except BaseException:
                if pc_task is not None:
                    pc_task.cancel()
                    postcopy.close()
                raise
            # until RESUME, a restarted receiver kills this stopped copy
            session.restored(pid if two_phase else None)
        start = session.meta["restoring"].get("start") if pid is not None else None
        if postcopy is not None:
            postcopy.set_tree(pid, start)   # a failure from here on kills it
        await conn.send_control(MsgType.COMMITTED, {"path": path, "restored_pid": pid})
        if pid is not None and two_phase:
            if postcopy is None:
                self._set(State.AWAITING_RESUME)
            try:
                await r._await_resume(conn, peer, name, pid, start,
                                      postcopy.resume if postcopy is not None else None)
            except BaseException:
                if container is not None:   # the killed copy's runc state
                    self.drop_session = True
                    await loop.run_in_executor(None, r._drop_container, container)
                if pc_task is not None:
                    pc_task.cancel()
                    postcopy.close()
                raise
            session.restored(None)
            if pc_task is not None:
                # the copy runs; a failure from here kills it (its memory is incomplete)
                pc_report = await pc_task
            await self._give_memory(session, daemon)
            self._set(State.IDLE)
        seconds = time.monotonic() - self.t0
        wire = conn.stats["bytes_in"]
        records = self.records
        report = {"session": name, "path": path, "restored_pid": pid,
                  "round": session.round, "wire_bytes_received": wire,
                  "records": dict(records), "seconds": round(seconds, 6),
                  "apply_threads": self.apply_threads,
                  "parallel_batches": self.parallel_batches,
                  "wire_rate_MBps": round(wire / seconds / 1e6, 3)}
        if postcopy is not None:
            report["postcopy"] = pc_report
        log.info("%s: session %s committed: %.2f MiB received in %.2f s "
                 "(%.1f MB/s; pages %d full, %d xor-delta, %d zero; %d batches on %d "
                 "apply threads); restorable images in %s%s", peer, name, wire / 2**20,
                 seconds, report["wire_rate_MBps"], records["full"], records["xor"],
                 records["zero"], self.parallel_batches, self.apply_threads, path,
                 f", restored as pid {pid} (criu's log: "
                 f"{os.path.join(path, 'restore.log')})" if pid else "")
        if r.on_commit:
            r.on_commit(report)

    async def cleanup(self) -> None:
        """Whatever the session left open: the partial round aborted on the worker (after
        whatever it still does with it), partial files discarded, the watch on a restored
        copy dropped."""
        self._set(State.CLOSED)
        try:
            if self.apply_pool is not None:
                # the threads stop (a job running ends first); their outcome no longer
                # matters: the round goes
                pool = self.apply_pool
                self.loop.remove_reader(pool.fd)
                await asyncio.shield(self.loop.run_in_executor(None, pool.close))
                self.applying.clear()
                self.applying_bytes = 0
            if self.rnd is not None:
                await asyncio.shield(self.loop.run_in_executor(self.worker, self.rnd.abort))
        finally:
            try:
                await asyncio.shield(self._drop_lazy_daemon())
            finally:
                self.worker.shutdown(wait=False)
                if self.files is not None:
                    self.files.discard()
                if self.session.meta.get("restoring"):
                    self.session.restored(None)      # the copy is ours to watch (or gone)


class Receiver:
    def __init__(self, store: Store, *, criu=None, on_commit=None, lazy_restore: bool = True,
                 parent_linked_final: bool = False, idle_timeout: float | None = IDLE_TIMEOUT,
                 runc_root: str | None = None, runc=None,
                 restore_opts=(), restore_config: str | None = None,
                 criu_verbosity: int = 2, early_restore: bool = True,
                 apply_threads: int = 1, keep_pages: bool = False):
        self.store = store
        # a migration's copy runs: its memory images stay in the session (serve
        # --keep-pages), or go, given to the copy (_Receiving._give_memory)
        self.keep_pages = keep_pages
        # threads applying a whole image's frames at once, per session (serve
        # --apply-threads); 1: the session's worker applies them in arrival order
        self.apply_threads = max(1, int(apply_threads))
        # start a migration's `criu restore` with its first round (criu/early.py); serve
        # --no-early-restore starts it at the commit
        self.early_restore = early_restore
        # the operator's own `criu restore` options (serve --criu-restore-opt, --criu-config)
        self.restore_opts, self.restore_config = list(restore_opts), restore_config
        self.criu_verbosity = criu_verbosity
        # runc containers (serve --runc-root): restored under this runc root with `runc`
        self.runc_root, self.runc = runc_root, runc
        self.idle_timeout = idle_timeout
        self.criu = criu
        self.lazy_restore = lazy_restore
        self.parent_linked_final = parent_linked_final
        self.on_commit = on_commit
        self.active: set[str] = set()

    def postcopy_ok(self, begin: dict) -> bool:
        """Whether a migration's final round may leave pages for after the resume:
        only a process (not a container) restored lazily here, served by deltaxfer's own
        lazy-pages server (which places pending pages as they arrive)."""
        return (self.criu is not None and self.lazy_restore and not self.parent_linked_final
                and getattr(self.criu, "lazy_server", "") == "deltaxfer"
                and begin.get("mode") == "migrate" and bool(begin.get("restore"))
                and begin.get("container") is None)

    async def handle(self, conn) -> None:
        """One connection: BEGIN, STATE, then the session's states (State, ACCEPTS) until
        CLOSE; ERROR on any failure."""
        peer = getattr(conn, "peer", "?")
        begin = await conn.recv_control(MsgType.BEGIN)
        name = begin["session"]
        if name in self.active:
            await conn.error("busy", f"session {name!r} is already receiving a transfer")
            return
        container = begin.get("container")
        if container is not None:
            refused = self._check_container(begin, container)
            if refused:
                # before the session exists: nothing is left here
                log.warning("%s: session %s refused: %s", peer, name, refused)
                await conn.error("restore", refused)
                return
        if begin.get("restore") and self.criu is None:
            # refused now, not after every live round at COMMIT (an old client does not
            # say, and is refused at COMMIT as before)
            reason = ("this server does not restore (it was started without --restore): "
                      "start `deltaxfer serve --restore` there, or migrate --no-restore to "
                      "only store the images")
            log.warning("%s: session %s refused: %s", peer, name, reason)
            await conn.error("restore", reason)
            return
        self.active.add(name)
        rcv = None
        loop = asyncio.get_running_loop()
        # the session's disk work (applying frames, verifying, swapping rounds) runs on one
        # worker thread, in arrival order: each step is awaited before the next message is
        # read, so the transport's flow control bounds what waits in memory
        worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"dx-{name}")
        # and a whole image's frames (a full round's bulk) on apply_threads C threads
        pool = None
        if self.apply_threads > 1:
            try:
                pool = _core.ApplyPool(self.apply_threads)
            except MemoryError as e:    # threads refused (limits): in order on the worker
                log.warning("%s: session %s: %s; its frames are applied by one thread",
                            peer, name, e)
        t0 = time.monotonic()
        try:
            session = self.store.session(name)
            rcv = _Receiving(self, conn, begin, session, worker, t0, pool)
            held = session.held()
            tables = {}
            for image_id in held:
                tables[image_id] = await loop.run_in_executor(worker, session.held_hashes,
                                                              image_id)
            await conn.send_control(MsgType.STATE, {
                "session": name, "round": session.round, "source": session.meta["source"],
                "images": [{"id": i, "pages": len(v), "digest": f"{image_digest(h):016x}"}
                           for i, (v, h) in tables.items()],
                "postcopy": self.postcopy_ok(begin)})
            for index, (v, h) in enumerate(tables.values()):
                for payload in iter_held(index, v, h):
                    await conn.send(MsgType.HELD, payload)
            await conn.send_control(MsgType.STATE_END, {})
            log.info("%s: session %s from %s (%s), holding round %d", peer, name,
                     begin["source"], begin["mode"], session.round)
            await rcv.run()
        except StoreError as e:
            log.warning("%s: session %s refused: %s (%s)", peer, name, e.reason, e.code)
            await conn.error(e.code, e.reason)
        except OSError as e:
            # the disk (ENOSPC, EIO) failed under a round or a file: the session's partial
            # state is discarded below and the server keeps serving
            log.warning("%s: session %s failed on the disk: %s", peer, name, e)
            await conn.error("quota" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "internal",
                             f"the destination's disk failed: {e.strerror or e}")
        finally:
            try:
                if rcv is not None:
                    await rcv.cleanup()
                else:
                    worker.shutdown(wait=False)
                    if pool is not None:
                        pool.close()
            finally:
                if rcv is not None and rcv.drop_session:
                    self._drop_session(name)
                self.active.discard(name)

    async def _await_resume(self, conn, peer: str, name: str, pid: int,
                            start: int | None, resume: asyncio.Future | None = None) -> None:
        """RESUME from the source: let the restored tree run. Anything else — silence, a
        lost connection, an ERROR — means the source may run on: kill the copy. The tree
        is signalled only while ``pid`` still has the start time recorded at restore.
        ``resume``: RESUME as another reader of the connection takes it (post-copy)."""
        try:
            if resume is not None:
                await asyncio.wait_for(asyncio.shield(resume), RESUME_TIMEOUT)
            else:
                await conn.recv_control(MsgType.RESUME, timeout=RESUME_TIMEOUT)
        except BaseException as e:
            killed = signal_tree(pid, signal.SIGKILL, start)
            log.warning("%s: session %s: no RESUME from the source (%s): killed the restored "
                        "copy (%d tasks) so that only one runs", peer, name,
                        type(e).__name__ if not str(e) else e, killed)
            raise
        if not signal_tree(pid, signal.SIGCONT, start):
            raise StoreError("restore", f"the restored process {pid} is gone (or its pid now "
                                        "names another process): nothing was resumed")
        await conn.send_control(MsgType.RESUMED, {"pid": pid})
        log.info("%s: session %s: the restored process %d runs", peer, name, pid)

    def _check_container(self, begin: dict, container: dict) -> str | None:
        """Why a session naming a runc container is refused, or None. runc runs as root
        what the bundle says: only a bundle directory root owns and others cannot write,
        only an ID runc accepts and that is not taken under our --runc-root."""
        from deltaxfer import runc as rc
        if self.runc_root is None or self.criu is None:
            return ("this server does not restore runc containers: start it with "
                    "`deltaxfer serve --restore --runc-root DIR`")
        if begin["mode"] != "migrate":
            return "a runc container is restored only by a migration (deltaxfer migrate --runc)"
        try:
            rc.check_container_id(container["id"])
            rc.check_bundle(container["bundle"])
        except ValueError as e:
            return str(e)
        if os.path.exists(os.path.join(self.runc_root, container["id"])):
            return (f"a container {container['id']!r} already exists under runc root "
                    f"{self.runc_root} here: delete it first (`runc --root {self.runc_root} "
                    f"delete {container['id']}`)")
        return None

    def _restore_container(self, path: str, container: dict, stopped: bool) -> int:
        from deltaxfer import runc as rc
        # checked again: the bundle may have changed since BEGIN
        try:
            rc.check_bundle(container["bundle"])
            return rc.restore_container(self.runc, self.criu.path, self.runc_root,
                                        container["id"], path, container["bundle"],
                                        os.path.join(path, "runc"), stopped=stopped)
        except (ValueError, rc.RuncError) as e:
            raise StoreError("restore", str(e)) from None

    def _drop_container(self, container: dict) -> None:
        from deltaxfer import runc as rc
        rc.remove_container(self.runc, self.runc_root, container["id"])
        log.warning("runc container %s under %s deleted (no RESUME from the source)",
                    container["id"], self.runc_root)

    def _drop_session(self, name: str) -> None:
        from deltaxfer.sessions import remove_sessions
        try:
            remove_sessions(self.store.root, [name], force=True)
        except OSError as e:
            log.warning("session %s: could not remove it: %s", name, e)

    @staticmethod
    def restore_extra(stopped: bool) -> list[str]:
        """deltaxfer's own `criu restore` options beyond restore_args': a migration's copy
        is restored stopped (it runs at RESUME)."""
        return ["--leave-stopped"] if stopped else []

    def _restore(self, path: str, stopped: bool = False, daemon=None, early=None) -> int:
        if self.criu is None:
            raise StoreError("restore", "this server was started without restore enabled "
                                        "(deltaxfer serve --restore)")
        # criu lazy-pages stalled serving pages through a parent link here (CRIU 4.1.1):
        # parent-linked images are restored eagerly. Measured at 256 MiB: flat final round
        # + lazy restore ~0.6 s of the freeze, parent-linked + eager restore ~0.85 s.
        lazy = self.lazy_restore and not os.path.islink(os.path.join(path, "parent"))
        log_path = os.path.join(path, "restore.log")
        try:
            pid = self.criu.restore(path, lazy=lazy, extra=self.restore_extra(stopped),
                                    user_opts=self.restore_opts, config=self.restore_config,
                                    verbosity=self.criu_verbosity, daemon=daemon,
                                    early=early)
            if early is not None and early.fed_s is not None:
                log.info("restored by the `criu restore` started with the first round: "
                         "%.1f ms from its inventory to its exit (%s)",
                         early.fed_s * 1e3, path)
            return pid
        except CriuError as e:
            msg = str(e)
            if log_path not in msg:
                msg += f"; criu's log: {log_path}"
            raise StoreError("restore", msg) from None
        except (OSError, ValueError) as e:     # the pidfile: criu said 0 but wrote no pid
            raise StoreError("restore", f"criu restore wrote no usable pid file "
                                        f"({e}); criu's log: {log_path}") from None



def recover_restores(store: Store) -> dict[str, list[str]]:
    """At a receiver's start, the restores a receiver that died was inside: the stopped
    restored copy that never got RESUME is killed (checked by its start time and its stop
    state: never a reused pid, never a copy that runs), and so are a `criu lazy-pages`
    daemon started for that session's restore and a `criu restore` started early for it
    (criu/early.py; matched on their command lines and exact directory: `images`, or
    `images.tmp` where they were started early), which would otherwise wait forever. A daemon serving a restored process that runs (the restore
    was confirmed) is left alone. Returns what was done, by session."""
    out = {}
    for session in store.sessions():
        done = []
        tmp_dir = os.path.join(session.path, "images.tmp")
        rec = session.interrupted_restore()
        dirs = []
        if rec is not None:
            dirs = [rec["images"], tmp_dir]
        elif session.meta.get("preparing"):
            # started early (_prestart_lazy_pages) for a commit that never came; once a
            # commit took images.tmp (and cleared the mark), its daemon serves the
            # restored copy: not ours to kill
            dirs = [tmp_dir]
        if session.meta.get("preparing"):
            session.discard_prepared()
        if rec is not None:
            pid, start = rec["pid"], rec["start"]
            if pid is not None and procmem.start_time(pid) == start \
                    and procmem.state(pid) in ("T", "t"):
                n = signal_tree(pid, signal.SIGKILL, start)
                done.append(f"killed the stopped restored copy {pid} ({n} tasks) that never "
                            "got RESUME")
        for d in dirs:
            for verb, what in (("restore", "`criu restore` started early"),
                               ("lazy-pages", "criu lazy-pages daemon")):
                for daemon in procmem.lazy_pages_daemons(d, verb):
                    try:
                        os.kill(daemon, signal.SIGKILL)
                        done.append(f"killed the {what} ({daemon}) left for this session's "
                                    "restore")
                    except ProcessLookupError:
                        pass
        if rec is not None:
            session.restored(None)
        if done:
            log.warning("session %s: recovered after an unclean stop: %s", session.name,
                        "; ".join(done))
            out[session.name] = done
    return out


__all__ = ["Receiver", "State", "ACCEPTS", "ProtocolError", "recover_restores"]
