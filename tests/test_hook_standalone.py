"""`criu dump --action-script deltaxfer-hook`, run by the operator (no `deltaxfer migrate`):
the hook alone does the live rounds at pre-dump and the residual, the images and the
two-step restore at post-dump, configured by environment variables or a config file."""
import json
import os
import sys
from pathlib import Path

import pytest

import workloads
from deltaxfer.criu import pipes
from faults import adopt_the_one_copy, host_pipe_max, wait_gone
from servers import Server, write_key

pytestmark = [pytest.mark.criu, pytest.mark.slow]
HOOK = str(Path(sys.executable).parent / "deltaxfer-hook")


@pytest.mark.parametrize("how", ["env", "config-file"])
def test_plain_criu_dump_with_the_hook_migrates(criu, tmp_path, how):
    key_file = write_key(tmp_path / "client.key")
    dump = tmp_path / "dump"
    dump.mkdir()
    with Server(tmp_path, extra=["--restore"]) as server, \
            workloads.start("memwork", mib=48, dirty_mib_per_s=4, tmpdir=tmp_path) as wl:
        report = tmp_path / "hook-report.json"
        settings = {"to": server.addr, "key_file": key_file, "session": f"hook-{how}",
                    "report": str(report)}
        pipe_max, leftover = host_pipe_max()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DELTAXFER_", "CRIU_"))}
        if how == "env":
            env.update({f"DELTAXFER_{k.upper()}": v for k, v in settings.items()})
        else:
            conf = tmp_path / "hook.conf"
            conf.write_text("# deltaxfer hook\n" + "".join(f"{k} = {v}\n" for k, v in settings.items()))
            env["DELTAXFER_CONFIG"] = str(conf)
        proc = criu.run(["dump", "-t", str(wl.pid), "-D", str(dump), "--shell-job",
                         "--action-script", HOOK], log_dir=str(dump), log_name="dump.log",
                        check=False, env=env)
        log = (dump / "dump.log").read_text()
        assert proc.returncode == 0, log[-3000:]
        assert "deltaxfer hook: round  1" in log          # live rounds ran at pre-dump
        assert wait_gone(wl.pid), "criu kills the source after a successful post-dump"
        adopt_the_one_copy(wl)
        assert f"session hook-{how}" in server.log() and "runs" in server.log()
        # CRIU's page pipes: the sysctl raised by pre-dump, put back by post-dump
        assert host_pipe_max() == (pipe_max, False)
        if not pipes.has_cap_sys_resource() and pipe_max < pipes.CRIU_PIPE_BYTES \
                and not leftover:
            pre = json.loads(Path(f"{report}.pre-dump").read_text())
            post = json.loads(report.read_text())
            assert pre["freeze"]["pipes"] == (f"fs.pipe-max-size raised from {pipe_max} to "
                                              f"{pipes.CRIU_PIPE_BYTES} for the freeze"), pre
            assert post["freeze"]["pipes"] == f"fs.pipe-max-size back to {pipe_max}", post


def test_hook_without_a_destination_makes_criu_resume(criu, tmp_path):
    dump = tmp_path / "dump"
    dump.mkdir()
    with workloads.start("memwork", mib=8, tmpdir=tmp_path) as wl:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DELTAXFER_", "CRIU_"))}
        env["DELTAXFER_CONFIG"] = str(tmp_path / "absent.conf")
        proc = criu.run(["dump", "-t", str(wl.pid), "-D", str(dump), "--shell-job",
                         "--action-script", HOOK], log_dir=str(dump), log_name="dump.log",
                        check=False, env=env)
        assert proc.returncode != 0
        assert "nowhere to migrate to" in (dump / "dump.log").read_text()
        assert wl.verify()["ok"]                          # resumed, memory intact
