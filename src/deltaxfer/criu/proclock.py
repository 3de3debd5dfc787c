"""One CRIU dump at a time per working directory, where CRIU needs that directory.

CRIU's parasite needs a /proc of the dumped task's own pid namespace. When the /proc the
task sees belongs to another namespace (a process started with ``unshare --pid --fork``
and no /proc of its own: what `deltaxfer lab`'s and the tests' workloads are, and what an
operator gets from `unshare -p -f` without ``--mount-proc``), the parasite, running inside
the task, makes the directory ``proc.crtools`` in the task's *working directory*, mounts a
proc there, opens it, detaches and removes it. Two dumps of such tasks that share a
working directory race on that mkdir: the second fails with "Can't create a directory
(-17)" and its migration rolls back. Seen once in CI with two concurrent migrations.

So before it starts ``criu dump``, the migration agent takes, for every task of the tree
in another pid namespace than ours, an exclusive lock named by its working directory's
(st_dev, st_ino), in sorted order (no deadlock between agents), and releases them when
CRIU has dumped (the post-dump hook) or exited. Tasks in our pid namespace (CRIU opens
/proc directly) take no lock, so ordinary migrations never wait on each other. The wait
happens before the freeze: the task runs on meanwhile. A lock held past ``timeout`` is
an error that names the directory; nothing has been frozen then.

Lock files live in ``/run/deltaxfer/criu-cwd`` (root's, mode 0700); a non-root agent
(tests without CAP_SYS_ADMIN never get here: CRIU dump needs root) uses a per-user
directory under the temporary directory instead.
"""
from __future__ import annotations

import asyncio
import fcntl
import os
import tempfile
import time

from ..core import procmem

LOCK_DIR = "/run/deltaxfer/criu-cwd"
DIRNAME = "proc.crtools"       # what CRIU's parasite creates in the working directory


class CwdLockTimeout(RuntimeError):
    pass


def cwd_keys(pid: int) -> list[tuple[int, int, str]]:
    """(st_dev, st_ino, path) of the working directories CRIU's parasite will make
    ``proc.crtools`` in, for the tree rooted at pid: those of tasks in another pid
    namespace than this process. Sorted, without repeats."""
    ours = procmem.namespace("self", "pid")
    keys = {}
    for t in procmem.process_tree(pid):
        ns = procmem.namespace(t.host_pid, "pid")
        if ns is None or ns == ours:
            continue
        found = procmem.cwd(t.host_pid)
        if found is None:
            continue           # gone, or no cwd: CRIU will say what it finds
        path, st = found
        keys[(st.st_dev, st.st_ino)] = path
    return sorted((d, i, p) for (d, i), p in keys.items())


def lock_dir() -> str:
    if os.geteuid() == 0:
        path = LOCK_DIR
    else:
        path = os.path.join(tempfile.gettempdir(), f"deltaxfer-{os.geteuid()}", "criu-cwd")
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


class CwdLocks:
    """The locks for one dump: ``await acquire()``, ``release()`` (idempotent)."""

    def __init__(self, keys: list[tuple[int, int, str]], directory: str | None = None):
        self.keys = keys
        self.dir = directory
        self.fds: list[int] = []
        self.waited = 0.0

    async def acquire(self, timeout: float = 30.0, poll: float = 0.01) -> None:
        if not self.keys:
            return
        directory = self.dir or lock_dir()
        t0 = time.monotonic()
        try:
            for dev, ino, path in self.keys:
                fd = os.open(os.path.join(directory, f"{dev:x}-{ino:x}.lock"),
                             os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
                self.fds.append(fd)
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() - t0 > timeout:
                            raise CwdLockTimeout(
                                f"another CRIU dump of a task working in {path} held it "
                                f"for {timeout:.0f} s (CRIU makes {DIRNAME} there for tasks "
                                f"in their own pid namespace); nothing was frozen") from None
                        await asyncio.sleep(poll)
        except BaseException:
            self.release()
            raise
        finally:
            self.waited = time.monotonic() - t0

    def release(self) -> None:
        fds, self.fds = self.fds, []
        for fd in fds:
            os.close(fd)       # closing drops the flock


def left_behind_hint(pid: int, log_text: str) -> str | None:
    """For a dump that failed on CRIU's mkdir of proc.crtools: what to do."""
    if "Can't create a directory (-17)" not in log_text:
        return None
    found = procmem.cwd(pid)
    cwd = found[0] if found else "the task's working directory"
    return (f"CRIU could not create {DIRNAME} in {cwd}: it already exists (a dump not run "
            f"by deltaxfer, or a killed criu, left it); remove that empty directory once no "
            f"criu is running, then migrate again")
