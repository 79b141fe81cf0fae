#!/usr/bin/env bash
# The GPU check, sized for one loan of one H100 80GB (sm_90, ~78 GiB usable, ~3.0 TB/s copy; python3
# with torch 2.11 and transformers 5.17, nvcc 13.0, ninja; nothing can be installed; a command may run
# 600 s; at most 8 files come back from $OUT). At most BUDGET (450) s of phase time, then packing:
# give the command timeout_s 540. An H200 (141 GB, 4.3 TB/s) runs it unchanged, with more room.
#
# Phases, most important first; each has a time limit and is skipped when too little time is left.
# Memory at each phase's peak, by arithmetic (released shape: 25.25B text parameters, 50.5 GB = 47.0 GiB
# in bf16; the routed experts 22.8B of them: 21.2 GiB in int8, 11.9 GiB in int4 with groups of 64):
#   0 env     versions, the GPU                                              ~0
#   1 build   the CUDA extension; on failure stop, with the compiler's errors  ~0
#   2 unit    the kernels against the plain path (test_kernels.py)           < 5 GiB: the largest test holds
#             8 x 256 x 262,144 fp32 logits (2.1 GB) and their bf16 copy (1.1 GB)
#   3 micro   one layer at the released shape, kernel by kernel (kernel_bench) < 8 GiB: one layer's experts
#             in bf16 (1.5 GB), int8 (0.8 GB) and int4 (0.4 GB)
#   4 model   the bundled code model: CUDA graph vs eager, kernels vs plain  < 2 GiB
#   5 bench   the released shape: kernels and their agreement with transformers, then transformers, then
#             plain (4 steps)                                                ~51 GiB: one shared stack (47.0;
#             transformers' model is built on meta, then materialised once), 1.5 GB transient, ~3 GiB of
#             activations, the graph's pool and 268 MB fp32 logits. Built on the device as transformers
#             constructs it, it would hold its encoder's and decoder's copies at once: 94 GiB
#   6 quant   bf16, int4 and int8 expert rows from one bf16 build            ~62 GiB: bf16 47.0 + int4 11.9
#             + activations ~3; int8 last, built while each bf16 stack is dropped: 47.0 + one stack in
#             slices of 16 experts (0.8 GB), never bf16 + all of int8 (71 GiB)
#   7 memory  the int4 model's peak generating from a 4k prompt               ~49 GiB while converting (bf16
#             shrinking as int4 grows), then ~17 GiB
#   8 vision  the released vision tower, ours and transformers'              < 3 GiB
#   9 finetune LoRA steps on a 2,048 + 2,048-token example (finetune.py's step): peak memory, s/step,
#             bf16 base then int4 base                                       ~60 GiB (bf16 47.0 + logits,
#             checkpoints, one layer's recomputation; finetune.py's header), ~30 GiB on int4 (16.3 + the same)
#             It rarely fits after the others: run it as PHASES=finetune in a second call
# (On an H200 the same phases, with 60 GiB more room; the step's floor is 12.4 ms there, 17.5 ms on the H100.)
# What comes back ($OUT, 8 files): summary.txt (appended after every phase), micro.json, bench.json,
# bench_quant.json, bench_memory.json, bench_vision.json, bench_finetune.json, logs.tgz (every log,
# re-packed after every phase).
# PHASES="bench quant" runs only those phases (env always runs; build runs whenever a later phase needs it).
#
#   bash scripts/device_check.sh             # on the GPU machine (timeout_s 540)
#   PHASES=quant bash scripts/device_check.sh   # one phase again, in the same loan if time is left
#   bash scripts/device_check.sh --dry-run   # every phase's CPU part, here (the tests run it)
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
PY=$(command -v python3 || command -v python)
OUT=${OUT:-out}
LOGS=$(mktemp -d)
BUDGET=${BUDGET:-450}  # seconds of command time for all phases
PHASES=${PHASES:-}  # empty: every phase
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
mkdir -p "$OUT"
: > "$OUT/summary.txt"
START=$(date +%s)

left() { echo $((BUDGET - $(date +%s) + START)); }
say() { echo "[$(($(date +%s) - START))s] $*" | tee -a "$OUT/summary.txt"; }
pack() { tar -czf "$OUT/logs.tgz" -C "$LOGS" . 2>/dev/null; }

# phase NAME LIMIT MIN COMMAND...: run COMMAND with at most LIMIT seconds (less if less is left),
# not at all when fewer than MIN seconds are left; its output goes to LOGS/NAME.log
phase() {
  local name=$1 limit=$2 min=$3
  shift 3
  if [ -n "$PHASES" ] && [ "$name" != env ] && [ "$name" != build ] && [[ " $PHASES " != *" $name "* ]]; then
    return 3  # not asked for
  fi
  local avail
  avail=$(left)
  if [ "$avail" -lt "$min" ]; then
    say "$name: skipped ($avail s left)"
    return 2
  fi
  [ "$limit" -gt "$avail" ] && limit=$avail
  local t0 rc
  t0=$(date +%s)
  timeout -k 10 "$limit" "$@" > "$LOGS/$name.log" 2>&1  # -k: a child stuck in the driver is killed too
  rc=$?
  say "$name: exit $rc after $(($(date +%s) - t0)) s$([ $rc -eq 124 ] && echo " (time limit $limit s)")"
  pack
  return $rc
}

if [ $DRY -eq 1 ]; then
  say "dry run: the CPU part of every phase"
  phase env 30 5 "$PY" -c "import torch, transformers, jinja2; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  phase build 60 10 "$PY" -c "import cuda_kernels; print(cuda_kernels.arch_for((9, 0)), cuda_kernels.cuda_home())"
  phase unit 120 10 "$PY" -m pytest -q -rA test_kernels.py -k "fused_moe or canvas_attention or fused_sampler or fused_samples or rms_norm or post_ffn or norm_rope or router_tail or softcap or choice"
  phase micro 120 10 "$PY" scripts/kernel_bench.py --tiny --device cpu --json "$OUT/micro.json"
  phase model 120 10 "$PY" -m pytest -q -rA test_kernels.py -k "whole_model or typed_canvases"
  phase bench 240 10 "$PY" scripts/bench.py --tiny --steps 2 --json "$OUT/bench.json"
  phase quant 120 10 "$PY" scripts/bench.py --tiny --steps 2 --quant int8,int4 --json "$OUT/bench_quant.json"
  phase memory 120 10 "$PY" scripts/bench.py --tiny --steps 2 --quant int4 --memory --prompt 256 --json "$OUT/bench_memory.json"
  phase vision 120 10 "$PY" scripts/bench.py --tiny --vision --json "$OUT/bench_vision.json"
  phase finetune 120 10 "$PY" scripts/bench.py --tiny --finetune --json "$OUT/bench_finetune.json"
  grep -q "exit [^0]" "$OUT/summary.txt" && { say "dry run: a phase failed"; exit 1; }
  say "dry run: every phase ran"
  exit 0
fi

say "device check: budget $BUDGET s"
phase env 20 5 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; \
  $PY -c \"import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', \
  transformers.__version__, torch.cuda.get_device_name())\"; nvcc --version | tail -1"
cat "$LOGS/env.log" >> "$OUT/summary.txt"
if ! phase build 200 60 "$PY" -c "import time, cuda_kernels; t = time.time(); cuda_kernels.build(verbose=True); print('built in', round(time.time() - t), 's')"; then
  say "build failed; the compiler's last lines:"
  tail -40 "$LOGS/build.log" >> "$OUT/summary.txt"
  pack
  exit 1
fi
tail -1 "$LOGS/build.log" >> "$OUT/summary.txt"
phase unit 120 30 "$PY" -m pytest -q -rA -p no:cacheprovider test_kernels.py -k "fused_moe or canvas_attention or fused_sampler or fused_samples or rms_norm or post_ffn or norm_rope or router_tail or softcap"
grep -E "^(PASSED|FAILED|ERROR)|passed|failed" "$LOGS/unit.log" 2>/dev/null | tail -60 >> "$OUT/summary.txt"
phase micro 100 30 "$PY" scripts/kernel_bench.py --json "$OUT/micro.json"
grep -E "^(moe|attention|layer|cuda)" "$LOGS/micro.log" 2>/dev/null >> "$OUT/summary.txt"
phase model 90 20 "$PY" -m pytest -q -rA -s -p no:cacheprovider test_kernels.py -k "whole_model or typed_canvases"
grep -E "logits|PASSED|FAILED|passed|failed|Error" "$LOGS/model.log" 2>/dev/null | tail -10 >> "$OUT/summary.txt"
phase bench 150 90 "$PY" scripts/bench.py --json "$OUT/bench.json"
grep -vE "Warning|warn" "$LOGS/bench.log" 2>/dev/null | tail -12 >> "$OUT/summary.txt"
phase quant 120 60 "$PY" scripts/bench.py --quant int8,int4 --json "$OUT/bench_quant.json" && \
  grep -vE "Warning|warn" "$LOGS/quant.log" | tail -6 >> "$OUT/summary.txt"
phase memory 60 40 "$PY" scripts/bench.py --quant int4 --memory --json "$OUT/bench_memory.json" && \
  grep -vE "Warning|warn" "$LOGS/memory.log" | tail -2 >> "$OUT/summary.txt"
phase vision 40 20 "$PY" scripts/bench.py --vision --json "$OUT/bench_vision.json" && \
  grep "vision tower" "$LOGS/vision.log" >> "$OUT/summary.txt"
phase finetune 200 90 "$PY" scripts/bench.py --finetune --json "$OUT/bench_finetune.json" && \
  grep "LoRA fine-tuning" "$LOGS/finetune.log" >> "$OUT/summary.txt"
say "done"
pack
