"""One path into migrate.Options (issue 14 item 1): the same settings through
`deltaxfer migrate`'s flags, deltaxfer-hook's environment and its configuration file give
equal Options; a bad value names the setting and where it came from."""
import dataclasses
import os

import pytest

from deltaxfer.cli import build_parser
from deltaxfer.hook import HookConfigError, hook_config
from deltaxfer.keys import ConfigError
from deltaxfer.settings import SETTINGS, SettingError, from_args, options_from, table_markdown

# every setting the hook can honour, away from its default
VALUES = {"session": "s-1", "downtime_target_ms": "150", "max_rounds": "4", "xor": "no",
          "lz4": "off", "xor_cache_mib": "8", "tracking": "off", "converge": "off",
          "encoder_threads": "3", "restore": "false", "report": "/tmp/r.json",
          "tls_server_name": "dest.example", "tls_pin": None, "tls_ca": None}
FLAGS = ["--session", "s-1", "--downtime-target", "150", "--max-rounds", "4", "--no-xor",
         "--no-lz4", "--xor-cache-mib", "8", "--tracking", "off", "--converge", "off",
         "--encoder-threads", "3", "--no-restore", "--report", "/tmp/r.json",
         "--tls-server-name", "dest.example"]


def _cli(*flags):
    args = build_parser().parse_args(["migrate", "1", "--to", "h:1", *flags])
    return options_from(*from_args(args))


def _comparable(opts):
    d = {f.name: getattr(opts, f.name) for f in dataclasses.fields(opts)}
    d.pop("progress")
    ssl = d.pop("ssl")
    return d, (ssl.server_name, ssl.pin) if ssl else None


@pytest.fixture
def ca(tmp_path):
    """A CA file for tls_ca (any PEM certificate loads as a trust anchor)."""
    ssl = pytest.importorskip("ssl")
    import subprocess
    key, cert = tmp_path / "ca.key", tmp_path / "ca.pem"
    r = subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key), "-out",
                        str(cert), "-days", "1", "-subj", "/CN=test-ca"], capture_output=True)
    if r.returncode:
        pytest.skip(f"openssl cannot make a CA: {r.stderr[-200:]!r}")
    assert ssl
    return str(cert)


def test_cli_environment_and_file_give_equal_options(tmp_path, ca):
    values = dict(VALUES, tls_ca=ca, tls_pin="sha256:" + "ab" * 32)
    cli = _cli(*FLAGS, "--tls-ca", ca, "--tls-pin", values["tls_pin"])
    env = {"DELTAXFER_CONFIG": str(tmp_path / "absent.conf")}
    env.update({f"DELTAXFER_{k.upper()}": v for k, v in values.items()})
    conf = tmp_path / "hook.conf"
    conf.write_text("# hook\nto = h:1\n" + "".join(f"{k} = {v}\n" for k, v in values.items()))
    os.chmod(conf, 0o644)
    from_env, from_file = hook_config(env), hook_config({"DELTAXFER_CONFIG": str(conf)})
    assert from_env["_sources"]["max_rounds"] == "DELTAXFER_MAX_ROUNDS"
    assert from_file["_sources"]["max_rounds"] == f"max_rounds in {conf}"
    got = [_comparable(options_from({k: v for k, v in c.items() if not k.startswith("_")
                                     and k != "to"}, c["_sources"], for_hook=True))
           for c in (from_env, from_file)]
    want = _comparable(cli)
    assert got[0] == want and got[1] == want
    opts = cli
    assert (opts.downtime_target, opts.max_rounds, opts.xor, opts.compress, opts.cache_bytes,
            opts.restore, opts.encoder_threads, opts.log_path) == \
        (0.15, 4, False, False, 8 << 20, False, 3, "/tmp/r.json.dump.log")
    assert opts.ssl is not None and opts.ssl.server_name == "dest.example"


def test_defaults_are_the_tables_and_equal_on_every_path():
    opts = _cli()
    assert _comparable(opts) == _comparable(options_from({}))
    assert (opts.downtime_target, opts.max_rounds, opts.cache_bytes, opts.xor, opts.compress,
            opts.tracking, opts.freeze, opts.converge, opts.restore, opts.criu_opts) == \
        (0.3, 10, 64 << 20, True, True, "auto", "auto", "auto", True, [])
    assert all(s.name in table_markdown() for s in SETTINGS)


@pytest.mark.parametrize("name,value,expected", [
    ("max_rounds", "ten", "an integer >= 0"),
    ("max_rounds", "-1", "an integer >= 0"),
    ("downtime_target_ms", "nan", "a number >= 0 (ms)"),
    ("xor", "maybe", "yes or no"),
    ("tracking", "sometimes", "one of auto, on, off"),
    ("encoder_threads", "0", "an integer >= 1"),
])
def test_bad_values_name_the_setting_and_its_source(tmp_path, name, value, expected):
    env = {"DELTAXFER_CONFIG": str(tmp_path / "absent.conf"), f"DELTAXFER_{name.upper()}": value}
    c = hook_config(env)
    with pytest.raises(SettingError) as e:
        options_from({name: c[name]}, c["_sources"])
    assert f"DELTAXFER_{name.upper()}" in str(e.value) and name in str(e.value)
    assert expected in str(e.value) and repr(value) in str(e.value)
    conf = tmp_path / "hook.conf"
    conf.write_text(f"{name} = {value}\n")
    os.chmod(conf, 0o644)
    c = hook_config({"DELTAXFER_CONFIG": str(conf)})
    with pytest.raises(SettingError) as e:
        options_from({name: c[name]}, c["_sources"])
    assert str(e.value).startswith(f"{name} in {conf} {value!r}: {name} takes {expected}")


def test_cli_errors_name_the_flag():
    with pytest.raises(SettingError, match="--max-rounds -2: max_rounds takes an integer"):
        _cli("--max-rounds", "-2")
    with pytest.raises(SettingError, match="--kill-source: kill_source goes with restore off"):
        _cli("--kill-source")
    with pytest.raises(ConfigError, match="--log-dir /nonexistent-dir is not a directory"):
        _cli("--log-dir", "/nonexistent-dir")
    with pytest.raises(ConfigError, match="--tls-pin.*need --tls-ca"):
        _cli("--tls-pin", "sha256:" + "ab" * 32)


def test_hook_refuses_what_its_criu_decides_and_unknown_keys(tmp_path):
    env = {"DELTAXFER_CONFIG": str(tmp_path / "absent.conf"), "DELTAXFER_FREEZE": "lazy",
           "DELTAXFER_CRIU_OPT": "--file-locks --ext-unix-sk"}
    c = hook_config(env)
    assert c["criu_opt"] == "--file-locks --ext-unix-sk"
    # migrate's own path takes them, as shell words
    assert options_from({"criu_opt": c["criu_opt"]}).criu_opts == ["--file-locks",
                                                                   "--ext-unix-sk"]
    with pytest.raises(SettingError, match="DELTAXFER_FREEZE: freeze is not for deltaxfer-hook"):
        options_from({"freeze": c["freeze"]}, c["_sources"], for_hook=True)
    with pytest.raises(SettingError, match="DELTAXFER_CRIU_OPT: criu_opt is not for"):
        options_from({"criu_opt": c["criu_opt"]}, c["_sources"], for_hook=True)
    conf = tmp_path / "hook.conf"
    conf.write_text("to = h:1\nmax_round = 3\n")
    os.chmod(conf, 0o644)
    with pytest.raises(HookConfigError, match="line 2: unknown key 'max_round'"):
        hook_config({"DELTAXFER_CONFIG": str(conf)})
    with pytest.raises(SettingError, match="unknown setting 'max_round'"):
        options_from({"max_round": 3})


def test_criu_opt_through_the_table_is_checked_with_its_source():
    with pytest.raises(SettingError, match="DELTAXFER_CRIU_OPT '--leave-running' refused"):
        options_from({"criu_opt": "--leave-running"}, {"criu_opt": "DELTAXFER_CRIU_OPT"})


def test_the_operations_guide_carries_the_table():
    """docs/OPERATIONS.md's settings table is the code's (regenerate it with
    deltaxfer.settings.table_markdown() when a setting changes)."""
    from pathlib import Path
    text = (Path(__file__).parent.parent / "docs" / "OPERATIONS.md").read_text()
    start = text.index("<!-- settings table: generated by deltaxfer.settings.table_markdown() -->\n")
    end = text.index("<!-- end of settings table -->")
    assert text[text.index("\n", start) + 1:end] == table_markdown()
