#!/usr/bin/env bash
# The GPU check in one call on a device machine: see benchmarks/gpu_check.py for what it runs.
#
#   bash benchmarks/gpu_wheels.sh        # here, once: the wheels the device image lacks, into .whl/
#   device run: command "bash benchmarks/gpu_check.sh", carry [".whl"], timeout_s 540
#   bash benchmarks/gpu_check.sh --dry-run   # anywhere: the same steps on the CPU at tiny sizes
#
# The device image holds torch, transformers, safetensors, click, rich, tqdm and pytest, and
# reaches no package registry: xc runs from this checkout (PYTHONPATH), and zarr and what it
# needs come as wheels from .whl/. Figures go to $OUT (the device tool's folder), else out/gpu_check.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out/gpu_check}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT"
if ! "$PYTHON" -c "import zarr" 2> /dev/null && compgen -G ".whl/*.whl" > /dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/xc-site \
    .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/xc-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
"$PYTHON" benchmarks/gpu_check.py --out "$OUT" "$@" 2>&1 | tee "$OUT/log.txt"
exit "${PIPESTATUS[0]}"
