#!/usr/bin/env bash
# The GPU check, in one run (about 5 minutes on an H100): build the CUDA kernels, run the GPU tests,
# benchmark transformers vs ours at the released shape, print a short table. Logs and bench.json go
# to $OUT (default ./out).
#
#   bash scripts/device_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"

echo "== build" | tee "$OUT/build.log"
( time python -c "import cuda_kernels; cuda_kernels.build(verbose=True); print('kernels built')" ) >> "$OUT/build.log" 2>&1
tail -3 "$OUT/build.log"

echo "== GPU tests"
timeout 150 python -m pytest -q -rs test_kernels.py test_parity.py > "$OUT/tests.log" 2>&1
tail -5 "$OUT/tests.log"

echo "== benchmark (released shape, random bf16 weights, 1024-token prompt, 16 steps, 2 canvases)"
timeout 240 python bench.py --json "$OUT/bench.json" > "$OUT/bench.log" 2>&1
cat "$OUT/bench.log" | grep -v Warning | tail -14

echo "== quantized experts (same run as bf16: speed, logit error, argmax agreement; then memory alone)"
timeout 150 python bench.py --quant int8 --json "$OUT/bench_int8.json" > "$OUT/bench_int8.log" 2>&1
timeout 150 python bench.py --quant int4 --json "$OUT/bench_int4.json" > "$OUT/bench_int4.log" 2>&1
grep -v Warning "$OUT/bench_int8.log" | tail -7
grep -v Warning "$OUT/bench_int4.log" | tail -3
for q in int4 int8; do
  timeout 120 python bench.py --quant $q --memory --json "$OUT/memory_$q.json" 2>&1 | grep -v Warning | tail -1
done
