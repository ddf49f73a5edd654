#!/usr/bin/env bash
# Installs wattmeter into a project virtual environment, ./.venv, made with the system's python3.
# Why a venv: Debian 12 / Ubuntu mark the system Python "externally managed" (PEP 668), so a bare
# `pip install` is refused there; a venv works the same as root or not, inside a venv or not.
# It changes nothing outside this folder, except (as root, only when python3's venv module is
# missing) `apt-get install python3-venv`.
#   bash tools/install.sh          # wattmeter itself (pip install .)
#   bash tools/install.sh --test   # editable, with every test dependency (pip install -e '.[test]')
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${WATTMETER_PYTHON:-python3}"
if ! command -v "$PY" >/dev/null 2>&1; then
  echo "wattmeter install: no $PY on PATH; install Python >= 3.10 (Debian: apt-get install python3 python3-venv)" >&2
  exit 1
fi
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
  echo "wattmeter install: $($PY --version 2>&1) is too old; wattmeter needs Python >= 3.10" >&2
  exit 1
fi
if ! "$PY" -c 'import venv, ensurepip' >/dev/null 2>&1; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
  else
    echo "wattmeter install: $PY cannot make a venv; as root run: apt-get install python3-venv" >&2
    exit 1
  fi
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if [ "${1:-}" = "--test" ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
else
  .venv/bin/python -m pip install -q --disable-pip-version-check .
fi
echo "wattmeter install: ready in $(pwd)/.venv (run .venv/bin/wattmeter; remove with rm -rf .venv)" >&2
