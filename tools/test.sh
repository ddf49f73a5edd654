#!/usr/bin/env bash
# The README's test command, and exactly what CI runs (.ci/run): installs every test dependency
# and runs the whole pytest suite. Extra arguments go to pytest (`bash tools/test.sh -k ledger`).
#  1. pip first, into the project venv ./.venv (tools/install.sh --test), so a failure there
#     costs no system change;
#  2. then the Debian packages prometheus and prometheus-pushgateway (real servers for the e2e
#     tests): installed as root (or with password-less sudo); otherwise one line says what is
#     missing and the tests that need them skip;
#  3. pytest with the venv's Python.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh --test
missing=""
for tool in prometheus prometheus-pushgateway; do
  command -v "$tool" >/dev/null 2>&1 || missing="$missing $tool"
done
if [ -n "$missing" ]; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; fi
  if { [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; } && command -v apt-get >/dev/null 2>&1; then
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
      prometheus prometheus-pushgateway >/dev/null
  else
    echo "wattmeter tests: the e2e tests need the Debian packages${missing} (as root: apt-get install prometheus prometheus-pushgateway); running the rest" >&2
  fi
fi
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
