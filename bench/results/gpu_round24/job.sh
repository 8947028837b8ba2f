#!/usr/bin/env bash
# Round 24's GPU job (2026-12-06): split-KV for dense pieces after a long prefix (dense_pieces.prefix_splits).
# No bundle (the device's own torch 2.11 / Triton 3.6; no SGLang, no FlashInfer), detached from a copy of the tree,
# results under /tmp/out:
#   rm -rf /tmp/repo && mkdir -p /tmp/repo /tmp/out && tar cf - . | tar xf - -C /tmp/repo && cd /tmp/repo &&
#   (setsid nohup bash bench/results/gpu_round24/job.sh > /tmp/run.log 2>&1 < /dev/null &); bash bench/gpu_poll.sh 540 "round24 done"
# Steps (name a subset as arguments; default all, in this order):
#   ps      bench/prefix_splits.py: a dense piece after a prefix at split counts around prefix_splits' choice, ~1 min
#   uc      bench/unit_cost.py: one moved piece (dense, top-k) after 32K-96K keys, 1K-16K rows, by kernel, against its
#           price; dense pieces split-KV vs the prefix in one call, ~2 min
#   hpu     bench/head_parallel.py, llama8b 64K / 128K TP 8 (the cells where round 23's refine moved most), both plans,
#           --unsplit-prefixes: the prefix of every dense piece in one call, as before, ~2 min
#   hps     the same cells with split-KV (the default), ~2 min
#   hp      (not by default) bench/head_parallel.py over round 18's 16 cells as round 23 ran them (--feedback 2
#           --refine 3), now with split-KV, ~6 min
set -u
steps=${*:-uc ps hpu hps}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD TRITON_INTERPRET=0
O=/tmp/out
CAL=bench/results/head_parallel/move_calibration_round13_h100.json
mkdir -p $O
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $O/gpu.txt
git log -1 --format=%H 2>/dev/null | tee $O/commit.txt
for step in $steps; do
  t0=$(date +%s)
  case $step in
    ps) python3 bench/prefix_splits.py --out $O/ps > $O/ps_run.log 2>&1 ;;
    uc) python3 bench/unit_cost.py --out $O/uc > $O/uc_run.log 2>&1 ;;
    hpu|hps) python3 bench/head_parallel.py --shapes llama8b --ctx 65536,131072 --tp 8 --plans profiled,mixed \
          --reps 20 --compare-calibration "" --calibration $CAL --feedback 2 --refine 3 --time-budget-s 150 \
          $([ $step = hpu ] && echo --unsplit-prefixes) --out $O/$step > $O/${step}_run.log 2>&1 ;;
    hp) python3 bench/head_parallel.py --shapes llama8b,llama70b \
          --ctx 65536,131072 --tp 4,8 --plans profiled,mixed --reps 20 --compare-calibration "" \
          --calibration $CAL --feedback 2 --refine 3 --time-budget-s 420 --out $O/hp > $O/hp_run.log 2>&1 ;;
    *) echo "unknown step $step (ps, uc, hpu, hps, hp)" ;;
  esac
  echo "round24 step $step rc=$? $(( $(date +%s) - t0 )) s"
done
echo "round24 done"
