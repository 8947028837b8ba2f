#!/usr/bin/env bash
# Round 20's GPU job (2026-12-06). After the bundle calls (../gpu_round13/README.md: slimmed tree, 50 MiB parts),
# detached from a copy of the repository, results under /tmp/out:
#   (setsid nohup bash bench/results/gpu_round20/job.sh > /tmp/run.log 2>&1 < /dev/null &); bash bench/gpu_poll.sh 460 "round20 done"
# Steps (name a subset as arguments; default all, in this order):
#   cold    the Llama-3-8B shape, 32K / 64K / 128K batch 1, shplb then FlashInfer, each server with empty Triton and
#           FlashInfer JIT caches (serve_gpu.py --fresh-caches): the cold start of each (startup + first requests
#           over steady) with the launcher's stock-path warm-up (serving/stock_warmup.py, not yet measured), ~6 min
#   tserve  the same cells, shplb against shplb_tile128 (the mixed plan's top-k heads at 128-token superblocks,
#           the 128 x 128 tile kernel), 3 measured passes, caches warm, ~4 min
#   tkern   bench/chunked_prefill.py --profile at top-k tiles 64 and 128: one layer by kernel, ~3 min, no server
#   smol    SmolLM2 grid (2K / 4K / 8K x batch 1 / 4 / 16), FlashInfer, shplb, FlashInfer again (the A/A floor), ~5 min
set -u
steps=${*:-cold tserve tkern smol}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
O=/tmp/out
mkdir -p $O
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $O/gpu.txt
CELLS="--lengths 32768,65536,131072 --batches 1 --context-length 131200"
for step in $steps; do
  t0=$(date +%s)
  case $step in
    cold) OUT=$O/cold LLAMA_SERVERS=shplb,flashinfer LLAMA_FLAGS="$CELLS --fresh-caches" \
            bash bench/serve_gpu.sh llama8b > $O/cold_run.log 2>&1 ;;
    tserve) OUT=$O/tile_serve LLAMA_SERVERS=shplb,shplb_tile128 LLAMA_FLAGS="$CELLS --repeats 3" \
              bash bench/serve_gpu.sh llama8b > $O/tile_serve_run.log 2>&1 ;;
    tkern) for t in 64 128; do
             PYTHONPATH=$PWD:/tmp/site python3 bench/chunked_prefill.py llama8b --profile --topk-tile $t \
               --out $O/tile_kernels > $O/tile_kernels_$t.log 2>&1
           done ;;
    smol) OUT=$O/smol bash bench/serve_gpu.sh smollm2 > $O/smol_run.log 2>&1 ;;
    *) echo "unknown step $step (cold, tserve, tkern, smol)" ;;
  esac
  echo "round20 step $step rc=$? $(( $(date +%s) - t0 )) s"
done
echo "round20 done"
