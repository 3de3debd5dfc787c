"""`criu restore` started before its images are complete: its start-up out of the freeze.

Before it reads its first image, `criu restore` spends 35-45 ms here: the exec, then
``kerndat_init``, CRIU probing the kernel's features (one probe creates a network
namespace and a veth pair). CRIU caches those results in /run/criu.kdat, but only where
/run is a tmpfs; and it is still an exec and a start per restore. In a migration the
restore starts at COMMIT, inside the freeze, so all of that was freeze time.

An EarlyRestore starts `criu restore` with the session's first round, with the options
the commit's restore will have, in the directory the commit fills (``images.tmp``),
whose ``inventory.img`` -- the first image CRIU reads, and the only thing it reads before
it checks its options and probes the kernel -- is then a FIFO. CRIU opens its images
and work directories at its start, by inode (the commit's rename to ``images`` moves
nothing under it), probes the kernel, and waits in open(2) on the FIFO, a reader without
a writer. At the restore the commit has put every image in place, its regular
inventory.img replacing the FIFO's name; :meth:`restore` reopens the FIFO through an
O_PATH descriptor kept since the start (a non-blocking open for writing succeeds only
once CRIU waits in its open), writes the dump's inventory into it and closes it, and
CRIU reads it to its end and goes on exactly as a restore started then would.

Measured here (a dumped `sleep`, plain restore, three runs): a restore started at the
commit took 42-67 ms to return, one fed this way 20-27 ms.

Clean-up: a restore never fed (the migration failed, was cancelled, its commit carried
no restore) is killed where it waits -- it has read nothing and made no task. It is
started under ``setpriv --pdeathsig KILL`` where util-linux has it, so it dies with the
receiver that started it (the event loop's thread, which lives as long as the
receiver); a receiver restarted after a crash kills one left waiting for a session it
finds interrupted (receiver.recover_restores). A restore that dies before it reaches
the FIFO, or does not reach it in time, is replaced by a fresh `criu restore`
(Criu.restore); one that fails after reading the inventory fails the restore, as a
fresh one would.
"""
from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess
import time

from deltaxfer.criu.runner import CriuError, log_errors, restore_args

log = logging.getLogger("deltaxfer.criu.early")

INVENTORY = "inventory.img"
LOG_NAME = "restore.log"
PIDFILE = "restored.pid"        # relative: CRIU writes it in its work directory (by inode)
# how long a restore fed at COMMIT may take to reach its first image: it has been starting
# since the first round, so it waits there already unless the host is starved
REACH_TIMEOUT = 30.0


class EarlyRestore:
    """One `criu restore` waiting at its first image (see the module's doc)."""

    def __init__(self, proc: subprocess.Popen, fifo_fd: int, images_dir: str, key: tuple):
        self.proc, self._fifo_fd, self.images_dir, self.key = proc, fifo_fd, images_dir, key
        self.t_start = time.monotonic()
        self.fed_s: float | None = None      # feed -> criu's exit, when fed

    @classmethod
    def start(cls, criu, images_dir: str, *, lazy: bool, extra=(), shell_job: bool = True,
              config: str | None = None, user_opts=(), verbosity: int = 2) -> "EarlyRestore":
        """Make images_dir/inventory.img a FIFO and start `criu restore` in images_dir.
        ``key`` records the options, so that a restore asked with others does not use it."""
        fifo = os.path.join(images_dir, INVENTORY)
        os.mkfifo(fifo, 0o600)
        fd = os.open(fifo, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        args = restore_args(images_dir, pidfile=PIDFILE, shell_job=shell_job, lazy=lazy,
                            extra=extra, config=config, user_opts=user_opts)
        cmd = [criu.path] + args + ["-o", LOG_NAME, f"-v{verbosity}"]
        setpriv = shutil.which("setpriv")
        if setpriv:
            cmd = [setpriv, "--pdeathsig", "KILL"] + cmd
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE)
        except BaseException:
            os.close(fd)
            os.unlink(fifo)
            raise
        key = (shell_job, bool(lazy), tuple(extra), config, tuple(user_opts))
        return cls(proc, fd, images_dir, key)

    def waiting(self) -> bool:
        """Whether criu waits in open(2) on the FIFO now (the kernel's wait for a FIFO's
        other end), i.e. its start-up is over."""
        try:
            with open(f"/proc/{self.proc.pid}/wchan") as f:
                return f.read().strip() == "wait_for_partner"
        except OSError:
            return False

    def _reach(self, timeout: float) -> int | None:
        """A descriptor writing into the FIFO once CRIU waits at it; None if CRIU exited or
        did not get there within ``timeout``."""
        deadline = time.monotonic() + timeout
        path = f"/proc/self/fd/{self._fifo_fd}"
        while True:
            try:
                return os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as e:
                if e.errno != errno.ENXIO:      # ENXIO: no reader yet
                    raise
            if self.proc.poll() is not None or time.monotonic() > deadline:
                return None
            time.sleep(0.001)

    def restore(self, images_dir: str, timeout: float | None = 600,
                reach_timeout: float = REACH_TIMEOUT) -> bool:
        """Feed the committed images_dir's inventory to the waiting restore and wait for it
        to end. True: it restored (its pid file is images_dir/restored.pid); False: it was
        gone or not at its first image (killed: the caller starts a fresh restore). Raises
        CriuError when the fed restore fails, quoting its log."""
        if self._fifo_fd < 0:
            return False
        try:
            wfd = self._reach(reach_timeout)
        finally:
            os.close(self._fifo_fd)
            self._fifo_fd = -1
        if wfd is None:
            rc = self.proc.poll()
            log.warning("the restore started early %s; a fresh one is started: %s",
                        f"exited ({rc}) before its first image" if rc is not None else
                        f"did not reach its first image in {reach_timeout:g} s",
                        log_errors(os.path.join(images_dir, LOG_NAME)) or "no error logged")
            self.kill()
            return False
        t0 = time.monotonic()
        try:
            with open(os.path.join(images_dir, INVENTORY), "rb") as f:
                data = f.read()
            os.set_blocking(wfd, True)
            view = memoryview(data)
            while view:
                view = view[os.write(wfd, view):]
        except BrokenPipeError:
            pass                                # criu died reading: its exit says why
        finally:
            os.close(wfd)
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise CriuError(f"`criu restore` did not finish in {timeout:g} s; full log: "
                            f"{os.path.join(images_dir, LOG_NAME)}") from None
        self.fed_s = time.monotonic() - t0
        if self.proc.returncode != 0:
            detail = (log_errors(os.path.join(images_dir, LOG_NAME))
                      or err.decode(errors="replace").strip())
            raise CriuError(f"`criu restore` failed (exit {self.proc.returncode}): "
                            f"{detail or 'no error output'}; full log: "
                            f"{os.path.join(images_dir, LOG_NAME)}")
        return True

    def kill(self) -> None:
        """Kill it wherever it is (a restore never fed has made no task) and reap it."""
        if self._fifo_fd >= 0:
            os.close(self._fifo_fd)
            self._fifo_fd = -1
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.communicate(timeout=30)
        except (subprocess.TimeoutExpired, ValueError, OSError):
            pass


__all__ = ["EarlyRestore", "REACH_TIMEOUT"]
