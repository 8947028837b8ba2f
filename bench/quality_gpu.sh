#!/usr/bin/env bash
# Refined plans made on the lent GPU (bf16, the serving dtype), then the eval of them beside the recall-only
# plans of the same densities. After the bundle calls of ../shared/gpu/README.md; runs detached:
#   bash bench/quality_gpu.sh start PROFILE PLANS_DIR SPEC... [-- eval flags]
#       SPEC = NAME:START:TARGET  refine PLANS_DIR/START up to mean density TARGET into NAME
#            = NAME:START:until:MAX  refine until the held-in answers match dense, at most MAX
#       NAME@Q1,Q2,...  (in either form): the held-in prompts of this one ask questions Q1, Q2, ... (an A/B of
#       question sets in one run; the plan is named NAME)
#       then place each for TP 3 (every layer sparse) and run bench/eval_gpu.sh on the refined plans and
#       the START plans; while refining, a stock server builds FlashInfer's JIT kernels once.
#       Environment: REFINE_PROMPTS (held-in prompts, default 12); REFINE_QUESTIONS="passkey keepers ..." (what
#       they ask, default refine's); EVAL_START_PLANS=0 (do not evaluate the
#       START plans again); EXTRA_PLANS="DIR..." (placed plans evaluated beside); PREFILL_ONLY=1 (each refined
#       plan also placed with --stock-decode as NAME_prefill and evaluated: its sparse prefill alone).
#   bash bench/quality_gpu.sh wait SECONDS
# Results: $OUT/refine_h200.tgz (refined plans, their refine.json, logs), then eval_gpu.sh's $OUT/eval_h200.tgz.
set -uo pipefail
export PYTHONPATH=/tmp/site NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
RUN=/tmp/refine_run
HERE=$(cd "$(dirname "$0")/.." && pwd)
what=$1; shift
collect() {
  tar czf "$OUT/refine_h200.tgz" -C "$RUN" . 2>/dev/null
}
if [ "$what" = start ]; then
  profile=$1 plans=$2; shift 2
  specs=()
  while [ $# -gt 0 ] && [ "$1" != -- ]; do specs+=("$1"); shift; done
  [ "${1:-}" = -- ] && shift
  mkdir -p "$RUN"; cp -r "$profile" "$RUN/profile"
  printf '%q ' "$@" > "$RUN/eval_flags"
  printf '%s\n' "$plans" "${specs[@]}" > "$RUN/specs"
  printf 'REFINE_PROMPTS=%q REFINE_QUESTIONS=%q EVAL_START_PLANS=%q PREFILL_ONLY=%q\n' "${REFINE_PROMPTS:-12}" \
    "${REFINE_QUESTIONS:-}" "${EVAL_START_PLANS:-1}" "${PREFILL_ONLY:-0}" > "$RUN/knobs"
  mkdir -p "$RUN/extra"; for d in ${EXTRA_PLANS:-}; do cp -r "$d" "$RUN/extra/"; done
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site "$HERE" >/dev/null 2>&1
  setsid nohup bash "$HERE/bench/quality_gpu.sh" drive > "$RUN/driver.out" 2>&1 < /dev/null &
  echo $! > "$RUN/pid"
  sleep 5; collect; exit 0
fi
if [ "$what" = drive ]; then  # the detached part of start (it outlives the call)
    cd "$HERE"
    { read -r plans; mapfile -t specs; } < "$RUN/specs"
    source "$RUN/knobs"
    python3 -m sglang.launch_server --model-path /tmp/smollm2 --attention-backend flashinfer --host 127.0.0.1 \
      --port 30999 --mem-fraction-static 0.1 --disable-prefill-cuda-graph --cuda-graph-max-bs 8 > "$RUN/jit_warm.log" 2>&1 &
    warm=$!
    pids=(); evalplans=()
    for spec in "${specs[@]}"; do
      IFS=: read -r name start kind max <<< "$spec"
      questions=$REFINE_QUESTIONS
      if [[ $name == *@* ]]; then questions=${name#*@}; questions=${questions//,/ }; name=${name%%@*}; fi
      flags=(--density-target "$kind")
      [ "$kind" = until ] && flags=(--until-match --max-density "$max")
      ( timeout 900 python3 -m sglang_shplb refine --budgets "$plans/$start" --profile "$RUN/profile" \
          --model /tmp/smollm2 --device cuda "${flags[@]}" --refine-prompts "$REFINE_PROMPTS" \
          ${questions:+--refine-questions $questions} \
          --refine-lengths 2048 4096 8000 --out "$RUN/$name" > "$RUN/$name.log" 2>&1 \
        && python3 -m sglang_shplb place --budgets "$RUN/$name" --tp 3 --no-stock-fallback --out "$RUN/$name" \
          >> "$RUN/$name.log" 2>&1 \
        && if [ "$PREFILL_ONLY" = 1 ]; then python3 -m sglang_shplb place --budgets "$RUN/$name" --tp 3 \
          --no-stock-fallback --stock-decode --out "$RUN/${name}_prefill" >> "$RUN/$name.log" 2>&1 \
          && cp "$RUN/$name/budgets.json" "$RUN/$name/refine.json" "$RUN/${name}_prefill/"; fi ) &
      pids+=($!)
      [ "$EVAL_START_PLANS" = 1 ] && evalplans+=("$plans/$start")
    done
    wait "${pids[@]}"
    for spec in "${specs[@]}"; do
      name=${spec%%:*}; name=${name%%@*}
      for d in "$RUN/$name" "$RUN/${name}_prefill"; do [ -f "$d/plan.json" ] && evalplans+=("$d"); done
    done
    for d in "$RUN"/extra/*/; do [ -f "$d/plan.json" ] && evalplans+=("${d%/}"); done
    until grep -q "fired up and ready\|Traceback" "$RUN/jit_warm.log" || ! kill -0 $warm 2>/dev/null; do sleep 5; done
    kill $warm; wait $warm 2>/dev/null
    echo "refine done $(date -u +%T); eval of: $(printf '%s ' $(printf '%s\n' "${evalplans[@]}" | sort -u))" >> "$RUN/driver.log"
    eval "bash bench/eval_gpu.sh start $(printf '%s\n' "${evalplans[@]}" | sort -u | tr '\n' ' ') -- $(cat "$RUN/eval_flags")" \
      >> "$RUN/driver.log" 2>&1
    echo "eval started $(date -u +%T)" >> "$RUN/driver.log"
    exit 0
fi
if [ "$what" = wait ]; then
  end=$(( $(date +%s) + ${1:-500} ))
  while kill -0 "$(cat $RUN/pid)" 2>/dev/null && [ "$(date +%s)" -lt "$end" ]; do sleep 10; done
  tail -3 "$RUN"/*.log 2>/dev/null | cut -c1-300
  collect
  if ! kill -0 "$(cat $RUN/pid)" 2>/dev/null && [ -f /tmp/eval_run/pid ]; then
    left=$(( end - $(date +%s) )); [ $left -lt 1 ] && left=1
    bash "$HERE/bench/eval_gpu.sh" wait $left
  fi
  exit 0
fi
echo "usage: bash bench/quality_gpu.sh start PROFILE PLANS_DIR NAME:START:TARGET... [-- eval flags] | wait SECONDS" >&2; exit 2
