"""runc containers checkpointed and restored through deltaxfer.runc with the project's
criu (runc --criu): the CRIU configuration file reaches CRIU (action script), the
restored workload keeps verifying its own memory, two copies on one host get their own
cgroups. Real runc, real criu, as root."""
from __future__ import annotations

import os
import subprocess
import time

import pytest

import containers
import workloads
from deltaxfer import runc as rc
from deltaxfer.criu.runner import CriuError, find_criu

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="runc and criu need root")


@pytest.fixture(scope="module")
def tools(tmp_path_factory):
    try:
        runc = rc.find_runc()
    except rc.RuncNotFound as e:
        pytest.skip(f"{e}")
    try:
        criu = find_criu()
    except CriuError as e:
        pytest.skip(f"{e}")
    if containers.busybox() is None:
        pytest.skip("no static busybox (make runc installs busybox-static)")
    # Can runc run a container on this kernel at all? (the only reason to skip)
    d = tmp_path_factory.mktemp("probe")
    b = containers.make_bundle(d / "bundle", mib=1, dirty_mib_per_s=0)
    try:
        c = containers.RuncContainer.run(runc.path, criu.path, str(d / "root"), "probe", b)
    except workloads.WorkloadError as e:
        pytest.skip(f"runc cannot run a container here: {e}")
    c.delete()
    return runc, criu


def _hook(path, log) -> str:
    path.write_text(f'#!/bin/sh\necho "$CRTOOLS_SCRIPT_ACTION" >> {log}\n')
    path.chmod(0o755)
    return str(path)


def _actions(log) -> list[str]:
    try:
        return log.read_text().split()
    except FileNotFoundError:
        return []


def _cgroup(pid: int) -> dict:
    out = {}
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            _, ctrls, path = line.rstrip("\n").split(":", 2)
            out[ctrls] = path
    return out


def _run(args, env=None, timeout=180):
    r = subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(args)} -> {r.returncode}: {r.stderr}"
    return r


def _restore(runc, criu, root, id, images, bundle, work):
    """runc restore with the restored container's stdio on fresh pipes."""
    pipes = containers.Pipes()
    args = rc.restore_args(runc, criu.path, root, id, str(images), str(bundle),
                           work_path=str(work))
    r = containers.run_with_pipes(args, pipes)
    restore_log = work / "restore.log"
    assert r.returncode == 0, (f"{' '.join(args)} -> {r.returncode}: {r.stderr}\n"
                               f"{restore_log.read_text()[-3000:] if restore_log.exists() else ''}")
    return containers.RuncContainer(runc.path, root, id, bundle, pipes)


def test_container_state(tools, tmp_path):
    runc, criu = tools
    b = containers.make_bundle(tmp_path / "bundle", mib=4, dirty_mib_per_s=0)
    root = str(tmp_path / "root")
    with containers.RuncContainer.run(runc.path, criu.path, root, "st1", b) as c:
        s = rc.container("st1", root, runc)
        assert s.status == "running" and s.pid == c.pid and s.pid > 0
        assert s.bundle == str(b) and s.root == root
        assert s.criu_config == rc.RUNC_CONF        # no annotation: runc's default file
        assert c.verify()["ok"]


def test_checkpoint_restore_migration(tools, tmp_path):
    """The migration shape: checkpoint (CRIU kills the source, runc destroys it), the
    action script given through $CRIU_CONFIG_FILE, restore under another runc root from
    the same bundle path; the restored workload verifies its memory and keeps dirtying."""
    runc, criu = tools
    b = containers.make_bundle(tmp_path / "bundle", mib=32, dirty_mib_per_s=4)
    r1, r2 = str(tmp_path / "root1"), str(tmp_path / "root2")
    log = tmp_path / "actions"
    conf = rc.write_criu_config(str(tmp_path / "criu.conf"), rc.criu_config_text(
        _hook(tmp_path / "hook", log)))
    images, work = tmp_path / "images", tmp_path / "work"
    with containers.RuncContainer.run(runc.path, criu.path, r1, "src", b) as c:
        time.sleep(0.5)
        assert c.verify()["ok"]
        src = rc.container("src", r1, runc)
        _run(rc.checkpoint_args(runc, criu.path, r1, "src", str(images), str(work)),
             env=rc.checkpoint_env(str(tmp_path / "criu.conf")))
        acts = _actions(log)
        # exactly once each: deltaxfer's hook must hand over once at post-dump
        assert acts == ["pre-dump", "network-lock", "post-dump"], acts
        assert (images / "descriptors.json").exists()
        # the source is gone: CRIU killed it, runc destroyed the container
        assert workloads.proc_state(src.pid) in (None, "Z")
        with pytest.raises(rc.ContainerNotFound):
            rc.container("src", r1, runc)
        # restore: the restore actions run too (the env file is not set here: none)
        with _restore(runc, criu, r2, "dst", images, src.bundle, tmp_path / "work2") as d:
            s = rc.container("dst", r2, runc)
            assert s.status == "running" and s.bundle == src.bundle
            first = d.verify(s.pid)
            assert first["ok"], first
            time.sleep(1.0)
            second = d.verify(s.pid)
            assert second["ok"] and second["mutations"] > first["mutations"], second
    assert _actions(log) == acts      # the file was given to the checkpoint only


def test_annotation_config_and_two_copies(tools, tmp_path):
    """runc's own mechanism (org.criu.config annotation -> CRIU RPC config file), and the
    cgroup rule: with --leave-running the source keeps running while the copy restored
    under another ID (bundle without cgroupsPath) lives in its own cgroup; both verify."""
    runc, criu = tools
    log = tmp_path / "actions"
    conf = tmp_path / "criu.conf"
    rc.write_criu_config(str(conf), rc.criu_config_text(_hook(tmp_path / "hook", log)))
    b = containers.make_bundle(tmp_path / "bundle", mib=16, dirty_mib_per_s=2,
                               annotations={rc.CRIU_CONFIG_ANNOTATION: str(conf)})
    r1, r2 = str(tmp_path / "root1"), str(tmp_path / "root2")
    images, work = tmp_path / "images", tmp_path / "work"
    with containers.RuncContainer.run(runc.path, criu.path, r1, "a", b) as c:
        s1 = rc.container("a", r1, runc)
        assert s1.criu_config == str(conf)
        _run(rc.checkpoint_args(runc, criu.path, r1, "a", str(images), str(work),
                                leave_running=True))
        acts = _actions(log)
        assert "pre-dump" in acts and "post-dump" in acts, acts
        # CRIU 4.1 parses an RPC config file twice (cr-service.c), so its action script
        # is added twice and runs twice per action: why deltaxfer uses $CRIU_CONFIG_FILE
        assert acts.count("post-dump") in (1, 2), acts
        assert rc.container("a", r1, runc).status == "running"
        # the annotation is in the bundle, so the restore reads the file as well
        with _restore(runc, criu, r2, "b", images, b, tmp_path / "work2") as d:
            s2 = rc.container("b", r2, runc)
            assert s2.status == "running" and s2.pid != s1.pid
            assert "post-restore" in _actions(log)
            cg1, cg2 = _cgroup(s1.pid), _cgroup(s2.pid)
            assert any(cg1[k] != cg2[k] for k in cg1 if k != ""), (cg1, cg2)
            assert cg1.get("memory", "").endswith("/a") or "a" in cg1.get("memory", "")
            assert c.verify(s1.pid)["ok"]
            assert d.verify(s2.pid)["ok"]
            # the cgroups work while both exist: freeze the copy, the source runs on
            _run([runc.path, "--root", r2, "pause", "b"])
            assert rc.container("b", r2, runc).status == "paused"
            assert c.verify(s1.pid)["ok"]
            _run([runc.path, "--root", r2, "resume", "b"])
            assert d.verify(s2.pid)["ok"]
        assert workloads.proc_state(s2.pid) in (None, "Z")
        assert c.verify(s1.pid)["ok"]


def test_errors(tools, tmp_path):
    runc, criu = tools
    with pytest.raises(rc.NotARuncRoot, match="does not exist"):
        rc.container("x", str(tmp_path / "no-such-root"), runc)
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(rc.NotARuncRoot, match="not a directory"):
        rc.container("x", str(f), runc)
    with pytest.raises(rc.ContainerNotFound, match="holds no runc containers"):
        rc.container("x", str(tmp_path), runc)
    b = containers.make_bundle(tmp_path / "bundle", mib=1, dirty_mib_per_s=0)
    root = str(tmp_path / "root")
    with containers.RuncContainer.run(runc.path, criu.path, root, "here", b):
        with pytest.raises(rc.ContainerNotFound, match=r"no container 'gone'.*holds: here"):
            rc.container("gone", root, runc)
    with pytest.raises(rc.RuncNotFound):
        rc.find_runc(str(tmp_path / "no-runc"))


def test_args_shape():
    a = rc.checkpoint_args("/usr/sbin/runc", "/c/criu", "/r", "id", "/img", "/w",
                           lazy_port=4242, manage_cgroups_mode="soft")
    assert a == ["/usr/sbin/runc", "--criu", "/c/criu", "--root", "/r", "checkpoint",
                 "--image-path", "/img", "--work-path", "/w", "--lazy-pages",
                 "--page-server", "127.0.0.1:4242", "--manage-cgroups-mode", "soft", "id"]
    with pytest.raises(ValueError):
        rc.checkpoint_args("runc", "criu", "/r", "id", "/i", "/w", lazy_port=1,
                           page_server="h:2")
    r = rc.restore_args("runc", "criu", "/r2", "id2", "/img", "/b", pid_file="/p")
    assert r[-4:] == ["--pid-file", "/p", "--detach", "id2"]
    assert rc.criu_config_text("/h", address="127.0.0.1", leave_stopped=True) == \
        "action-script /h\naddress 127.0.0.1\nleave-stopped\n"
    with pytest.raises(ValueError):
        rc.criu_config_text("/a b")


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listeners(port: int) -> list[str]:
    r = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True)
    return [line.split()[3] for line in r.stdout.splitlines() if line.split()]


def test_lazy_checkpoint_ends_like_deltaxfer(tools, tmp_path):
    """The freeze deltaxfer will use: runc --lazy-pages --page-server 127.0.0.1:PORT, the
    config file adding the action script and `address 127.0.0.1` (CRIU's RPC takes only
    the port in lazy mode); after post-dump CRIU serves the frozen pages; one page-server
    CLOSE ends the dump (no page sent), CRIU kills the source, the images restore."""
    import socket
    from deltaxfer.criu.lazy import close_header
    runc, criu = tools
    b = containers.make_bundle(tmp_path / "bundle", mib=16, dirty_mib_per_s=2)
    r1, r2 = str(tmp_path / "root1"), str(tmp_path / "root2")
    log = tmp_path / "actions"
    port = _free_port()
    conf = rc.write_criu_config(str(tmp_path / "criu.conf"), rc.criu_config_text(
        _hook(tmp_path / "hook", log), address="127.0.0.1"))
    images, work = tmp_path / "images", tmp_path / "work"
    with containers.RuncContainer.run(runc.path, criu.path, r1, "lz", b) as c:
        src = rc.container("lz", r1, runc)
        proc = subprocess.Popen(
            rc.checkpoint_args(runc, criu.path, r1, "lz", str(images), str(work),
                               lazy_port=port),
            env=rc.checkpoint_env(conf), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True)
        try:
            deadline = time.monotonic() + 60
            while not _listeners(port):
                assert proc.poll() is None, proc.stderr.read()
                assert time.monotonic() < deadline, "no lazy page server"
                time.sleep(0.05)
            assert _listeners(port) == [f"127.0.0.1:{port}"]
            assert "post-dump" in _actions(log)
            assert workloads.proc_state(src.pid) in ("T", "t", "S", "D")  # frozen, alive
            with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
                s.sendall(close_header(criu.version))
                s.shutdown(socket.SHUT_WR)
                status = b""
                while len(status) < 4:
                    chunk = s.recv(4 - len(status))
                    if not chunk:
                        break
                    status += chunk
            assert status == b"\0\0\0\0", status
            assert proc.wait(timeout=60) == 0, proc.stderr.read()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert workloads.proc_state(src.pid) in (None, "Z")
