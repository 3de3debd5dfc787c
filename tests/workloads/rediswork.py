"""rediswork -- a real server from Debian (redis-server) holding a checkable dataset.

Used by the migration benchmarks as the "real server program" workload: it has the same
surface as a ``workloads.Workload`` (``pid``, ``adopt``, ``verify``, ``kill``), so a
harness can move it like memwork or pyheap.

* redis-server runs as PID 1 of its own PID namespace (``unshare --pid --fork setsid``),
  optionally inside a network namespace (``prefix``), with no persistence (``--save ''
  --appendonly no``) and **no TCP port**: it listens only on a unix socket (CRIU 4.1.1
  cannot dump a process holding an INET socket on this kernel, as tried here). The socket is
  a path in the file system, so a copy restored in another network namespace answers on
  the same path.
* The dataset is loaded by a Lua script inside the server: ``keys`` strings
  ``k:<i>`` whose value is 16 SHA-1 hex digests of ``<seed>:<i>:<j>`` (640 bytes, not
  compressible by a repeat finder), and one hash ``meta`` with the count and seed.
* ``verify(pid)`` connects with redis-cli (through ``verify_prefix``, e.g. the
  destination namespace), and a Lua script recomputes every value from (seed, i) and
  compares it with what the server holds; it also checks DBSIZE. Only ``pid`` can answer:
  the check is refused unless ``pid`` is alive and not stopped, and the only other holder
  of the socket is the original, stopped (frozen by the dump) or gone. Returns ``{"ok": bool, "status": "OK"/"BAD",
  "line": ...}`` like the other workloads.
* No client connection stays open between requests (redis-cli exits), so a dump sees
  only the listening socket.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import workloads

LOAD = r"""
local n, seed = tonumber(ARGV[1]), ARGV[2]
for i = 1, n do
  local parts = {}
  for j = 1, 16 do parts[j] = redis.sha1hex(seed .. ':' .. i .. ':' .. j) end
  redis.call('SET', 'k:' .. i, table.concat(parts))
end
redis.call('HSET', 'meta', 'keys', n, 'seed', seed)
return n
"""

CHECK = r"""
local n = tonumber(redis.call('HGET', 'meta', 'keys'))
local seed = redis.call('HGET', 'meta', 'seed')
local bad, first = 0, -1
for i = 1, n do
  local parts = {}
  for j = 1, 16 do parts[j] = redis.sha1hex(seed .. ':' .. i .. ':' .. j) end
  if redis.call('GET', 'k:' .. i) ~= table.concat(parts) then
    bad = bad + 1
    if first < 0 then first = i end
  end
end
return {n, bad, first, redis.call('DBSIZE')}
"""


class RedisError(RuntimeError):
    pass


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise RedisError(f"{tool} not found: apt-get install redis-server redis-tools "
                         "(`make bench-migrate` does)")
    return path


class RedisWork:
    kind = "redis"

    def __init__(self, *, tmpdir, keys: int = 20000, seed: int = 1, prefix=(),
                 verify_prefix=None, ready_timeout: float = 300):
        self.keys, self.seed = keys, seed
        self.prefix = list(prefix)
        self.verify_prefix = list(prefix if verify_prefix is None else verify_prefix)
        tmpdir = Path(tmpdir)
        tmpdir.mkdir(parents=True, exist_ok=True)
        tag = f"{os.getpid()}-{time.monotonic_ns()}"
        # sun_path holds 108 bytes: keep the socket path short
        self.sock_dir = Path(f"/tmp/dx-redis-{tag}")
        self.sock_dir.mkdir(mode=0o700)
        self.sock = str(self.sock_dir / "r.sock")
        self.log_path = tmpdir / f"redis-{tag}.log"
        argv = [_need("redis-server"), "--port", "0", "--unixsocket", self.sock,
                "--unixsocketperm", "700", "--save", "", "--appendonly", "no",
                "--daemonize", "no", "--logfile", str(self.log_path),
                "--dir", str(self.sock_dir), "--protected-mode", "no"]
        _need("redis-cli")
        self._workload = workloads.Workload("redis", argv, self.sock_dir / "unused")
        self._workload.prefix = self.prefix
        self._start(ready_timeout)

    # the same surface as workloads.Workload
    @property
    def pid(self) -> int:
        return self._workload.pid

    def adopt(self, pid: int) -> None:
        self._workload.adopt(pid)

    def kill(self) -> None:
        self._workload.kill()
        shutil.rmtree(self.sock_dir, ignore_errors=True)

    def _start(self, timeout: float) -> None:
        w = self._workload
        proc = subprocess.Popen([*self.prefix, "unshare", "--pid", "--fork", "setsid", *w.argv],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, close_fds=True,
                                start_new_session=True)
        w.proc, w.unshare_pid = proc, proc.pid
        w._procs = workloads._Procs(proc)
        deadline = time.monotonic() + timeout
        try:
            w.pid = w._find_init(deadline)
            w._procs.hold(w.pid)
            while self.cli(["PING"], check=False).stdout.strip() != "PONG":
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RedisError(f"redis-server did not start: {self.log()}")
                time.sleep(0.05)
            n = self.cli(["EVAL", LOAD, "0", str(self.keys), str(self.seed)],
                         timeout=timeout).stdout.strip()
            if n != str(self.keys):
                raise RedisError(f"loading {self.keys} keys answered {n!r}: {self.log()}")
        except BaseException:
            self.kill()
            raise

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def cli(self, args: list[str], *, prefix=None, check=True, timeout: float = 300):
        proc = subprocess.run([*(self.prefix if prefix is None else prefix), "redis-cli",
                               "-s", self.sock, *args], stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RedisError(f"redis-cli {args[0]}: exit {proc.returncode}: {proc.stderr}")
        return proc

    def verify(self, pid: int | None = None, timeout: float = 300) -> dict:
        """Every value recomputed inside the server and compared; the server that answers
        must be `pid` (default: the original), running. Nothing else may answer: the
        original is stopped (frozen) or dead while a restored copy is checked."""
        target = self.pid if pid is None else pid
        state = workloads.proc_state(target)
        if state in (None, "Z", "X", "T", "t"):
            return {"ok": False, "status": "BAD", "line": f"process {target} state {state}"}
        try:
            proc = self.cli(["EVAL", CHECK, "0"], prefix=self.verify_prefix, check=False,
                            timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"ok": False, "status": "BAD", "line": f"no answer in {timeout} s"}
        words = proc.stdout.split()
        if proc.returncode != 0 or len(words) != 4:
            return {"ok": False, "status": "BAD",
                    "line": f"redis-cli exit {proc.returncode}: {proc.stdout} {proc.stderr}"}
        n, bad, first, dbsize = (int(w) for w in words)
        ok = n == self.keys and bad == 0 and dbsize == self.keys + 1
        line = (f"{'OK' if ok else 'BAD'} keys={n} bad={bad} first={first} dbsize={dbsize} "
                f"pid={target}")
        return {"ok": ok, "status": "OK" if ok else "BAD", "line": line, "keys": n,
                "bad": bad}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.kill()


def start(*, tmpdir, keys: int = 20000, seed: int = 1, prefix=(), verify_prefix=None,
          ready_timeout: float = 300) -> RedisWork:
    return RedisWork(tmpdir=tmpdir, keys=keys, seed=seed, prefix=prefix,
                     verify_prefix=verify_prefix, ready_timeout=ready_timeout)
