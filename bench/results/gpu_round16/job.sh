#!/usr/bin/env bash
# Round 16's detached GPU job, after the bundle calls (../gpu_round13/README.md: slimmed tree, 50 MiB parts).
# Steps (name a subset as arguments; default all), results under /tmp/out, brought back by
# `bash bench/gpu_poll.sh N "round16 done"`:
#   serve    issue 15: Llama-3-8B shape, 32K / 64K / 128K, batch 1, FlashInfer then `shplb`, with round 15's
#            dense-after-prefix cuDNN pair and query-rows index (estimated 2.05x / 2.98x at 64K / 128K from
#            round 13's H100 pair and round 15's per-layer bench; this measures it)
#   chunked  bench/chunked_prefill.py on the same card (per-layer routes, to set beside the server's TTFT)
#   kern     issue 13: bench/home_calls.py --kernels at llama8b 64K TP 4 (profiled): which launch of rank 1's
#            sparse call is 0.5 ms over its heads' sum (top-k 0.15 + six streaming heads; round 15)
#   hp       issue 13: bench/head_parallel.py, profiled + mixed plans, with the fused vertical-slash builder
set -u
steps=${*:-serve kern chunked hp}
for step in $steps; do
  t0=$(date +%s)
  case $step in
    serve) bash bench/results/gpu_round13/job.sh serve ;;
    kern) HOME_SHAPES=llama8b HOME_ARGS="--ctx 65536 --tp 4 --plans profiled --kernels" \
            bash bench/results/gpu_round14/job.sh home ;;
    chunked) bash bench/results/gpu_round15/job.sh chunked ;;
    hp) HP_PLANS=${HP_PLANS:-profiled,mixed} HP_BUDGET=${HP_BUDGET:-240} bash bench/results/gpu_round14/job.sh hp ;;
    *) echo "unknown step $step (serve, kern, chunked, hp)" ;;
  esac
  echo "round16 step $step rc=$? $(( $(date +%s) - t0 )) s"
done
echo "round16 done"
