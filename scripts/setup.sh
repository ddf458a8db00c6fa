#!/usr/bin/env bash
# Installs everything step-ssh needs on Debian 12 (run as root), then builds
# and installs the package into ./.venv. Idempotent: packages already present
# are not fetched again.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  gcc make python3 python3-dev python3-venv python3-apt libpam0g-dev zlib1g-dev
  openssh-server openssh-client sudo pamtester util-linux iproute2 procps
  clang libclang-rt-14-dev valgrind
)

if [ "$(id -u)" -ne 0 ]; then
  echo "setup.sh: run as root (it installs system packages and the tests use mount namespaces)" >&2
  exit 1
fi

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "==> installing system packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # policy-rc.d keeps the distribution's sshd from starting on the real host:
  # step-ssh runs its own sshd inside test hosts only.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv"
  python3 -m venv .venv
fi
echo "==> building and installing step-ssh (C modules, gRPC code) into .venv"
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[test]'
echo "==> ready: $(.venv/bin/step-ssh --version)"
