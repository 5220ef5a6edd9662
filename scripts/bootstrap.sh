#!/usr/bin/env bash
# Shared by start.sh and test.sh: make .venv with lunseal installed.
# Usage: bash scripts/bootstrap.sh [extras]   (extras e.g. "dev")
# Run it, never `source` it: a sourced script without arguments sees its
# caller's arguments as its own, and would take them for pip extras.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
if ! "$PY" -c 'import venv, ensurepip' 2>/dev/null; then
    # Debian splits venv/ensurepip out of python3.
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
fi
if [ ! -x "$ROOT/.venv/bin/python" ]; then
    "$PY" -m venv "$ROOT/.venv"
fi
SPEC="$ROOT"
if [ -n "${1:-}" ]; then SPEC="$ROOT[$1]"; fi
"$ROOT/.venv/bin/pip" install --quiet --disable-pip-version-check -c "$ROOT/constraints.txt" -e "$SPEC"
