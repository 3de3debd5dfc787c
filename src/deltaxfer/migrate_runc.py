"""`deltaxfer migrate --runc ID`: live migration of a runc container (docs/CONTAINERS.md).

The same agent as for a process tree (migrate.Agent): live rounds on the container's
init and its tree, the freeze, the final round, the two-step commit and its rollback
rules. What differs is who runs CRIU: `runc checkpoint --lazy-pages` instead of
`criu dump`, because runc knows what a container needs (its rootfs as CRIU's root, its
mounts, cgroups, namespaces, stdio). deltaxfer's hook and `leave-stopped` reach CRIU in
a configuration file named by $CRIU_CONFIG_FILE; the lazy page server listens on a
loopback TCP port (runc cannot hand CRIU a socket) and the agent ends it over TCP.

The destination is told the container's ID and bundle in BEGIN (receivers that offer
the "runc" capability: `deltaxfer serve --restore --runc-root DIR`), restores it with
`runc restore` left stopped, and lets it run at RESUME. On success the source's stopped
tasks are killed through the pidfds taken in the freeze and `runc delete` drops its
state; on any failure CRIU resumes the container at the source.
"""
from __future__ import annotations

import asyncio
import functools
import os
import socket
import sys
import time

from deltaxfer import runc as rc
from deltaxfer import transport
from deltaxfer.criu.lazy import end_lazy_dump
from deltaxfer.criu.runner import Criu, log_errors
from deltaxfer.hook_env import AGENT_ENV, LAZY_PORT_ENV, PYTHON_ENV, TIMEOUT_ENV
from deltaxfer.migrate import Agent, MigrationError, Options, Report
from deltaxfer.wire import RUNC_CAP


class ContainerAgent(Agent):
    """One container's migration. `container`: runc.container()'s state at the source."""

    def __init__(self, container: rc.Container, runc: rc.Runc, host: str, port: int,
                 key: bytes, criu: Criu, opts: Options, dest_id: str | None = None):
        if opts.session is None:
            opts.session = (f"migrate-{socket.gethostname()}-{container.id}-"
                            f"{int(time.time())}")[:64]
        super().__init__(container.pid, host, port, key, criu, opts)
        self.container, self.runc = container, runc
        # the ID it gets at the destination: the same by default; another one where both
        # copies share a host (the cgroup is named after the ID: docs/CONTAINERS.md)
        self.dest_id = dest_id or container.id
        self.report.container = {"id": container.id, "root": container.root,
                                  "bundle": container.bundle, "dest_id": self.dest_id}

    # begin_session is Agent's; a container offers the "runc" capability, needs the
    # destination to offer it too (refused here, before anything was frozen), and names
    # its container in BEGIN
    def connect_caps(self) -> dict:
        return {"caps": list(transport.CAPS) + [RUNC_CAP]}

    def check_peer(self, conn) -> None:
        if RUNC_CAP not in conn.caps:
            raise MigrationError(
                f"the destination {self.host}:{self.port} does not restore runc containers: "
                "start it with `deltaxfer serve --restore --runc-root DIR` (deltaxfer with "
                "container support); nothing was frozen")

    def source_label(self) -> str:
        return f"{socket.gethostname()}:runc {self.container.id} (pid {self.pid})"

    def begin_fields(self) -> dict:
        return {"container": {"id": self.dest_id, "bundle": self.container.bundle}}

    def choose_freeze(self) -> None:
        """Only the lazy freeze: runc 1.1 cannot give CRIU's page server a socket, and a
        page-server freeze would need a TCP listener of ours for CRIU to connect to."""
        if self.opts.freeze == "page-server":
            raise MigrationError("--freeze page-server is not supported with --runc (runc "
                                 "1.1 cannot hand CRIU the page server's socket); use "
                                 "--freeze lazy; nothing was frozen")
        fits, why = self.lazy_dump_check()
        if not fits:
            raise MigrationError(f"--runc freezes with a lazy dump: {why}; raise the limit "
                                 "(ulimit -Hn, LimitNOFILE=); nothing was frozen")
        self.freeze_mode = "lazy"
        self.report.freeze["mode"] = "lazy (runc checkpoint)"

    async def freeze_and_push(self) -> int:
        """`runc checkpoint --lazy-pages` with deltaxfer's hook as CRIU's action script
        (post-dump: the final round and the two-step commit, as for a process), then the
        lazy page server ended over loopback TCP."""
        self.dump_dir = os.path.join(self.work, "dump")
        os.makedirs(self.dump_dir, mode=0o700)
        sock_path = os.path.join(self.work, "agent.sock")
        server = await asyncio.start_unix_server(self.on_hook, sock_path)
        self.set_freeze_deadline(self.memory_bytes)
        hook = self.write_hook_wrapper()
        port = rc.loopback_port()
        conf = rc.write_criu_config(os.path.join(self.work, "criu.conf"), rc.criu_config_text(
            hook, address="127.0.0.1", leave_stopped=True))
        # the hook inherits runc's environment through criu: the agent's socket, its
        # deadline, and the port to end the lazy dump at if this agent dies
        env = rc.checkpoint_env(conf, dict(os.environ, **{
            AGENT_ENV: sock_path, TIMEOUT_ENV: str(self.freeze_timeout + 15.0),
            LAZY_PORT_ENV: str(port), PYTHON_ENV: sys.executable}))
        args = rc.checkpoint_args(self.runc, self.criu.path, self.container.root,
                                  self.container.id, self.dump_dir, self.dump_dir,
                                  lazy_port=port)
        self.source.check()
        proc = await asyncio.create_subprocess_exec(
            *args, env=env, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        self.report.freeze["runc_argv"] = args[1:]
        self.report.freeze["lazy_port"] = port
        try:
            code, hung = await self.wait_dump(proc, functools.partial(
                end_lazy_dump, "127.0.0.1", port, self.criu.version))
            if code is None:
                return hung
            self.report.freeze["runc_exit"] = code
            if code != 0 and not self.report.error:
                err = (await proc.stderr.read()).decode(errors="replace")
                self.report.error = (f"runc checkpoint failed (exit {code}): "
                                     f"{rc._runc_message(err)}; "
                                     f"{log_errors(os.path.join(self.dump_dir, 'dump.log'))}")
            return code
        finally:
            server.close()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()

    async def run(self) -> Report:
        report = await super().run()
        if report.outcome == "migrated":
            # the stopped tasks were killed through the freeze's pidfds; runc's own
            # destroy refused the still-existing container: drop its state and cgroup
            await asyncio.get_running_loop().run_in_executor(
                None, rc.remove_container, self.runc, self.container.root, self.container.id)
        return report


async def migrate_container(id: str, root: str, host: str, port: int, key: bytes,
                            criu: Criu, opts: Options | None = None,
                            runc: rc.Runc | None = None, dest_id: str | None = None) -> Report:
    """Migrate runc container `id` (under runc root `root`), restored as `dest_id` (default
    `id`). A container that cannot be found, or is not running, is reported without
    connecting to the destination."""
    opts = opts or Options()
    try:
        if dest_id is not None:
            rc.check_container_id(dest_id)
        runc = runc or rc.find_runc()
        c = rc.container(id, root, runc)
        if c.status != "running" or c.pid <= 0:
            raise rc.RuncError(f"container {id!r} under {c.root} is {c.status}, not running: "
                               "only a running container can be migrated")
    except (rc.RuncError, ValueError) as e:
        report = Report(0, f"{host}:{port}", opts.session or "")
        report.error = f"{type(e).__name__}: {e}"
        report.outcome = "aborted before the freeze: nothing was done"
        report.container = {"id": id, "root": os.path.abspath(root)}
        return report
    return await ContainerAgent(c, runc, host, port, key, criu, opts, dest_id).run()
