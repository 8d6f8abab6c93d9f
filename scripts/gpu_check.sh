#!/usr/bin/env bash
# One-shot GPU check for a machine with an NVIDIA GPU: train a tiny model, export it, run parity on the
# `gpu` target (fp32, fp16) and a short generation benchmark, in a single call.
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

echo "== parity: gpu x fp32, fp16"
"$PY" -m toolkit parity "$WORK/bundle" --targets gpu --precisions fp32,fp16 --report "$WORK/parity" --no-record
PARITY=$?

echo "== bench: prefill + 64 greedy tokens, gpu vs cpu"
"$PY" - "$WORK/bundle" <<'PY' | tee "$WORK/bench.txt"
import json, sys, time
import numpy as np
from toolkit import runtime
bundle = sys.argv[1]
results = []
for target, precision in (("cpu", "fp32"), ("gpu", "fp32"), ("gpu", "fp16")):
    try:
        s = runtime.load(bundle, target=target, precision=precision)
    except Exception as exc:
        print(f"{target}/{precision}: not run ({type(exc).__name__}: {exc})")
        continue
    prompt = [int(i) for i in np.random.default_rng(0).integers(4, s.config.vocab_size, 32)]
    list(s.generate_ids(prompt, max_new_tokens=4))  # warm-up
    t0 = time.perf_counter(); s.forward(np.asarray([prompt])); prefill = time.perf_counter() - t0
    t0 = time.perf_counter(); n = len(list(s.generate_ids(prompt, max_new_tokens=64))); total = time.perf_counter() - t0
    row = {"target": target, "precision": precision, "device": s.device, "prefill_ms": round(prefill * 1e3, 2),
           "tokens": n, "tokens_per_s": round(n / total, 1)}
    results.append(row)
    print(json.dumps(row))
PY

echo "== done: parity exit code $PARITY; report in $WORK/parity, log in $LOG"
exit $PARITY
