"""The fourth way into Options: a CRIU configuration file. `# deltaxfer: KEY = VALUE`
lines (comments to CRIU) in the configuration files the criu running the hook reads give
the same Options as the flags; the order is the hook's file, then CRIU's files in CRIU's
order, then the environment; a file with such lines is held to the hook file's rules."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import workloads
from deltaxfer.hook import HookConfigError, criu_config_files, hook_config
from deltaxfer.settings import options_from
from faults import adopt_the_one_copy, wait_gone
from servers import Server, write_key
from test_settings import FLAGS, VALUES, _cli, _comparable

HOOK = str(Path(sys.executable).parent / "deltaxfer-hook")


def _criu_conf(path: Path, settings: dict, criu_lines: str = "") -> Path:
    path.write_text("# CRIU options, and deltaxfer's in comments CRIU skips\n" + criu_lines
                    + "".join(f"# deltaxfer: {k} = {v}\n" for k, v in settings.items()
                              if v is not None))
    os.chmod(path, 0o644)
    return path


def test_criu_config_file_gives_the_same_options_as_the_flags(tmp_path):
    values = {k: v for k, v in VALUES.items() if not k.startswith("tls_")}
    flags = [f for i, f in enumerate(FLAGS) if "--tls-server-name" not in FLAGS[max(i - 1, 0):i + 1]]
    assert len(flags) == len(FLAGS) - 2
    conf = _criu_conf(tmp_path / "criu.conf", dict(values, to="h:1"),
                      criu_lines="tcp-established\nfile-locks  # and a trailing comment\n")
    c = hook_config({"DELTAXFER_CONFIG": str(tmp_path / "absent.conf"),
                     "CRIU_CONFIG_FILE": str(conf)})
    assert c["to"] == "h:1"
    assert c["_sources"]["max_rounds"] == f"max_rounds in {conf} (CRIU configuration)"
    got = options_from({k: v for k, v in c.items() if not k.startswith("_") and k != "to"},
                       c["_sources"])
    assert _comparable(got) == _comparable(_cli(*flags))


def _fake_criu(argv):
    """A process whose command line is a criu dump's (``dump`` + argv), returned once its
    /proc/PID/cmdline says so (under load the new program's argv shows up late)."""
    fake = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "dump",
                             *argv])
    deadline = time.monotonic() + 10
    while b"\0dump\0" not in open(f"/proc/{fake.pid}/cmdline", "rb").read():
        assert time.monotonic() < deadline, "the stand-in criu never showed its argv"
        time.sleep(0.01)
    return fake


def test_order_hook_file_then_criu_files_then_environment(tmp_path):
    hook_conf = tmp_path / "hook.conf"
    hook_conf.write_text("max_rounds = 5\ndowntime_target_ms = 500\nsession = from-hook\n")
    os.chmod(hook_conf, 0o644)
    first = _criu_conf(tmp_path / "first.conf", {"max_rounds": "3", "session": "first"})
    last = _criu_conf(tmp_path / "last.conf", {"session": "last"})
    env = {"DELTAXFER_CONFIG": str(hook_conf), "HOME": str(tmp_path / "home")}
    (tmp_path / "home" / ".criu").mkdir(parents=True)
    os.replace(first, tmp_path / "home" / ".criu" / "default.conf")
    first = tmp_path / "home" / ".criu" / "default.conf"
    argv = ["-t", "1", "--config", str(last)]
    assert criu_config_files(argv, env)[-2:] == [str(first), str(last)]
    # a hook under this criu: our own process stands in for it (its argv is read)
    fake = _fake_criu(argv)
    try:
        c = hook_config(env, criu_pid=fake.pid)
        assert (c["max_rounds"], c["downtime_target_ms"], c["session"]) == ("3", "500", "last")
        c = hook_config(dict(env, DELTAXFER_SESSION="env"), criu_pid=fake.pid)
        assert c["session"] == "env" and c["_sources"]["session"] == "DELTAXFER_SESSION"
        # --no-default-config: CRIU skips ~/.criu/default.conf, and so do we
        fake.kill()
        fake.wait()
        fake = _fake_criu(["--no-default-config", *argv])
        c = hook_config(env, criu_pid=fake.pid)
        assert (c["max_rounds"], c["session"]) == ("5", "last")
    finally:
        fake.kill()
        fake.wait()


def test_criu_config_with_settings_must_be_owned_and_keys_known(tmp_path):
    env = {"DELTAXFER_CONFIG": str(tmp_path / "absent.conf")}
    conf = _criu_conf(tmp_path / "criu.conf", {"criu": "/tmp/evil", "to": "h:1"})
    os.chmod(conf, 0o666)
    with pytest.raises(HookConfigError, match="writable"):
        hook_config(dict(env, CRIU_CONFIG_FILE=str(conf)))
    # no deltaxfer lines: CRIU's own business, whatever its mode
    plain = tmp_path / "plain.conf"
    plain.write_text("tcp-established\n")
    os.chmod(plain, 0o666)
    assert "to" not in hook_config(dict(env, CRIU_CONFIG_FILE=str(plain)))
    bad = _criu_conf(tmp_path / "bad.conf", {"max_round": "3"})
    with pytest.raises(HookConfigError, match=r"bad.conf line 2: unknown key 'max_round'"):
        hook_config(dict(env, CRIU_CONFIG_FILE=str(bad)))
    bad.write_text("# deltaxfer: max_rounds 3\n")
    with pytest.raises(HookConfigError, match="expected `# deltaxfer: KEY = VALUE`"):
        hook_config(dict(env, CRIU_CONFIG_FILE=str(bad)))


@pytest.mark.criu
@pytest.mark.slow
def test_one_criu_config_file_configures_the_dump_and_the_migration(criu, tmp_path):
    """`criu dump --config FILE`: FILE names the action script (a CRIU option) and, in
    its deltaxfer lines, the destination and key; CRIU reads it as it is, the hook
    migrates the process, and the restored copy verifies its memory."""
    key_file = write_key(tmp_path / "client.key")
    dump = tmp_path / "dump"
    dump.mkdir()
    with Server(tmp_path, extra=["--restore"]) as server, \
            workloads.start("memwork", mib=16, dirty_mib_per_s=2, tmpdir=tmp_path) as wl:
        conf = _criu_conf(tmp_path / "criu.conf",
                          {"to": server.addr, "key_file": key_file, "session": "criu-conf",
                           "max_rounds": "3"},
                          criu_lines=f"action-script {HOOK}\nshell-job\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DELTAXFER_", "CRIU_"))}
        env["DELTAXFER_CONFIG"] = str(tmp_path / "absent.conf")
        proc = criu.run(["dump", "-t", str(wl.pid), "-D", str(dump), "--config", str(conf)],
                        log_dir=str(dump), log_name="dump.log", check=False, env=env)
        log = (dump / "dump.log").read_text()
        assert proc.returncode == 0, log[-3000:]
        assert "deltaxfer hook: round  1" in log
        assert wait_gone(wl.pid)
        adopt_the_one_copy(wl)
        assert "session criu-conf" in server.log()
