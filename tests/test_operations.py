"""What an operator between two hosts meets: CRIU's own options through migrate and
serve, criu's logs kept, safe defaults (--no-restore leaves the source stopped, the hook
refuses --leave-running, a server that does not restore refuses at BEGIN, a bad PID is
refused before anything), and errors that name the cause and the fix. The migrations
run the real criu on real processes (tests/workloads/extwork.py verifies itself)."""
import fcntl
import json
import re
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import workloads
from deltaxfer.cli import build_parser, main
from deltaxfer.criu import runner
from deltaxfer.criu.runner import CriuError, check_criu_config, check_criu_opts, dump_args
from faults import (agent_env, agent_tmp, copies_of, run_migrate,  # noqa: F401
                    wait_gone, wait_stopped)
from servers import Server, write_key

HOOK = Path(sys.executable).parent / "deltaxfer-hook"
EXTWORK = Path(workloads.__file__).resolve().parent / "extwork.py"


# -- 1. CRIU's own options ------------------------------------------------------------------

@pytest.mark.parametrize("opt", [
    "-D", "-D/tmp/x", "-t", "-t5", "--tree=5", "--images-dir", "--action-script=/bin/true",
    "--lazy-pages", "--page-server", "--ps-socket=3", "--leave-running", "-R", "-jR",
    "--leave-r", "--no-leave-stopped", "--address=10.0.0.1", "--port", "-o", "-ofoo.log",
    "-v0", "--log-file=x", "--config=/etc/x.conf", "--work-dir=/tmp", "--track-mem"])
def test_criu_opt_refused(opt, tmp_path, capsys):
    rc = main(["migrate", "4242", "--to", "127.0.0.1:7411", "--insecure", f"--criu-opt={opt}"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("deltaxfer migrate: error: --criu-opt") and repr(opt) in err, err
    assert "refused" in err and err.count("\n") == 1, err


def test_criu_opts_accepted_and_appended():
    opts = check_criu_opts(["--ext-unix-sk", "--file-locks", "--external=unix[1234]",
                            "--tcp-established", "--manage-cgroups=soft", "-l",
                            "--timeout", "20"])
    args = dump_args(77, "/d", leave="stopped", action_script="/h", ps_socket=5, lazy=True,
                     config="/c.conf", user_opts=opts)
    assert args[:5] == ["dump", "-t", "77", "-D", "/d"]
    assert args[-len(opts) - 2:] == ["--config", "/c.conf", *opts]
    for own in ("--leave-stopped", "--shell-job", "--lazy-pages", "--ps-socket",
                "--action-script"):
        assert own in args


def test_criu_dump_built_in_one_place(monkeypatch):
    """Criu.dump (tests, benchmarks) and the migration agent build `criu dump` with
    runner.dump_args: the same options, whoever runs it."""
    seen = {}

    def fake_run(self, args, **kw):
        seen["args"], seen["log_name"] = args, kw["log_name"]
    monkeypatch.setattr(runner.Criu, "run", fake_run)
    runner.Criu("/criu", (4, 1), "test").dump(9, "/imgs", leave="stopped",
                                              extra=["--ext-unix-sk"])
    assert seen["args"] == dump_args(9, "/imgs", leave="stopped", log_name=None,
                                     extra=["--ext-unix-sk"])
    assert seen["log_name"] == "dump.log"
    import inspect

    from deltaxfer import migrate
    src = inspect.getsource(migrate.Agent.freeze_and_push)
    assert "dump_args(" in src and '"--leave-stopped"' not in src


def test_criu_config_checked(tmp_path, capsys):
    bad = tmp_path / "bad.conf"
    bad.write_text("# dump options\next-unix-sk\nleave-running   # no\n")
    good = tmp_path / "good.conf"
    good.write_text("ext-unix-sk\nfile-locks\nexternal unix[5]\n")
    assert check_criu_config(str(good)) == str(good)
    with pytest.raises(CriuError, match="leave-running"):
        check_criu_config(str(bad))
    rc = main(["migrate", "4242", "--to", "127.0.0.1:7411", "--insecure",
               "--criu-config", str(bad)])
    err = capsys.readouterr().err
    assert rc == 2 and str(bad) in err and "leave-running" in err, err
    rc = main(["migrate", "4242", "--to", "127.0.0.1:7411", "--insecure",
               "--criu-config", str(tmp_path / "missing.conf")])
    err = capsys.readouterr().err
    assert rc == 2 and "missing.conf" in err and "cannot read" in err, err


@pytest.mark.parametrize("argv,needle", [
    (["--restore", "--criu-restore-opt=-d"], "-d"),
    (["--restore", "--criu-restore-opt=--pidfile=/x"], "--pidfile"),
    (["--restore", "--criu-restore-opt=--lazy-pages"], "--lazy-pages"),
    (["--criu-restore-opt=--ext-unix-sk"], "give --restore too"),
    (["--apply-threads", "0"], "--apply-threads 0: give 1 to 64 threads"),
    (["--apply-threads", "65"], "give 1 to 64 threads"),
])
def test_serve_restore_opts_refused(tmp_path, capsys, argv, needle):
    rc = main(["serve", "--listen", "127.0.0.1:0", "--insecure", "--dir", str(tmp_path / "d"),
               *argv])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err, err
    assert not (tmp_path / "d").exists()


# -- 4. errors that name the fix --------------------------------------------------------------

def _dump_dir(tmp_path):
    from deltaxfer.criu import images as im
    from test_criu_images import write_dump
    d = tmp_path / "dump"
    write_dump(d, [(0x10000, 1, im.PE_PRESENT)])
    return d


def test_migrate_missing_pid(tmp_path, capsys):
    report = tmp_path / "r.json"
    rc = main(["migrate", "999999", "--to", "127.0.0.1:1", "--insecure", "--report",
               str(report)])
    out = capsys.readouterr().out
    r = json.loads(report.read_text())
    assert rc == 1, out
    assert r["outcome"].startswith("not started"), r
    assert "999999 does not exist" in r["error"], r
    assert "Connection" not in r["error"] and "exited" not in r["outcome"], r
    assert r["rounds"] == [] and r["wire_bytes_sent"] == 0, r


def test_migrate_refuses_itself_and_init(tmp_path):
    from deltaxfer import migrate as mig
    for pid, needle in ((1, "init"), (os.getpid(), "deltaxfer itself"),
                        (os.getppid(), "deltaxfer itself")):
        with pytest.raises(mig.NotStarted, match=needle):
            mig.check_pid(pid)


@pytest.mark.parametrize("command", ["send", "migrate"])
def test_connection_refused_names_address(tmp_path, capsys, command):
    key = write_key(tmp_path / "k")
    with socket.socket() as s:          # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    report = tmp_path / "r.json"
    if command == "send":
        argv = ["send", str(_dump_dir(tmp_path)), "--to", f"127.0.0.1:{port}",
                "--key-file", key]
    else:
        argv = ["migrate", str(os.getpid()), "--to", f"127.0.0.1:{port}", "--key-file", key,
                "--report", str(report)]
        # a PID that is not ours, so that it gets as far as connecting
        sleeper = subprocess.Popen(["sleep", "30"])
        argv[1] = str(sleeper.pid)
    try:
        rc = main(argv)
    finally:
        if command == "migrate":
            sleeper.kill()
            sleeper.wait()
    cap = capsys.readouterr()
    text = cap.err if command == "send" else json.loads(report.read_text())["error"]
    assert rc in (1, 2), cap
    assert f"127.0.0.1:{port}" in text and "refused the connection" in text, text
    assert "deltaxfer serve" in text and "firewall" in text, text
    assert "ConnectionRefusedError" not in text, text


def test_unknown_host_named(tmp_path, capsys, monkeypatch):
    def no_such_host(*a, **kw):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    monkeypatch.setattr(socket, "getaddrinfo", no_such_host)   # no DNS query leaves
    rc = main(["send", str(_dump_dir(tmp_path)), "--to", "dest.example:7411",
               "--key-file", write_key(tmp_path / "k"), "--loop", "asyncio"])
    err = capsys.readouterr().err
    assert rc == 2 and "'dest.example'" in err and "resolve" in err, err


def test_connect_timeout_named(tmp_path, capsys):
    """A listener whose accept queue is full drops new SYNs, as a dropping firewall does."""
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(0)
    port = lst.getsockname()[1]
    fillers = []
    try:
        for _ in range(8):             # fill the accept queue until a connect times out
            c = socket.socket()
            c.settimeout(0.5)
            try:
                c.connect(("127.0.0.1", port))
            except (TimeoutError, BlockingIOError):
                c.close()
                break
            fillers.append(c)
        else:
            pytest.fail("the accept queue never filled")
        t0 = time.monotonic()
        rc = main(["send", str(_dump_dir(tmp_path)), "--to", f"127.0.0.1:{port}",
                   "--key-file", write_key(tmp_path / "k"), "--json"])
        took = time.monotonic() - t0
    finally:
        for c in fillers:
            c.close()
        lst.close()
    out = json.loads(capsys.readouterr().out)
    assert rc == 2, out
    assert f"127.0.0.1:{port}" in out["error"] and "no answer within 10 s" in out["error"], out
    assert "firewall" in out["error"] and "deltaxfer serve" in out["hint"], out
    assert 9 < took < 60, took


def test_json_errors_are_objects(tmp_path, capsys):
    rc = main(["send", str(tmp_path / "nodump"), "--to", "127.0.0.1:99999", "--insecure",
               "--json"])
    cap = capsys.readouterr()
    obj = json.loads(cap.out)
    assert rc == 2 and set(obj) >= {"error", "hint"}, obj
    assert "port 99999 is out of range" in obj["error"], obj
    assert cap.err == ""


def test_port_out_of_range(capsys):
    for argv in (["serve", "--listen", "127.0.0.1:99999", "--insecure", "--dir", "/tmp/x"],
                 ["migrate", "5", "--to", "h:70000", "--insecure"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "out of range" in err and "not HOST:PORT" not in err, err


def test_serve_dir_is_a_file(tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    rc = main(["serve", "--listen", "127.0.0.1:0", "--insecure", "--dir", str(f)])
    err = capsys.readouterr().err
    assert rc == 2 and "is a file, not a directory" in err and "already exists" not in err


def test_help_names_the_hook_executable(capsys):
    parser = build_parser()
    text = parser.format_help()
    for action in parser._subparsers._group_actions:
        for name, sub in action.choices.items():
            text += sub.format_help()
    text = re.sub(r"\s+", " ", text).replace("- ", "-")      # undo argparse's wrapping
    assert "'deltaxfer hook'" not in text, text
    assert "--action-script PATH/deltaxfer-hook" in text, text


# -- 3. the hook refuses a dump that leaves the tasks running ---------------------------------

def _hook_env():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DELTAXFER_", "CRIU_"))}
    env["DELTAXFER_CONFIG"] = "/nonexistent"
    return env


@pytest.mark.criu
@pytest.mark.parametrize("how", ["cmdline", "config"])
def test_hook_refuses_leave_running(criu, tmp_path, how):
    with workloads.start("memwork", mib=4, tmpdir=tmp_path) as wl:
        d = tmp_path / "dump"
        d.mkdir()
        args = [criu.path, "dump", "-t", str(wl.pid), "-D", str(d), "--shell-job",
                "--action-script", str(HOOK), "-o", "dump.log", "-v4"]
        if how == "cmdline":
            args.append("--leave-running")
        else:
            conf = tmp_path / "criu.conf"
            conf.write_text("leave-running\n")
            args += ["--config", str(conf)]
        p = subprocess.run(args, capture_output=True, text=True, env=_hook_env(), timeout=120)
        log = (d / "dump.log").read_text(errors="replace") + p.stderr
        assert p.returncode != 0, log[-2000:]
        assert "refused: this criu dump leaves the tasks running" in log, log[-3000:]
        assert ("criu's command line" if how == "cmdline" else str(conf)) in log
        assert workloads.proc_state(wl.pid) in ("R", "S"), workloads.proc_state(wl.pid)
        assert wl.verify()["ok"]


# -- migrations ------------------------------------------------------------------------------

class Ext:
    """extwork in its own PID namespace, its datagram peer (bound here, outside the tree)
    and its lock file."""

    def __init__(self, tmp_path):
        self.peer_path = f"/tmp/dxt-peer-{os.getpid()}-{time.monotonic_ns()}.sock"
        self.peer = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.peer.bind(self.peer_path)
        self.peer.settimeout(30)
        self.lock = tmp_path / "ext.lock"
        result = tmp_path / "ext.result"
        self.wl = workloads.Workload(
            "extwork", [sys.executable, "-I", str(EXTWORK), "--result", str(result),
                        "--peer", self.peer_path, "--lock", str(self.lock), "--mib", "4"],
            result)
        self.wl._launch(60)
        assert self.peer.recv(100).startswith(b"hello n=0")

    def copies(self) -> list[int]:
        """Other processes running extwork with this peer (restored copies)."""
        out = []
        for name in os.listdir("/proc"):
            if name.isdigit() and int(name) not in (self.wl.pid, self.wl.unshare_pid):
                try:
                    with open(f"/proc/{name}/cmdline", "rb") as f:
                        if self.peer_path.encode() in f.read():
                            out.append(int(name))
                except OSError:
                    pass
        return out

    def close(self):
        self.wl.kill()
        self.peer.close()
        os.unlink(self.peer_path)


@pytest.fixture
def ext(tmp_path):
    e = Ext(tmp_path)
    yield e
    e.close()


EXT_OPTS = ("--criu-opt=--ext-unix-sk", "--criu-opt=--file-locks")


@pytest.mark.criu
@pytest.mark.slow
def test_ext_unix_socket_and_file_lock_migrate(criu, tmp_path, agent_tmp, ext):
    """--criu-opt reaches criu dump, --criu-restore-opt criu restore: the restored copy
    holds the lock and sends through the socket to the peer outside."""
    with Server(tmp_path, extra=["--restore", "--criu-restore-opt=--ext-unix-sk",
                                 "--criu-restore-opt=--file-locks",
                                 "--criu-verbosity", "4"]) as server:
        # --criu-verbosity 3: CRIU's phases in the kept dump.log (the default, 2, keeps
        # errors and warnings only)
        m = run_migrate(ext.wl.pid, server.addr, write_key(tmp_path / "c.key"),
                        tmp_path / "r.json", *EXT_OPTS, "--criu-verbosity", "3",
                        env=agent_env(agent_tmp), timeout=180)
        r = m.report
        if r and r.get("restored_pid"):
            ext.wl.adopt(r["restored_pid"])
        assert m.rc == 0 and r["outcome"] == "migrated", (m.stderr[-2000:], r and r["error"],
                                                          server.log()[-2000:])
        assert "--ext-unix-sk" in r["freeze"]["criu_argv"], r["freeze"]
        assert r["dump_log"] == str(tmp_path / "r.json") + ".dump.log", r
        assert "Dumping finished successfully" in Path(r["dump_log"]).read_text(errors="replace")
        assert "-v3" in r["freeze"]["criu_argv"], r["freeze"]
        # serve --criu-verbosity 4: criu restore's debug lines in restore.log
        restore_log = Path(r["destination_path"]) / "restore.log"
        assert "(pid: " in restore_log.read_text(errors="replace") or \
            "Restore finished successfully" in restore_log.read_text(errors="replace")
        assert oct(os.stat(r["dump_log"]).st_mode & 0o777) == "0o600"
        pid = r["restored_pid"]
        assert wait_gone(ext.wl.pid)
        v = ext.wl.verify(pid=pid, timeout=60)
        assert v["ok"] and v["lock"] == 1, v
        assert ext.peer.recv(100) == b"ping 1 pid=1"     # through the restored socket
        # the restored copy holds the shared flock: an exclusive one is refused
        fd = os.open(ext.lock, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
        assert f"criu's log: {r['destination_path']}/restore.log" in server.log()


@pytest.mark.criu
@pytest.mark.slow
@pytest.mark.parametrize("where", ["report", "log-dir"])
def test_without_ext_unix_sk_rolls_back_and_keeps_the_log(criu, tmp_path, agent_tmp, ext,
                                                          where):
    """Without --ext-unix-sk criu cannot dump the socket: rolled back, the source runs on,
    and criu's dump.log is kept and named in the error."""
    extra = ["--criu-opt=--file-locks"]
    if where == "log-dir":
        logs = tmp_path / "logs"
        logs.mkdir()
        extra += ["--log-dir", str(logs), "--session", "ext-1"]
        want = str(logs / "ext-1.dump.log")
    else:
        want = str(tmp_path / "r.json") + ".dump.log"
    with Server(tmp_path, extra=["--restore"]) as server:
        m = run_migrate(ext.wl.pid, server.addr, write_key(tmp_path / "c.key"),
                        tmp_path / "r.json", *extra, env=agent_env(agent_tmp), timeout=180)
        r = m.report
        assert r is not None, (m.rc, m.stdout[-2000:], m.stderr[-3000:])
        assert m.rc == 1 and r["outcome"] == "rolled back: the source runs on", r
        assert "External socket is used" in r["error"], r["error"]
        assert r["dump_log"] == want and want in r["error"], r
        log = Path(want).read_text(errors="replace")
        assert "Consider using --ext-unix-sk" in log and "Dumping FAILED" in log
        assert ext.copies() == []
        assert ext.wl.verify()["ok"]


@pytest.mark.criu
@pytest.mark.slow
def test_restore_failure_names_restore_log(criu, tmp_path, agent_tmp):
    """A restore that fails (here: serve's --criu-restore-opt is an option criu does not
    know; it reaches criu, which refuses it): the COMMITTED refusal the source reports
    and serve's log name restore.log."""
    with Server(tmp_path, extra=["--restore", "--criu-restore-opt=--no-such-criu-option"]
                ) as server, workloads.start("memwork", mib=8, tmpdir=tmp_path) as wl:
        m = run_migrate(wl.pid, server.addr, write_key(tmp_path / "c.key"),
                        tmp_path / "r.json", "--session", "badroot",
                        env=agent_env(agent_tmp), timeout=180)
        r = m.report
        if r and r.get("restored_pid"):
            wl.adopt(r["restored_pid"])
        assert m.rc == 1 and r["outcome"] == "rolled back: the source runs on", r
        restore_log = f"{server.dir}/badroot/images/restore.log"
        assert restore_log in r["error"], r["error"]
        assert restore_log in server.log(), server.log()[-2000:]
        assert str(tmp_path / "r.json") + ".dump.log" in r["error"], r["error"]
        assert wl.verify()["ok"]


@pytest.mark.criu
@pytest.mark.slow
@pytest.mark.parametrize("kill", [False, True])
def test_no_restore_leaves_the_source_stopped(criu, tmp_path, agent_tmp, kill):
    """--no-restore: the destination holds the images and the source is left stopped,
    with how to restore or resume; the images restore by the printed command. With
    --kill-source the source is gone."""
    with Server(tmp_path) as server, \
            workloads.start("memwork", mib=16, dirty_mib_per_s=2, tmpdir=tmp_path) as wl:
        m = run_migrate(wl.pid, server.addr, write_key(tmp_path / "c.key"),
                        tmp_path / "r.json", "--no-restore",
                        *(["--kill-source"] if kill else []), env=agent_env(agent_tmp),
                        timeout=180)
        r = m.report
        assert m.rc == 0, (m.stderr[-2000:], r and r["error"])
        assert r["outcome"].startswith("stored: the destination holds the images"), r
        assert r["restored_pid"] is None and r["destination_path"], r
        if kill:
            assert wait_gone(wl.pid)
            return
        assert wait_stopped(wl.pid) == "T", workloads.proc_state(wl.pid)
        assert f"criu restore -D {r['destination_path']}" in r["hint"], r["hint"]
        assert f"kill -CONT {wl.pid}" in r["hint"], r["hint"]
        assert copies_of(wl) == []
        # the operator restores the images later, as the hint says
        pidfile = tmp_path / "later.pid"
        criu.run(["restore", "-D", r["destination_path"], "--shell-job", "-d", "--pidfile",
                  str(pidfile)], log_dir=r["destination_path"], log_name="later.log")
        pid = int(pidfile.read_text())
        wl.adopt(pid)
        assert wl.verify(pid=pid, timeout=60)["ok"]


@pytest.mark.criu
def test_serve_without_restore_refuses_at_begin(criu, tmp_path, agent_tmp):
    with Server(tmp_path) as server, \
            workloads.start("memwork", mib=8, tmpdir=tmp_path) as wl:
        m = run_migrate(wl.pid, server.addr, write_key(tmp_path / "c.key"),
                        tmp_path / "r.json", env=agent_env(agent_tmp), timeout=120)
        r = m.report
        assert m.rc == 1 and r["outcome"] == "aborted before the freeze: the source runs on", r
        assert "does not restore" in r["error"] and "--restore" in r["error"], r["error"]
        assert r["rounds"] == [], r["rounds"]          # not one live round was sent
        assert "does not restore" in server.log()
        assert not any(server.dir.iterdir()), list(server.dir.iterdir())
        assert workloads.proc_state(wl.pid) in ("R", "S") and wl.verify()["ok"]


def test_old_client_begin_without_restore_key():
    """A BEGIN without "restore" (an older client) is still valid; one with it is checked."""
    from deltaxfer.wire import MsgType, ProtocolError, encode_control, parse_control
    base = {"session": "s", "mode": "migrate", "source": "h", "images": []}
    assert "restore" not in parse_control(MsgType.BEGIN, encode_control(MsgType.BEGIN, base))
    got = parse_control(MsgType.BEGIN, encode_control(MsgType.BEGIN, {**base, "restore": True}))
    assert got["restore"] is True
    with pytest.raises(ProtocolError):
        parse_control(MsgType.BEGIN, json.dumps({**base, "restore": "yes"}).encode())
