"""`deltaxfer criu --install [--prefix DIR]` (deltaxfer.criu.install, also behind
scripts/install-criu.sh): the pieces it builds, and a real install of Debian 13's criu
into a temporary prefix (packages from the Debian mirror of this machine's apt sources;
DELTAXFER_SKIP_NETWORK=1 skips that one)."""
import json
import os
import subprocess
from pathlib import Path

import pytest

from deltaxfer.cli import main
from deltaxfer.criu import install as inst

ROOT = Path(__file__).resolve().parents[1]


def test_find_mirror_deb822_first_then_one_line(tmp_path):
    (tmp_path / "a.sources").write_text(
        "Types: deb\nURIs: http://security.example/debian-security\nSuites: x\n\n"
        "Types: deb\nURIs: http://mirror.example/debian/\nSuites: bookworm\n")
    (tmp_path / "b.list").write_text("deb [arch=amd64] http://other.example/debian trixie main\n")
    globs = (str(tmp_path / "*.sources"), str(tmp_path / "*.list"))
    assert inst.find_mirror(globs) == "http://mirror.example/debian"
    assert inst.find_mirror(globs[1:]) == "http://other.example/debian"
    (tmp_path / "c.list").write_text("# deb http://x/debian y main\ndeb-src http://y/debian z\n")
    assert inst.find_mirror((str(tmp_path / "c.list"),)) is None


def test_private_apt_state_and_package_choice(tmp_path):
    opts = inst.apt_options(str(tmp_path), "amd64")
    pairs = dict(o.split("=", 1) for o in opts[1::2])
    assert opts[::2] == ["-o"] * len(pairs)
    # every state, cache and source path apt uses is under the private directory
    for k in ("Dir::Etc::SourceList", "Dir::State::Lists", "Dir::State::Status", "Dir::Cache",
              "Dir::Etc::Preferences", "Dir::Etc::PreferencesParts"):
        assert pairs[k].startswith(str(tmp_path)), k
    assert pairs["Dir::Etc::SourceParts"] == "-" and pairs["APT::Architecture"] == "amd64"
    assert inst.sources_list("http://m/debian", "trixie") == \
        f"deb [signed-by={inst.KEYRING}] http://m/debian trixie main\n"
    depends = ("criu\n  Depends: libc6\n  Depends: python3\nlibc6\n  Depends: libgcc-s1\n"
               "libgcc-s1\npython3\n  Depends: python3.13\nlibc6:i386\n<virtual>\n")
    assert inst.packages_from_depends(depends) == ["criu", "libc6", "libgcc-s1"]


def test_wrapper_runs_criu_through_the_unpacked_loader(tmp_path):
    """The wrapper execs PREFIX/root/LOADER with the prefix's library path, from any cwd
    and through a symlink."""
    root = tmp_path / "p" / "root"
    (root / "lib64").mkdir(parents=True)
    (root / "usr/sbin").mkdir(parents=True)
    loader = root / "lib64" / "ld-fake.so"
    loader.write_text('#!/bin/sh\necho "$@"\n')
    loader.chmod(0o755)
    (tmp_path / "p" / "bin").mkdir()
    w = tmp_path / "p" / "bin" / "criu"
    w.write_text(inst.wrapper("trixie", "lib64/ld-fake.so", "x86_64-linux-gnu"))
    w.chmod(0o755)
    (tmp_path / "link").symlink_to(w)
    out = subprocess.run([str(tmp_path / "link"), "check", "--all"], capture_output=True,
                         text=True, cwd="/", check=True).stdout.split()
    r = os.path.realpath(tmp_path / "p" / "bin" / ".." / "root")
    assert out[0] == "--library-path"
    assert [os.path.realpath(p) for p in out[1].split(":")] == \
        [f"{r}/usr/lib/x86_64-linux-gnu", f"{r}/lib/x86_64-linux-gnu"]
    assert os.path.realpath(out[2]) == f"{r}/usr/sbin/criu" and out[3:] == ["check", "--all"]
    # called by its own path (relative too), and found on PATH: the same criu
    for argv, kw in (([str(w), "x"], {"cwd": "/"}), (["bin/criu", "x"], {"cwd": tmp_path / "p"}),
                     (["criu", "x"], {"cwd": "/", "env": {"PATH": str(tmp_path / "p" / "bin")}})):
        out = subprocess.run(argv, capture_output=True, text=True, check=True, **kw).stdout.split()
        assert os.path.realpath(os.path.join(kw["cwd"], out[2])) == f"{r}/usr/sbin/criu", (argv, out)


def test_default_prefix_is_where_find_criu_looks():
    from deltaxfer.criu.runner import candidates
    assert any(p == str(inst.default_prefix() / "bin" / "criu") for _, p in candidates())


@pytest.mark.criu
def test_real_install_into_a_temporary_prefix(criu, tmp_path, monkeypatch, capsys):
    if os.environ.get("DELTAXFER_SKIP_NETWORK") == "1":
        pytest.skip("DELTAXFER_SKIP_NETWORK=1 (the install downloads from the Debian mirror)")
    monkeypatch.setenv("DELTAXFER_CRIU_FORCE_LOCAL", "1")   # even though a criu works here
    prefix = tmp_path / "criu"
    assert main(["criu", "--install", "--prefix", str(prefix), "--check", "--json"]) == 0
    out = capsys.readouterr()
    info = json.loads(out.out)
    assert info["path"] == str(prefix / "bin" / "criu") and info["check"] == "passed"
    assert info["version"].startswith("4.")
    assert "downloading: criu " in out.err and not Path(f"{prefix}.new").exists()
    # again, and through scripts/install-criu.sh: nothing downloaded, nothing replaced
    stamp = (prefix / "root").stat().st_ino
    proc = subprocess.run(["bash", str(ROOT / "scripts/install-criu.sh"), str(prefix)],
                          capture_output=True, text=True, env=dict(os.environ,
                                                                   PYTHON="python3"))
    assert proc.returncode == 0, proc.stderr
    assert "already installed and passes 'criu check'" in proc.stderr
    assert (prefix / "root").stat().st_ino == stamp


def test_install_needs_root(monkeypatch, capsys):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert main(["criu", "--install", "--prefix", "/nonexistent/x"]) != 0
    assert "must run as root" in capsys.readouterr().err
