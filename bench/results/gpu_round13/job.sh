#!/usr/bin/env bash
# Round 13's detached GPU job, after the bundle calls (../gpu_round12/README.md: 16 MiB parts). Steps, in order
# (name a subset as arguments; default all):
#   serve  issue 15: Llama-3-8B shape, 32K / 64K / 128K, batch 1, FlashInfer first, then `shplb`, with the dense
#          tail now on Triton (round 12: 1.84x / 2.33x at 64K / 128K with the cuDNN tail); on an H100 the server
#          reads the H200's launch-config table (same sm 9.0; round 12's first 64K request autotuned for 25 s)
#   hp     issue 13: bench/head_parallel.py --quick with the Triton tail (round 12: tail 0.9-2.1 ms per rank)
#   tail   bench/tail.py (the tail's two routes), quick
#   eval   issue 14: the budgets `python -m sglang_shplb plan` now makes by default (bench/results/default_plan:
#          density target 0.2, top-k floor 16, refined on answers to 0.25, all on the CPU in float32), placed
#          with every layer sparse (eval_cpu/round13/default13_sparse; the default plan itself is stock at <= 32K), in bf16,
#          all six tasks, 34 per task and length; beside it the old default (default_plan_tau95: tau 0.95 on
#          recall, 0.486 at 8K), whose only bf16 figures predate the decode fix
#   tune   issue 15: this GPU's own launch-config table (bench/tune_kernels.py, Llama-3-8B and SmolLM2 layouts;
#          last, so that `serve` measured the borrowed table): commit $OUT/tuned/<gpu>.json into the package
# Everything lands in $OUT (default /tmp/out); bench/gpu_poll.sh tars it and stops at "job done".
set -uo pipefail
export PYTHONPATH=/tmp/site NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
steps=${*:-serve eval hp tail tune}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
for step in $steps; do
  echo "$step start $(date -u +%T)"
  case $step in
    tune)
      python3 bench/tune_kernels.py --shapes llama8b,smollm2 --out "$OUT/tuned" \
        > "$OUT/tune_run.log" 2>&1 ;;
    serve)
      LLAMA_SERVERS=flashinfer,shplb LLAMA_FLAGS="--lengths 32768,65536,131072 --batches 1 --context-length 131200" \
        bash bench/serve_gpu.sh llama8b > "$OUT/serve_run.log" 2>&1 ;;
    hp)
      python3 bench/head_parallel.py --quick --compare-calibration "" --time-budget-s 240 \
        --out "$OUT/hp" > "$OUT/hp_run.log" 2>&1 ;;
    eval)
      bash bench/eval_gpu.sh start bench/results/eval_cpu/round13/default13_sparse bench/results/default_plan_tau95 -- \
        --per-task 34 --concurrency 16 --parallel-servers --server-args "--mem-fraction-static 0.99 --max-total-tokens 200000"
      while [ -f /tmp/eval_run/pid ] && kill -0 "$(cat /tmp/eval_run/pid)" 2>/dev/null; do sleep 10; done
      bash bench/eval_gpu.sh wait 1 > /dev/null 2>&1 ;;   # collect: $OUT/eval_h200.tgz
    tail)
      python3 bench/tail.py --out "$OUT/tail" > "$OUT/tail_run.log" 2>&1 ;;
    *) echo "unknown step $step (serve, eval, hp, tail, tune)"; exit 2 ;;
  esac
  echo "$step done $(date -u +%T)"
done
echo "job done $(date -u +%T)"
