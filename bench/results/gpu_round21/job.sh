#!/usr/bin/env bash
# Round 21's GPU job (2026-12-06). After the bundle calls (../gpu_round13/README.md: slimmed tree, 50 MiB parts),
# detached from a copy of the repository, results under /tmp/out:
#   (setsid nohup bash bench/results/gpu_round21/job.sh > /tmp/run.log 2>&1 < /dev/null &); bash bench/gpu_poll.sh 460 "round21 done"
# Steps (name a subset as arguments; default all, in this order):
#   hp     bench/head_parallel.py over round 18's 16 cells with --feedback 2 (measured feedback to the placement,
#          planning/rank_feedback.py), round 13's calibration as rounds 14-18; no FlashInfer (its JIT would cost
#          minutes before the servers), ~7 min
#   grid   the Llama-3-8B shape, 16K-128K x batch 1 / 4, shplb then FlashInfer, each with empty Triton and
#          FlashInfer JIT caches (the cold start side by side) and 2 measured passes, ~10 min
#   smol   SmolLM2 grid (2K / 4K / 8K x batch 1 / 4 / 16), FlashInfer, shplb, FlashInfer again (the A/A floor), ~5 min
set -u
steps=${*:-hp grid smol}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
O=/tmp/out
mkdir -p $O
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $O/gpu.txt
for step in $steps; do
  t0=$(date +%s)
  case $step in
    hp) PYTHONPATH=$PWD TRITON_INTERPRET=0 python3 bench/head_parallel.py --shapes llama8b,llama70b \
          --ctx 65536,131072 --tp 4,8 --plans profiled,mixed --reps 20 --compare-calibration "" \
          --calibration bench/results/head_parallel/move_calibration_round13_h100.json --feedback 2 \
          --time-budget-s 400 --out $O/hp > $O/hp_run.log 2>&1 ;;
    grid) OUT=$O/grid LLAMA_SERVERS=shplb,flashinfer LLAMA_FLAGS="--lengths 16384,32768,65536,131072 --batches 1,4 \
            --context-length 131200 --repeats 2 --fresh-caches" bash bench/serve_gpu.sh llama8b > $O/grid_run.log 2>&1 ;;
    smol) OUT=$O/smol bash bench/serve_gpu.sh smollm2 > $O/smol_run.log 2>&1 ;;
    *) echo "unknown step $step (hp, grid, smol)" ;;
  esac
  echo "round21 step $step rc=$? $(( $(date +%s) - t0 )) s"
done
echo "round21 done"
