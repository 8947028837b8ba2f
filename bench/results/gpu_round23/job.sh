#!/usr/bin/env bash
# Round 23's GPU job (2026-12-06). After the bundle calls (../gpu_round13/README.md: slimmed tree, 50 MiB parts),
# detached from a copy of the repository, results under /tmp/out:
#   (setsid nohup bash bench/results/gpu_round23/job.sh > /tmp/run.log 2>&1 < /dev/null &); bash bench/gpu_poll.sh 500 "round23 done"
# Steps (name a subset as arguments; default all, in this order):
#   hp      bench/head_parallel.py over round 18's 16 cells, --feedback 2 then --refine 3 (refine_cuts: the best
#           placement's structure kept, its cuts moved on its measured ranks), round 13's calibration as rounds 14-22,
#           ~9 min
#   pf      bench/head_parallel.py --plan on the serving benchmark's Llama-3-8B plan (every layer sparse; made here as
#           bench/serve_gpu.py makes it) at 64K / 128K, TP 4 / 8, 2 feedback and 2 refine rounds: a head-scales file
#           for the plan the server runs, ~3 min
#   llama   the Llama-3-8B shape, shplb alone, 32K / 64K batch 1, empty caches: the first GPU run of round 22's
#           pool-index dtype fix (first request vs steady TTFT; the steps before compile other kernels only), ~4 min
set -u
steps=${*:-hp pf llama}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
O=/tmp/out
CAL=bench/results/head_parallel/move_calibration_round13_h100.json
mkdir -p $O
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $O/gpu.txt
for step in $steps; do
  t0=$(date +%s)
  case $step in
    llama) OUT=$O/llama LLAMA_SERVERS=shplb \
             LLAMA_FLAGS="--lengths 32768,65536 --batches 1 --context-length 131200 --repeats 2 --fresh-caches" \
             bash bench/serve_gpu.sh llama8b > $O/llama_run.log 2>&1 ;;
    pf) mkdir -p $O/pf/cfg && PYTHONPATH=$PWD python3 -c "
import json, sys; sys.path.insert(0, 'bench')
from serve_gpu import LLAMA8B
from sglang_shplb.planning.synthetic_plans import serving_bench_budget, synthetic_plan
open('$O/pf/cfg/config.json', 'w').write(json.dumps({**LLAMA8B, 'max_position_embeddings': 131200}))
synthetic_plan('$O/pf/cfg', serving_bench_budget(), '$O/pf/plan', meta={'source': 'gpu_round23 pf'})" \
        && PYTHONPATH=$PWD TRITON_INTERPRET=0 python3 bench/head_parallel.py --plan $O/pf/plan \
          --ctx 65536,131072 --tp 4,8 --feedback 2 --refine 2 --reps 20 --calibration $CAL --time-budget-s 200 \
          --out $O/pf > $O/pf_run.log 2>&1 ;;
    hp) PYTHONPATH=$PWD TRITON_INTERPRET=0 python3 bench/head_parallel.py --shapes llama8b,llama70b \
          --ctx 65536,131072 --tp 4,8 --plans profiled,mixed --reps 20 --compare-calibration "" \
          --calibration $CAL --feedback 2 --refine 3 --time-budget-s 480 --out $O/hp > $O/hp_run.log 2>&1 ;;
    *) echo "unknown step $step (hp, pf, llama)" ;;
  esac
  echo "round23 step $step rc=$? $(( $(date +%s) - t0 )) s"
done
echo "round23 done"
