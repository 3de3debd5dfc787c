"""`deltaxfer serve`: the long-running receiver. Each authenticated connection runs one
session's protocol (docs/PROTOCOL.md) against the destination store; anything wrong is
answered with ERROR, the partial round or send is discarded, and the server keeps serving.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import logging
import os
import signal
import time

from deltaxfer import transport
from deltaxfer.criu.runner import CriuError
from deltaxfer.pidref import signal_tree
from deltaxfer.store import Store, StoreError, image_digest
from deltaxfer.wire import (CAPS, RUNC_CAP, MsgType, ProtocolError, decode_control,
                            decode_pagemap,
                            decode_pages, iter_held)

log = logging.getLogger("deltaxfer.serve")

RESUME_TIMEOUT = 30.0   # after COMMITTED, how long the restored copy waits for the source
# after authentication, how long a client may stay silent before its session is dropped
# (a migration's longest silence is the source reading its memory between rounds)
IDLE_TIMEOUT = 300.0


PAGES_BATCH = 64      # frames handed to a session's worker thread at once, at most


def _apply_frames(rnd, batch) -> dict:
    """Apply (image index, frame) pairs in order on the session's worker thread."""
    counts = {"zero": 0, "xor": 0, "full": 0}
    for index, frame in batch:
        for k, v in rnd.add_pages(index, frame).items():
            counts[k] += v
    return counts


class Receiver:
    def __init__(self, store: Store, *, criu=None, on_commit=None, lazy_restore: bool = True,
                 parent_linked_final: bool = False, idle_timeout: float | None = IDLE_TIMEOUT,
                 runc_root: str | None = None, runc=None,
                 restore_opts=(), restore_config: str | None = None):
        self.store = store
        # the operator's own `criu restore` options (serve --criu-restore-opt, --criu-config)
        self.restore_opts, self.restore_config = list(restore_opts), restore_config
        # runc containers (serve --runc-root): restored under this runc root with `runc`
        self.runc_root, self.runc = runc_root, runc
        self.idle_timeout = idle_timeout
        self.criu = criu
        self.lazy_restore = lazy_restore
        self.parent_linked_final = parent_linked_final
        self.on_commit = on_commit
        self.active: set[str] = set()

    async def handle(self, conn) -> None:
        """One connection: BEGIN, STATE, rounds, files, COMMIT; ERROR on any failure."""
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
        rnd = files = session = None
        drop_session = False
        loop = asyncio.get_running_loop()
        # the session's disk work (applying frames, verifying, swapping rounds) runs on one
        # worker thread, in arrival order: each step is awaited before the next message is
        # read, so the transport's flow control bounds what waits in memory
        worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"dx-{name}")
        t0 = time.monotonic()
        records = {"zero": 0, "xor": 0, "full": 0}
        try:
            session = self.store.session(name)
            held = session.held()
            tables = {}
            for image_id in held:
                tables[image_id] = await loop.run_in_executor(worker, session.held_hashes,
                                                              image_id)
            await conn.send_control(MsgType.STATE, {
                "session": name, "round": session.round, "source": session.meta["source"],
                "images": [{"id": i, "pages": len(v), "digest": f"{image_digest(h):016x}"}
                           for i, (v, h) in tables.items()]})
            for index, (v, h) in enumerate(tables.values()):
                for payload in iter_held(index, v, h):
                    await conn.send(MsgType.HELD, payload)
            await conn.send_control(MsgType.STATE_END, {})
            log.info("%s: session %s from %s (%s), holding round %d", peer, name,
                     begin["source"], begin["mode"], session.round)

            while True:
                try:
                    msg = await conn.recv(timeout=self.idle_timeout)
                except TimeoutError:
                    raise StoreError("timeout", f"nothing received for {self.idle_timeout:g} s: "
                                                "the session is dropped") from None
                t = msg.type
                if t == MsgType.PAGES:
                    if rnd is None:
                        raise StoreError("unexpected", "PAGES outside a round")
                    # the frames already received go to the worker in one hand-off: a
                    # thread switch per frame costs more than applying a small frame
                    batch = [decode_pages(msg.payload)]
                    while len(batch) < PAGES_BATCH and \
                            (nxt := conn.recv_ready(MsgType.PAGES)) is not None:
                        batch.append(decode_pages(nxt.payload))
                    counts = await loop.run_in_executor(worker, _apply_frames, rnd, batch)
                    for k, v in counts.items():
                        records[k] += v
                elif t == MsgType.PAGEMAP:
                    if rnd is None:
                        raise StoreError("unexpected", "PAGEMAP outside a round")
                    pm = decode_pagemap(msg.payload)
                    rnd.add_pagemap(pm.index, pm.entries)     # u64 pairs, kept as arrays
                elif t == MsgType.FILE_DATA:
                    if files is None:
                        raise StoreError("unexpected", "FILE_DATA outside a file")
                    files.data(msg.payload)
                elif t == MsgType.CLOSE:
                    return
                else:
                    body = decode_control(msg)
                    if t == MsgType.ROUND:
                        if rnd is not None:
                            raise StoreError("unexpected", "ROUND inside a round")
                        # optionally, a migration's final round links to the held pages
                        # instead of rewriting them (see Receiver._restore for the cost)
                        final_round = bool(body["final"])
                        rnd = session.begin_round(
                            body["round"], begin["source"],
                            parent_linked=(self.parent_linked_final and body["final"]
                                           and begin["mode"] == "migrate"))
                    elif t == MsgType.IMAGE:
                        self._need(rnd, "IMAGE")
                        rnd.begin_image(body["index"], body["id"], body["entries"], body["pages"])
                    elif t == MsgType.IMAGE_END:
                        self._need(rnd, "IMAGE_END")
                        await loop.run_in_executor(worker, rnd.end_image, body["index"],
                                                   int(body["digest"], 16))
                    elif t == MsgType.ROUND_END:
                        self._need(rnd, "ROUND_END")
                        done = await loop.run_in_executor(worker, rnd.finish)
                        rnd = None
                        await conn.send_control(MsgType.ROUND_OK, {
                            "round": done["round"], "pages": done["pages"],
                            "bytes": conn.stats["bytes_in"]})
                        if begin["mode"] == "migrate" and not final_round:
                            # a live round's writes go to disk after it is confirmed, so that
                            # the final round's layout edit finds nothing to write out (see
                            # Session.flush_held); queued on the session's one worker thread,
                            # not awaited: the writeback overlaps the source's next round,
                            # and whatever the worker does next waits for it
                            loop.run_in_executor(worker, session.flush_held)
                        log.info("%s: session %s round %d complete: %d pages held", peer, name,
                                 done["round"], done["pages"])
                    elif t == MsgType.FILE:
                        files = files or session.begin_files()
                        files.begin(body["name"], body["size"], body["mode"])
                    elif t == MsgType.FILE_END:
                        if files is None:
                            raise StoreError("unexpected", "FILE_END outside a file")
                        files.end(int(body["xxh3"], 16))
                    elif t == MsgType.COMMIT:
                        if rnd is not None:
                            raise StoreError("unexpected", "COMMIT inside a round")
                        if files is None:
                            raise StoreError("unexpected", "COMMIT without image files")
                        path = session.commit(files)
                        files = None
                        pid = None
                        # a migration's copy is restored stopped and runs only once the
                        # source has confirmed (RESUME) that it will not resume itself
                        two_phase = begin["mode"] == "migrate"
                        if body["restore"] and container is not None:
                            session.mark_restoring()
                            try:
                                pid = await loop.run_in_executor(
                                    None, self._restore_container, path, container, two_phase)
                            except StoreError:
                                drop_session = True   # nothing of this container stays here
                                raise
                            session.restored(pid if two_phase else None)
                        elif body["restore"]:
                            session.mark_restoring()
                            pid = await loop.run_in_executor(None, self._restore, path,
                                                             two_phase)
                            # until RESUME, a restarted receiver kills this stopped copy
                            session.restored(pid if two_phase else None)
                        await conn.send_control(MsgType.COMMITTED, {"path": path,
                                                                    "restored_pid": pid})
                        if pid is not None and two_phase:
                            try:
                                await self._await_resume(conn, peer, name, pid,
                                                         session.meta["restoring"].get("start"))
                            except BaseException:
                                if container is not None:   # the killed copy's runc state
                                    drop_session = True
                                    await loop.run_in_executor(None, self._drop_container,
                                                               container)
                                raise
                            session.restored(None)
                        seconds = time.monotonic() - t0
                        wire = conn.stats["bytes_in"]
                        report = {"session": name, "path": path, "restored_pid": pid,
                                  "round": session.round, "wire_bytes_received": wire,
                                  "records": dict(records), "seconds": round(seconds, 6),
                                  "wire_rate_MBps": round(wire / seconds / 1e6, 3)}
                        log.info("%s: session %s committed: %.2f MiB received in %.2f s "
                                 "(%.1f MB/s; pages %d full, %d xor-delta, %d zero); restorable "
                                 "images in %s%s", peer, name, wire / 2**20, seconds,
                                 report["wire_rate_MBps"], records["full"], records["xor"],
                                 records["zero"], path,
                                 f", restored as pid {pid} (criu's log: "
                                 f"{os.path.join(path, 'restore.log')})" if pid else "")
                        if self.on_commit:
                            self.on_commit(report)
                    else:
                        raise StoreError("unexpected", f"{t.name} is not expected here")
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
                if rnd is not None:
                    # on the worker, after whatever it is still doing with the round
                    await asyncio.shield(loop.run_in_executor(worker, rnd.abort))
            finally:
                worker.shutdown(wait=False)
                if files is not None:
                    files.discard()
                if session is not None and session.meta.get("restoring"):
                    session.restored(None)      # the copy is ours to watch (or gone) now
                if drop_session:
                    self._drop_session(name)
                self.active.discard(name)

    @staticmethod
    def _need(rnd, what):
        if rnd is None:
            raise StoreError("unexpected", f"{what} outside a round")

    async def _await_resume(self, conn, peer: str, name: str, pid: int,
                            start: int | None) -> None:
        """RESUME from the source: let the restored tree run. Anything else — silence, a
        lost connection, an ERROR — means the source may run on: kill the copy. The tree
        is signalled only while ``pid`` still has the start time recorded at restore."""
        try:
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

    def _restore(self, path: str, stopped: bool = False) -> int:
        if self.criu is None:
            raise StoreError("restore", "this server was started without restore enabled "
                                        "(deltaxfer serve --restore)")
        # criu lazy-pages stalled serving pages through a parent link here (CRIU 4.1.1):
        # parent-linked images are restored eagerly. Measured at 256 MiB: flat final round
        # + lazy restore ~0.6 s of the freeze, parent-linked + eager restore ~0.85 s.
        lazy = self.lazy_restore and not os.path.islink(os.path.join(path, "parent"))
        log_path = os.path.join(path, "restore.log")
        try:
            return self.criu.restore(path, lazy=lazy,
                                     extra=["--leave-stopped"] if stopped else [],
                                     user_opts=self.restore_opts, config=self.restore_config)
        except CriuError as e:
            msg = str(e)
            if log_path not in msg:
                msg += f"; criu's log: {log_path}"
            raise StoreError("restore", msg) from None
        except (OSError, ValueError) as e:     # the pidfile: criu said 0 but wrote no pid
            raise StoreError("restore", f"criu restore wrote no usable pid file "
                                        f"({e}); criu's log: {log_path}") from None


def same_user_only(tp) -> str | None:
    """`serve --insecure`'s admission: the key is public there, so a peer is admitted only
    if its socket belongs to this daemon's own user on this host."""
    from deltaxfer.keys import loopback_peer_uid
    sock = tp.get_extra_info("socket")
    uid = loopback_peer_uid(sock) if sock is not None else None
    if uid is None:
        return "this server runs without a key (--insecure) and admits only local peers"
    if uid != os.geteuid():
        return (f"this server runs without a key (--insecure) and admits only processes of "
                f"uid {os.geteuid()}; the peer's socket belongs to uid {uid}")
    return None


async def serve(host: str, port: int, *, key: bytes, directory: str, ssl=None, criu=None,
                quota_bytes: int | None = None, session_quota_bytes: int | None = None,
                max_sessions: int | None = None, max_connections: int = 8, on_commit=None,
                lazy_restore: bool = True, parent_linked_final: bool = False,
                insecure: bool = False,
                idle_timeout: float | None = IDLE_TIMEOUT, runc_root: str | None = None,
                restore_opts=(), restore_config: str | None = None):
    """Start the receiver; returns the asyncio server (serve_forever it, or close it).
    ``insecure``: the key is the published one; peers are admitted by their local uid."""
    store = Store(directory, quota_bytes, session_quota_bytes=session_quota_bytes,
                  max_sessions=max_sessions)
    runc = None
    if runc_root is not None:
        # runc containers: the "runc" capability is offered only with a runc root
        from deltaxfer import runc as rc
        from deltaxfer.keys import ConfigError
        try:
            runc = rc.find_runc()
        except rc.RuncError as e:
            raise ConfigError(f"--runc-root: {e}") from None
        runc_root = os.path.abspath(runc_root)
        os.makedirs(runc_root, mode=0o700, exist_ok=True)
    receiver = Receiver(store, criu=criu, on_commit=on_commit, lazy_restore=lazy_restore,
                        parent_linked_final=parent_linked_final, idle_timeout=idle_timeout,
                        runc_root=runc_root, runc=runc,
                        restore_opts=restore_opts, restore_config=restore_config)
    caps = list(CAPS) + ([RUNC_CAP] if runc is not None else [])
    return await transport.serve(host, port, key=key, handler=receiver.handle, ssl=ssl,
                                 max_connections=max_connections, caps=caps,
                                 admit=same_user_only if insecure else None)


__all__ = ["Receiver", "serve", "ProtocolError"]
