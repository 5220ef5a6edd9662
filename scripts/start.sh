#!/usr/bin/env bash
# Command 1 of the README: install lunseal into .venv and start the array in the
# foreground with the embedded default (data directory ./lunseal-data or
# $LUNSEAL_HOME, SQLite catalog, a 1G file-backed LUN named "demo").
# Extra arguments go to `lunseal serve` (see `lunseal serve --help`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/bootstrap.sh"
exec "$ROOT/.venv/bin/lunseal" serve "$@"
