"""`deltaxfer migrate --runc ID` to a `deltaxfer serve --restore --runc-root DIR`, both on
this machine under two runc roots, with real runc and criu: the container's self-checking
workload verifies all of its memory after the move and the source container is gone; bad
input and a failing `runc restore` end with a clear error, the container running on at
the source and nothing left at the destination (no container, no session)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import containers
import workloads
from deltaxfer import runc as rc
from deltaxfer.criu.runner import CriuError, find_criu
from servers import Server, write_key

pytestmark = [pytest.mark.criu,
              pytest.mark.skipif(os.geteuid() != 0, reason="runc and criu need root")]


@pytest.fixture(scope="module")
def tools(tmp_path_factory):
    try:
        runc, criu = rc.find_runc(), find_criu()
    except (rc.RuncNotFound, CriuError) as e:
        pytest.skip(f"{e}")
    if containers.busybox() is None:
        pytest.skip("no static busybox (make runc installs busybox-static)")
    d = tmp_path_factory.mktemp("probe")
    b = containers.make_bundle(d / "bundle", mib=1, dirty_mib_per_s=0)
    try:
        containers.RuncContainer.run(runc.path, criu.path, str(d / "root"), "probe", b).delete()
    except workloads.WorkloadError as e:
        pytest.skip(f"runc cannot run a container here: {e}")
    return runc, criu


def migrate(tmp_path, server, id, root, *extra, dest_id="copy"):
    """`deltaxfer migrate --runc ID --runc-root ROOT --runc-dest-id DEST_ID`; (exit code,
    report, stderr). Both roots share this host: the copy gets another ID, hence its own
    cgroup (with the same ID it would join the frozen source's cgroup)."""
    key = write_key(tmp_path / "client.key")
    out = tmp_path / "report.json"
    out.unlink(missing_ok=True)
    p = subprocess.run([sys.executable, "-m", "deltaxfer", "migrate", "--runc", id,
                        "--runc-root", str(root), "--runc-dest-id", dest_id, "--to", server.addr, "--key-file", key,
                        "--report", str(out), "--quiet", *extra],
                       capture_output=True, text=True, timeout=300)
    report = json.loads(out.read_text()) if out.exists() else None
    return p.returncode, report, p.stderr


def sessions(server) -> list[str]:
    return sorted(n for n in os.listdir(server.dir) if not n.startswith(".")) \
        if server.dir.exists() else []


def assert_nothing_left(server, root2):
    assert rc._known(str(root2)) == [], os.listdir(root2)
    assert sessions(server) == [], sessions(server)


def assert_runs_on(c, runc, root, id):
    s = rc.container(id, str(root), runc)
    assert s.status == "running", s
    res = c.verify(s.pid)
    assert res["ok"], res


def test_container_migrates_live(tools, tmp_path):
    runc, criu = tools
    b = containers.make_bundle(tmp_path / "bundle", mib=32, dirty_mib_per_s=2)
    r1, r2 = tmp_path / "root1", tmp_path / "root2"
    with Server(tmp_path, extra=["--restore", "--runc-root", str(r2)]) as server, \
            containers.RuncContainer.run(runc.path, criu.path, str(r1), "web", b) as c:
        src_pid = c.pid
        code, r, err = migrate(tmp_path, server, "web", r1)
        try:
            assert code == 0, (code, err[-3000:], r and r.get("error"), server.log()[-6000:])
            assert r["outcome"] == "migrated" and r["error"] is None, r
            assert r["container"] == {"id": "web", "root": str(r1), "bundle": str(b),
                                      "dest_id": "copy"}
            live = [x for x in r["rounds"] if x["live"]]
            assert len(live) >= 1 and r["rounds"][-1]["live"] is False, r["rounds"]
            assert live[0]["changed"] == live[0]["pages"] > 32 * 256 // 2
            assert r["freeze"]["runc_exit"] == 0 and r["freeze"]["lazy_close_status"] == 0
            assert 0 < r["downtime"] < 60, r
            # the source: its tasks killed, its runc state deleted
            assert workloads.proc_state(src_pid) in (None, "Z")
            with pytest.raises(rc.ContainerNotFound):
                rc.container("web", str(r1), runc)
            # the copy: same ID under the other root, running, its memory intact
            s = rc.container("copy", str(r2), runc)
            assert s.status == "running" and s.pid == r["restored_pid"] != src_pid
            assert s.bundle == str(b)
            first = c.verify(s.pid)
            assert first["ok"], first
            second = c.verify(s.pid)
            assert second["ok"] and second["mutations"] >= first["mutations"], second
            assert "restored as pid" in server.log()
        finally:
            rc.remove_container(runc, str(r2), "copy")


def test_unknown_container_and_bad_root(tools, tmp_path):
    runc, criu = tools
    b = containers.make_bundle(tmp_path / "bundle", mib=4, dirty_mib_per_s=1)
    r1, r2 = tmp_path / "root1", tmp_path / "root2"
    with Server(tmp_path, extra=["--restore", "--runc-root", str(r2)]) as server, \
            containers.RuncContainer.run(runc.path, criu.path, str(r1), "db", b) as c:
        code, r, err = migrate(tmp_path, server, "nosuch", r1)
        assert code == 1 and r["outcome"].startswith("aborted before the freeze"), (code, r)
        assert "no container 'nosuch'" in r["error"] and "holds: db" in r["error"], r
        code, r, err = migrate(tmp_path, server, "db", tmp_path / "not-a-root")
        assert code == 1 and "does not exist" in r["error"] and "--root" in r["error"], r
        f = tmp_path / "file"
        f.write_text("")
        code, r, err = migrate(tmp_path, server, "db", f)
        assert code == 1 and "not a directory" in r["error"], r
        assert "Traceback" not in err, err
        assert_runs_on(c, runc, r1, "db")
        assert_nothing_left(server, r2)
        assert "session" not in server.log()     # the destination was never reached


def test_bundle_missing_on_destination(tools, tmp_path):
    """The bundle path the source names does not exist at the destination (here: moved
    away while the container runs): refused at BEGIN, before any round."""
    runc, criu = tools
    b = containers.make_bundle(tmp_path / "bundle", mib=4, dirty_mib_per_s=1)
    r1, r2 = tmp_path / "root1", tmp_path / "root2"
    with Server(tmp_path, extra=["--restore", "--runc-root", str(r2)]) as server, \
            containers.RuncContainer.run(runc.path, criu.path, str(r1), "app", b) as c:
        os.rename(b, tmp_path / "elsewhere")
        try:
            code, r, err = migrate(tmp_path, server, "app", r1)
        finally:
            os.rename(tmp_path / "elsewhere", b)
        assert code == 1, (code, err)
        assert "refused the session" in r["error"] and "does not exist here" in r["error"], r
        assert "same path on both hosts" in r["error"], r
        assert r["rounds"] == [] and "dump" not in r["freeze"], r
        assert_runs_on(c, runc, r1, "app")
        assert_nothing_left(server, r2)


def test_bundle_writable_by_others_refused(tools, tmp_path):
    runc, criu = tools
    b = containers.make_bundle(tmp_path / "bundle", mib=4, dirty_mib_per_s=1)
    r1, r2 = tmp_path / "root1", tmp_path / "root2"
    with Server(tmp_path, extra=["--restore", "--runc-root", str(r2)]) as server, \
            containers.RuncContainer.run(runc.path, criu.path, str(r1), "w", b) as c:
        os.chmod(b, 0o777)
        try:
            code, r, err = migrate(tmp_path, server, "w", r1)
        finally:
            os.chmod(b, 0o755)
        assert code == 1 and "writable by others" in r["error"], r
        assert_runs_on(c, runc, r1, "w")
        assert_nothing_left(server, r2)


def test_runc_restore_fails(tools, tmp_path):
    """The destination's `runc restore` fails (its runc is given a criu that exits 1):
    the final round's verdict is no, CRIU resumes the container at the source; the
    destination deletes what runc left and the session."""
    runc, criu = tools
    wrapper = tmp_path / "runc-broken-restore"
    wrapper.write_text(
        f"#!{sys.executable}\nimport os, sys\n"
        "a = sys.argv[1:]\n"
        "if 'restore' in a and '--criu' in a:\n"
        "    a[a.index('--criu') + 1] = '/bin/false'\n"
        f"os.execv({runc.path!r}, [{runc.path!r}] + a)\n")
    wrapper.chmod(0o755)
    b = containers.make_bundle(tmp_path / "bundle", mib=8, dirty_mib_per_s=1)
    r1, r2 = tmp_path / "root1", tmp_path / "root2"
    env = dict(os.environ, DELTAXFER_RUNC=str(wrapper))
    with Server(tmp_path, extra=["--restore", "--runc-root", str(r2)], env=env) as server, \
            containers.RuncContainer.run(runc.path, criu.path, str(r1), "job", b) as c:
        src_pid = c.pid
        code, r, err = migrate(tmp_path, server, "job", r1)
        assert code == 1, (code, err)
        assert r["outcome"] == "rolled back: the source runs on", r
        assert "runc restore of container copy" in r["error"], r
        assert r["freeze"]["runc_exit"] != 0, r["freeze"]
        # the same process, resumed by CRIU, its memory intact
        assert rc.container("job", str(r1), runc).pid == src_pid
        assert_runs_on(c, runc, r1, "job")
        assert_nothing_left(server, r2)
        assert "runc restore of container copy" in server.log()
