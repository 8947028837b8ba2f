#!/usr/bin/env bash
# Round 27's GPU job (ran 2026-12-07, README.md beside it): the Llama-3-8B-shaped server (dummy weights,
# TP 1, the serving benchmark's mixed plan) with cuDNN's block-sparse route (`shplb`, SHPLB_CUDNN_BLOCKS auto),
# without it (`shplb_triton`, =0) and stock FlashInfer, 16K-128K batch 1: what round 26's 1.04-1.13x per layer
# (../gpu_round26/README.md) gives in TTFT. Then (hpg70) round 26's Llama-3-70B head-parallel cells, which ran only
# with the host sync since fixed: the route on (SHPLB_CUDNN_BLOCKS=1), then off (=0). Steps as arguments (default
# `llama hpg70`); `p64`, added after the first run showed the server never took the route (SGLang's page size 1;
# the launcher now sets 64 where the route may run): shplb (route auto, page 64), shplb_triton (route off, page 1:
# the served default before) and shplb_p64_triton (route off, page 64).
# Calls, one warm machine, back to back, after `bash bench/device_tree.sh on` (the tree travels at ~1.7 MiB):
#   1-4  ../shared/gpu/README.md's bundle parts d00..d03, the last with `bash /tmp/parts/install-on-device`
#   5    carry [".whl/one", "bench/results/gpu_round27/job.sh", CAL, "bench/results/calibration_h100_tiles.json",
#        "bench/results/default_plan/plan.json"] (the site of ../gpu_round26/make_site.sh; the rest for hpg70):
#        rm -rf /tmp/repo && mkdir -p /tmp/repo /tmp/out && tar cf - . | tar xf - -C /tmp/repo && cd /tmp/repo &&
#        (setsid nohup bash bench/results/gpu_round27/job.sh > /tmp/run.log 2>&1 < /dev/null &); bash bench/gpu_poll.sh 560 "round27 done"
#   6    bash bench/gpu_poll.sh 560 "round27 done"      (while the machine is warm: results in $OUT/r.tgz)
set -u
export PYTHONUNBUFFERED=1
O=/tmp/out
mkdir -p $O
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $O/gpu.txt
# cuDNN frontend 1.28.0 + cutlass-dsl 4.6.0 + tvm-ffi 0.1.11 beside the bundle's SGLang site (same tvm-ffi)
tar xJf .whl/one/site.tar.xz -C /tmp/site
lib=/tmp/site/tvm_ffi/lib
[ -e $lib/libtvm_ffi_testing.so ] || { nm -D --undefined-only /tmp/site/tvm_ffi/core.abi3.so | awk '{print $2}' |
  grep -i testing | sed 's/.*/int &(void) { return 0; }/' > /tmp/stub.c && gcc -shared -fPIC -o $lib/libtvm_ffi_testing.so /tmp/stub.c; }
export PYTHONPATH_EXTRA=/tmp/site/nvidia_cutlass_dsl/dsl_packages
PYTHONPATH=/tmp/site:$PYTHONPATH_EXTRA python3 -c "import cudnn, cutlass; \
from cudnn.block_sparse_attention import block_sparse_attention_forward; print('cudnn frontend', cudnn.__version__)" \
  2>&1 | tail -n 3 | tee $O/probe.txt
for step in ${*:-llama hpg70}; do
  t0=$(date +%s)
  case $step in
    llama) OUT=$O/llama LLAMA_SERVERS=flashinfer,shplb,shplb_triton \
             LLAMA_FLAGS="--lengths 16384,32768,65536,131072 --batches 1 --context-length 131200 --repeats 2" \
             bash bench/serve_gpu.sh llama8b > $O/llama_run.log 2>&1 ;;
    hpg70) for sw in 1 0; do
             SHPLB_CUDNN_BLOCKS=$sw PYTHONPATH=/tmp/site:$PYTHONPATH_EXTRA:$PWD TRITON_INTERPRET=0 \
               python3 bench/head_parallel.py --shapes llama70b --ctx 65536,131072 --tp 4,8 --plans mixed --reps 20 \
               --compare-calibration "" --calibration bench/results/head_parallel/move_calibration_round13_h100.json \
               --feedback 2 --refine 2 --time-budget-s 90 --out $O/hpg70_$sw > $O/hpg70_${sw}_run.log 2>&1
           done ;;
    p64) OUT=$O/llama_p64 LLAMA_SERVERS=shplb,shplb_triton,shplb_p64_triton \
           LLAMA_FLAGS="--lengths 16384,32768,65536,131072 --batches 1 --context-length 131200 --repeats 2" \
           bash bench/serve_gpu.sh llama8b > $O/llama_p64_run.log 2>&1 ;;
    *) echo "unknown step $step (llama, hpg70, p64)" ;;
  esac
  echo "round27 step $step rc=$? $(( $(date +%s) - t0 )) s"
done
echo "round27 done"
