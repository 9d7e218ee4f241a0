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
# Slurm 22.05 and munge: the slurm gate's tests start a private cluster on loopback (tests/support/slurm.py).
for pkg in slurmctld slurmd slurm-client slurmrestd munge; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
# The JupyterHub tests (tests/e2e/test_jupyterhub.py): Debian's chromium, driven by Playwright (whose
# driver matches it; never `playwright install`), and Node.js for configurable-http-proxy (npm, below).
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v node >/dev/null 2>&1 || need+=(nodejs)
command -v npm >/dev/null 2>&1 || need+=(npm)
# Debian's Python with venv (the single-user servers' venvs, below).
/usr/bin/python3 -c "import ensurepip" >/dev/null 2>&1 || need+=(python3-venv)
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

# The original Sky Port cloud gate (tests/compat/test_swmcloudgate.py, in its mocked mode) pins
# fastapi 0.63 and pydantic 1, so it gets its own venv. Its Azure router needs the Azure SDKs of its time:
# newer azure-mgmt-resource lacks SubscriptionClient and newer azure-mgmt-compute models refuse its kwargs.
gate_pkgs="swmcloudgate==0.1.8 azure-mgmt-compute==32.0.0 azure-mgmt-resource==23.0.1"
gate_stamp=.venv-swmcloudgate/.installed-$(echo "$gate_pkgs" | sha256sum | cut -c1-16)
if [ ! -f "$gate_stamp" ]; then
  [ -x .venv-swmcloudgate/bin/python ] || "$PYTHON" -m venv .venv-swmcloudgate
  # shellcheck disable=SC2086  # the list is split into packages on purpose
  .venv-swmcloudgate/bin/pip install -q $gate_pkgs
  rm -f .venv-swmcloudgate/.installed-*
  touch "$gate_stamp"
fi

# JupyterHub's proxy, configurable-http-proxy, from npm into node_modules/ (package.json, gitignored).
npm_stamp=node_modules/.installed-$(cat package.json package-lock.json 2>/dev/null | sha256sum | cut -c1-16)
if [ ! -f "$npm_stamp" ] || [ ! -x node_modules/.bin/configurable-http-proxy ]; then
  if [ -f package-lock.json ]; then npm ci --no-audit --no-fund --loglevel=error; else npm install --no-audit --no-fund --loglevel=error; fi
  rm -f node_modules/.installed-*
  touch "$npm_stamp"
fi

# Jupyter single-user servers run as Sky Port jobs, i.e. as the job accounts (`nobody` in the tests), who
# cannot run .venv's interpreter when it lives under root's home: their venvs use Debian's Python.
# .venv-singleuser: the servers SkyPortSpawner starts (the hub's JupyterHub version, and JupyterLab).
# .venv-swmjupyter: the original spawner swmjupyter 0.1.7 pins jupyterhub 5.2.1, so it gets its own hub
# and servers (tests/compat/test_swmjupyter.py).
SYSPY=/usr/bin/python3
for spec in ".venv-singleuser|jupyterhub==6.1.* jupyterlab==4.*" ".venv-swmjupyter|swmjupyter==0.1.7 jupyterhub==5.2.1"; do
  venv=${spec%%|*}
  pkgs=${spec#*|}
  stamp=$venv/.installed-$(echo "$pkgs" | sha256sum | cut -c1-16)
  if [ ! -f "$stamp" ]; then
    [ -x "$venv/bin/python" ] || "$SYSPY" -m venv "$venv"
    # shellcheck disable=SC2086  # the list is split into packages on purpose
    "$venv/bin/pip" install -q $pkgs
    rm -f "$venv"/.installed-*
    touch "$stamp"
  fi
done
