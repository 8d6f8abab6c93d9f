#!/usr/bin/env bash
# Distillation figure (README): teacher vs a small student from scratch vs a small student distilled from
# the teacher, same data (WikiText-2 valid.txt), same student steps and batch; perplexity on test.txt.
# Usage: scripts/distill_experiment.sh [OUT_DIR]   (about 33 minutes on 2 quiet CPU cores)
set -euo pipefail
OUT=${1:-runs/distill-exp}
DATA=${DATA:-../shared/data/wikitext-2}
COMMON="--corpus $DATA/valid.txt --no-progress --set training.seq_len=128"
TEACHER_STEPS=${TEACHER_STEPS:-400}
STUDENT_STEPS=${STUDENT_STEPS:-200}
mkdir -p "$OUT"
edgekit train teacher $COMMON --steps "$TEACHER_STEPS" --out "$OUT/teacher" --overwrite
edgekit train small $COMMON --steps "$STUDENT_STEPS" --out "$OUT/scratch" --overwrite
edgekit distill small --teacher "$OUT/teacher" $COMMON --steps "$STUDENT_STEPS" --out "$OUT/distilled" --overwrite
# the teacher's top-64 logits cached on disk: the first run fills the cache (teacher forward every step),
# a later run with the same teacher, K, data and seed reads it (run the script again to see the step time)
edgekit distill small --teacher "$OUT/teacher" --top-k-cache 64 --cache-dir "$OUT/topk64-cache" $COMMON \
  --steps "$STUDENT_STEPS" --out "$OUT/topk64" --overwrite
for run in teacher scratch distilled topk64; do
  edgekit eval "$OUT/$run" "$DATA/test.txt" --seq-len 128 | tee "$OUT/$run.eval.json"
done
