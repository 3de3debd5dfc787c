"""`deltaxfer send` to `deltaxfer serve` with real dumps of a real process, restored from
what the receiver holds and verified by the process itself."""
import json
import os
import time

import pytest

import workloads
from deltaxfer.cli import main
from servers import Server, write_key

pytestmark = pytest.mark.criu
MIB = 64


def send(capsys, server, key_file, image_dir, *extra):
    rc = main(["send", str(image_dir), "--to", server.addr, "--key-file", key_file,
               "--session", "app", "--json", *extra])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return json.loads(out.out)


@pytest.mark.slow
@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_send_twice_then_restore(criu, tmp_path, capsys, loop):
    key_file = write_key(tmp_path / "client.key")
    d1, d2 = tmp_path / "dump1", tmp_path / "dump2"
    d1.mkdir()
    d2.mkdir()
    with Server(tmp_path, loop=loop) as server, \
            workloads.start("memwork", mib=MIB, dirty_mib_per_s=4, tmpdir=tmp_path) as wl:
        criu.dump(wl.pid, str(d1), leave="running")
        first = send(capsys, server, key_file, d1, "--loop", loop)
        assert first["round"] == 1 and first["pages"]["sent_xor"] == 0
        assert first["pages"]["unchanged"] == 0
        # zero pages cost no page bytes; the rest is lz4-compressed
        assert first["wire_bytes_sent"] < first["image_bytes"]

        time.sleep(2)  # memwork dirties ~8 MiB of pages meanwhile
        criu.dump(wl.pid, str(d2), leave="stopped")
        second = send(capsys, server, key_file, d2, "--loop", loop)
        p = second["pages"]
        assert second["round"] == 2 and second["base"] == str(d1)
        assert p["unchanged"] > 0.7 * p["pages"]
        assert p["sent_xor"] > 0.9 * (p["changed"]), p
        # only the delta crossed the wire: a small fraction of the image
        assert second["wire_bytes_sent"] < second["image_bytes"] / 20, second

        path = second["destination_path"]
        assert path.startswith(str(server.dir)) and os.path.isdir(path)
        assert "committed" in server.log() and path in server.log()
        # the receiver's directory restores, and the process finds its memory intact
        pid = criu.restore(path)
        wl.adopt(pid)
        result = wl.verify(pid=pid)
        assert result["ok"], result
        assert server.alive()
    leftovers = [p for p in os.listdir(server.dir / "app") if p.endswith(".tmp")]
    assert leftovers == []


def test_wrong_key_is_refused_and_server_keeps_serving(criu, tmp_path, capsys):
    dump = tmp_path / "dump"
    dump.mkdir()
    with Server(tmp_path) as server, \
            workloads.start("memwork", mib=8, tmpdir=tmp_path) as wl:
        criu.dump(wl.pid, str(dump), leave="running")
        bad_key = write_key(tmp_path / "bad.key", b"not-the-right-key-at-all" + bytes(8))
        rc = main(["send", str(dump), "--to", server.addr, "--key-file", bad_key])
        err = capsys.readouterr().err
        assert rc == 2 and "key" in err and "Traceback" not in err, err
        time.sleep(0.2)
        assert "authentication" in server.log()
        good = write_key(tmp_path / "good.key")
        report = send(capsys, server, good, dump)
        assert report["round"] == 1 and server.alive()


def test_key_file_readable_by_others_is_refused(tmp_path, capsys):
    key = write_key(tmp_path / "k", mode=0o644)
    rc = main(["send", str(tmp_path), "--to", "127.0.0.1:1", "--key-file", key])
    err = capsys.readouterr().err
    assert rc == 2 and "chmod 600" in err


def test_restore_hook_checks_received_images(criu, tmp_path, capsys):
    """`criu restore --action-script deltaxfer-hook` on what `serve` received: a completed
    transfer restores (post-restore logs it); a directory that is not the session's
    committed one is refused at pre-restore, before CRIU starts anything."""
    import shutil
    import sys as _sys
    from pathlib import Path
    hook = str(Path(_sys.executable).parent / "deltaxfer-hook")
    key_file = write_key(tmp_path / "client.key")
    dump = tmp_path / "dump"
    dump.mkdir()
    with Server(tmp_path) as server, \
            workloads.start("memwork", mib=16, tmpdir=tmp_path) as wl:
        criu.dump(wl.pid, str(dump), leave="stopped")
        report = send(capsys, server, key_file, dump)
        images = report["destination_path"]
        # a copy that is not the committed directory: refused
        stale = Path(images).parent / "images.tmp"
        shutil.copytree(images, stale, symlinks=True)
        proc = criu.run(["restore", "-d", "-D", str(stale), "--shell-job",
                         "--action-script", hook], log_dir=str(stale),
                        log_name="restore.log", check=False)
        assert proc.returncode != 0
        log = (stale / "restore.log").read_text()
        assert "pre-restore refused" in log and "not a completed deltaxfer transfer" in log
        shutil.rmtree(stale)
        # the committed directory restores, and the hook logs it
        pid = criu.restore(images, extra=["--action-script", hook])
        wl.adopt(pid)
        assert wl.verify(pid=pid)["ok"]
        assert "deltaxfer hook: post-restore: restored tree" in \
            (Path(images) / "restore.log").read_text()
