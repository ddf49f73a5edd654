#!/usr/bin/env bash
# The device check, as one script: install, pytest -m gpu, a real `wattmeter run`, and the
# counter-vs-power validation. Writes everything under ${OUT:-/tmp/wattmeter-gpu}.
set -uo pipefail
OUT=${OUT:-/tmp/wattmeter-gpu}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv | tee "$OUT/nvidia-smi.txt"
if ! python -m pip install -q --no-deps --no-build-isolation -e . 2>"$OUT/pip-err.txt" \
   || ! python -c "import wattmeter.exporters" 2>/dev/null; then
  # No network for build deps: lay the package out by hand (agent -> wattmeter, exporters -> wattmeter.exporters).
  rm -rf /tmp/wmsite && mkdir -p /tmp/wmsite && cp -r agent /tmp/wmsite/wattmeter && cp -r exporters /tmp/wmsite/wattmeter/exporters
  export PYTHONPATH=/tmp/wmsite
fi
python -m pip list 2>/dev/null | grep -iE "hypothesis|pytest|torch|nvidia-ml|psutil|prometheus" | tee "$OUT/pip.txt"
python -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider 2>&1 | tee "$OUT/pytest-gpu.txt"
python -m wattmeter doctor 2>&1 | tee "$OUT/doctor.txt"
python -m wattmeter run --records "$OUT/records.jsonl" --job matmul -- python -m wattmeter.examples.workload 8 2>&1 | tee "$OUT/run.txt"
timeout 240 python tools/gpu_validate.py 2>&1 | tee "$OUT/validate.json"
