#!/usr/bin/env bash
# Round 18's GPU job (written 2026-12-06, not yet run). After the bundle calls (../gpu_round13/README.md: slimmed
# tree, 50 MiB parts), detached from a copy of the repository, results under /tmp/out:
#   (setsid nohup bash bench/results/gpu_round18/job.sh > /tmp/run.log 2>&1 < /dev/null &); bash bench/gpu_poll.sh 540 "round18 done"
# Steps (name a subset as arguments; default all, in this order):
#   first   bench/first_call.py --warm-up with TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1: the warm-up as the server now runs
#           it (every shape with the pieces on flash, cuDNN plans for the chunk-aligned shapes only, then cuDNN kept
#           to those) and the last chunk at never-seen lengths: round 17 measured +0.72-1.08 s per new shape after
#           an all-cuDNN warm-up, +0.06-0.13 s without one, +5-22 ms with every piece on flash; expected: the
#           last, with the chunk-aligned 65,536 on cuDNN, ~2 min, no server
#   fresh   the server grid (Llama-3-8B shape, 32K / 64K / 128K, batch 1) with 3 never-served lengths per cell,
#           FlashInfer then shplb: round 17's server (all-cuDNN warm-up) paid ~1 s at 2 of 9 such lengths and
#           +2.0 s on its first 128K request, ~10 min
#   hp      issue 13's 16 cells with the dense competitor through dense_pieces.causal_sdpa (round 17's plain SDPA
#           took 1.6-1.9x longer than round 16's), round 13's calibration, ~4 min
set -u
steps=${*:-first fresh hp}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
O=/tmp/out
mkdir -p $O
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $O/gpu.txt
for step in $steps; do
  t0=$(date +%s)
  case $step in
    first) PYTHONPATH=$PWD:/tmp/site TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1 python3 bench/first_call.py --warm-up \
             --lengths 30659,32707,61379,65536,98365,131011 --out $O/first > $O/first_run.log 2>&1 ;;
    fresh) OUT=$O LLAMA_SERVERS=flashinfer,shplb \
             LLAMA_FLAGS="--lengths 32768,65536,131072 --batches 1 --context-length 131200 --fresh-lengths 3" \
             bash bench/serve_gpu.sh llama8b > $O/fresh_run.log 2>&1 ;;
    hp) PYTHONPATH=$PWD python3 bench/head_parallel.py --shapes llama8b,llama70b --ctx 65536,131072 --tp 4,8 \
          --plans profiled,mixed --reps 20 --time-budget-s 260 --compare-calibration "" \
          --calibration bench/results/head_parallel/move_calibration_round13_h100.json \
          --out $O/hp > $O/hp_run.log 2>&1 ;;
    *) echo "unknown step $step (first, fresh, hp)" ;;
  esac
  echo "round18 step $step rc=$? $(( $(date +%s) - t0 )) s"
done
echo "round18 done"
