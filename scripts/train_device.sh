#!/usr/bin/env bash
# Train the 9x9 Sudoku model on one GPU, in one prepared run of at most 6 minutes (an H100 80GB or an
# H200: python3 with torch installed there, nothing else needed; the data is made there, on its CPUs).
# It needs a loan of its own: with the machine's start it takes 7-9 of a loan's 15 device minutes, and
# scripts/device_check.sh takes 6-10 (give the command timeout_s 540).
# Every 60 s the checkpoint (bf16, one 14 MB file) and the last evaluation land in $OUT, so a time
# limit still returns weights. At the end: scripts/eval.py --sudoku on held-out puzzles. Files under $OUT (6):
#   weights-sudoku9/{config.json, generation_config.json, model.safetensors, tokenizer.json},
#   eval.json (the last evaluation), train_log.txt
# MINUTES, BATCH, PUZZLES, DEVICE and PRESET change the run (a test runs it small on the CPU).
#
#   bash scripts/train_device.sh                  # then: cp -r $OUT/weights-sudoku9 weights
set -uo pipefail
cd "$(dirname "$0")/.."
PY=$(command -v python3 || command -v python)
OUT=${OUT:-out}
RUN=$(mktemp -d)
MINUTES=${MINUTES:-4.5}
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
mkdir -p "$OUT"
timeout -k 10 360 "$PY" train.py --task sudoku --grid 9 --out "$RUN" --pool 2000 --batch "${BATCH:-512}" \
  --steps 6000 --minutes "$MINUTES" --lr 2e-3 --warmup 300 --ar-weight 0 --eval-every 250 --quiet \
  ${PRESET:+--preset "$PRESET"} ${DEVICE:+--device "$DEVICE"} \
  --snapshot "$OUT/weights-sudoku9" --snapshot-seconds 60
cp "$RUN/log.txt" "$OUT/train_log.txt"
tail -3 "$OUT/train_log.txt"
timeout -k 10 150 "$PY" scripts/eval.py --model "$OUT/weights-sudoku9" --sudoku --puzzles "${PUZZLES:-100}" \
  --device "${DEVICE:-cuda}" --json "$OUT/eval.json"
ls -la "$OUT" "$OUT/weights-sudoku9"
