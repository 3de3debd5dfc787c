"""`deltaxfer sessions list|rm` on a serve directory built by real `deltaxfer send`s of a
small dump to a real `deltaxfer serve`."""
import json
import os
import subprocess
import sys
import time

import pytest

from deltaxfer.cli import main
from deltaxfer.criu import images as im
from servers import Server
from test_criu_images import write_dump


def send(server, dump, session):
    proc = subprocess.run(
        [sys.executable, "-m", "deltaxfer", "send", str(dump), "--to", server.addr,
         "--key-file", server.key_file, "--session", session, "--json"],
        capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def age(path, days):
    """Set every mtime under path (links themselves, not their targets) days back."""
    t = time.time() - days * 86400
    for dirpath, dirnames, filenames in os.walk(path):
        for n in dirnames + filenames:
            os.utime(os.path.join(dirpath, n), (t, t), follow_symlinks=False)
    os.utime(path, (t, t), follow_symlinks=False)


def run(capsys, *argv):
    rc = main(["sessions", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture
def served(tmp_path):
    """A serve dir holding sessions web (2 sends) and db (1 send); the server still up."""
    dump = tmp_path / "dump"
    write_dump(dump, [(0x10000, 8, im.PE_PRESENT), (0x20000, 2, im.PE_PRESENT)])
    with Server(tmp_path) as server:
        send(server, dump, "web")
        send(server, dump, "web")
        send(server, dump, "db")
        yield server, dump


def test_list(served, capsys):
    server, dump = served
    rc, out, _ = run(capsys, "list", "--dir", str(server.dir), "--json")
    assert rc == 0
    doc = json.loads(out)
    by = {s["name"]: s for s in doc["sessions"]}
    assert sorted(by) == ["db", "web"]
    assert by["web"]["round"] == 2 and by["db"]["round"] == 1
    for s in by.values():
        assert s["source"].endswith(str(dump))
        assert s["committed"] and s["images"] == str(server.dir / s["name"] / "images")
        assert not s["restored"] and s["restored_pid"] is None
        assert s["unfinished"] == []
        assert s["bytes"] >= 10 * 4096          # the held pages (images/ are hard links)
        assert s["age_seconds"] < 300
    rc, out, _ = run(capsys, "list", "--dir", str(server.dir))
    assert rc == 0 and out.splitlines()[0].split()[:3] == ["SESSION", "ROUND", "SIZE"]
    assert any(line.startswith("web ") and " committed " in line for line in out.splitlines())


def test_rm_by_name(served, capsys):
    server, dump = served
    d = str(server.dir)
    # just written: it may belong to a transfer in progress
    rc, _, err = run(capsys, "rm", "--dir", d, "web")
    assert rc == 1 and "refused web: modified" in err and (server.dir / "web").is_dir()
    age(server.dir / "web", 1)
    rc, out, _ = run(capsys, "rm", "--dir", d, "web", "--dry-run")
    assert rc == 0 and "would remove web" in out and (server.dir / "web").is_dir()
    rc, out, _ = run(capsys, "rm", "--dir", d, "web", "--json")
    r = json.loads(out)
    assert rc == 0 and r["removed"] == ["web"] and r["bytes_freed"] > 0
    assert sorted(os.listdir(d)) == ["db"]      # nothing left behind, db untouched
    # the server serves the removed name again, from scratch
    assert send(server, dump, "web")["round"] == 1
    # a recent session goes with --force
    rc, _, _ = run(capsys, "rm", "--dir", d, "--force", "web")
    assert rc == 0 and sorted(os.listdir(d)) == ["db"]
    rc, _, err = run(capsys, "rm", "--dir", d, "web")
    assert rc == 1 and "no such session" in err


def test_rm_older_than(served, capsys):
    server, _ = served
    age(server.dir / "db", 3)
    rc, out, _ = run(capsys, "rm", "--dir", str(server.dir), "--older-than", "2")
    assert rc == 0 and "removed db" in out
    assert sorted(os.listdir(server.dir)) == ["web"]
    rc, _, err = run(capsys, "rm", "--dir", str(server.dir))
    assert rc == 2 and "--older-than" in err


def test_unfinished_state_is_refused_unless_forced(served, capsys):
    server, _ = served
    os.mkdir(server.dir / "web" / "round.tmp", 0o700)
    age(server.dir / "web", 3)
    rc, out, _ = run(capsys, "list", "--dir", str(server.dir), "--json")
    web = {s["name"]: s for s in json.loads(out)["sessions"]}["web"]
    assert web["unfinished"] and "round.tmp" in web["unfinished"][0]
    rc, _, err = run(capsys, "rm", "--dir", str(server.dir), "--older-than", "1")
    assert rc == 1 and "refused web: unfinished: round.tmp" in err
    assert (server.dir / "web").is_dir()
    rc, _, _ = run(capsys, "rm", "--dir", str(server.dir), "--older-than", "1", "--force")
    assert rc == 0 and not (server.dir / "web").exists()


def test_links_and_bad_names_are_never_followed(served, tmp_path, capsys):
    server, _ = served
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep")
    os.symlink(outside, server.dir / "linked")            # a session name, but a link
    os.symlink(outside, server.dir / "db" / "images" / "escape")   # a link inside
    rc, out, _ = run(capsys, "list", "--dir", str(server.dir), "--json")
    assert [s["name"] for s in json.loads(out)["sessions"]] == ["db", "web"]
    age(server.dir / "db", 1)
    rc, _, err = run(capsys, "rm", "--dir", str(server.dir), "--force",
                     "linked", "../outside", ".removing-x", "db")
    assert rc == 1
    assert "refused linked: not a directory" in err
    assert "refused ../outside: not a session name" in err
    assert "refused .removing-x: not a session name" in err
    assert not (server.dir / "db").exists()
    assert (outside / "precious").read_text() == "keep"
    assert os.path.islink(server.dir / "linked")
    # a --dir that is a link is refused as a whole
    os.symlink(server.dir, tmp_path / "dirlink")
    rc, _, err = run(capsys, "list", "--dir", str(tmp_path / "dirlink"))
    assert rc == 2 and "symbolic link" in err


def test_restored_pid_and_pid_reuse(served, capsys):
    server, _ = served
    pidfile = server.dir / "db" / "images" / "restored.pid"
    pidfile.write_text(f"{os.getpid()}\n")      # a process that runs, started before
    rc, out, _ = run(capsys, "list", "--dir", str(server.dir), "--json")
    db = {s["name"]: s for s in json.loads(out)["sessions"]}["db"]
    assert db["restored"] and db["restored_pid"] == os.getpid() and db["restored_running"]
    old = time.time() - 10 * 86400               # pidfile older than this process: the
    os.utime(pidfile, (old, old))                 # pid now names another process
    rc, out, _ = run(capsys, "list", "--dir", str(server.dir))
    assert "restored pid" in out and "(gone)" in out
