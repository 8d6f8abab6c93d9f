#!/usr/bin/env bash
# One-shot GPU check for a machine with an NVIDIA GPU: train a tiny model, export it, run parity on the
# `gpu` target (fp32, fp16, 4-bit) and a short generation benchmark, in a single call.
#
#   bash scripts/gpu_check.sh            # work folder: ${OUT:-/tmp/edgekit-gpu-check}
#
# Needs: this repository installed (pip install -e .), onnxruntime-gpu instead of onnxruntime
# (pip uninstall -y onnxruntime && pip install edgekit[gpu]; CUDA 12 / cuDNN 9 from NVIDIA's wheels or
# the system), and torch (any build; training runs on the CPU here, the GPU only runs ONNX Runtime).
# Exit code: 0 parity passed; 1 parity failed; 2 the GPU or the CUDA provider is missing (nothing ran).
set -uo pipefail

cd "$(dirname "$0")/.."
WORK="${OUT:-/tmp/edgekit-gpu-check}"
mkdir -p "$WORK"
LOG="$WORK/gpu_check.log"
PY="${PYTHON:-python}"
exec > >(tee "$LOG") 2>&1

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not found"
"$PY" - <<'PY' || exit 2
import sys
try:
    import onnxruntime as ort
except ImportError:
    sys.exit("onnxruntime is not installed: pip install edgekit[gpu]")
print("onnxruntime", ort.__version__, "providers:", ", ".join(ort.get_available_providers()))
from toolkit import probe, targets
usable, reason = probe.availability(targets.get("gpu"))
print("gpu target:", "usable" if usable else "NOT usable", "-", reason)
sys.exit(0 if usable else 2)
PY

echo "== targets"
"$PY" -m toolkit targets

echo "== train (tiny recipe, 150 steps, CPU)"
"$PY" -m toolkit train tiny --steps 150 --out "$WORK/run" --overwrite --no-progress || exit 1

echo "== export (fp32 + fp16)"
"$PY" -m toolkit export "$WORK/run" --out "$WORK/bundle" --overwrite || exit 1

echo "== fit on the gpu target"
"$PY" -m toolkit fit "$WORK/bundle" --target gpu

echo "== quantize: 4-bit (MatMulNBits) for the gpu target"
"$PY" -m toolkit quantize "$WORK/bundle" --precision int4 --target gpu || exit 1

echo "== parity: gpu x fp32, fp16, int4"
"$PY" -m toolkit parity "$WORK/bundle" --targets gpu --precisions fp32,fp16,int4 --report "$WORK/parity" --no-record
PARITY=$?

echo "== bench: prefill + 64 greedy tokens, cpu and gpu variants vs PyTorch eager (CPU)"
"$PY" -m toolkit bench "$WORK/bundle" --targets cpu,gpu --repeats 3 --report "$WORK/bench"

echo "== done: parity exit code $PARITY; report in $WORK/parity, log in $LOG"
exit $PARITY
