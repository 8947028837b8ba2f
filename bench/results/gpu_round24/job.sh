#!/usr/bin/env bash
# Round 24's GPU job (2026-12-07). No bundle (the device's own torch 2.11 / Triton 3.6; no SGLang, no FlashInfer),
# detached from a copy of the tree, results under /tmp/out:
#   rm -rf /tmp/repo && mkdir -p /tmp/repo /tmp/out && tar cf - . | tar xf - -C /tmp/repo && cd /tmp/repo &&
#   (setsid nohup bash bench/results/gpu_round24/job.sh > /tmp/run.log 2>&1 < /dev/null &); bash bench/gpu_poll.sh 540 "round24 done"
# The first run (commit 353959e, README.md here) ran split-KV, since replaced: its steps were `uc ps hpu hps` with
# bench/prefix_splits.py and --unsplit-prefixes, which that commit holds.
# Steps of the code as it is now (name a subset as arguments; default `pk hpu hpr`):
#   pk      bench/prefix_kernel.py: a dense piece after a prefix on cuDNN, on flash and as prefix_backend routes it, ~15 s
#   uc      bench/unit_cost.py: one moved piece (dense, top-k) by kernel against its price, routed vs unrouted, ~30 s
#   hpu     bench/head_parallel.py, llama8b 64K / 128K TP 8, both plans, open loop, --unrouted-prefixes, ~40 s
#   hpr     the same cells as the package runs them (prefix_backend), ~40 s
set -u
steps=${*:-pk hpu hpr}
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
    hpu|hpr) python3 bench/head_parallel.py --shapes llama8b --ctx 65536,131072 --tp 8 --plans profiled,mixed \
          --reps 20 --compare-calibration "" --calibration $CAL --time-budget-s 60 \
          $([ $step = hpu ] && echo --unrouted-prefixes) --out $O/$step > $O/${step}_run.log 2>&1 ;;
    *) echo "unknown step $step (pk, uc, hpu, hpr)" ;;
  esac
  echo "round24 step $step rc=$? $(( $(date +%s) - t0 )) s"
done
echo "round24 done"
