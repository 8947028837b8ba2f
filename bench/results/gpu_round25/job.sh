#!/usr/bin/env bash
# Round 25's GPU job (2026-12-07). No bundle (the device's own torch 2.11 / Triton 3.6; no SGLang, no FlashInfer),
# detached from a copy of the tree, results under /tmp/out:
#   rm -rf /tmp/repo && mkdir -p /tmp/repo /tmp/out && tar cf - . | tar xf - -C /tmp/repo && cd /tmp/repo &&
#   (setsid nohup bash bench/results/gpu_round25/job.sh > /tmp/run.log 2>&1 < /dev/null &); bash bench/gpu_poll.sh 570 "round25 done"
# Steps (name a subset as arguments; default `pk uc hp`):
#   pk   bench/prefix_kernel.py: a dense piece after a prefix on cuDNN, on flash and as prefix_backend routes it, ~15 s
#   uc   bench/unit_cost.py: one moved piece by kernel, its device span / busy / gaps with a flushed L2, host ms, ~60 s
#   hp   bench/head_parallel.py, round 23's 16 cells (feedback 2, refine 3; --open-cuts: a head of the slowest
#        rank cut where no cut can move), each row's best placement timed again unrouted and routed back to back
#        (--routing-pair), ~6 min
#   hpp  the llama8b TP 8 cells and rounds, each rank also timed as 4 layers back to back (--pipelined 4), ~2 min
set -u
steps=${*:-pk uc hp}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD TRITON_INTERPRET=0
O=/tmp/out
CAL=bench/results/head_parallel/move_calibration_round13_h100.json
mkdir -p $O
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $O/gpu.txt
for step in $steps; do
  t0=$(date +%s)
  case $step in
    pk) python3 bench/prefix_kernel.py --out $O/pk > $O/pk_run.log 2>&1 ;;
    uc) python3 bench/unit_cost.py --out $O/uc > $O/uc_run.log 2>&1 ;;
    hp) python3 bench/head_parallel.py --shapes llama8b,llama70b --ctx 65536,131072 --tp 4,8 --plans profiled,mixed \
          --reps 20 --compare-calibration "" --calibration $CAL --feedback 2 --refine 3 --open-cuts --routing-pair \
          --time-budget-s 330 --out $O/hp > $O/hp_run.log 2>&1 ;;
    hpp) python3 bench/head_parallel.py --shapes llama8b --ctx 65536,131072 --tp 8 --plans profiled,mixed \
          --reps 20 --compare-calibration "" --calibration $CAL --feedback 2 --refine 3 --open-cuts --pipelined 4 \
          --time-budget-s 120 --out $O/hpp > $O/hpp_run.log 2>&1 ;;
    *) echo "unknown step $step (pk, uc, hp, hpp)" ;;
  esac
  echo "round25 step $step rc=$? $(( $(date +%s) - t0 )) s"
done
echo "round25 done"
