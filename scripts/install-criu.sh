#!/usr/bin/env bash
# Install a CRIU that works on this kernel into a project-local prefix.
#
# Debian 12's criu (3.17) fails `criu check` on recent kernels (vDSO); Debian 13's
# criu (4.1.x) works but is linked against Debian 13's libc. We download criu and its
# library packages from Debian 13 with a *private* apt configuration (own sources list,
# lists and cache directories), unpack them under PREFIX, and start criu through the
# prefix's own dynamic loader. The system's apt state and libc stay untouched.
#
# Idempotent: does nothing if a system criu already passes `criu check`, or if
# PREFIX/bin/criu exists and passes `criu check`.
#
# Usage: scripts/install-criu.sh [PREFIX]   (default: .local/criu next to this script's repo)
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
prefix=${1:-${DELTAXFER_CRIU_PREFIX:-$here/.local/criu}}
suite=${DELTAXFER_CRIU_SUITE:-trixie}

log() { printf 'install-criu: %s\n' "$*" >&2; }

criu_ok() {  # $1: criu command; passes `criu check` quietly
    "$1" check >/dev/null 2>&1
}

if [ "$(id -u)" != 0 ]; then
    log "must run as root (criu itself needs root)"; exit 1
fi

if [ -z "${DELTAXFER_CRIU_FORCE_LOCAL:-}" ] && command -v criu >/dev/null 2>&1 && criu_ok criu; then
    log "system criu passes 'criu check' ($(criu --version | head -1)); nothing to install"
    exit 0
fi
if [ -x "$prefix/bin/criu" ] && criu_ok "$prefix/bin/criu"; then
    log "$prefix/bin/criu already installed and passes 'criu check'"
    exit 0
fi

command -v apt-get >/dev/null || { log "apt-get not found: this installer supports Debian only"; exit 1; }

# The mirror comes from the machine's own apt sources (deb822 or one-line format).
mirror=""
for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    mirror=$(awk '/^URIs:/ {for (i=2;i<=NF;i++) if ($i ~ /\/debian\/?$/) {print $i; exit}}' "$f")
    [ -n "$mirror" ] && break
done
if [ -z "$mirror" ]; then
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        mirror=$(awk '$1=="deb" {for (i=2;i<=NF;i++) if ($i ~ /^(https?|file):.*\/debian\/?$/) {print $i; exit}}' "$f")
        [ -n "$mirror" ] && break
    done
fi
[ -n "$mirror" ] || { log "no Debian mirror found in /etc/apt/sources*; add one"; exit 1; }
mirror=${mirror%/}

keyring=/usr/share/keyrings/debian-archive-keyring.gpg
[ -f "$keyring" ] || { log "missing $keyring: apt-get install debian-archive-keyring"; exit 1; }

work=$(mktemp -d /tmp/deltaxfer-criu.XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/debs" "$work/etc/preferences.d"
cat >"$work/sources.list" <<SRC
deb [signed-by=$keyring] $mirror $suite main
SRC
: >"$work/status"
apt_opts=(
    -o "Dir::Etc::SourceList=$work/sources.list"
    -o "Dir::Etc::SourceParts=-"
    -o "Dir::Etc::Preferences=$work/etc/preferences"
    -o "Dir::Etc::PreferencesParts=$work/etc/preferences.d"
    -o "Dir::State::Lists=$work/lists"
    -o "Dir::State::Status=$work/status"
    -o "Dir::Cache=$work/cache"
    -o "APT::Architecture=$(dpkg --print-architecture)"
    -o "Debug::NoLocking=1"
    -o "Acquire::Languages=none"
    -o "APT::Sandbox::User=root"
)
log "fetching the $suite package lists from $mirror (private apt state in $work)"
apt-get "${apt_opts[@]}" -qq update

# criu plus every library package it needs, transitively (with an empty dpkg status, apt
# treats nothing as installed, so libc6 and friends come from $suite too).
pkgs=$(apt-cache "${apt_opts[@]}" depends --recurse --no-recommends --no-suggests \
        --no-conflicts --no-breaks --no-replaces --no-enhances criu \
    | awk '/^[a-z0-9]/ {print $1}' | grep -E '^(criu$|lib)' | grep -v -E ':i386$' | sort -u)
log "downloading: $(echo $pkgs | tr '\n' ' ')"
(cd "$work/debs" && apt-get "${apt_opts[@]}" -qq download $pkgs)

rm -rf "$prefix.new"
mkdir -p "$prefix.new/root"
for deb in "$work"/debs/*.deb; do
    dpkg-deb -x "$deb" "$prefix.new/root"
done

# The loader of the unpacked libc, and the library directories it should search.
ld=$(ls "$prefix.new"/root/usr/lib*/*/ld-linux-*.so.* "$prefix.new"/root/lib*/ld-linux-*.so.* 2>/dev/null | head -1 || true)
[ -n "$ld" ] || { log "no dynamic loader found in the unpacked packages"; exit 1; }
arch_triplet=$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || echo x86_64-linux-gnu)
mkdir -p "$prefix.new/bin"
cat >"$prefix.new/bin/criu" <<WRAP
#!/bin/sh
# criu from Debian $suite, started with its own libc (installed by deltaxfer's scripts/install-criu.sh)
root="\$(dirname "\$(readlink -f "\$0")")/../root"
exec "\$root/${ld#$prefix.new/root/}" --library-path "\$root/usr/lib/$arch_triplet:\$root/lib/$arch_triplet" "\$root/usr/sbin/criu" "\$@"
WRAP
chmod 0755 "$prefix.new/bin/criu"
rm -rf "$prefix"
mv "$prefix.new" "$prefix"

if ! "$prefix/bin/criu" check; then
    log "the installed criu does not pass 'criu check' on this kernel; see the output above"
    exit 1
fi
log "installed $("$prefix/bin/criu" --version | head -1) into $prefix"
