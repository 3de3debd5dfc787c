"""Auto-converge: slow a process tree that writes memory faster than the rounds can send
it, so that the pre-copy rounds shrink and the freeze stays short.

QEMU's auto-converge takes a growing share of every vCPU's time slices once the rounds
stop shrinking (20 % first, +10 % per round). A process has no vCPU loop to hook, so
deltaxfer does the same from outside with a stop/continue duty cycle: in each period
(250 ms) every task of the tree is stopped (SIGSTOP) for ``level`` of it and continued
(SIGCONT) for the rest. Why not a cgroup CPU quota: a writer that spends 2 % of a CPU
rewriting 50 MB/s of pages is not slowed by any quota above 2 %, and moving the tree into
a cgroup of ours would be dumped by CRIU and recreated on the destination; why a period
of 250 ms: a program that catches up lost time after a pause (memwork keeps 100 ms of
backlog) would otherwise make up a short stop entirely.

A task that is stopped when CRIU dumps it is restored stopped, and a task left stopped
by a crashed agent is an outage: so the duty cycle runs in a **guardian** process of its
own (``python -m deltaxfer.throttle``), which the agent drives over a pipe and which
continues every task it ever stopped when told to release, when the pipe closes (the
agent exited or was killed, however), or when it gets SIGTERM/SIGINT/SIGHUP. Tasks are
named by pidfds taken when the guardian first hears of them, so a PID reused after a
task exited is never signalled.

Protocol (one line each way): ``set LEVEL PID...`` -> ``ok``; ``release`` -> ``released
STOPPED_SECONDS``. LEVEL is the fraction of each period the tree spends stopped (0-0.99).
"""
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time

PERIOD = 0.25            # seconds; longer than the catch-up window of paced writers
MAX_LEVEL = 0.95         # never stop the tree for good: it must keep answering
LEVELS = (0.3, 0.5, 0.7, 0.85, 0.95)   # the steps the convergence policy climbs


class ThrottleError(RuntimeError):
    pass


class Throttle:
    """The agent's handle on the guardian. ``set`` starts or changes the duty cycle;
    ``release`` ends it and returns only once every task was continued."""

    def __init__(self):
        self.proc: subprocess.Popen | None = None
        self.level = 0.0
        self.max_level = 0.0
        self.stopped_seconds = 0.0   # time the tree spent stopped, as the guardian counted
        self.throttled_seconds = 0.0  # wall time with a duty cycle running
        self._since: float | None = None

    def _start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "deltaxfer.throttle"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1,
            start_new_session=True)   # a Ctrl-C to the agent's group is the agent's to handle

    def _ask(self, line: str, timeout: float = 5.0) -> str:
        assert self.proc is not None
        try:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as e:
            raise ThrottleError(f"the throttle guardian is gone: {e}") from None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        reply = self.proc.stdout.readline().strip() if ready else ""
        if not reply:
            raise ThrottleError(f"the throttle guardian did not answer {line.split()[0]!r}")
        return reply

    def set(self, level: float, pids: list[int]) -> None:
        level = max(0.0, min(level, MAX_LEVEL))
        if self.proc is None:
            self._start()
        reply = self._ask(f"set {level:.3f} " + " ".join(str(p) for p in pids))
        if reply != "ok":
            raise ThrottleError(f"the throttle guardian refused: {reply}")
        if self._since is None:
            self._since = time.monotonic()
        self.level = level
        self.max_level = max(self.max_level, level)

    @property
    def active(self) -> bool:
        return self.proc is not None and self.level > 0

    def release(self) -> None:
        """Continue every task and stop cycling (before the freeze, and on every exit)."""
        if self.proc is None:
            return
        try:
            reply = self._ask("release")
            if reply.startswith("released"):
                self.stopped_seconds = float(reply.split()[1])
        except ThrottleError:
            pass
        finally:
            self._end()

    def _end(self) -> None:
        proc, self.proc = self.proc, None
        if self._since is not None:
            self.throttled_seconds += time.monotonic() - self._since
            self._since = None
        self.level = 0.0
        if proc is None:
            return
        try:
            proc.stdin.close()     # the guardian continues every task on EOF too
        except OSError:
            pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    close = release

    def summary(self) -> dict:
        return {"max_level": round(self.max_level, 3),
                "throttled_seconds": round(self.throttled_seconds, 3),
                "stopped_seconds": round(self.stopped_seconds, 3)}


# -- the guardian ----------------------------------------------------------------------------
class _Guardian:
    def __init__(self):
        self.tasks: dict[int, int] = {}      # pid -> pidfd, every task ever stopped or named
        self.level = 0.0
        self.stopped = False
        self.stopped_total = 0.0
        self._t_stop = 0.0

    def name(self, pids: list[int]) -> None:
        for pid in pids:
            if pid not in self.tasks:
                try:
                    self.tasks[pid] = os.pidfd_open(pid)
                except OSError:
                    pass                      # gone already: nothing to stop or continue

    def _signal(self, sig: int) -> None:
        for pid, fd in list(self.tasks.items()):
            try:
                signal.pidfd_send_signal(fd, sig)
            except ProcessLookupError:
                os.close(fd)
                del self.tasks[pid]

    def stop(self) -> None:
        if not self.stopped and self.level > 0:
            self._signal(signal.SIGSTOP)
            self.stopped, self._t_stop = True, time.monotonic()

    def cont(self) -> None:
        # always sent, stopped or not: a task stopped by a previous guardian is continued too
        self._signal(signal.SIGCONT)
        if self.stopped:
            self.stopped_total += time.monotonic() - self._t_stop
            self.stopped = False

    def handle(self, line: str) -> str | None:
        words = line.split()
        if not words:
            return None
        if words[0] == "set" and len(words) >= 2:
            try:
                level = float(words[1])
                pids = [int(w) for w in words[2:]]
            except ValueError:
                return "error: bad set line"
            self.level = max(0.0, min(level, MAX_LEVEL))
            self.name(pids)
            return "ok"
        if words[0] == "release":
            self.level = 0.0
            self.cont()
            return f"released {self.stopped_total:.6f}"
        return f"error: unknown command {words[0]!r}"

    def run(self, fd: int, out) -> None:
        """Cycle while reading commands from ``fd`` (raw reads: a buffered reader could hold
        a command that select() then never reports)."""
        phase_end = time.monotonic()
        pending = b""
        while True:
            now = time.monotonic()
            if self.level > 0 and now >= phase_end:
                # flip the phase: stopped for level * PERIOD, running for the rest
                if self.stopped:
                    self.cont()
                    phase_end = now + (1 - self.level) * PERIOD
                else:
                    self.stop()
                    phase_end = now + self.level * PERIOD
            timeout = max(phase_end - now, 0.0) if self.level > 0 else None
            ready, _, _ = select.select([fd], [], [], timeout)
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:                     # the agent is gone: continue everything
                self.level = 0.0
                self.cont()
                return
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                text = line.decode(errors="replace")
                reply = self.handle(text)
                if reply is not None:
                    out.write(reply + "\n")
                    out.flush()
                if text.startswith("release"):
                    phase_end = time.monotonic()


def _guardian_main() -> int:
    g = _Guardian()

    def give_up(signum, frame):
        g.level = 0.0
        g.cont()
        os._exit(0)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, give_up)
    try:
        g.run(sys.stdin.fileno(), sys.stdout)
    finally:
        g.level = 0.0
        g.cont()
    return 0


if __name__ == "__main__":
    sys.exit(_guardian_main())
