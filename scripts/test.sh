#!/usr/bin/env bash
# Installs everything (scripts/setup.sh) and runs the whole test suite.
# Extra arguments go to pytest, e.g. `scripts/test.sh -k nss -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -ra "$@"
