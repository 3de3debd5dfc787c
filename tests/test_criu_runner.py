"""Finding criu: search order, version checks and the errors an operator reads.

The order tests use tiny scripts that print a version (they test our search, not
CRIU); the last tests run the real criu this project installs."""
import stat
from pathlib import Path

import pytest

from deltaxfer.cli import main
from deltaxfer.criu import runner


def fake_criu(path: Path, version: str) -> str:
    path.write_text(f"#!/bin/sh\necho 'Version: {version}'\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """No env override, an empty PATH and a local prefix under tmp_path."""
    monkeypatch.delenv("DELTAXFER_CRIU", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "path"))
    (tmp_path / "path").mkdir()
    (tmp_path / "prefix" / "bin").mkdir(parents=True)
    monkeypatch.setattr(runner, "_local_prefixes", lambda: [tmp_path / "prefix"])
    return tmp_path


def test_search_order(isolated, monkeypatch):
    on_path = fake_criu(isolated / "path" / "criu", "4.1")
    assert runner.find_criu().path == on_path
    local = fake_criu(isolated / "prefix" / "bin" / "criu", "4.1.1")
    assert runner.find_criu().origin.startswith("local prefix")
    env = fake_criu(isolated / "env-criu", "4.2")
    monkeypatch.setenv("DELTAXFER_CRIU", env)
    c = runner.find_criu()
    assert (c.path, c.origin, c.version_str) == (env, "DELTAXFER_CRIU", "4.2")
    explicit = fake_criu(isolated / "mine", "4.1.1")
    assert runner.find_criu(explicit).origin == "--criu"
    assert local != explicit


def test_too_old_criu_is_skipped_with_reason(isolated):
    fake_criu(isolated / "path" / "criu", "3.17")
    with pytest.raises(runner.CriuNotFound) as e:
        runner.find_criu()
    msg = str(e.value)
    assert "criu 3.17" in msg and "vDSO" in msg and "make criu" in msg


def test_explicit_bad_choice_is_an_error_not_skipped(isolated):
    fake_criu(isolated / "path" / "criu", "4.1.1")
    with pytest.raises(runner.CriuNotFound, match="from --criu .* is not an executable"):
        runner.find_criu(str(isolated / "missing"))
    old = fake_criu(isolated / "old", "3.17")
    with pytest.raises(runner.CriuNotFound, match="too old"):
        runner.find_criu(old)


def test_nothing_found_names_the_fix(isolated, capsys):
    assert main(["criu"]) == 2
    err = capsys.readouterr().err
    assert "no usable criu found" in err and "make criu" in err and "Traceback" not in err


def test_parse_version():
    assert runner.parse_version("Version: 4.1.1\n") == (4, 1, 1)
    assert runner.parse_version("Version: 4.2\nGitID: v4.2\n") == (4, 2)
    with pytest.raises(runner.CriuError, match="cannot parse"):
        runner.parse_version("criu, probably")


@pytest.mark.criu
def test_installed_criu_works(capsys):
    c = runner.find_criu()
    assert c.version >= runner.MIN_VERSION
    ok, out = c.check()
    assert ok, out
    assert main(["criu", "--check", "--json"]) == 0
    assert '"check": "passed"' in capsys.readouterr().out
