"""Issue 17, overlap: the pages written since the last live round are sent while CRIU
dumps the frozen tree (one more round once CRIU has seized every thread), so the final
round at post-dump carries only what changed during the dump. Real `criu` migrations,
checked by the restored processes themselves; the seizure detection against a real
ptrace seizure of a real process tree."""
import subprocess
import sys
import threading

import pytest

import workloads
from deltaxfer.live import process_tree
from deltaxfer.migrate import wait_seized
from faults import agent_tmp, migrate_adopting  # noqa: F401
from servers import Server

# seizes the given threads as CRIU does (PTRACE_SEIZE + PTRACE_INTERRUPT), waits for
# their stops, says so, and holds them until stdin closes (exiting detaches them)
TRACER = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
tids = [int(x) for x in sys.argv[1:]]
for t in tids:
    for req in (0x4206, 0x4207):          # PTRACE_SEIZE, PTRACE_INTERRUPT
        if libc.ptrace(req, t, None, None) != 0:
            sys.exit(f"ptrace {req:#x} {t}: {os.strerror(ctypes.get_errno())}")
for t in tids:
    os.waitpid(t, 0x40000000)             # __WALL
print("seized", flush=True)
sys.stdin.read()
"""


def _threads(pid: int) -> list[int]:
    import os
    return [int(t) for t in os.listdir(f"/proc/{pid}/task")]


class _Tracer:
    def __init__(self, tids):
        self.p = subprocess.Popen([sys.executable, "-c", TRACER, *map(str, tids)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.p.stdout.readline()
        assert line.strip() == "seized", (line, self.p.wait())

    def release(self):
        self.p.stdin.close()
        self.p.wait(10)


def test_wait_seized_wants_every_thread_of_the_tree_stopped_under_a_tracer(tmp_path):
    """A running tree is not taken for seized; one whose root process is seized but
    whose child is not, neither; the whole tree seized (as CRIU seizes it), yes; a set
    stop event ends the wait at once. The tree runs on unharmed when the tracer lets go."""
    with workloads.start("shmwork", mib=4, tmpdir=tmp_path) as wl:
        tasks = process_tree(wl.pid)
        assert len(tasks) >= 2, tasks
        root = next(t for t in tasks if t.host_pid == wl.pid)
        others = [t for t in tasks if t is not root]
        assert len(_threads(root.host_pid)) >= 2
        assert not wait_seized(wl.pid, threading.Event(), 0.3)
        first = _Tracer(_threads(root.host_pid))
        try:
            assert not wait_seized(wl.pid, threading.Event(), 0.3)
            rest = _Tracer([tid for t in others for tid in _threads(t.host_pid)])
            try:
                assert wait_seized(wl.pid, threading.Event(), 5.0)
                stop = threading.Event()
                stop.set()
                assert not wait_seized(wl.pid, stop, 5.0)
            finally:
                rest.release()
        finally:
            first.release()
        assert wl.verify()["ok"]


@pytest.mark.criu
@pytest.mark.parametrize("kind", ["memwork", "shmwork"])
def test_the_residual_goes_while_criu_dumps(criu, tmp_path, agent_tmp, kind):
    """A process writing 20 MiB/s (and a tree: a child, a second thread, shared
    memory): once CRIU has seized the tree, one more round sends what was written since
    the last live round; the final round then reads almost nothing (pages the dump
    itself touches); the restored copy finds every page as it wrote it."""
    kw = {"dirty_mib_per_s": 20} if kind == "memwork" else {}
    with Server(tmp_path, extra=["--restore"]) as server, \
            workloads.start(kind, mib=64, tmpdir=tmp_path, **kw) as wl:
        m = migrate_adopting(wl, server.addr, tmp_path, agent_tmp)
        r = m.report
        assert m.rc == 0 and r["outcome"] == "migrated", (m.stderr[-3000:], r and r["error"])
        ov = r["freeze"]["overlap"]
        assert ov["ran"] is True, ov
        assert 0 <= ov["seized_after"] < r["freeze"]["dump"], (ov, r["freeze"])
        seized = [x for x in r["rounds"] if x.get("seized")]
        # inside the freeze, so not a live round; the final round follows it
        assert len(seized) == 1 and seized[0]["live"] is False, r["rounds"]
        final = r["rounds"][-1]
        assert final["live"] is False and not final.get("seized")
        assert final["round"] == seized[0]["round"] + 1
        if kind == "memwork":
            # written at 20 MiB/s since the last live round: the seized round carried it
            assert seized[0]["changed"] > 0, seized
        assert final["read_pages"] <= 16, final
        assert wl.verify(pid=r["restored_pid"], timeout=60)["ok"]


@pytest.mark.criu
def test_no_overlap_dump_sends_the_residual_after_the_dump(criu, tmp_path, agent_tmp):
    """--no-overlap-dump: no round while CRIU dumps, the report says why, and the final
    round carries the pages written since the last live round."""
    with Server(tmp_path, extra=["--restore"]) as server, \
            workloads.start("memwork", mib=64, dirty_mib_per_s=20, tmpdir=tmp_path) as wl:
        m = migrate_adopting(wl, server.addr, tmp_path, agent_tmp, "--no-overlap-dump")
        r = m.report
        assert m.rc == 0 and r["outcome"] == "migrated", (m.stderr[-3000:], r and r["error"])
        assert r["freeze"]["overlap"] == {"ran": False, "why": "--no-overlap-dump"}
        assert not any(x.get("seized") for x in r["rounds"])
        assert r["rounds"][-1]["changed"] > 0, r["rounds"][-1]
        assert wl.verify(pid=r["restored_pid"], timeout=60)["ok"]
