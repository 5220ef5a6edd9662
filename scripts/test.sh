#!/usr/bin/env bash
# Command 2 of the README: install everything the tests need (Debian packages
# and Python dependencies), then lint, type-check and run the whole suite.
# Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DEBS="qemu-utils qemu-block-extra libnbd-bin nbdkit fio python3-venv libiscsi-bin tgt systemd"
missing=""
for pkg in $DEBS; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing="$missing $pkg"
done
if [ -n "$missing" ]; then
    echo "installing Debian packages:$missing"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
fi
bash "$ROOT/scripts/bootstrap.sh" dev
echo "== ruff"; .venv/bin/ruff check src tests bench && .venv/bin/ruff format --check src tests bench
echo "== mypy"; .venv/bin/mypy
echo "== pytest"; .venv/bin/pytest "$@"
