"""`deltaxfer serve`: the long-running receiver. This module is the command: the store,
the optional runc support, the listener and who it admits; each authenticated connection
is handed to receiver.Receiver, which runs the session's protocol."""
from __future__ import annotations

import os

from deltaxfer import transport
from deltaxfer.receiver import IDLE_TIMEOUT, Receiver, recover_restores
from deltaxfer.store import Store
from deltaxfer.wire import CAPS, RUNC_CAP


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


def default_apply_threads(cpus: int | None = None) -> int:
    """Half the cores, at most 8, at least 1: a whole image's frames are applied (lz4,
    hashing, pwritev into the page cache: ~0.75-1.2 CPU-s per GiB) on that many threads;
    on 2 cores, where both "hosts" and the restore share them, by the session's worker."""
    if cpus is None:        # the cores this process may run on (a cpuset, taskset)
        try:
            cpus = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cpus = os.cpu_count() or 1
    return max(1, min(8, cpus // 2))


async def serve(host: str, port: int, *, key: bytes, directory: str, ssl=None, criu=None,
                quota_bytes: int | None = None, session_quota_bytes: int | None = None,
                max_sessions: int | None = None, max_connections: int = 8, on_commit=None,
                lazy_restore: bool = True, parent_linked_final: bool = False,
                insecure: bool = False,
                idle_timeout: float | None = IDLE_TIMEOUT, runc_root: str | None = None,
                restore_opts=(), restore_config: str | None = None,
                criu_verbosity: int = 2, early_restore: bool = True,
                apply_threads: int | None = None, keep_pages: bool = False):
    """Start the receiver; returns the asyncio server (serve_forever it, or close it).
    ``insecure``: the key is the published one; peers are admitted by their local uid.
    ``apply_threads``: per session, for a whole image's frames (None: default_apply_threads).
    ``keep_pages``: a migrated copy's memory images stay in its session after it runs."""
    store = Store(directory, quota_bytes, session_quota_bytes=session_quota_bytes,
                  max_sessions=max_sessions)
    # what a receiver that died left: its files went as the store opened; its processes now
    recover_restores(store)
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
                        restore_opts=restore_opts, restore_config=restore_config,
                        criu_verbosity=criu_verbosity, early_restore=early_restore,
                        apply_threads=apply_threads if apply_threads is not None
                        else default_apply_threads(), keep_pages=keep_pages)
    caps = list(CAPS) + ([RUNC_CAP] if runc is not None else [])
    return await transport.serve(host, port, key=key, handler=receiver.handle, ssl=ssl,
                                 max_connections=max_connections, caps=caps,
                                 admit=same_user_only if insecure else None)

