#!/usr/bin/env bash
# Round 26's GPU job (2026-12-07). No bundle: the device's own torch 2.11 / Triton 3.6, plus cuDNN's block-sparse
# attention as an SGLang 0.5.17 install would have it (nvidia-cudnn-frontend 1.28.0, the newest whose
# nvidia-cutlass-dsl need meets SGLang's pin 4.6.0; apache-tvm-ffi 0.1.11). The six wheels unpacked into one
# site directory, less what the block-sparse forward does not import (headers, static and aarch64 libraries,
# tvm-ffi's testing library, cudnn's gemm / linear / DeepSeek / native sparse attention modules), xz -9e:
# 62.0 MiB, carried in one call as .whl/one/site.tar.xz (built by make_site.sh beside this file):
#   carry [".whl/one", "bench/results/gpu_round26/job.sh", CAL, "bench/results/calibration_h100_tiles.json",
#          "bench/results/default_plan"]:
#     rm -rf /tmp/repo && mkdir -p /tmp/repo /tmp/out && tar cf - . | tar xf - -C /tmp/repo && cd /tmp/repo &&
#     (setsid nohup bash bench/results/gpu_round26/job.sh > /tmp/run.log 2>&1 < /dev/null &); bash bench/gpu_poll.sh 560 "round26 done"
# (bench/results is left out of the tree for these calls, `bash bench/device_tree.sh on`: its 57 MiB would not fit
# the 64 MiB a call carries.)
# Steps (name a subset as arguments; default `cb hpg`):
#   cb   bench/cudnn_blocks.py: cuDNN's block-sparse route vs the Triton kernels vs dense SDPA, 16K-128K, ~3 min
#   hpg  issue 13's goal cells (mixed plan, llama8b / llama70b, 64K / 128K, TP 4 / 8) with the route on
#        (SHPLB_CUDNN_BLOCKS=1), then off (=0), feedback 2, refine 2, ~2 x 2 min
#   hpp  the llama8b TP 8 head-parallel cells, each rank also timed as 4 layers back to back (--pipelined 4), ~2 min
set -u
steps=${*:-cb hpg}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
O=/tmp/out
CAL=bench/results/head_parallel/move_calibration_round13_h100.json
mkdir -p $O
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $O/gpu.txt
t0=$(date +%s)
mkdir -p /tmp/site && tar xJf .whl/one/site.tar.xz -C /tmp/site
# the site tar of 2026-12-07 pruned tvm-ffi's testing library, which tvm_ffi.core links against (one symbol): a
# stub in its place (make_site.sh now keeps the library)
lib=/tmp/site/tvm_ffi/lib
[ -e $lib/libtvm_ffi_testing.so ] || { nm -D --undefined-only /tmp/site/tvm_ffi/core.abi3.so | awk '{print $2}' |
  grep -i testing | sed 's/.*/int &(void) { return 0; }/' > /tmp/stub.c && gcc -shared -fPIC -o $lib/libtvm_ffi_testing.so /tmp/stub.c; }
export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:$PWD TRITON_INTERPRET=0
python3 -c "import torch, cudnn, cutlass; from cudnn.block_sparse_attention import block_sparse_attention_forward; \
print('cudnn frontend', cudnn.__version__, 'backend', cudnn.backend_version(), 'cutlass-dsl', cutlass.__version__)" \
  2>&1 | tail -n 5 | tee $O/probe.txt
grep -q "^cudnn frontend" $O/probe.txt || { echo "cuDNN's block-sparse attention does not import: steps skipped"; steps=; }
echo "install $(( $(date +%s) - t0 )) s"
for step in $steps; do
  t0=$(date +%s)
  case $step in
    cb) python3 bench/cudnn_blocks.py --out $O/cb --budget-s ${CB_BUDGET:-180} --ctx ${CB_CTX:-16384,32768,65536,131072} \
          > $O/cb_run.log 2>&1 ;;
    hpg) for sw in 1 0; do
          SHPLB_CUDNN_BLOCKS=$sw python3 bench/head_parallel.py --shapes llama8b,llama70b --ctx 65536,131072 --tp 4,8 \
            --plans mixed --reps 20 --compare-calibration "" --calibration $CAL --feedback 2 --refine 2 \
            --time-budget-s 90 --out $O/hpg$sw > $O/hpg${sw}_run.log 2>&1
        done ;;
    hpp) python3 bench/head_parallel.py --shapes llama8b --ctx 65536,131072 --tp 8 --plans profiled,mixed \
          --reps 20 --compare-calibration "" --calibration $CAL --feedback 2 --refine 3 --open-cuts --pipelined 4 \
          --time-budget-s 120 --out $O/hpp > $O/hpp_run.log 2>&1 ;;
    *) echo "unknown step $step (cb, hpg, hpp)" ;;
  esac
  echo "round26 step $step rc=$? $(( $(date +%s) - t0 )) s"
done
echo "round26 done"
