#!/usr/bin/env bash
# `python -m sglang_shplb eval` on the lent GPU (bf16, dense on FlashInfer), after the 4 bundle calls of
# ../shared/gpu/README.md (SGLang 0.5.17 in /tmp/site, SmolLM2 in /tmp/smollm2). The eval runs detached, so
# a call can end while it runs and the next call waits for it (the machine keeps /tmp while warm):
#   bash bench/eval_gpu.sh start PLAN_DIR... [-- eval flags]   install this package, start the eval
#   bash bench/eval_gpu.sh wait SECONDS                          wait up to SECONDS for it to end
# Both copy what exists so far (eval.json/png per plan, logs, answers) into $OUT/eval_h200.tgz.
set -uo pipefail
export PYTHONPATH=/tmp/site NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
RUN=/tmp/eval_run
what=$1; shift
collect() {
  tail -c 20000 "$RUN/eval.log" > "$OUT/eval_tail.log" 2>/dev/null
  tar czf "$OUT/eval_h200.tgz" -C "$RUN" . 2>/dev/null
  nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
}
if [ "$what" = start ]; then
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site . >/dev/null 2>&1 \
    || python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .
  plans=()
  while [ $# -gt 0 ] && [ "$1" != -- ]; do plans+=("$1"); shift; done
  [ "${1:-}" = -- ] && shift
  mkdir -p "$RUN"
  cp -r "${plans[@]}" "$RUN/"
  names=(); for p in "${plans[@]}"; do names+=("$RUN/$(basename "$p")"); done
  setsid nohup python3 -m sglang_shplb eval --model /tmp/smollm2 --device cuda --plan "${names[@]}" "$@" \
    > "$RUN/eval.log" 2>&1 < /dev/null &
  echo $! > "$RUN/pid"
  sleep 20
  collect
  exit 0
fi
if [ "$what" = wait ]; then
  end=$(( $(date +%s) + ${1:-500} ))
  while kill -0 "$(cat $RUN/pid)" 2>/dev/null && [ "$(date +%s)" -lt "$end" ]; do sleep 10; done
  kill -0 "$(cat $RUN/pid)" 2>/dev/null && echo "eval still running" || echo "eval ended"
  tr '\r' '\n' < "$RUN/eval.log" | grep -v "^\s*$" | tail -40
  collect
  exit 0
fi
echo "usage: bash bench/eval_gpu.sh start PLAN_DIR... [-- eval flags] | wait SECONDS" >&2; exit 2
