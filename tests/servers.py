"""A `deltaxfer serve` subprocess for tests: started on a free loopback port, its log
kept, stopped and checked for leftovers at the end."""
import asyncio
import contextlib
import os
import re
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

KEY = b"test-key-0123456789abcdef\x00\x01\x02\x03\x04\x05\x06"  # 32 bytes, not all printable


LISTENING_RE = re.compile(r"listening on [^:]+:(\d+)")


def wait_listening(proc, read_log, timeout: float = 30) -> int:
    """The port a starting `deltaxfer serve` logs ("listening on ADDR:PORT"), read with
    ``read_log()`` until it appears; a clear error if the server exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        m = LISTENING_RE.search(read_log())
        if m:
            return int(m.group(1))
        time.sleep(0.05)
    raise RuntimeError(f"deltaxfer serve did not start: {read_log()}")


def run_bounded(kind: str, coro, timeout: float):
    """Run coro on the named event loop (uvloop or asyncio), failing after timeout s."""
    from deltaxfer import transport

    async def bounded():
        async with asyncio.timeout(timeout):
            return await coro
    return transport.run(bounded(), loop=kind)


def terminate(proc: subprocess.Popen, timeout: float = 10) -> None:
    """SIGTERM, then SIGKILL if it has not exited within timeout s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def write_key(path, key=KEY, mode=0o600):
    with open(path, "wb") as f:
        f.write(key + b"\n")
    os.chmod(path, mode)
    return str(path)


class Server:
    def __init__(self, tmp_path, *, loop="uvloop", extra=(), key=KEY, env=None, prefix=()):
        self.dir = tmp_path / "serve"
        self.extra = tuple(extra)
        self.key_file = write_key(tmp_path / "server.key", key)
        self.log_path = tmp_path / "serve.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "deltaxfer", "serve", "--listen", "127.0.0.1:0",
             "--key-file", self.key_file, "--dir", str(self.dir), "--loop", loop, *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        self.port = self._wait_listening()

    def _wait_listening(self, timeout=30):
        deadline = time.monotonic() + timeout
        buf = b""
        while time.monotonic() < deadline:
            r, _, _ = select.select([self.proc.stderr], [], [], 0.2)
            if r:
                chunk = os.read(self.proc.stderr.fileno(), 65536)
                if not chunk:
                    break
                buf += chunk
                self._log.write(chunk)
                m = re.search(rb"listening on [^:]+:(\d+)", buf)
                if m:
                    return int(m.group(1))
        raise RuntimeError(f"deltaxfer serve did not start: {buf.decode(errors='replace')}")

    @property
    def addr(self):
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        """Everything the server logged so far."""
        while True:
            r, _, _ = select.select([self.proc.stderr], [], [], 0.05)
            if not r:
                break
            chunk = os.read(self.proc.stderr.fileno(), 65536)
            if not chunk:
                break
            self._log.write(chunk)
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self):
        terminate(self.proc)
        self.log()
        self._log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


class ServeProcess:
    """`deltaxfer serve` on any address — optionally inside a network namespace of
    tests/lab.py (``prefix=host.command([])``) — on a port it picks, logging to a file
    beside its directory; ``stop()`` also removes the directory (the benchmarks' server)."""

    def __init__(self, directory: Path, key_file: str, *, host: str = "127.0.0.1",
                 prefix=(), extra=()):
        self.dir = Path(directory)
        self.host = host
        self.log_path = self.dir.with_suffix(".log")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [*prefix, sys.executable, "-m", "deltaxfer", "serve", "--listen", f"{host}:0",
                 "--key-file", key_file, "--dir", str(self.dir), *extra],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)
        try:
            self.port = wait_listening(self.proc, self.log)
        except BaseException:
            self.stop()
            raise

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        terminate(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def served_hosts(tmp_path, rate: str | None):
    """Two hosts (tests/lab.py) joined by a veth shaped to ``rate``, with `deltaxfer serve
    --restore` listening on the destination: yields (lab, server, key file)."""
    from lab import TwoHosts
    key = write_key(tmp_path / "k.key")
    with TwoHosts(rate=rate) as lab:
        server = ServeProcess(tmp_path / "serve", str(key), host=lab.dest.addr,
                              prefix=lab.dest.command([]), extra=["--restore"])
        try:
            yield lab, server, key
        finally:
            server.stop()
