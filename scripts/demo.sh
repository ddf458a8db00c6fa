#!/usr/bin/env bash
# Installs everything (scripts/setup.sh) and runs the end-to-end demo inside a
# test host (private mount namespace): the machine's own /etc is untouched.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m step_ssh.demo "$@"
