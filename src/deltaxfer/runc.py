"""runc containers: finding runc, reading a container's state, and the command lines with
which deltaxfer has runc checkpoint and restore a container (docs/CONTAINERS.md).

runc drives CRIU itself (``criu swrk``, over RPC): it adds what a container needs —
the rootfs as CRIU's root, the bind mounts and devices as external mounts, the cgroups,
the network namespace as external, the container's stdio pipes (``descriptors.json`` in
the image directory) — so deltaxfer does not run ``criu dump`` for a container. What
deltaxfer adds to CRIU (its action script, the lazy page server's address, leave-stopped)
travels in a CRIU *configuration file*. runc 1.1 offers two of them (the
``org.criu.config`` annotation, else ``/etc/criu/runc.conf``), both fixed per container or
per host; deltaxfer uses a third that CRIU itself reads: ``criu swrk`` parses the file
named by ``$CRIU_CONFIG_FILE`` at start-up (CRIU's config.c, PARSING_ENV_CONF), and runc
starts criu with its own environment. So the file is per checkpoint, written by the
agent, and nothing global is touched (``checkpoint_env``).

The criu runc runs is the one given with runc's global ``--criu PATH`` option (default:
``criu`` from PATH): deltaxfer passes the project's criu (``criu.runner.find_criu``),
never changes PATH.

All functions here build argument lists or run short runc queries; the caller runs the
long commands (checkpoint with a live hook, restore).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field

__all__ = [
    "RuncError", "RuncNotFound", "ContainerNotFound", "NotARuncRoot", "Runc", "Container",
    "find_runc", "container", "criu_config_text", "write_criu_config", "checkpoint_env",
    "checkpoint_args", "restore_args", "kill_args", "delete_args", "DEFAULT_ROOT",
    "CRIU_CONFIG_ANNOTATION", "RUNC_CONF", "check_container_id", "check_bundle",
    "loopback_port", "remove_container", "restore_container",
]

DEFAULT_ROOT = "/run/runc"                 # runc's own default --root
CRIU_CONFIG_ANNOTATION = "org.criu.config"  # runc: per-container CRIU RPC config file
RUNC_CONF = "/etc/criu/runc.conf"          # runc: its default when the annotation is absent
MIN_VERSION = (1, 1)
INSTALL_HINT = "install Debian's runc (`make runc`, as root) or point DELTAXFER_RUNC at one"


class RuncError(RuntimeError):
    """runc is missing or a runc command failed (the message says which and why)."""


class RuncNotFound(RuncError):
    pass


class NotARuncRoot(RuncError):
    """The --root given is not a directory runc keeps container state in."""


class ContainerNotFound(RuncError):
    """No container of that ID under that runc root."""


@dataclass(frozen=True)
class Runc:
    path: str
    version: tuple[int, ...]


@dataclass(frozen=True)
class Container:
    """What `runc state` says about a container (host view)."""
    id: str
    pid: int           # the container's init process, host PID (0 when stopped)
    status: str        # created | running | paused | stopped
    bundle: str        # the bundle directory (config.json + rootfs)
    rootfs: str
    root: str          # the runc --root it lives under
    annotations: dict = field(default_factory=dict)

    @property
    def criu_config(self) -> str | None:
        """The CRIU configuration file runc hands CRIU for this container: the
        org.criu.config annotation's value, runc.conf without it, None when the
        annotation is set to "" (runc then passes none)."""
        if CRIU_CONFIG_ANNOTATION in self.annotations:
            return self.annotations[CRIU_CONFIG_ANNOTATION] or None
        return RUNC_CONF


def find_runc(explicit: str | None = None) -> Runc:
    """`explicit`, else $DELTAXFER_RUNC, else `runc` on PATH; checked with `runc --version`
    (>= 1.1: the first with --criu, --lazy-pages and CRIU configuration files)."""
    origin, path = "--runc", explicit
    if not path:
        origin, path = "DELTAXFER_RUNC", os.environ.get("DELTAXFER_RUNC")
    if not path:
        origin, path = "PATH", shutil.which("runc")
        if path is None:
            raise RuncNotFound(f"runc not found on PATH; {INSTALL_HINT}")
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        raise RuncNotFound(f"runc from {origin} ({path}) is not an executable file; "
                           f"{INSTALL_HINT}")
    try:
        r = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuncNotFound(f"runc from {origin} ({path}) does not run: {e}") from None
    m = re.search(r"runc version (\d+)\.(\d+)(?:\.(\d+))?", r.stdout)
    if r.returncode != 0 or not m:
        raise RuncNotFound(f"runc from {origin} ({path}): `--version` failed "
                           f"(exit {r.returncode}): {(r.stderr or r.stdout).strip()}")
    version = tuple(int(x) for x in m.groups() if x is not None)
    if version < MIN_VERSION:
        raise RuncNotFound(f"runc {'.'.join(map(str, version))} at {path} is too old "
                           f"(need >= 1.1 for --criu and lazy pages); {INSTALL_HINT}")
    return Runc(path=path, version=version)


def _runc_message(stderr: str) -> str:
    """runc's logrus line `time=... level=error msg="..."` -> the message."""
    msgs = re.findall(r'msg="((?:[^"\\]|\\.)*)"', stderr)
    if msgs:
        return "; ".join(m.encode().decode("unicode_escape") for m in msgs)
    return stderr.strip()


def _check_root(root: str) -> None:
    # runc itself says only "container does not exist" for a wrong root (or creates a
    # missing one): say what is wrong with the directory instead.
    if not os.path.exists(root):
        raise NotARuncRoot(f"runc root {root} does not exist (runc's default root is "
                           f"{DEFAULT_ROOT}; give the --root the container was started with)")
    if not os.path.isdir(root):
        raise NotARuncRoot(f"runc root {root} is not a directory")


def _known(root: str) -> list[str]:
    try:
        return sorted(d for d in os.listdir(root)
                      if os.path.isfile(os.path.join(root, d, "state.json")))
    except OSError:
        return []


def container(id: str, root: str = DEFAULT_ROOT, runc: Runc | None = None) -> Container:
    """The state of container `id` under runc root `root` (`runc --root R state ID`).
    Raises NotARuncRoot / ContainerNotFound with what is there instead, RuncError when
    runc fails otherwise."""
    runc = runc or find_runc()
    root = os.path.abspath(root)
    _check_root(root)
    r = subprocess.run([runc.path, "--root", root, "state", id],
                       capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        msg = _runc_message(r.stderr)
        if "does not exist" in msg:
            known = _known(root)
            if known:
                raise ContainerNotFound(f"no container {id!r} under runc root {root} "
                                        f"(it holds: {', '.join(known)})")
            raise ContainerNotFound(f"no container {id!r} under {root}: that directory holds "
                                    "no runc containers at all — is it the runc --root the "
                                    "container was started with?")
        raise RuncError(f"`runc --root {root} state {id}` failed (exit {r.returncode}): {msg}")
    try:
        s = json.loads(r.stdout)
        return Container(id=s["id"], pid=int(s.get("pid") or 0), status=s["status"],
                         bundle=s["bundle"], rootfs=s.get("rootfs", ""), root=root,
                         annotations=dict(s.get("annotations") or {}))
    except (ValueError, KeyError, TypeError) as e:
        raise RuncError(f"`runc state {id}` printed something unexpected ({e}): "
                        f"{r.stdout[:200]!r}") from None


# -- the CRIU configuration file ---------------------------------------------------------

def criu_config_text(action_script: str | None = None, *, address: str | None = None,
                     leave_stopped: bool = False, extra: tuple[str, ...] = ()) -> str:
    """A CRIU configuration file (one long option per line, without the dashes).

    action_script: CRIU runs it at every action (pre-dump, network-lock, post-dump, ...)
        with CRTOOLS_SCRIPT_ACTION set — deltaxfer's hook. runc 1.1 has no option for it.
    address: where the lazy page server listens. Needed with lazy pages: CRIU's RPC
        takes only the port from runc's --page-server ADDR:PORT when lazy-pages is on
        (cr-service.c), so without this line it listens on every address.
    leave_stopped: keep the frozen tasks stopped after the dump instead of killed (runc
        has no such option; its checkpoint then does not destroy the still-existing
        container: the agent kills/deletes it after the destination confirmed)."""
    lines = []
    if action_script:
        if any(c.isspace() for c in action_script):
            # CRIU's config parser splits on white space (no quoting of paths we rely on)
            raise ValueError(f"action script path {action_script!r} has white space")
        lines.append(f"action-script {action_script}")
    if address:
        lines.append(f"address {address}")
    if leave_stopped:
        lines.append("leave-stopped")
    lines.extend(extra)
    return "".join(line + "\n" for line in lines)


def write_criu_config(path: str, text: str) -> str:
    """Write the configuration file (0600, replaced atomically) and return its path."""
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


def checkpoint_env(config_file: str, base: dict | None = None) -> dict:
    """The environment for `runc checkpoint`: CRIU_CONFIG_FILE names the per-checkpoint
    configuration file. runc starts `criu swrk` with its own environment and criu reads
    that file when it starts, before runc's RPC options arrive; the RPC options runc sets
    (images, root, cgroups, mounts, lazy-pages, port) then apply, and a container's
    org.criu.config / runc.conf file last — so the action script adds to them and
    `address`/`leave-stopped` (which runc never sets) stay. The action script, and the
    hook it starts, inherit this environment too (deltaxfer's agent socket variables)."""
    env = dict(os.environ if base is None else base)
    env["CRIU_CONFIG_FILE"] = config_file
    return env


# -- command lines ------------------------------------------------------------------------

def checkpoint_args(runc: Runc | str, criu: str, root: str, id: str, image_path: str,
                    work_path: str, *, lazy_port: int | None = None,
                    page_server: str | None = None, leave_running: bool = False,
                    pre_dump: bool = False, parent_path: str | None = None,
                    manage_cgroups_mode: str | None = None,
                    tcp_established: bool = False) -> list[str]:
    """`runc --criu CRIU --root R checkpoint ... ID`.

    criu: the criu binary runc runs (global --criu; runc execs `criu swrk 3`).
    image_path / work_path: CRIU's images (plus runc's descriptors.json: the container's
        stdio pipes, needed by restore) / its dump.log.
    lazy_port: `--lazy-pages --page-server 127.0.0.1:PORT` — CRIU freezes the container,
        writes the metadata images, runs the post-dump action and then serves the pages
        from the frozen tasks on PORT until a lazy-pages client ends it (deltaxfer's
        agent reads the memory itself and ends it: criu.lazy.end_lazy_dump). CRIU uses
        only the port from RPC here: the config file must say `address 127.0.0.1`.
    page_server: ADDR:PORT without lazy pages — CRIU sends the pages to a page server
        (deltaxfer's page sink) instead of writing pages-*.img.
    leave_running: CRIU resumes the container after the dump (runc does not destroy it).
        Not for a migration (two copies would run); without it runc destroys the
        container after a successful dump, and a failed one (e.g. the hook refused at
        post-dump: CRIU resumes the tasks) leaves it running — runc's destroy refuses a
        running container.
    pre_dump / parent_path: iterative CRIU pre-dumps (memory only, container keeps
        running); deltaxfer's live rounds replace these.
    manage_cgroups_mode: soft (runc's default) | full | strict — how CRIU restores the
        cgroup properties; with soft the restore side's cgroup is made by runc from the
        bundle (see restore_args).
    tcp_established: checkpoint open TCP connections (the container's own netns)."""
    path = runc.path if isinstance(runc, Runc) else runc
    if lazy_port is not None and page_server is not None:
        raise ValueError("lazy_port and page_server exclude each other")
    args = [path, "--criu", criu, "--root", root, "checkpoint",
            "--image-path", image_path, "--work-path", work_path]
    if lazy_port is not None:
        args += ["--lazy-pages", "--page-server", f"127.0.0.1:{int(lazy_port)}"]
    elif page_server is not None:
        args += ["--page-server", page_server]
    if leave_running:
        args.append("--leave-running")
    if pre_dump:
        args.append("--pre-dump")
    if parent_path:
        args += ["--parent-path", parent_path]
    return _with_criu_options(args, id, manage_cgroups_mode, tcp_established)


def _with_criu_options(args: list[str], id: str, manage_cgroups_mode: str | None,
                       tcp_established: bool) -> list[str]:
    """The CRIU options checkpoint and restore share, then the container ID, last."""
    if manage_cgroups_mode:
        if manage_cgroups_mode not in ("soft", "full", "strict"):
            raise ValueError(f"manage_cgroups_mode {manage_cgroups_mode!r}: soft|full|strict")
        args += ["--manage-cgroups-mode", manage_cgroups_mode]
    if tcp_established:
        args.append("--tcp-established")
    args.append(id)
    return args


def restore_args(runc: Runc | str, criu: str, root: str, id: str, image_path: str,
                 bundle: str, *, work_path: str | None = None, pid_file: str | None = None,
                 detach: bool = True, manage_cgroups_mode: str | None = None,
                 tcp_established: bool = False) -> list[str]:
    """`runc --criu CRIU --root R restore --image-path D --bundle B --detach ID`.

    bundle: the bundle the container ran from (Container.bundle at the source; the same
        path must hold the same rootfs and config.json on this host). runc mounts its
        rootfs as CRIU's root, maps its bind mounts and devices, and creates the cgroup
        from its config.json before CRIU restores the tasks into it.
    id / root: the restored container's ID and runc root. The cgroup rule: leave
        linux.cgroupsPath out of config.json and runc derives the cgroup from the
        container ID (under the caller's cgroup with the cgroupfs driver), so a copy
        restored on the same host under another ID gets its own cgroup while the source
        still exists; a config.json with a fixed cgroupsPath makes both share one
        cgroup (runc then refuses or mixes them) — restore on another host, or under
        another ID from a bundle without cgroupsPath.
    detach: runc returns once the container runs (else it waits for it like `runc run`).
    The container's stdio: its pipes are re-connected to runc restore's own stdin,
        stdout and stderr (descriptors.json + CRIU inherit-fd): give restore the pipes
        (or /dev/null) the restored container shall write to.
    pid_file: runc writes the restored init's host PID there."""
    path = runc.path if isinstance(runc, Runc) else runc
    args = [path, "--criu", criu, "--root", root, "restore",
            "--image-path", image_path, "--bundle", bundle]
    if work_path:
        args += ["--work-path", work_path]
    if pid_file:
        args += ["--pid-file", pid_file]
    if detach:
        args.append("--detach")
    return _with_criu_options(args, id, manage_cgroups_mode, tcp_established)


def kill_args(runc: Runc | str, root: str, id: str, signal: str = "KILL") -> list[str]:
    """`runc --root R kill ID SIGNAL` (SIGKILL ends a frozen, left-stopped source)."""
    path = runc.path if isinstance(runc, Runc) else runc
    return [path, "--root", root, "kill", id, signal]


def delete_args(runc: Runc | str, root: str, id: str, force: bool = False) -> list[str]:
    """`runc --root R delete [--force] ID`: removes the state and the cgroup (--force
    kills a still-running container first)."""
    path = runc.path if isinstance(runc, Runc) else runc
    return [path, "--root", root, "delete", *(["--force"] if force else []), id]


# -- the destination: what `deltaxfer serve --runc-root` accepts and runs -------------------

# runc's own rule for a container ID (libcontainer: `^[\w+-\.]+$`, not "." or "..")
_ID_RE = re.compile(r"[\w+\-.]{1,1024}", re.ASCII)


def check_container_id(id: str) -> str:
    """The ID as runc accepts it; ValueError naming the rule otherwise."""
    if not isinstance(id, str) or not _ID_RE.fullmatch(id) or id in (".", ".."):
        raise ValueError(f"container ID {id!r} is not one runc accepts (1-1024 of letters, "
                         "digits, '_', '+', '-', '.'; not '.' or '..')")
    return id


def check_bundle(path: str) -> str:
    """A bundle path a sender may name for `runc restore`: absolute, an existing directory
    (not a symbolic link) owned by root and not writable by others, every ancestor owned
    by root and not writable by others (unless sticky), holding a regular config.json.
    runc mounts its rootfs and applies its config.json as root: a bundle another user
    could write would let that user choose what runs. ValueError says what is wrong."""
    import stat as st_
    if not isinstance(path, str) or not os.path.isabs(path) or "\0" in path:
        raise ValueError(f"bundle path {path!r} is not an absolute path")
    if os.path.normpath(path) != path:
        raise ValueError(f"bundle path {path!r} is not in normal form (no '..', '//', "
                         "trailing '/')")
    parts = path.strip("/").split("/")
    for i in range(len(parts) + 1):
        p = "/" + "/".join(parts[:i])
        try:
            s = os.lstat(p)
        except OSError as e:
            raise ValueError(f"bundle {path}: {p} does not exist here ({e.strerror}); the "
                             "bundle must be at the same path on both hosts (shared "
                             "storage, or a copy made before the migration)") from None
        if st_.S_ISLNK(s.st_mode):
            raise ValueError(f"bundle {path}: {p} is a symbolic link; name the real path")
        if not st_.S_ISDIR(s.st_mode):
            raise ValueError(f"bundle {path}: {p} is not a directory")
        last = i == len(parts)
        if s.st_uid != 0:
            raise ValueError(f"bundle {path}: {p} is owned by uid {s.st_uid}, not root: "
                             "runc would run what that user put there as root")
        if s.st_mode & 0o002 and (last or not s.st_mode & st_.S_ISVTX):
            raise ValueError(f"bundle {path}: {p} is writable by others (mode "
                             f"{s.st_mode & 0o7777:o}): `chmod o-w {p}`")
    try:
        c = os.lstat(os.path.join(path, "config.json"))
    except OSError:
        raise ValueError(f"bundle {path} has no config.json here: not a bundle, or not the "
                         "same one as on the source") from None
    if not st_.S_ISREG(c.st_mode) or c.st_uid != 0 or c.st_mode & 0o002:
        raise ValueError(f"bundle {path}: config.json must be a regular file owned by root "
                         "and not writable by others")
    return path


def loopback_port() -> int:
    """A TCP port free on 127.0.0.1 now, for CRIU's lazy page server under runc (runc 1.1
    cannot hand CRIU a socket). Another local process may bind it before CRIU does:
    the residual race described in docs/CONTAINERS.md."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def remove_container(runc: Runc | str, root: str, id: str) -> None:
    """`runc delete --force`: kills what is left of the container, drops its state and
    cgroup. Quiet when there is no such container."""
    subprocess.run(delete_args(runc, root, id, force=True), stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)


def restore_container(runc: Runc, criu: str, root: str, id: str, image_path: str,
                      bundle: str, work_path: str, *, stopped: bool = True,
                      timeout: float = 600) -> int:
    """`runc restore --detach` of `image_path` as container `id` under `root`; returns the
    restored init's host PID. The container's stdio is /dev/null (runc re-connects the
    stdio pipes recorded at checkpoint to its own stdin/stdout/stderr); runc's messages go
    to work_path/runc.log. stopped: CRIU leaves the tasks stopped (`leave-stopped` in a
    $CRIU_CONFIG_FILE): the caller sends SIGCONT once the source confirmed. On failure
    whatever runc made of the container is deleted and RuncError says why."""
    os.makedirs(work_path, mode=0o700, exist_ok=True)
    conf = write_criu_config(os.path.join(work_path, "criu.conf"),
                             criu_config_text(leave_stopped=stopped))
    pid_file = os.path.join(work_path, "restored.pid")
    log = os.path.join(work_path, "runc.log")
    args = restore_args(runc, criu, root, id, image_path, bundle, work_path=work_path,
                        pid_file=pid_file)
    args[1:1] = ["--log", log]
    env = checkpoint_env(conf, {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")})
    with open(os.devnull, "r+b") as null:
        try:
            r = subprocess.run(args, stdin=null, stdout=null, stderr=null, env=env,
                               timeout=timeout)
            code = r.returncode
        except subprocess.TimeoutExpired:
            code = None
    try:
        if code == 0:
            with open(pid_file) as f:
                return int(f.read().strip())
    except (OSError, ValueError):
        pass
    remove_container(runc, root, id)
    try:
        with open(log, errors="replace") as f:
            msg = _runc_message(f.read())
    except OSError:
        msg = ""
    from deltaxfer.criu.runner import log_errors
    criu_msg = log_errors(os.path.join(work_path, "restore.log"))
    what = f"exit {code}" if code is not None else f"not done within {timeout:.0f} s"
    raise RuncError(f"runc restore of container {id} under {root} failed ({what}): "
                    f"{msg or 'no message'}" + (f"; criu: {criu_msg}" if criu_msg else ""))
