#!/usr/bin/env bash
# Round 19's GPU job (2026-12-06). After the bundle calls (../gpu_round13/README.md: slimmed tree, 50 MiB parts),
# detached from a copy of the repository, results under /tmp/out:
#   (setsid nohup bash bench/results/gpu_round19/job.sh > /tmp/run.log 2>&1 < /dev/null &); bash bench/gpu_poll.sh 540 "round19 done"
# Steps (name a subset as arguments; default all, in this order):
#   first   bench/first_call.py --warm-up --diagnose, round 18's lengths: round 18 found 4 of 6 new lengths paying
#           0.6-1.0 s of Triton compiles (length-following integer arguments specialised); those arguments are
#           now not specialised (sglang_shplb/kernels/triton_jit.py): expected no compile, and the steady times
#           of round 18's run (2.55 / 2.95 / 3.10 / 4.19 / 1.20 / 10.02 ms) unchanged, ~2 min, no server
#   old     the same on the kernels before the change (r19_old/: git archive 3d286b2 sglang_shplb bench/first_call.py
#           bench/layer_path.py bench/timing.py, carried untracked), without --diagnose: the same device's baseline
#   fresh   round 18's server grid (Llama-3-8B shape, 32K / 64K / 128K, batch 1, 3 never-served lengths per
#           cell), shplb then FlashInfer, ~7 min
set -u
steps=${*:-first old fresh}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
O=/tmp/out
mkdir -p $O
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $O/gpu.txt
for step in $steps; do
  t0=$(date +%s)
  case $step in
    first) PYTHONPATH=$PWD:/tmp/site TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1 python3 bench/first_call.py --warm-up \
             --diagnose --lengths 30659,32707,61379,65536,98365,131011 --out $O/first > $O/first_run.log 2>&1 ;;
    old) (cd r19_old && PYTHONPATH=$PWD:/tmp/site TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1 python3 bench/first_call.py \
           --warm-up --lengths 30659,32707,61379,65536,98365,131011 --out $O/first_old > $O/first_old_run.log 2>&1) ;;
    fresh) OUT=$O LLAMA_SERVERS=shplb,flashinfer \
             LLAMA_FLAGS="--lengths 32768,65536,131072 --batches 1 --context-length 131200 --fresh-lengths 3" \
             bash bench/serve_gpu.sh llama8b > $O/fresh_run.log 2>&1 ;;
    *) echo "unknown step $step (first, old, fresh)" ;;
  esac
  echo "round19 step $step rc=$? $(( $(date +%s) - t0 )) s"
done
echo "round19 done"
