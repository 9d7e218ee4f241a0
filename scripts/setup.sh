#!/usr/bin/env bash
# Set up everything Sky Port and its tests need on a fresh Debian machine: system packages, .venv, the
# project with its test dependencies. Idempotent; quick when everything is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages the tests use: PostgreSQL (the store's second backend), sqlite3 (debugging),
# OpenSSH and iproute2 (below).
need=()
[ -x /usr/lib/postgresql/15/bin/initdb ] || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
# OpenSSH's server (the ssh gate's tests run real sshd on hosts made of network namespaces with iproute2).
[ -x /usr/sbin/sshd ] && [ -x /usr/lib/openssh/sftp-server ] || need+=(openssh-server)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
# rsync: Snakemake's fs storage plugin, used by the TES workflow test (tests/compat/test_tes_clients.py).
command -v rsync >/dev/null 2>&1 || need+=(rsync)
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

# GA4GH TES clients: py-tes 1.1 is in .venv (test extra); Snakemake's TES plugin pins py-tes 0.4, which
# cannot share that venv, so Snakemake, the plugin (and py-tes 0.4, which needs six) get their own.
snake_pkgs="snakemake==9.* snakemake-executor-plugin-tes==0.1.* snakemake-storage-plugin-fs==1.* six"
snake_stamp=.venv-snakemake/.installed-$(echo "$snake_pkgs" | sha256sum | cut -c1-16)
if [ ! -f "$snake_stamp" ]; then
  [ -x .venv-snakemake/bin/python ] || "$PYTHON" -m venv .venv-snakemake
  # shellcheck disable=SC2086  # the list is split into packages on purpose
  .venv-snakemake/bin/pip install -q $snake_pkgs
  rm -f .venv-snakemake/.installed-*
  touch "$snake_stamp"
fi
