#!/usr/bin/env bash
# Install a CRIU that works on this kernel into a project-local prefix (`make criu`).
#
# The installer is src/deltaxfer/criu/install.py (also `deltaxfer criu --install` for a
# pip-installed deltaxfer): Debian 13's criu and its libraries, downloaded with a private
# apt configuration from the mirror of this machine's apt sources, unpacked under PREFIX
# and started through their own dynamic loader; nothing is done when a system criu or
# PREFIX/bin/criu already passes `criu check`. It needs only the standard library, so it
# runs from src/ with the system's python3 before the virtual environment exists.
#
# Usage: scripts/install-criu.sh [PREFIX]   (default: $DELTAXFER_CRIU_PREFIX, else
# .local/criu next to this script's repo). DELTAXFER_CRIU_SUITE (default trixie) and
# DELTAXFER_CRIU_FORCE_LOCAL (install even if a system criu works) are honoured.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}
PYTHONPATH="$here/src${PYTHONPATH:+:$PYTHONPATH}" exec "$python" -m deltaxfer.criu.install "$@"
