"""Real programs nobody here wrote, migrated with `deltaxfer migrate` to a `deltaxfer serve
--restore` and checked by their own means afterwards: memcached (Debian's, on a unix
socket: keys and `stats` read back through a fresh connection), a CPython process holding
numpy arrays and one holding an in-memory sqlite3 database (tests/workloads/pyprograms.py:
the restored process recomputes its digests itself), nginx (Debian's, on a unix socket:
serves the page after migration). Each runs in its own PID namespace, so that the source
and the restored copy can coexist. `make programs` installs the Debian packages; a test is
skipped only when its program is not installed, saying so."""
import os
import shutil
import socket
import sys
import time
from pathlib import Path

import pytest

import workloads
from faults import agent_tmp, migrate_adopting, wait_gone  # noqa: F401
from servers import Server

pytestmark = [pytest.mark.criu, pytest.mark.slow]

PYPROGRAMS = Path(workloads.__file__).resolve().parent / "pyprograms.py"


class Program(workloads.Workload):
    """A program that is not one of ours: ready when ``ready()`` says so (no result file)."""

    def __init__(self, kind, argv, tmp_path, ready):
        super().__init__(kind, argv, Path(tmp_path) / f"{kind}.unused")
        self.ready_fn = ready

    def _wait_ready(self, deadline):
        while not self.ready_fn():
            if self.proc.poll() is not None:
                raise self._died("died before it was ready")
            if time.monotonic() > deadline:
                raise workloads.WorkloadError(f"{self.kind} not ready in time")
            time.sleep(0.05)


def need(program: str, package: str) -> str:
    path = shutil.which(program) or (f"/usr/sbin/{program}"
                                     if os.path.exists(f"/usr/sbin/{program}") else None)
    if path is None:
        pytest.skip(f"{program} is not installed (Debian package {package}: `make programs` "
                    f"installs it, as root)")
    return path


def migrate(tmp_path, agent_tmp, server, wl) -> int:
    """Migrate wl; the restored copy's host pid (adopted by wl), the source gone."""
    m = migrate_adopting(wl, server.addr, tmp_path, agent_tmp, timeout=240)
    r = m.report
    assert m.rc == 0, (m.rc, m.stderr[-3000:], r and r.get("error"), server.log()[-3000:])
    assert r["outcome"] == "migrated" and r["error"] is None, r
    assert len(r["rounds"]) >= 2 and r["rounds"][-1]["live"] is False, r["rounds"]
    assert wait_gone(wl.pid), workloads.proc_state(wl.pid)
    return r["restored_pid"]


def unix_talk(path: str, data: bytes, until: bytes, timeout: float = 20) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(data)
        got = b""
        while not got.endswith(until):
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
        return got


def connectable(path: str) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(path)
        return True
    except OSError:
        return False


def test_memcached_keys_and_stats_survive(criu, tmp_path, agent_tmp):
    exe = need("memcached", "memcached")
    sock = os.path.join(agent_tmp, "mc.sock")
    keys = {f"key{i}": os.urandom(50 + i % 400).hex().encode() for i in range(300)}
    with Server(tmp_path, extra=["--restore"]) as server, Program(
            "memcached", [exe, "-s", sock, "-u", "root", "-m", "64", "-t", "2"], tmp_path,
            lambda: connectable(sock)) as wl:
        wl._launch(30)
        req = b"".join(b"set %s 0 0 %d\r\n%s\r\n" % (k.encode(), len(v), v)
                       for k, v in keys.items())
        assert unix_talk(sock, req, b"STORED\r\n" * len(keys)).count(b"STORED") == len(keys)
        pid = migrate(tmp_path, agent_tmp, server, wl)
        # a fresh client connection to the restored server's listening socket
        for k, v in keys.items():
            got = unix_talk(sock, b"get %s\r\n" % k.encode(), b"END\r\n")
            assert got == b"VALUE %s 0 %d\r\n%s\r\nEND\r\n" % (k.encode(), len(v), v), k
        stats = unix_talk(sock, b"stats\r\n", b"END\r\n").decode()
        fields = dict(line.split()[1:3] for line in stats.splitlines()
                      if line.startswith("STAT "))
        assert int(fields["curr_items"]) == len(keys), fields
        assert int(fields["cmd_set"]) == len(keys), fields
        assert int(fields["pid"]) == 1, fields       # PID 1 of its (restored) namespace
        assert workloads.proc_state(pid) in ("S", "R")


@pytest.mark.parametrize("kind", ["numpy", "sqlite"])
def test_python_library_state_survives(criu, tmp_path, agent_tmp, kind):
    if kind == "numpy":
        try:
            import numpy  # noqa: F401
        except ImportError:
            pytest.skip("numpy is not installed in the venv (the test extra has it: "
                        "`make venv`)")
    result = tmp_path / f"{kind}.result"
    wl = workloads.Workload(kind, [sys.executable, "-I", str(PYPROGRAMS), "--kind", kind,
                                   "--result", str(result)], result)
    with Server(tmp_path, extra=["--restore"]) as server, wl:
        wl._launch(120)
        before = wl.verify(timeout=60)
        assert before["ok"], before
        pid = migrate(tmp_path, agent_tmp, server, wl)
        after = wl.verify(pid=pid, timeout=60)
        assert after["ok"], after
        assert after["digest"] == before["digest"] == wl.ready["digest"], (before, after)


NGINX_CONF = """
daemon off;
master_process off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen unix:{sock};
        root {dir}/www;
    }}
}}
"""


def test_nginx_serves_after_migration(criu, tmp_path, agent_tmp):
    exe = need("nginx", "nginx")
    d = Path(agent_tmp) / "ngx"
    (d / "www").mkdir(parents=True)
    page = os.urandom(3000).hex()
    (d / "www" / "index.html").write_text(page)
    sock = str(d / "ngx.sock")
    (d / "nginx.conf").write_text(NGINX_CONF.format(dir=d, sock=sock))

    def get():
        got = unix_talk(sock, b"GET /index.html HTTP/1.0\r\nHost: x\r\n\r\n", b"\0")
        head, _, body = got.partition(b"\r\n\r\n")
        return head.split(b"\r\n")[0], body.decode()

    with Server(tmp_path, extra=["--restore"]) as server, Program(
            "nginx", [exe, "-c", str(d / "nginx.conf"), "-p", str(d)], tmp_path,
            lambda: connectable(sock)) as wl:
        wl._launch(30)
        assert get() == (b"HTTP/1.1 200 OK", page)
        migrate(tmp_path, agent_tmp, server, wl)
        status, body = get()
        assert status == b"HTTP/1.1 200 OK" and body == page, status
