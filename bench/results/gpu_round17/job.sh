#!/usr/bin/env bash
# Round 17's GPU job (written 2026-12-06, not yet run). After the bundle calls (../gpu_round13/README.md: slimmed
# tree, 50 MiB parts), detached from the repository root, results under /tmp/out:
#   (setsid nohup bash bench/results/gpu_round17/job.sh > /tmp/run.log 2>&1 < /dev/null &); bash bench/gpu_poll.sh 540 "round17 done"
# Steps (name a subset as arguments; default all, in this order):
#   first    bench/first_call.py: the last chunk of prompts whose lengths the process has not seen, first call vs
#            steady, per route (shplb, the dense pieces on cuDNN and on flash, FlashInfer): does a new shape cost
#            cuDNN an execution plan per call (round 16: a first request at a new length +4.4-4.8 s, round 13's
#            +2.5-4.1 s without cuDNN pieces), and does TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1 (token-major operands,
#            plans by power-of-two length; the launcher sets it since 2026-12-06) remove it at what steady cost;
#            once with it 0, once 1, ~2 min, no server
#   fresh    issue 15, "never slower" in real traffic: Llama-3-8B shape at 32K / 64K / 128K, batch 1, FlashInfer then
#            shplb, plus 3 requests per cell at lengths neither server has seen (--fresh-lengths 3), ~10 min
#   profile  bench/chunked_prefill.py --profile at 64K / 128K: the served route's last chunk by kernel (round 16
#            profiled the Triton-dense route by mistake), ~1.5 min
#   kern     issue 13: bench/home_calls.py --kernels at llama8b 64K TP 4 (profiled), now with each home call's device
#            timeline as do_bench sees it (span, busy, idle gaps): what fills rank 1's 0.58 ms that is neither
#            kernel nor host time (round 16), ~1 min
#   tests    the dense-head tests compiled on the GPU with TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1 (cuDNN's ragged path,
#            which the server now takes; the one-time cuDNN check falls back to flash if it disagrees), ~3 min
#   hp       issue 13: bench/head_parallel.py, placements solved with round 16's refit (fitted on the corrected
#            run; on the CPU it changes 15 of the 16 cells' placements) against round 13's (shplb_prior), side by
#            side, ~4 min
#   wtest    the start-up warm-up (sglang_shplb/kernels/warmup.py, added after first/kern/tests/profile ran) and the
#            token-major test compiled on the GPU, before a server takes it, ~1 min
set -u
steps=${*:-first kern tests fresh profile hp}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
O=/tmp/out
mkdir -p $O
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $O/gpu.txt
for step in $steps; do
  t0=$(date +%s)
  case $step in
    first) PYTHONPATH=$PWD:/tmp/site TORCH_CUDNN_SDPA_AVOID_RECOMPILE=0 python3 bench/first_call.py --out $O/first \
             > $O/first_run.log 2>&1
           PYTHONPATH=$PWD:/tmp/site TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1 python3 bench/first_call.py --out $O/first \
             >> $O/first_run.log 2>&1 ;;
    fresh) OUT=$O LLAMA_SERVERS=flashinfer,shplb \
             LLAMA_FLAGS="--lengths 32768,65536,131072 --batches 1 --context-length 131200 --fresh-lengths 3" \
             bash bench/serve_gpu.sh llama8b > $O/fresh_run.log 2>&1 ;;
    profile) PYTHONPATH=$PWD python3 bench/chunked_prefill.py llama8b --profile --ctx 65536,131072 --out $O/profile \
               > $O/profile_run.log 2>&1 ;;
    kern) HOME_SHAPES=llama8b HOME_ARGS="--ctx 65536 --tp 4 --plans profiled --kernels" \
            bash bench/results/gpu_round14/job.sh home ;;
    tests) PYTHONPATH=$PWD TRITON_INTERPRET=0 TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1 python3 -m pytest -q -p no:cacheprovider \
             tests/test_kernels.py tests/test_head_parallel.py -k "piece or prefix or dense or tail or matches_reference" \
             > $O/gpu_tests.log 2>&1 ;;
    hp) PYTHONPATH=$PWD python3 bench/head_parallel.py --shapes llama8b,llama70b --ctx 65536,131072 --tp 4,8 \
          --plans profiled,mixed --reps 20 --time-budget-s 240 \
          --calibration bench/results/head_parallel/move_calibration_round16_fixed_h100.json \
          --compare-calibration bench/results/head_parallel/move_calibration_round13_h100.json \
          --out $O/hp > $O/hp_run.log 2>&1 ;;
    wtest) PYTHONPATH=$PWD:/tmp/site TRITON_INTERPRET=0 python3 -m pytest -q -p no:cacheprovider tests/test_warmup.py \
             tests/test_kernels.py -k "warm or token_major or distinct or grid" > $O/wtest.log 2>&1 ;;
    *) echo "unknown step $step (first, kern, tests, fresh, profile, hp, wtest)" ;;
  esac
  echo "round17 step $step rc=$? $(( $(date +%s) - t0 )) s"
done
echo "round17 done"
