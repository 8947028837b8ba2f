#!/usr/bin/env bash
# Round 22's GPU job (2026-12-06). After the bundle calls (../gpu_round13/README.md: slimmed tree, 50 MiB parts),
# detached from a copy of the repository, results under /tmp/out:
#   (setsid nohup bash bench/results/gpu_round22/job.sh > /tmp/run.log 2>&1 < /dev/null &); bash bench/gpu_poll.sh 500 "round22 done"
# Steps (name a subset as arguments; default all, in this order):
#   smol    SmolLM2 grid (2K / 4K / 8K x batch 1 / 4 / 16), FlashInfer, shplb, FlashInfer again (the A/A floor):
#           the first GPU run of the stock-path warm-up's length fix (serving/stock_warmup.py), ~7 min
#   hp      bench/head_parallel.py over round 18's 16 cells with --feedback 2, feedback now charging only the
#           ranks' attention calls (LayerTimes.busy), round 13's calibration as rounds 14-21, ~5 min
#   pf      bench/head_parallel.py --plan: the committed SmolLM2 plan's 30 layers at 8K, TP 3 (what CI's TP-3 server
#           places), 2 feedback rounds each, the head-scales file for place --head-scales, ~2 min
#   tserve  the Llama-3-8B shape, 32K / 64K / 128K batch 1, shplb against shplb_tile128 (the mixed plan's top-k heads
#           at 128-token superblocks), 3 measured passes (round 20's step, lost with its machine), ~8 min
set -u
steps=${*:-smol hp pf tserve}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
O=/tmp/out
mkdir -p $O
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $O/gpu.txt
for step in $steps; do
  t0=$(date +%s)
  case $step in
    smol) OUT=$O/smol bash bench/serve_gpu.sh smollm2 > $O/smol_run.log 2>&1 ;;
    hp) PYTHONPATH=$PWD TRITON_INTERPRET=0 python3 bench/head_parallel.py --shapes llama8b,llama70b \
          --ctx 65536,131072 --tp 4,8 --plans profiled,mixed --reps 20 --compare-calibration "" \
          --calibration bench/results/head_parallel/move_calibration_round13_h100.json --feedback 2 \
          --time-budget-s 400 --out $O/hp > $O/hp_run.log 2>&1 ;;
    pf) PYTHONPATH=$PWD TRITON_INTERPRET=0 python3 bench/head_parallel.py --plan bench/results/default_plan --ctx 8192 \
          --tp 3 --feedback 2 --reps 20 --calibration bench/results/calibration_h100_tiles.json --time-budget-s 240 \
          --out $O/pf > $O/pf_run.log 2>&1 ;;
    tserve) OUT=$O/tile_serve LLAMA_SERVERS=shplb,shplb_tile128 \
              LLAMA_FLAGS="--lengths 32768,65536,131072 --batches 1 --context-length 131200 --repeats 3" \
              bash bench/serve_gpu.sh llama8b > $O/tile_serve_run.log 2>&1 ;;
    *) echo "unknown step $step (smol, hp, pf, tserve)" ;;
  esac
  echo "round22 step $step rc=$? $(( $(date +%s) - t0 )) s"
done
echo "round22 done"
