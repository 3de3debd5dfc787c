"""Security review, the source side (issue 15 items 2, 7, 9b), with the real CRIU on real
processes:

2.  CRIU's page server (the lazy dump's, the page sink's stream) is reached over a
    socketpair (--ps-socket), not a probed TCP port: a local user who holds the port
    deltaxfer would once have probed changes nothing, criu opens no TCP socket, both
    freeze modes migrate; a criu that hangs inside the freeze is killed at the freeze
    deadline + margin and the source runs on.
7.  The process is named by a pidfd and its start time (pidref.py): a PID that names
    another process is caught, and the agent then touches nothing.
9b. Injecting userfaultfd(): the bytes at the chosen address are re-read once the thread
    is stopped (not a `syscall` instruction: refused, the target untouched), and the fd
    taken over must be a userfaultfd (else refused, and the target's fd is not closed).
"""
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import workloads
from deltaxfer import _core, migrate as mig, tracking, transport
from deltaxfer.core import procmem
from faults import agent_leftovers, agent_tmp, copies_of, wait_gone, wait_not_frozen  # noqa: F401
from servers import KEY, Server

MIB = 16
DIRTY = 2


# -- 2. CRIU's page server off TCP --------------------------------------------------------

def recording_criu(tmp_path, real):
    """A criu that records its pid and argv, then execs the real one (same pid)."""
    path = tmp_path / "recording-criu"
    path.write_text("#!/bin/sh\n"
                    f'if [ "$1" = dump ]; then echo $$ > "{tmp_path}/criu.pid"; '
                    f'printf "%s\\n" "$@" > "{tmp_path}/criu.argv"; fi\n'
                    f'exec "{real.path}" "$@"\n')
    path.chmod(0o755)
    return mig.Criu(path=str(path), version=real.version, origin="test")


def tcp_inodes(pid: int) -> set[str]:
    """Socket inodes of every TCP socket (any state) in pid's network namespace."""
    out = set()
    for name in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{name}") as f:
                next(f)
                out |= {line.split()[9] for line in f}
        except OSError:
            pass
    return out


class TcpWatch:
    """Polls criu's fd table during the dump: any TCP socket criu holds is recorded."""

    def __init__(self, pid_file):
        self.pid_file, self.seen, self.polls = pid_file, [], 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop.is_set():
            try:
                pid = int(self.pid_file.read_text())
                tcp = tcp_inodes(pid)
                for fd in os.listdir(f"/proc/{pid}/fd"):
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if link.startswith("socket:[") and link[8:-1] in tcp:
                        self.seen.append((fd, link))
                self.polls += 1
            except (OSError, ValueError):
                pass
            time.sleep(0.002)

    def close(self):
        self.stop.set()
        self.thread.join()


def in_process_migrate(criu, server, wl, agent_tmp, **opts):
    o = mig.Options(work_dir=agent_tmp, max_rounds=5, **opts)
    return transport.run(mig.migrate(wl.pid, "127.0.0.1", server.port, KEY, criu, o)).as_dict()


@pytest.mark.criu
@pytest.mark.parametrize("freeze", ["lazy", "page-server"])
def test_page_server_is_not_on_a_tcp_port(criu, tmp_path, agent_tmp, monkeypatch, freeze):
    """A local user holds the port deltaxfer used to probe for CRIU's page server (old
    code: criu's bind fails after post-dump said yes). Now criu gets a socketpair end:
    its argv names no address or port, it holds no TCP socket while it runs, and the
    migration completes in both freeze modes."""
    squatter = socket.create_server(("127.0.0.1", 0))      # "another local user"
    monkeypatch.setattr(mig, "_free_port", lambda: squatter.getsockname()[1], raising=False)
    rec = recording_criu(tmp_path, criu)
    watch = TcpWatch(tmp_path / "criu.pid")
    try:
        with Server(tmp_path, extra=["--restore"]) as server, \
                workloads.start("memwork", mib=MIB, dirty_mib_per_s=DIRTY, tmpdir=tmp_path) as wl:
            r = in_process_migrate(rec, server, wl, agent_tmp, freeze=freeze)
            if r.get("restored_pid"):
                wl.adopt(r["restored_pid"])
            watch.close()
            assert r["outcome"] == "migrated" and r["error"] is None, r
            assert r["freeze"]["mode"] == freeze and r["freeze"]["criu_exit"] == 0, r["freeze"]
            argv = (tmp_path / "criu.argv").read_text().split("\n")
            assert "--ps-socket" in argv, argv
            assert not {"--port", "--address"} & set(argv), argv
            assert ("--lazy-pages" in argv) == (freeze == "lazy"), argv
            assert watch.polls > 0 and watch.seen == [], watch.seen
            if freeze == "lazy":
                assert r["freeze"]["lazy_close_status"] == 0, r["freeze"]
            else:
                assert r["freeze"]["sink"]["pages_discarded"] > 0, r["freeze"]
            assert wait_gone(wl.pid)
            assert wl.verify(pid=r["restored_pid"], timeout=60)["ok"]
            assert agent_leftovers(agent_tmp) == []
    finally:
        watch.close()
        squatter.close()


@pytest.mark.criu
def test_hung_criu_is_killed_and_the_source_runs_on(criu, tmp_path, agent_tmp, monkeypatch):
    """The final round fails (the hook says no) and nothing ever ends the lazy dump:
    criu waits on its page-server socket with the tree seized. The agent kills it at the
    freeze deadline + margin and the source runs on (old code: waits forever)."""
    async def failing_final_round(self):
        self.frozen_tasks = []
        raise mig.MigrationError("final round refused by the test")

    def never_close(*args, cancelled=lambda: False, **kw):
        while not cancelled():
            time.sleep(0.05)
        return None

    monkeypatch.setattr(mig.Agent, "final_round", failing_final_round)
    monkeypatch.setattr(mig, "close_lazy_dump", never_close, raising=False)
    monkeypatch.setattr(mig, "end_lazy_dump", never_close, raising=False)   # the old name
    monkeypatch.setattr(mig, "CRIU_MARGIN", 4.0, raising=False)
    result, criu_pids = {}, []
    with Server(tmp_path, extra=["--restore"]) as server, \
            workloads.start("memwork", mib=MIB, dirty_mib_per_s=DIRTY, tmpdir=tmp_path) as wl:
        rec = recording_criu(tmp_path, criu)

        def run():
            result["r"] = in_process_migrate(rec, server, wl, agent_tmp, freeze="lazy",
                                             freeze_timeout=3.0)
        t0 = time.monotonic()
        th = threading.Thread(target=run, daemon=True)
        th.start()
        th.join(90)
        hung = th.is_alive()
        if hung:        # old code: kill the criu it waits on, so that the test ends
            try:
                criu_pids.append(int((tmp_path / "criu.pid").read_text()))
                os.kill(criu_pids[0], signal.SIGKILL)
            except (OSError, ValueError):
                pass
            th.join(30)
        assert not hung, "the agent waited on a hung criu past the freeze deadline + margin"
        r = result["r"]
        assert time.monotonic() - t0 < 80
        assert r["outcome"] == "rolled back: the source runs on", r
        assert "criu dump hung" in r["error"] and "killed" in r["error"], r["error"]
        assert "criu_killed" in r["freeze"], r["freeze"]
        assert wait_not_frozen(wl.pid, timeout=15) in ("R", "S")
        first = wl.verify(timeout=30)
        time.sleep(0.3)
        again = wl.verify(timeout=30)
        assert first["ok"] and again["ok"] and again["mutations"] > first["mutations"]
        assert copies_of(wl) == []
        assert agent_leftovers(agent_tmp) == []


# -- 7. processes named by pidfd + start time ------------------------------------------------

def test_pidref_catches_an_exited_process_and_a_reused_pid():
    from deltaxfer.pidref import PidRef, ProcessChanged, start_time
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    ref = PidRef(p.pid)
    try:
        ref.check()                                  # the same process: passes
        assert ref.start == start_time(p.pid)
        # the PID now names a process that started at another time: a reused PID
        wrong = PidRef(p.pid)
        wrong.start += 1
        with pytest.raises(ProcessChanged, match="now names another process"):
            wrong.check()
        wrong.close()
        p.kill()
        p.wait()
        with pytest.raises(ProcessChanged, match="exited"):
            ref.check()
        assert ref.kill(signal.SIGKILL) is False     # never reaches a later holder
        with pytest.raises(ProcessChanged):
            PidRef(p.pid)
    finally:
        ref.close()
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.mark.criu
def test_agent_stops_when_the_pid_names_another_process(criu, tmp_path, agent_tmp):
    """Between two live rounds the source's PID comes to name another process (simulated:
    the reference's start time no longer matches). The agent stops before the next
    round, freezes and kills nothing, and says why."""
    agent_box = {}
    real_init = mig.Agent.__init__

    def progress(line):
        a = agent_box["agent"]
        if a.source is not None and not agent_box.get("done"):
            agent_box["done"] = True
            a.source.start += 1      # as if the process exited and its PID was reused

    with Server(tmp_path, extra=["--restore"]) as server, \
            workloads.start("memwork", mib=MIB, dirty_mib_per_s=DIRTY, tmpdir=tmp_path) as wl:
        o = mig.Options(work_dir=agent_tmp, max_rounds=50, downtime_target=0.0,
                        progress=progress)
        agent = mig.Agent(wl.pid, "127.0.0.1", server.port, KEY, criu, o)
        agent_box["agent"] = agent
        r = transport.run(agent.run()).as_dict()
        assert agent_box.get("done"), r
        assert r["freeze"] == {} and r["restored_pid"] is None, r
        assert "now names another process" in r["error"], r["error"]
        assert r["outcome"] == "aborted: the source process exited", r
        assert wait_not_frozen(wl.pid) in ("R", "S")     # the "other process" untouched
        assert wl.verify(timeout=30)["ok"]
    del real_init


# -- 9b. injection checks ---------------------------------------------------------------------

needs_kernel = pytest.mark.skipif(tracking.support() is not None,
                                  reason=f"written-page tracking: {tracking.support()}")

ECHO = textwrap.dedent("""
    import sys
    sys.stdout.write("ready\\n"); sys.stdout.flush()
    for line in sys.stdin:
        sys.stdout.write("echo " + line); sys.stdout.flush()
""")


def _echo_target():
    p = subprocess.Popen([sys.executable, "-c", ECHO], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline() == "ready\n"
    time.sleep(0.1)
    return p


def _fds(pid):
    return {fd: os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}


def _still_answers(p):
    with open(f"/proc/{p.pid}/status") as f:
        assert "TracerPid:\t0" in f.read()
    p.stdin.write("ping\n")
    p.stdin.flush()
    assert p.stdout.readline() == "echo ping\n"


def _two_byte_non_syscall(pid) -> int:
    """An executable `xor eax, eax` (31 c0) in the target: run as if it were `syscall`, it
    leaves rax = 0 two bytes on, which the old code took for fd 0."""
    for v in procmem.read_maps(pid):
        if v.perms[2] == "x" and v.path and v.path.startswith("/"):
            with open(f"/proc/{pid}/mem", "rb", buffering=0) as f:
                f.seek(v.start)
                try:
                    code = f.read(min(v.end - v.start, 1 << 22))
                except OSError:
                    continue
            at = code.find(b"\x31\xc0")
            if at >= 0:
                return v.start + at
    pytest.fail("no `xor eax, eax` in the target's code")


@needs_kernel
def test_injection_refuses_an_address_that_is_not_a_syscall_instruction(monkeypatch):
    """The chosen address no longer holds `syscall` (0f 05) when the thread is stopped:
    refused before anything runs; the target keeps its fds (old code: it ran the two
    bytes, took the target's stdin for a userfaultfd and closed fd 0 in the target), and
    tracking falls back to hashing with the reason."""
    p = _echo_target()
    try:
        ip = _two_byte_non_syscall(p.pid)
        before = _fds(p.pid)
        with pytest.raises(OSError, match="not a `syscall` instruction"):
            fd, _ = _core.inject_userfaultfd(p.pid, p.pid, ip, tracking.O_CLOEXEC)
            os.close(fd)
        assert _fds(p.pid) == before
        _still_answers(p)
        monkeypatch.setattr(tracking, "_syscall_ip", lambda pid, maps: ip)
        tr = tracking.Tracking()
        assert tr.scan(p.pid) is None
        assert "not a `syscall` instruction" in tr.failed[p.pid], tr.failed
        assert tr.summary()["mode"] == "hashing"
        assert _fds(p.pid) == before
        _still_answers(p)
    finally:
        p.kill()
        p.wait()


@needs_kernel
def test_injection_refuses_an_fd_that_is_not_a_userfaultfd():
    """The injected system call returns a number that is some other fd of the target
    (here sched_yield(), which returns 0: the target's stdin): refused, our copy closed,
    and the target's fd 0 is NOT closed (it is not ours)."""
    p = _echo_target()
    try:
        ip = tracking._syscall_ip(p.pid, procmem.read_maps(p.pid))
        before = _fds(p.pid)
        with pytest.raises(OSError, match="not a userfaultfd"):
            fd, _ = _core._inject_fd_syscall(p.pid, p.pid, ip, 24, 0)   # SYS_sched_yield
            os.close(fd)
        assert _fds(p.pid) == before
        _still_answers(p)
        # the real thing still works on the same target afterwards
        fd, info = _core.inject_userfaultfd(p.pid, p.pid, ip, tracking.O_CLOEXEC)
        assert os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[userfaultfd]"
        os.close(fd)
        assert _fds(p.pid) == before
        _still_answers(p)
    finally:
        p.kill()
        p.wait()
