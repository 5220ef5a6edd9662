#!/usr/bin/env bash
# Command 1 of the README: install lunseal into .venv and start the array in the
# foreground with the embedded default (data directory ./lunseal-data or
# $LUNSEAL_HOME, SQLite catalog, a 1G file-backed LUN named "demo").
# Extra arguments go to `lunseal serve` (see `lunseal serve --help`), e.g.
#   bash scripts/start.sh --home /srv/array --nbd-port 0 --api-port 0
# exec: the daemon keeps this script's pid, so `kill PID` stops it cleanly.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/bootstrap.sh"
exec "$ROOT/.venv/bin/lunseal" serve "$@"
