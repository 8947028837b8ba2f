#!/usr/bin/env bash
# Round 15's bare-machine call (no SGLang bundle): the steps named on the command line, in order, results under
# /tmp/out (bench/gpu_poll.sh brings them back). Run detached from the repository root:
#   (setsid nohup bash bench/results/gpu_round15/job.sh chunked index home tests > /tmp/run.log 2>&1 < /dev/null &)
set -u
export PYTHONPATH=$PWD TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
O=/tmp/out
mkdir -p $O
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $O/gpu.txt
for step in "$@"; do
  t0=$(date +%s)
  case $step in
    tests) python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_triton_index.py \
             tests/test_tile_prefill.py ${TESTS_K:+-k "$TESTS_K"} > $O/gpu_tests.log 2>&1
           python3 -m pytest -q -p no:cacheprovider tests/test_head_parallel.py -k "piece or after_a_prefix" \
             >> $O/gpu_tests.log 2>&1 ;;
    chunked) python3 bench/chunked_prefill.py llama8b --ctx ${CP_CTX:-32768,65536,131072} --out $O/chunked \
               > $O/chunked_run.log 2>&1 ;;
    index) python3 bench/index_build.py --ctx ${IB_CTX:-16384,65536,131072} --layouts paged --out $O/index \
             > $O/index_run.log 2>&1 ;;
    home) python3 bench/home_calls.py --shapes ${HOME_SHAPES:-llama8b,llama70b} --out $O/home > $O/home_run.log 2>&1 ;;
    *) echo "unknown step $step" ;;
  esac
  echo "step $step rc=$? $(( $(date +%s) - t0 )) s"
done
echo "job done"
