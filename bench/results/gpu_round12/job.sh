#!/usr/bin/env bash
# Round 12's detached GPU job, after the bundle calls (../eval_gpu_round10/README.md; 20 MiB parts since round 12). Steps, in
# order (name a subset as arguments; default all):
#   serve  issue 15: Llama-3-8B shape, 64K / 128K, batch 1, FlashInfer first, then `shplb` (with the dense tail);
#          round 11 measured only the `shplb` half (../serve_h100_round11/)
#   eval   issue 14: a bf16 refine of needle_d10_min16 to 0.20 with the tail counted (the refined method's next
#          point below 0.25), evaluated beside round 10's cpu10_d25 (0.252, within -2 on four tasks in round 11),
#          all six tasks (vt / cwe for cpu10_d25 were never run in bf16)
#   hp     issue 13: bench/head_parallel.py --quick, whose ranks time the tail (never run on a GPU)
# Everything lands in $OUT (default /tmp/out); bench/gpu_poll.sh tars it and stops at "job done".
set -uo pipefail
export PYTHONPATH=/tmp/site NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
steps=${*:-serve eval hp}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
for step in $steps; do
  echo "$step start $(date -u +%T)"
  case $step in
    serve)
      LLAMA_SERVERS=flashinfer,shplb LLAMA_FLAGS="--lengths 65536,131072 --batches 1 --context-length 131200" \
        bash bench/serve_gpu.sh llama8b > "$OUT/serve_run.log" 2>&1 ;;
    eval)
      REFINE_PROMPTS=24 EVAL_START_PLANS=0 PREFILL_ONLY=0 EXTRA_PLANS=bench/results/eval_cpu/round10/cpu10_d25 \
        bash bench/quality_gpu.sh start bench/results/eval_h200/profile bench/results/eval_h200_round5/plans \
          refined12_d20:needle_d10_min16:0.2 -- --per-task 34 --concurrency 16 --parallel-servers \
          --server-args "--mem-fraction-static 0.99 --max-total-tokens 200000"
      while kill -0 "$(cat /tmp/refine_run/pid)" 2>/dev/null; do sleep 10; done
      while [ -f /tmp/eval_run/pid ] && kill -0 "$(cat /tmp/eval_run/pid)" 2>/dev/null; do sleep 10; done
      bash bench/eval_gpu.sh wait 1 > /dev/null 2>&1 ;;   # collect: $OUT/eval_h200.tgz
    hp)
      python3 bench/head_parallel.py --quick --compare-calibration "" --time-budget-s 240 --out "$OUT/hp" \
        > "$OUT/hp_run.log" 2>&1 ;;
    *) echo "unknown step $step (serve, eval, hp)"; exit 2 ;;
  esac
  echo "$step done $(date -u +%T)"
done
echo "job done $(date -u +%T)"
