"""CRIU's page pipes, and the sysctl that caps their size.

A dump drains the tasks' pages into pipes (vmsplice from the parasite). CRIU grows each
pipe (F_SETPIPE_SZ) up to the largest its pipe buffers fit in (``CRIU_PIPE_BYTES``: 4
MiB); past ``fs.pipe-max-size`` (1 MiB by default) the kernel lets only a process with
CAP_SYS_RESOURCE grow one. Root usually has it. Where it does not (containers, sandboxed
hosts: this project's machines), every pipe stays at 1 MiB, so a lazy dump keeps four
times the pipes -- ~2048 open files per GiB instead of ~500 -- and spends longer making
and filling them: `criu dump --lazy-pages` of memwork, pre-dump to post-dump, 4 GiB
0.53-0.57 s with 1 MiB pipes against 0.28-0.29 s with 4 MiB; 8 GiB 0.80-0.84 s against
0.43-0.52 s (two runs each, 2026-11-30).

``PipeSizeRaise`` raises ``fs.pipe-max-size`` to ``CRIU_PIPE_BYTES`` for a freeze when
that is what stands in the way, and puts the operator's value back when the last
migration that needed it is done. Concurrent migrations on one host coordinate through
lock files in /run/deltaxfer: each holds one shared from its raise until its release; a
release that can then take it exclusively (no other migration between raise and
release) restores the saved value, unless someone changed the sysctl meanwhile. A
migration killed before its release leaves the saved value on disk: the post-dump hook
that finds the agent gone restores it (hook.py), else the next release does.
"""
from __future__ import annotations

import errno
import fcntl
import os
import stat

SYSCTL = "/proc/sys/fs/pipe-max-size"
# CRIU's PIPE_MAX_SIZE: as many pipe buffers as fit in an order-3 allocation (8 pages /
# 40-byte struct pipe_buffer = 819 pages), which the kernel rounds up to 1024 pages
CRIU_PIPE_BYTES = 4 << 20
STATE_DIR = "/run/deltaxfer"
CAP_SYS_RESOURCE = 24
# open files per GiB of a lazy dump, measured with CRIU 4.1.1 (memwork, 4 and 8 GiB):
# 1 MiB pipes 1950, 4 MiB pipes 490; rounded up
FDS_PER_GIB_SMALL_PIPES = 2048
FDS_PER_GIB_LARGE_PIPES = 512


_NOFOLLOW = os.O_CLOEXEC | os.O_NOFOLLOW


def _read(path: str) -> int | None:
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
    except OSError:
        return None
    try:
        return int(os.read(fd, 64).split()[0])
    except (OSError, ValueError, IndexError):
        return None
    finally:
        os.close(fd)


def _write(path: str, value: int, *, create: bool = False) -> None:
    flags = os.O_WRONLY | _NOFOLLOW | (os.O_CREAT | os.O_TRUNC if create else 0)
    fd = os.open(path, flags, 0o600)
    try:
        os.write(fd, str(value).encode())
    finally:
        os.close(fd)


def _private_dir(path: str) -> None:
    """Create ``path`` (0700) or check that it is a directory of ours that nobody else may
    write: the saved value is written there as root, and a directory someone else could
    put a link in would let them aim that write (every open is O_NOFOLLOW too)."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise PermissionError(errno.EPERM, f"{path} is not a directory of uid "
                                           f"{os.geteuid()} closed to others")


def has_cap_sys_resource() -> bool:
    """Whether this process (and the criu it runs as root) may grow a pipe past the
    sysctl."""
    from deltaxfer.core.procmem import status
    try:
        return bool(int(status("self")["CapEff"], 16) >> CAP_SYS_RESOURCE & 1)
    except (OSError, KeyError, ValueError):
        return False


def criu_pipes_large() -> bool:
    """Whether CRIU's page pipes can reach CRIU_PIPE_BYTES now."""
    if has_cap_sys_resource():
        return True
    cur = _read(SYSCTL)
    return cur is not None and cur >= CRIU_PIPE_BYTES


def lazy_dump_fds_per_gib() -> int:
    return FDS_PER_GIB_LARGE_PIPES if criu_pipes_large() else FDS_PER_GIB_SMALL_PIPES


class PipeSizeRaise:
    """Raise fs.pipe-max-size for a freeze (``raise_()``), restore it after
    (``release()``, idempotent; call it on every exit path). ``note`` says what was done,
    for the report ('' when nothing was needed).

    Two lock files in ``state_dir``: ``pipe-max-size.lock``, held exclusively only for
    each short read-modify-write (raise, or the check and restore of a release), and
    ``pipe-max-size.users``, held shared by every migration from its raise to its
    release; a release restores only if it can then take the users' lock exclusively."""

    def __init__(self, sysctl: str = SYSCTL, state_dir: str = STATE_DIR):
        self.sysctl, self.state_dir = sysctl, state_dir
        self.lock_path = os.path.join(state_dir, "pipe-max-size.lock")
        self.users_path = os.path.join(state_dir, "pipe-max-size.users")
        self.saved_path = os.path.join(state_dir, "pipe-max-size.saved")
        self.fd = -1           # our shared hold of the users' lock, from raise to release
        self.note = ""

    def _hold(self) -> None:
        """Open the users' lock file (in a state directory checked to be private) as our
        hold: taken shared by raise_, converted by release."""
        _private_dir(self.state_dir)
        self.fd = os.open(self.users_path, os.O_RDWR | os.O_CREAT | _NOFOLLOW, 0o600)

    def _mutex(self) -> int:
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | _NOFOLLOW, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd                  # closing it unlocks

    def raise_(self, want: int = CRIU_PIPE_BYTES, *, needed: bool | None = None) -> str:
        """Make fs.pipe-max-size at least ``want`` while this freeze runs, where CRIU
        needs it (``needed``: default, root without CAP_SYS_RESOURCE). Never fails the
        migration: a sysctl that cannot be written leaves the dump as it would have been,
        and the note says why."""
        if needed is None:
            needed = not has_cap_sys_resource()
        cur = _read(self.sysctl)
        if not needed or cur is None or cur >= want and not os.path.exists(self.saved_path):
            return ""
        mutex = -1
        try:
            self._hold()
            mutex = self._mutex()
            fcntl.flock(self.fd, fcntl.LOCK_SH)   # releases take it EX only under the mutex
            cur = _read(self.sysctl) or 0
            if cur < want:
                saved_here = not os.path.exists(self.saved_path)
                if saved_here:
                    _write(self.saved_path, cur, create=True)
                try:
                    _write(self.sysctl, want)     # EROFS where /proc/sys is read-only
                except OSError:
                    if saved_here:
                        os.unlink(self.saved_path)
                    raise
                self.note = f"fs.pipe-max-size raised from {cur} to {want} for the freeze"
        except OSError as e:
            self.note = f"fs.pipe-max-size left at {cur}: {e.strerror or e}"
            self._close()
        finally:
            if mutex >= 0:
                os.close(mutex)
        return self.note

    def release(self, *, held_elsewhere: bool = False) -> str:
        """Put the saved value back if no other migration holds the raise (and nobody set
        the sysctl to something else meanwhile); returns what was done.
        ``held_elsewhere``: the raise was made by another process of this migration that
        has exited since (the stand-alone hook: pre-dump raises, post-dump releases):
        restore a saved value if no migration holds it now."""
        if self.fd < 0:
            if not held_elsewhere or not os.path.exists(self.saved_path):
                return ""
            try:
                self._hold()
            except OSError as e:
                return f"fs.pipe-max-size not restored: {e.strerror or e}"
        done, mutex = "", -1
        try:
            mutex = self._mutex()
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return "fs.pipe-max-size left raised: another migration's freeze holds it"
            saved = _read(self.saved_path)
            if saved is not None:
                if _read(self.sysctl) == CRIU_PIPE_BYTES:
                    _write(self.sysctl, saved)
                    done = f"fs.pipe-max-size back to {saved}"
                os.unlink(self.saved_path)
        except OSError as e:
            done = f"fs.pipe-max-size not restored: {e.strerror or e}"
        finally:
            self._close()
            if mutex >= 0:
                os.close(mutex)
        return done

    def _close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
