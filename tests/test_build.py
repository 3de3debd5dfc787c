"""The package builds against the system libraries and says what to install when one is
missing."""
import os
import subprocess
import sys
from pathlib import Path

import deltaxfer
from deltaxfer import _core

ROOT = Path(__file__).resolve().parents[1]


def test_core_is_linked_against_system_libraries():
    v = _core.lib_versions()
    assert v["lz4"].startswith("1.") and v["xxhash"].startswith("0.")
    maps = Path(f"/proc/{os.getpid()}/maps").read_text()
    assert "liblz4.so" in maps and "libxxhash.so" in maps


def test_missing_library_names_the_debian_package(tmp_path):
    env = dict(os.environ, PKG_CONFIG_LIBDIR=str(tmp_path), PKG_CONFIG_PATH="")
    proc = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "liblz4 was not found by pkg-config; install it: apt-get install liblz4-dev" in proc.stderr


def test_python_dash_m_and_console_script():
    for cmd in ([sys.executable, "-m", "deltaxfer", "--version"],
                [str(Path(sys.executable).parent / "deltaxfer"), "--version"]):
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout
        assert out.strip() == f"deltaxfer {deltaxfer.__version__}"


def test_subcommand_is_required():
    proc = subprocess.run([sys.executable, "-m", "deltaxfer"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "required: COMMAND" in proc.stderr
