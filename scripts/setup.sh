#!/usr/bin/env bash
# Set up everything Sky Port and its tests need on a fresh Debian machine: system packages, .venv, the
# project with its test dependencies. Idempotent; quick when everything is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages the tests use: PostgreSQL (the store's second backend), sqlite3 (debugging).
need=()
[ -x /usr/lib/postgresql/15/bin/initdb ] || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: missing system packages: ${need[*]} — install them with apt-get as root" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  # Never let a package's post-install start a system-wide daemon on a shared machine.
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[test]'
  rm -f .venv/.installed-*
  touch "$stamp"
fi
