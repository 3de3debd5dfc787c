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

    @property
    def version_str(self) -> str:
        return ".".join(map(str, self.version))

    def run(self, args: list[str], *, log_dir: str | None = None, log_name: str | None = None,
            timeout: float | None = None, check: bool = True, **popen) -> subprocess.CompletedProcess:
        """Run ``criu ARGS``; on failure raise CriuError quoting the log's error lines."""
        cmd = [self.path] + list(args)
        if log_name:
            cmd += ["-o", log_name, "-v4"]
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
        args = ["dump", "-t", str(pid), "-D", images_dir]
        if leave == "running":
            args.append("--leave-running")
        elif leave == "stopped":
            args.append("--leave-stopped")
        elif leave != "dead":
            raise ValueError(f"leave must be running, stopped or dead, not {leave!r}")
        if shell_job:
            args.append("--shell-job")
        args += list(extra)
        return self.run(args, log_dir=images_dir, log_name=log_name, timeout=timeout)

    def restore(self, images_dir: str, *, pidfile: str | None = None, shell_job: bool = True,
                lazy: bool = False, extra: list[str] = (), log_name: str = "restore.log",
                timeout: float | None = 600) -> int:
        """``criu restore -d -D DIR``; returns the restored root's host pid (from the
        pidfile) so the caller can supervise it.

        ``lazy``: start `criu lazy-pages` on the same directory first and restore with
        --lazy-pages: restore returns once the tasks exist (~0.07 s for 256 MiB here,
        against ~0.7 s for a plain restore that copies every page in) and the daemon fills
        the pages from the local images as the tasks touch them, then exits."""
        pidfile = pidfile or os.path.join(images_dir, "restored.pid")
        args = ["restore", "-d", "-D", images_dir, "--pidfile", pidfile]
        if shell_job:
            args.append("--shell-job")
        daemon = self._start_lazy_pages(images_dir) if lazy else None
        if daemon is not None:
            args.append("--lazy-pages")
        args += list(extra)
        try:
            self.run(args, log_dir=images_dir, log_name=log_name, timeout=timeout)
            with open(pidfile) as f:
                pid = int(f.read().strip())
        except BaseException:
            if daemon is not None:
                daemon.kill()
                daemon.wait()
            raise
        if daemon is not None:
            # reap the daemon when it has served every page
            threading.Thread(target=daemon.wait, name="criu-lazy-pages", daemon=True).start()
        return pid

    def _start_lazy_pages(self, images_dir: str, timeout: float = 10.0) -> subprocess.Popen:
        sock = os.path.join(images_dir, "lazy-pages.socket")
        daemon = subprocess.Popen([self.path, "lazy-pages", "-D", images_dir,
                                   "-o", "lazy-pages.log", "-v4"],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not os.path.exists(sock):
            if daemon.poll() is not None or time.monotonic() > deadline:
                daemon.kill()
                daemon.wait()
                raise CriuError("`criu lazy-pages` did not start: "
                                f"{log_errors(os.path.join(images_dir, 'lazy-pages.log'))}")
            time.sleep(0.002)
        return daemon


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
