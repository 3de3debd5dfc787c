"""Install a CRIU that works on this kernel into a private prefix: `deltaxfer criu
--install [--prefix DIR]`, `make criu` (scripts/install-criu.sh runs this module) and
``python -m deltaxfer.criu.install [PREFIX]`` all come here — one installer.

Debian 12's criu (3.17) fails `criu check` on recent kernels (vDSO); Debian 13's criu
(4.1.x) works but is linked against Debian 13's libc. So: download criu and its library
packages from Debian 13 with a *private* apt configuration (own sources list, lists and
cache directories, an empty dpkg status), unpack them under PREFIX/root, and start criu
through the unpacked libc's own dynamic loader (PREFIX/bin/criu, a shell wrapper). The
system's apt state and libc stay untouched. The mirror is the one the machine's apt
sources already name.

Idempotent: nothing is done when a system criu passes `criu check` (unless
DELTAXFER_CRIU_FORCE_LOCAL is set) or PREFIX/bin/criu exists and passes it.

The default prefix is the first place `find_criu` looks for such a prefix
(deltaxfer.criu.runner): $DELTAXFER_CRIU_PREFIX, else .local/criu of the source checkout,
else .local/criu beside the Python environment. Standard library only, and nothing else
of deltaxfer but deltaxfer.criu.runner (itself standard library only), so that `make
criu` can run it from src/ before the virtual environment exists.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

DEFAULT_SUITE = "trixie"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
SOURCES = ("/etc/apt/sources.list.d/*.sources", "/etc/apt/sources.list",
           "/etc/apt/sources.list.d/*.list")


from deltaxfer.criu.runner import CriuError


class InstallError(CriuError):
    """The installer could not finish (the message says why)."""


def log(msg: str) -> None:
    print(f"install-criu: {msg}", file=sys.stderr, flush=True)


def default_prefix() -> Path:
    from deltaxfer.criu.runner import _local_prefixes
    return _local_prefixes()[0]


def find_mirror(source_globs=SOURCES) -> str | None:
    """The first Debian mirror (a URI ending in /debian) in the apt sources: deb822
    ``URIs:`` lines of *.sources files first, then one-line ``deb`` entries."""
    for pattern in source_globs:
        for path in sorted(glob.glob(pattern)):
            try:
                text = Path(path).read_text()
            except OSError:
                continue
            deb822 = path.endswith(".sources")
            for line in text.splitlines():
                words = line.split()
                if deb822 and words[:1] == ["URIs:"]:
                    uris = words[1:]
                elif not deb822 and words[:1] == ["deb"]:
                    uris = [w for w in words[1:] if re.match(r"(https?|file):", w)]
                else:
                    continue
                for uri in uris:
                    if re.search(r"/debian/?$", uri):
                        return uri.rstrip("/")
    return None


def apt_options(work: str, arch: str) -> list[str]:
    """apt-get/apt-cache options for a private apt state under ``work``."""
    opts = {
        "Dir::Etc::SourceList": f"{work}/sources.list",
        "Dir::Etc::SourceParts": "-",
        "Dir::Etc::Preferences": f"{work}/etc/preferences",
        "Dir::Etc::PreferencesParts": f"{work}/etc/preferences.d",
        "Dir::State::Lists": f"{work}/lists",
        "Dir::State::Status": f"{work}/status",
        "Dir::Cache": f"{work}/cache",
        "APT::Architecture": arch,
        "Debug::NoLocking": "1",
        "Acquire::Languages": "none",
        "APT::Sandbox::User": "root",
    }
    return [x for k, v in opts.items() for x in ("-o", f"{k}={v}")]


def sources_list(mirror: str, suite: str, keyring: str = KEYRING) -> str:
    return f"deb [signed-by={keyring}] {mirror} {suite} main\n"


def packages_from_depends(text: str) -> list[str]:
    """criu and the library packages in `apt-cache depends --recurse criu` output (with
    an empty dpkg status apt treats nothing as installed, so libc6 and friends come from
    the suite too); no foreign-architecture ones."""
    names = {line.split()[0] for line in text.splitlines() if re.match(r"[a-z0-9]", line)}
    return sorted(n for n in names if (n == "criu" or n.startswith("lib"))
                  and not n.endswith(":i386"))


def wrapper(suite: str, loader: str, triplet: str) -> str:
    """PREFIX/bin/criu: the unpacked criu through the unpacked loader (``loader``
    relative to PREFIX/root). Its own directory is found without a subprocess unless it
    is called through a symlink: a criu restore runs inside the freeze, and two forks
    (readlink, dirname) cost ~5 ms of it here."""
    return (f"#!/bin/sh\n"
            f"# criu from Debian {suite}, started with its own libc (installed by "
            f"deltaxfer.criu.install)\n"
            f'self="$0"\n'
            f'[ -L "$self" ] && self="$(readlink -f "$self")"\n'
            f'case "$self" in */*) ;; *) self="$(command -v -- "$self")" ;; esac\n'
            f'root="${{self%/*}}/../root"\n'
            f'exec "$root/{loader}" --library-path "$root/usr/lib/{triplet}:$root/lib/{triplet}" '
            f'"$root/usr/sbin/criu" "$@"\n')


def criu_ok(criu: str) -> bool:
    try:
        return subprocess.run([criu, "check"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, timeout=120).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, text=True, capture_output=True, **kw)
    if proc.returncode != 0:
        words = [a for a in argv if a != "-o" and "::" not in a]
        raise InstallError(f"`{' '.join(words[:8])}` failed ({proc.returncode}): "
                           f"{proc.stderr.strip()[-2000:]}")
    return proc


def _arch() -> str:
    return _run(["dpkg", "--print-architecture"]).stdout.strip()


def _triplet() -> str:
    try:
        return _run(["dpkg-architecture", "-qDEB_HOST_MULTIARCH"]).stdout.strip()
    except (InstallError, OSError):
        return "x86_64-linux-gnu"


def install(prefix: str | os.PathLike | None = None, suite: str | None = None,
            force_local: bool | None = None) -> str:
    """Install (or find installed) a criu that passes `criu check`; returns its path."""
    prefix = Path(prefix) if prefix else default_prefix()
    prefix = prefix.absolute()
    suite = suite or os.environ.get("DELTAXFER_CRIU_SUITE") or DEFAULT_SUITE
    if force_local is None:
        force_local = bool(os.environ.get("DELTAXFER_CRIU_FORCE_LOCAL"))
    if os.geteuid() != 0:
        raise InstallError("must run as root (criu itself needs root)")
    system = shutil.which("criu")
    if not force_local and system and criu_ok(system):
        log(f"system criu {system} passes 'criu check'; nothing to install")
        return system
    local = str(prefix / "bin" / "criu")
    if os.access(local, os.X_OK) and criu_ok(local):
        log(f"{local} already installed and passes 'criu check'")
        return local
    if not shutil.which("apt-get"):
        raise InstallError("apt-get not found: this installer supports Debian only")
    mirror = find_mirror()
    if not mirror:
        raise InstallError("no Debian mirror found in /etc/apt/sources*; add one")
    if not os.path.isfile(KEYRING):
        raise InstallError(f"missing {KEYRING}: apt-get install debian-archive-keyring")
    with tempfile.TemporaryDirectory(prefix="deltaxfer-criu.") as work:
        for d in ("lists/partial", "cache/archives/partial", "debs", "etc/preferences.d"):
            os.makedirs(os.path.join(work, d))
        Path(work, "sources.list").write_text(sources_list(mirror, suite))
        Path(work, "status").write_text("")
        opts = apt_options(work, _arch())
        log(f"fetching the {suite} package lists from {mirror} (private apt state in {work})")
        _run(["apt-get", *opts, "-qq", "update"])
        deps = _run(["apt-cache", *opts, "depends", "--recurse", "--no-recommends",
                     "--no-suggests", "--no-conflicts", "--no-breaks", "--no-replaces",
                     "--no-enhances", "criu"]).stdout
        pkgs = packages_from_depends(deps)
        log(f"downloading: {' '.join(pkgs)}")
        _run(["apt-get", *opts, "-qq", "download", *pkgs], cwd=os.path.join(work, "debs"))
        new = Path(f"{prefix}.new")
        shutil.rmtree(new, ignore_errors=True)
        (new / "root").mkdir(parents=True)
        for deb in sorted(glob.glob(os.path.join(work, "debs", "*.deb"))):
            _run(["dpkg-deb", "-x", deb, str(new / "root")])
    loaders = sorted(glob.glob(str(new / "root/usr/lib*/*/ld-linux-*.so.*"))
                     + glob.glob(str(new / "root/lib*/ld-linux-*.so.*")))
    if not loaders:
        raise InstallError("no dynamic loader found in the unpacked packages")
    loader = os.path.relpath(loaders[0], new / "root")
    (new / "bin").mkdir()
    (new / "bin" / "criu").write_text(wrapper(suite, loader, _triplet()))
    os.chmod(new / "bin" / "criu", 0o755)
    shutil.rmtree(prefix, ignore_errors=True)
    os.rename(new, prefix)
    proc = subprocess.run([local, "check"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise InstallError("the installed criu does not pass 'criu check' on this kernel: "
                           + (proc.stdout + proc.stderr).strip()[-2000:])
    version = subprocess.run([local, "--version"], capture_output=True, text=True).stdout
    log(f"installed {version.splitlines()[0] if version else 'criu'} into {prefix}")
    return local


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) > 1 or args[:1] in (["-h"], ["--help"]):
        print("usage: python -m deltaxfer.criu.install [PREFIX]", file=sys.stderr)
        return 2
    try:
        install(args[0] if args else None)
    except InstallError as e:
        log(str(e))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
