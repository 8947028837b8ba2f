#!/usr/bin/env bash
# Round 10's one detached GPU job (after the bundle calls of ../../../../shared/gpu/README.md), in order
# (`job.sh eval`: step 1 without the refine, four tasks):
# 1. issue 14: a bf16 refine to 0.30 at 8K with the dense tail counted, evaluated through real servers beside
#    round 8's two plans re-placed with the tail and round 9's float32 CPU refine (cpu9_d30);
# 2. issue 15: the Llama-3-8B shape at 64K / 128K, batch 1, `shplb` (sparse prefill now with the tail) vs FlashInfer;
# 3. issue 13: bench/head_parallel.py --quick, whose ranks now time the tail.
# Everything lands in $OUT (default /tmp/out); a poll call tars it.
set -uo pipefail
export PYTHONPATH=/tmp/site NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
echo "quality start $(date -u +%T)"
tail_plans="bench/results/eval_h200_round8/tail/refined8_d30_tail bench/results/eval_h200_round8/tail/needle_d20_tail bench/results/eval_cpu/round9/cpu9_d30 bench/results/eval_cpu/round10/cpu10_d25"
eval_flags=(--per-task 34 --concurrency 16 --parallel-servers --server-args "--mem-fraction-static 0.99 --max-total-tokens 200000")
if [ "${1:-refine}" = refine ]; then
  REFINE_PROMPTS=24 EVAL_START_PLANS=0 PREFILL_ONLY=0 EXTRA_PLANS="$tail_plans" \
    bash bench/quality_gpu.sh start bench/results/eval_h200/profile bench/results/eval_h200_round5/plans \
      refined9_d30:needle_d20_min16:0.3 -- "${eval_flags[@]}"
  while kill -0 "$(cat /tmp/refine_run/pid)" 2>/dev/null; do sleep 10; done
  echo "refine driver ended $(date -u +%T)"
else  # `job.sh eval`: no refine, the three plans with the tail on the four tasks dense SmolLM2 can do
  bash bench/eval_gpu.sh start $tail_plans -- "${eval_flags[@]}" --tasks passkey multikey multivalue qa
fi
if [ -f /tmp/eval_run/pid ]; then
  while kill -0 "$(cat /tmp/eval_run/pid)" 2>/dev/null; do sleep 10; done
fi
echo "quality done $(date -u +%T)"
bash bench/eval_gpu.sh wait 1 > /dev/null 2>&1   # collect: $OUT/eval_h200.tgz
LLAMA_SERVERS=shplb,flashinfer LLAMA_FLAGS="--lengths 65536,131072 --batches 1 --context-length 131200" \
  bash bench/serve_gpu.sh llama8b > "$OUT/serve_run.log" 2>&1
echo "serve done $(date -u +%T)"
python3 bench/head_parallel.py --quick --compare-calibration "" --time-budget-s 240 --out "$OUT/hp" > "$OUT/hp_run.log" 2>&1
echo "head_parallel done $(date -u +%T)"
