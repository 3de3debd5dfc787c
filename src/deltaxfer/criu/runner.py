"""Finding a usable ``criu`` binary and running it.

Search order (first hit wins): ``--criu PATH``, ``$DELTAXFER_CRIU``, the project-local
prefix installed by ``scripts/install-criu.sh`` (``make criu``), then ``criu`` on PATH.
A candidate that exists but is too old for this kernel is reported, not silently used.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

# CRIU before 4.0 fails `criu check` on recent kernels (Debian 12's 3.17: vDSO).
MIN_VERSION = (4, 0)
INSTALL_HINT = ("install one with `make criu` (runs scripts/install-criu.sh as root: "
                "Debian 13's criu in a project-local prefix), or point --criu / "
                "DELTAXFER_CRIU at a criu >= 4.0")


# CRIU's log level on the migration path (dump in the freeze, restore, lazy-pages): 2 =
# errors and warnings, which is what explains a failure (log_errors reads the "Error"
# lines). -v4 logs every page pipe and page: 40 000 lines per GiB in a lazy dump, 0.09 s
# more freeze per GiB measured at 1 GiB here (dump step 0.19 s at -v2, 0.23 at -v3,
# 0.27-0.29 at -v4), and per page fault in the lazy-pages daemon. Raised per run with
# migrate/serve --criu-verbosity.
CRIU_VERBOSITY = 2
# where a restore's log and pid file go in its images (= work) directory
RESTORE_LOG = "restore.log"
RESTORE_PIDFILE = "restored.pid"


class CriuError(RuntimeError):
    """criu is missing, unusable, or a criu command failed (the message says which)."""


class CriuNotFound(CriuError):
    pass


def _local_prefixes() -> list[Path]:
    """Where scripts/install-criu.sh puts criu: ``$DELTAXFER_CRIU_PREFIX``, else
    ``.local/criu`` in the source tree (editable install) or next to the venv."""
    out = []
    env = os.environ.get("DELTAXFER_CRIU_PREFIX")
    if env:
        out.append(Path(env))
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "scripts" / "install-criu.sh").exists():
            out.append(parent / ".local" / "criu")
            break
    venv_parent = Path(sys.prefix).resolve().parent
    out.append(venv_parent / ".local" / "criu")
    seen, unique = set(), []
    for p in out:
        if p not in seen:
            seen.add(p)
            unique.append(p)
    return unique


def candidates(explicit: str | None = None) -> list[tuple[str, str]]:
    """(origin, path) pairs in search order; paths may not exist."""
    out = []
    if explicit:
        out.append(("--criu", explicit))
    if os.environ.get("DELTAXFER_CRIU"):
        out.append(("DELTAXFER_CRIU", os.environ["DELTAXFER_CRIU"]))
    for prefix in _local_prefixes():
        out.append((f"local prefix {prefix}", str(prefix / "bin" / "criu")))
    found = shutil.which("criu")
    if found:
        out.append(("PATH", found))
    return out


def parse_version(text: str) -> tuple[int, ...]:
    m = re.search(r"Version:\s*(\d+)\.(\d+)(?:\.(\d+))?", text)
    if not m:
        raise CriuError(f"cannot parse the output of `criu --version`: {text.strip()[:200]!r}")
    return tuple(int(g) for g in m.groups() if g is not None)


@dataclass
class Criu:
    path: str
    version: tuple[int, ...]
    origin: str
    # who serves a lazy restore's pages: "deltaxfer" (deltaxfer.lazyserve) or "criu"
    # (`criu lazy-pages`); serve --lazy-pages-server
    lazy_server: str = "deltaxfer"

    @property
    def version_str(self) -> str:
        return ".".join(map(str, self.version))

    def run(self, args: list[str], *, log_dir: str | None = None, log_name: str | None = None,
            timeout: float | None = None, check: bool = True, verbosity: int = 4,
            **popen) -> subprocess.CompletedProcess:
        """Run ``criu ARGS``; on failure raise CriuError quoting the log's error lines.
        ``verbosity``: CRIU's -vN for the log (4 here: the tests' and tools' runs; the
        migration path passes CRIU_VERBOSITY)."""
        cmd = [self.path] + list(args)
        if log_name:
            cmd += ["-o", log_name, f"-v{verbosity}"]
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout, **popen)
        if check and proc.returncode != 0:
            detail = proc.stderr.strip()
            if log_dir and log_name:
                detail = log_errors(os.path.join(log_dir, log_name)) or detail
            raise CriuError(f"`criu {' '.join(args[:1])}` failed (exit {proc.returncode}): "
                            f"{detail or 'no error output'}"
                            + (f"; full log: {os.path.join(log_dir, log_name)}"
                               if log_dir and log_name else ""))
        return proc

    def check(self) -> tuple[bool, str]:
        proc = subprocess.run([self.path, "check"], stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=60)
        out = (proc.stdout + proc.stderr).strip()
        return proc.returncode == 0, out

    def dump(self, pid: int, images_dir: str, *, leave: str = "running", shell_job: bool = True,
             extra: list[str] = (), log_name: str = "dump.log", timeout: float | None = 600):
        """``criu dump -t PID -D DIR``; ``leave`` is "running", "stopped" or "dead"."""
        args = dump_args(pid, images_dir, leave=leave, shell_job=shell_job, extra=extra,
                         log_name=None)
        return self.run(args, log_dir=images_dir, log_name=log_name, timeout=timeout)

    def restore(self, images_dir: str, *, pidfile: str | None = None, shell_job: bool = True,
                lazy: bool = False, extra: list[str] = (), log_name: str = RESTORE_LOG,
                timeout: float | None = 600, user_opts: list[str] = (),
                config: str | None = None, verbosity: int = 4,
                daemon: subprocess.Popen | None = None, early=None) -> int:
        """``criu restore -d -D DIR``; returns the restored root's host pid (from the
        pidfile) so the caller can supervise it.

        ``lazy``: start `criu lazy-pages` on the same directory first and restore with
        --lazy-pages: restore returns once the tasks exist (~0.07 s for 256 MiB here,
        against ~0.7 s for a plain restore that copies every page in) and the daemon fills
        the pages from the local images as the tasks touch them, then exits.

        ``early``: a criu.early.EarlyRestore started with the same options in the directory
        that became images_dir, waiting at its first image: it is fed instead of starting
        criu now; one that died or never reached that image is replaced by a fresh start."""
        pidfile = pidfile or os.path.join(images_dir, RESTORE_PIDFILE)
        if not lazy and daemon is not None:     # started for nothing
            daemon.kill()
            daemon.wait()
            daemon = None
        elif lazy and daemon is None:
            daemon = self.start_lazy_pages(images_dir, verbosity=verbosity)
        args = restore_args(images_dir, pidfile=pidfile, shell_job=shell_job,
                            lazy=daemon is not None, extra=extra, config=config,
                            user_opts=user_opts)
        if early is not None and (
                early.key != restore_key(shell_job=shell_job, lazy=daemon is not None,
                                         extra=extra, config=config, user_opts=user_opts)
                or pidfile != os.path.join(images_dir, RESTORE_PIDFILE)
                or log_name != RESTORE_LOG):
            early.kill()                        # started for another restore than this one
            early = None
        try:
            if early is None or not early.restore(images_dir, timeout=timeout):
                self.run(args, log_dir=images_dir, log_name=log_name, timeout=timeout,
                         verbosity=verbosity)
            with open(pidfile) as f:
                pid = int(f.read().strip())
        except BaseException:
            if early is not None:
                early.kill()
            if daemon is not None:
                daemon.kill()
                daemon.wait()
            raise
        if daemon is not None:
            # reap the daemon when it has served every page
            threading.Thread(target=daemon.wait, name="criu-lazy-pages", daemon=True).start()
        return pid

    def start_lazy_pages(self, images_dir: str, timeout: float = 10.0,
                         verbosity: int = 4) -> subprocess.Popen:
        """The lazy restore's page server for images_dir, returned once its socket is
        there, by ``lazy_server``: deltaxfer's own ("deltaxfer", the default:
        deltaxfer.lazyserve, faulted pages first and every other page copied in the
        background on all cores) or `criu lazy-pages` ("criu"). A receiver starts it
        before the commit (receiver._Receiving._prestart_lazy_pages): either reads the
        images only when a restore hands it the tasks' userfaultfds, so the directory may
        still be filled -- and renamed: it works in the directory it opened, by inode."""
        server = self.lazy_server
        sock = os.path.join(images_dir, "lazy-pages.socket")
        if server == "deltaxfer":
            cmd = [sys.executable, "-m", "deltaxfer.lazyserve", "lazy-pages", "-D", images_dir,
                   "-o", "lazy-pages.log", "--parent", str(os.getpid())]
        elif server == "criu":
            cmd = [self.path, "lazy-pages", "-D", images_dir, "-o", "lazy-pages.log",
                   f"-v{verbosity}"]
        else:
            raise ValueError(f"unknown lazy-pages server {server!r} (deltaxfer or criu)")
        daemon = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not os.path.exists(sock):
            if daemon.poll() is not None or time.monotonic() > deadline:
                daemon.kill()
                daemon.wait()
                raise CriuError(f"the lazy-pages server ({server}) did not start: "
                                f"{log_errors(os.path.join(images_dir, 'lazy-pages.log'))}")
            time.sleep(0.002)
        return daemon


# -- the command lines of criu dump and restore, and the operator's own options -----------------

# Options of `criu dump` that deltaxfer sets itself, or that would break a migration, with
# why; an operator's --criu-opt / --criu-config naming one is refused (also as --no-NAME,
# as NAME=VALUE, and as any abbreviation getopt would take for it).
_OWN = "deltaxfer sets it"
DUMP_RESERVED = {
    "tree": _OWN + " (the PID to migrate)", "images-dir": _OWN + " (its work directory)",
    "work-dir": "it moves criu's log away from where deltaxfer reads and keeps it",
    "action-script": _OWN + " (deltaxfer's hook is the migration agent's)",
    "lazy-pages": _OWN + " (--freeze lazy)", "page-server": _OWN + " (--freeze page-server)",
    "ps-socket": _OWN + " (the page server's socketpair)",
    "address": "the page server runs over deltaxfer's socketpair, not TCP",
    "port": "the page server runs over deltaxfer's socketpair, not TCP",
    "tls": "the page server runs over deltaxfer's socketpair (the migration has --tls-ca)",
    "tls-cacert": "the page server runs over deltaxfer's socketpair",
    "tls-cacrl": "the page server runs over deltaxfer's socketpair",
    "tls-cert": "the page server runs over deltaxfer's socketpair",
    "tls-key": "the page server runs over deltaxfer's socketpair",
    "tls-no-cn-verify": "the page server runs over deltaxfer's socketpair",
    "log-file": _OWN + " (dump.log; kept with --report or --log-dir)",
    "verbosity": "use --criu-verbosity N (default 2: errors and warnings)",
    "leave-running": "the source must stay stopped until the destination runs its copy "
                     "(two running copies otherwise)",
    "leave-stopped": _OWN,
    "shell-job": _OWN,
    "config": "use --criu-config FILE",
    "track-mem": "deltaxfer tracks written pages itself (--tracking)",
    "prev-images-dir": "deltaxfer's rounds hold the previous pages, not a criu pre-dump",
    "stream": "deltaxfer reads the images from its own directory",
    "daemon": "criu must stay deltaxfer's child", "status-fd": _OWN,
}
DUMP_RESERVED_SHORT = {"t": "tree", "D": "images-dir", "W": "work-dir", "o": "log-file",
                       "v": "verbosity", "R": "leave-running", "s": "leave-stopped",
                       "d": "daemon", "j": "shell-job"}
RESTORE_RESERVED = {
    "tree": "a restore takes no PID", "images-dir": _OWN + " (the session's images)",
    "work-dir": "it moves restore.log away from the session directory",
    "restore-detached": _OWN, "pidfile": _OWN + " (serve supervises the restored pid)",
    "log-file": _OWN + " (restore.log in the session directory)",
    "verbosity": "use serve --criu-verbosity N (default 2)",
    "lazy-pages": _OWN + " (serve --no-lazy-restore)",
    "leave-stopped": _OWN + " (a migration's copy waits stopped for the source's RESUME)",
    "leave-running": "not a restore option", "config": "use serve --criu-config FILE",
    "page-server": "serve restores from local images", "ps-socket": "serve restores "
    "from local images", "address": "serve restores from local images",
    "port": "serve restores from local images", "daemon": "criu must stay serve's child",
    "status-fd": _OWN, "exec-cmd": "serve supervises the restored tree by its pid",
    "stream": "serve restores from its own directory", "shell-job": _OWN,
}
RESTORE_RESERVED_SHORT = {"D": "images-dir", "W": "work-dir", "d": "restore-detached",
                          "o": "log-file", "v": "verbosity", "s": "leave-stopped",
                          "R": "leave-running", "t": "tree", "j": "shell-job"}
# criu's short options that take an argument: the rest of a cluster is that argument
_SHORT_WITH_ARG = set("tDoWrLJMx")


def _refusal(opt: str, reserved: dict, short: dict) -> str | None:
    """Why ``opt`` (one word of criu's command line) must not be given, or None."""
    if opt == "--":
        return "criu takes nothing after --"
    if opt.startswith("--"):
        name = opt[2:].split("=", 1)[0]
        base = name[3:] if name.startswith("no-") and name[3:] else name
        hits = [r for r in reserved if r == base] or [r for r in reserved if base and
                                                         r.startswith(base)]
        return f"--{hits[0]}: {reserved[hits[0]]}" if hits else None
    if opt.startswith("-") and len(opt) > 1:
        for ch in opt[1:]:
            if ch in short:
                return f"-{ch} (--{short[ch]}): {reserved[short[ch]]}"
            if ch in _SHORT_WITH_ARG:
                break
    return None


def check_criu_opts(opts, command: str = "dump", flag: str = "--criu-opt") -> list[str]:
    """The operator's own options for ``criu dump`` (or ``restore``), checked: one that
    deltaxfer sets itself or that would break it raises CriuError naming it and why."""
    reserved, short = ((DUMP_RESERVED, DUMP_RESERVED_SHORT) if command == "dump"
                       else (RESTORE_RESERVED, RESTORE_RESERVED_SHORT))
    out = []
    for opt in opts or ():
        why = _refusal(opt, reserved, short)
        if why:
            raise CriuError(f"{flag} {opt!r} refused for `criu {command}`: {why}; leave it "
                            "out (docs/OPERATIONS.md, section 7)")
        out.append(opt)
    return out


def config_options(path: str) -> list[str]:
    """The options a CRIU configuration file sets, as ``--NAME`` words (one per line: the
    option's long name without dashes, then its value, if any; ``#`` comments)."""
    out = []
    with open(path, errors="replace") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                out.append("--" + line.split()[0].lstrip("-"))
    return out


def check_criu_config(path: str | None, command: str = "dump",
                      flag: str = "--criu-config") -> str | None:
    """A CRIU configuration file for ``criu dump`` (or ``restore``), as an absolute path,
    after checking each of its options as check_criu_opts does (CriuError naming the
    file, the option and why)."""
    if not path:
        return None
    path = os.path.abspath(path)
    try:
        opts = config_options(path)
    except OSError as e:
        raise CriuError(f"{flag} {path}: cannot read it: {e.strerror or e}") from None
    reserved, short = ((DUMP_RESERVED, DUMP_RESERVED_SHORT) if command == "dump"
                       else (RESTORE_RESERVED, RESTORE_RESERVED_SHORT))
    for opt in opts:
        why = _refusal(opt, reserved, short)
        if why:
            raise CriuError(f"{flag} {path}: the line {opt[2:]!r} is refused for `criu "
                            f"{command}`: {why}; remove it from the file (docs/OPERATIONS.md, "
                            "section 7)")
    return path


def dump_args(pid: int, images_dir: str, *, leave: str = "stopped", shell_job: bool = True,
              action_script: str | None = None, log_name: str | None = "dump.log",
              ps_socket: int | None = None, lazy: bool = False, page_server: bool = False,
              config: str | None = None, user_opts=(), extra=(),
              verbosity: int = CRIU_VERBOSITY) -> list[str]:
    """The one place where deltaxfer builds ``criu dump``'s arguments (after the binary):
    its own options, then ``--config FILE`` and the operator's options (checked with
    check_criu_config / check_criu_opts by the caller). ``leave``: "running", "stopped"
    or "dead" (what becomes of the tree after the dump)."""
    args = ["dump", "-t", str(pid), "-D", images_dir]
    if leave == "running":
        args.append("--leave-running")
    elif leave == "stopped":
        args.append("--leave-stopped")
    elif leave != "dead":
        raise ValueError(f"leave must be running, stopped or dead, not {leave!r}")
    if shell_job:
        args.append("--shell-job")
    if action_script:
        args += ["--action-script", action_script]
    if log_name:
        args += ["-o", log_name, f"-v{verbosity}"]
    if ps_socket is not None:
        args += ["--ps-socket", str(ps_socket)]
    if lazy:
        args.append("--lazy-pages")
    if page_server:
        args.append("--page-server")
    return _then_operator_opts(args, extra, config, user_opts)


def restore_key(*, shell_job: bool, lazy: bool, extra=(), config: str | None = None,
                user_opts=()) -> tuple:
    """What makes two `criu restore` runs of one directory the same restore (the options
    restore_args takes besides the directory and pid file): a restore started early
    (criu/early.py) is used only by a restore asked with the same key."""
    return (bool(shell_job), bool(lazy), tuple(extra), config, tuple(user_opts))


def restore_args(images_dir: str, *, pidfile: str, shell_job: bool = True, lazy: bool = False,
                 extra=(), config: str | None = None, user_opts=()) -> list[str]:
    """The one place where deltaxfer builds ``criu restore``'s arguments (after the binary,
    before ``-o LOG -vN``): its own options, then ``--config FILE`` and the operator's
    options last (checked by check_criu_opts / check_criu_config when serve started)."""
    args = ["restore", "-d", "-D", images_dir, "--pidfile", pidfile]
    if shell_job:
        args.append("--shell-job")
    if lazy:
        args.append("--lazy-pages")
    return _then_operator_opts(args, extra, config, user_opts)


def _then_operator_opts(args: list[str], extra, config: str | None, user_opts) -> list[str]:
    """deltaxfer's extra options, then ``--config FILE`` and the operator's options last
    (CRIU lets a later option override an earlier one)."""
    args = args + list(extra)
    if config:
        args += ["--config", config]
    return args + list(user_opts)


def log_errors(path: str, limit: int = 5) -> str:
    """The last ``Error`` lines of a criu log, which say why it failed."""
    try:
        with open(path, errors="replace") as f:
            lines = [ln.strip() for ln in f if "Error (" in ln]
    except OSError:
        return ""
    return " | ".join(lines[-limit:])


def _probe(path: str) -> tuple[int, ...]:
    proc = subprocess.run([path, "--version"], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise CriuError(f"{path} --version failed (exit {proc.returncode}): "
                        f"{(proc.stderr or proc.stdout).strip()[:300]}")
    return parse_version(proc.stdout)


def find_criu(explicit: str | None = None) -> Criu:
    """The first usable criu in search order, or CriuNotFound explaining every miss."""
    misses = []
    for origin, path in candidates(explicit):
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            if origin in ("--criu", "DELTAXFER_CRIU"):
                # an explicit choice that is wrong is an error, not something to skip
                raise CriuNotFound(f"criu from {origin} ({path}) is not an executable file; "
                                   f"{INSTALL_HINT}")
            misses.append(f"{origin}: {path} not installed")
            continue
        explicit_choice = origin in ("--criu", "DELTAXFER_CRIU")
        try:
            version = _probe(path)
        except (CriuError, OSError, subprocess.TimeoutExpired) as e:
            if explicit_choice:
                raise CriuNotFound(f"criu from {origin} ({path}) does not work: {e}; "
                                   f"{INSTALL_HINT}") from None
            misses.append(f"{origin}: {e}")
            continue
        if version < MIN_VERSION:
            msg = (f"{origin}: criu {'.'.join(map(str, version))} at {path} is too old: "
                   "criu < 4.0 cannot handle this kernel's vDSO (`criu check` fails)")
            if explicit_choice:
                raise CriuNotFound(f"{msg}; {INSTALL_HINT}")
            misses.append(msg)
            continue
        return Criu(path=path, version=version, origin=origin)
    raise CriuNotFound("no usable criu found (" + "; ".join(misses or ["nothing on PATH"])
                       + f"); {INSTALL_HINT}")
