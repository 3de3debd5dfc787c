"""`criu restore` started before its images are complete: its start-up out of the freeze.

Before it reads its first image, `criu restore` spends 35-45 ms here: the exec, then
``kerndat_init``, CRIU probing the kernel's features (one probe creates a network
namespace and a veth pair). CRIU caches those results in /run/criu.kdat, but only where
/run is a tmpfs; and it is still an exec and a start per restore. In a migration the
restore starts at COMMIT, inside the freeze, so all of that was freeze time.

An EarlyRestore starts `criu restore` with the session's first round, with the options
the commit's restore will have, in the directory the commit fills (``images.tmp``),
whose ``inventory.img`` -- the first image CRIU reads, and the only thing it reads before
it checks its options and probes the kernel -- is then a FIFO that the receiver holds
open (read-write: the open never blocks, and CRIU's open finds a writer). CRIU opens its
images and work directories at its start, by inode (the commit's rename to ``images``
moves nothing under it), probes the kernel, opens the FIFO and waits in read(2). The
commit first waits until CRIU holds the FIFO (:meth:`ready`: renamed over the FIFO before
CRIU opened it, the real inventory would be read straight from the file and CRIU would
restore on its own, before its time), then puts every image in place, its regular
inventory.img replacing the FIFO's name. At the restore :meth:`restore` checks that CRIU holds the FIFO (its descriptors name
the FIFO's inode: data written before CRIU opened it would go with the receiver's
descriptor), writes the dump's inventory into it and closes its end, and CRIU reads it
to its end and goes on exactly as a restore started then would.

Measured here (a dumped `sleep`, plain restore, three runs): a restore started at the
commit took 42-67 ms to return, one fed this way 20-27 ms; in a 256 MiB migration the
freeze's commit_restore went from 56-60 ms to 11-16 ms.

Clean-up: a restore never fed (the migration failed, was cancelled, its commit carried
no restore) is killed where it waits -- it has read nothing and made no task. If the
receiver dies, its end of the FIFO closes with it: CRIU reads an empty inventory, says
so in its log and exits, having made nothing (a restore already fed is not affected: it
finishes, and a receiver restarted kills the stopped copy that never got RESUME). A
receiver stopped by SIGTERM kills the ones it has not fed on its way out (kill_unfed:
one still starting would not see its end close). One that was still starting when the
receiver was killed otherwise waits in its open; the next receiver's
start kills it (receiver.recover_restores). A restore that dies before it holds the
FIFO, or does not get there in time, is replaced by a fresh `criu restore`
(Criu.restore); one that fails after reading the inventory fails the restore, as a
fresh one would.
"""
from __future__ import annotations

import logging
import os
import subprocess
import time

from deltaxfer.criu.runner import (RESTORE_LOG, RESTORE_PIDFILE, CriuError, log_errors,
                                   restore_args, restore_key)

log = logging.getLogger("deltaxfer.criu.early")

INVENTORY = "inventory.img"
LOG_NAME = RESTORE_LOG
PIDFILE = RESTORE_PIDFILE       # relative: CRIU writes it in its work directory (by inode)
# how long the commit waits for a restore to reach its first image (inside the freeze):
# it has been starting since the first round (~40 ms here), so it waits there already
# unless the host is starved; past this it is killed and a fresh one started
REACH_TIMEOUT = 5.0
# how long a kill waits for a restore still starting to reach its first image (~40 ms here)
SETTLE_TIMEOUT = 5.0


# the early restores of this process not fed yet (they have made nothing): what a receiver
# stopped by SIGTERM kills on its way out (kill_unfed)
_UNFED: set["EarlyRestore"] = set()


def kill_unfed() -> int:
    """SIGKILL every early restore of this process not fed yet (a receiver on its way out:
    one still starting would otherwise wait in its open for a writer that is gone).
    Signal-handler safe enough: no lock, no wait. Returns how many."""
    n = 0
    for e in list(_UNFED):
        try:
            e.proc.kill()
            n += 1
        except OSError:
            pass
    return n


class EarlyRestore:
    """One `criu restore` waiting at its first image (see the module's doc)."""

    def __init__(self, proc: subprocess.Popen, fifo_fd: int, images_dir: str, key: tuple):
        self.proc, self._fifo_fd, self.images_dir, self.key = proc, fifo_fd, images_dir, key
        st = os.fstat(fifo_fd)
        self._fifo_id = (st.st_dev, st.st_ino)
        self.fed_s: float | None = None      # feed -> criu's exit, when fed

    @classmethod
    def start(cls, criu, images_dir: str, *, lazy: bool, extra=(), shell_job: bool = True,
              config: str | None = None, user_opts=(), verbosity: int = 2) -> "EarlyRestore":
        """Make images_dir/inventory.img a FIFO held open here and start `criu restore` in
        images_dir. ``key`` records the options, so that a restore asked with others does
        not use it."""
        fifo = os.path.join(images_dir, INVENTORY)
        os.mkfifo(fifo, 0o600)
        try:
            # read-write: never blocks, and is the writer CRIU's open waits for
            fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
        except BaseException:
            os.unlink(fifo)
            raise
        args = restore_args(images_dir, pidfile=PIDFILE, shell_job=shell_job, lazy=lazy,
                            extra=extra, config=config, user_opts=user_opts)
        cmd = [criu.path] + args + ["-o", LOG_NAME, f"-v{verbosity}"]
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE)
        except BaseException:
            os.close(fd)
            os.unlink(fifo)
            raise
        early = cls(proc, fd, images_dir, restore_key(
            shell_job=shell_job, lazy=lazy, extra=extra, config=config, user_opts=user_opts))
        _UNFED.add(early)
        return early

    def waiting(self) -> bool:
        """Whether criu holds the FIFO open now (its start-up is over: it waits to read)."""
        fds = f"/proc/{self.proc.pid}/fd"
        try:
            names = os.listdir(fds)
        except OSError:
            return False
        for name in names:
            try:
                st = os.stat(os.path.join(fds, name))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == self._fifo_id:
                return True
        return False

    def _reach(self, timeout: float) -> bool:
        """Until criu holds the FIFO; False if it exited or did not within ``timeout``."""
        deadline = time.monotonic() + timeout
        while not self.waiting():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                return False
            time.sleep(0.001)
        return True

    def ready(self, timeout: float = REACH_TIMEOUT) -> bool:
        """Before the commit puts the real inventory.img in the FIFO's place: wait until
        criu holds the FIFO. Renamed over the FIFO before criu opened it, the inventory
        would be read straight from the file, and criu would restore on its own, before
        its time. False (and the restore killed: the caller restores afresh) if it
        exited or did not get there within ``timeout``."""
        if self._fifo_fd >= 0 and self._reach(timeout):
            return True
        self._give_up(timeout, self.images_dir)
        return False

    def _give_up(self, timeout: float, images_dir: str) -> None:
        """It exited before its first image or did not get there in ``timeout``: say so
        (with its log's errors) and kill it; the caller starts a fresh restore."""
        rc = self.proc.poll()
        log.warning("the restore started early %s; a fresh one is started: %s",
                    f"exited ({rc}) before its first image" if rc is not None else
                    f"did not reach its first image in {timeout:g} s",
                    log_errors(os.path.join(images_dir, LOG_NAME)) or "no error logged")
        self.kill(settle=0)

    def restore(self, images_dir: str, timeout: float | None = 600,
                reach_timeout: float = REACH_TIMEOUT) -> bool:
        """Feed the committed images_dir's inventory to the waiting restore and wait for it
        to end. True: it restored (its pid file is images_dir/restored.pid); False: it was
        gone or not at its first image (killed: the caller starts a fresh restore). Raises
        CriuError when the fed restore fails, quoting its log."""
        if self._fifo_fd < 0:
            return False
        if not self._reach(reach_timeout):
            rc = self.proc.poll()
            if rc == 0:
                # it read a real inventory.img (the FIFO's name replaced before it opened
                # it: a caller that did not wait for ready()) and restored: a second
                # restore would make a second copy
                log.warning("the restore started early restored before it was fed (%s)",
                            images_dir)
                self._fifo_fd, fd = -1, self._fifo_fd
                os.close(fd)
                _UNFED.discard(self)
                self.proc.communicate()
                self.fed_s = 0.0
                return True
            self._give_up(reach_timeout, images_dir)
            return False
        t0 = time.monotonic()
        fd, self._fifo_fd = self._fifo_fd, -1
        _UNFED.discard(self)                    # fed from here: it restores
        try:
            with open(os.path.join(images_dir, INVENTORY), "rb") as f:
                view = memoryview(f.read())
            while view:     # (an inventory is far below a pipe's 64 KiB: one write)
                try:
                    view = view[os.write(fd, view):]
                except BlockingIOError:
                    if self.proc.poll() is not None:
                        break                   # criu died reading: its exit says why
                    time.sleep(0.001)
        finally:
            os.close(fd)                        # criu reads the inventory, then its end
        try:
            _, err = self.proc.communicate(timeout=timeout)
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

    def kill(self, settle: float = SETTLE_TIMEOUT) -> None:
        """Kill it (a restore never fed has made no task) and reap it. One still probing
        the kernel is first given up to ``settle`` seconds to reach the FIFO: CRIU's
        probes fork helpers (one in a network namespace of its own), which a kill in the
        middle would leave behind."""
        if self._fifo_fd >= 0:
            if settle > 0:
                self._reach(settle)
            os.close(self._fifo_fd)
            self._fifo_fd = -1
        if self.proc.poll() is None:
            self.proc.kill()
        _UNFED.discard(self)
        try:
            self.proc.communicate(timeout=30)
        except (subprocess.TimeoutExpired, ValueError, OSError):
            pass


__all__ = ["EarlyRestore", "REACH_TIMEOUT", "kill_unfed"]
