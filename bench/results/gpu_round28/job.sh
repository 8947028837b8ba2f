#!/usr/bin/env bash
# Round 28's GPU job (README.md beside it). Steps as arguments (default `grid cp plug smol`):
#   cp    one Llama-3-8B layer through a chunked prefill (bench/chunked_prefill.py --profile, 8K chunks over a 64-slot
#         page pool, as the server now runs it on CUDA), cuDNN's route at auto then off: where a chunk's time goes
#         with the route, and the top-k pool kernel reading only the KV heads that hold top-k heads (this round);
#         then one unchunked 64K prefill, the route in 16K-row pieces against the Triton kernels.
#   grid  issue 15's never-slower grid on HEAD (the launcher's --page-size 64 since round 27 had run at batch 1 only):
#         stock FlashInfer then shplb, Llama-3-8B shape (dummy weights), 2K-128K x batch 1/4/16, 131,200-token
#         context, two measured passes per server.
#   plug  the same plan through SGLang's own launcher (`shplb_sglang`: `python -m sglang.launch_server
#         --attention-backend shplb`, SHPLB_PLAN set, no --page-size): the plugin's page-size hook, 64K and 128K.
#   ab    (added after the run, for the next session) one process, batch 1, 32K-128K: flashinfer, shplb (the
#         launcher as now: no bucketing switch), shplb_bucketed (the switch on, as before round 28) and shplb_route1
#         (the route at every call it can run, against auto's 5e9 threshold): the two A/Bs round 28 could not run.
#   smol  SmolLM2, the default plan: flashinfer, shplb, flashinfer#2 (the A/A pair), 2K-8K x batch 1/4/16.
# Calls, one warm machine, back to back, after `bash bench/device_tree.sh on`:
#   1-4  ../shared/gpu/README.md's bundle parts d00..d03, the last with `bash /tmp/parts/install-on-device`
#   5    carry [".whl/one", "bench/results/gpu_round28/job.sh", "bench/results/default_plan"]:
#        rm -rf /tmp/repo && mkdir -p /tmp/repo /tmp/out && tar cf - . | tar xf - -C /tmp/repo && cd /tmp/repo &&
#        (setsid nohup bash bench/results/gpu_round28/job.sh > /tmp/run.log 2>&1 < /dev/null &); bash bench/gpu_poll.sh 560 "round28 done"
#   6..  bash bench/gpu_poll.sh 560 "round28 done"      (while the machine is warm: results in $OUT/r.tgz)
set -u
export PYTHONUNBUFFERED=1
O=/tmp/out
mkdir -p $O
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $O/gpu.txt
# cuDNN frontend 1.28.0 + cutlass-dsl 4.6.0 + tvm-ffi 0.1.11 beside the bundle's SGLang site (../gpu_round26/make_site.sh)
tar xJf .whl/one/site.tar.xz -C /tmp/site
lib=/tmp/site/tvm_ffi/lib
[ -e $lib/libtvm_ffi_testing.so ] || { nm -D --undefined-only /tmp/site/tvm_ffi/core.abi3.so | awk '{print $2}' |
  grep -i testing | sed 's/.*/int &(void) { return 0; }/' > /tmp/stub.c && gcc -shared -fPIC -o $lib/libtvm_ffi_testing.so /tmp/stub.c; }
export PYTHONPATH_EXTRA=/tmp/site/nvidia_cutlass_dsl/dsl_packages
PYTHONPATH=/tmp/site:$PYTHONPATH_EXTRA python3 -c "import cudnn, cutlass; \
from cudnn.block_sparse_attention import block_sparse_attention_forward; print('cudnn frontend', cudnn.__version__)" \
  2>&1 | tail -n 3 | tee $O/probe.txt
for step in ${*:-grid cp plug smol}; do
  t0=$(date +%s)
  case $step in
    cp) for sw in auto 0; do
          SHPLB_CUDNN_BLOCKS=$sw PYTHONPATH=/tmp/site:$PYTHONPATH_EXTRA:$PWD TRITON_INTERPRET=0 \
            python3 bench/chunked_prefill.py llama8b --profile --out $O/cp_$sw > $O/cp_${sw}.log 2>&1
        done
        # one unchunked 64K prefill: the route in 16K-row pieces (ROUTE_MAX_ROWS), checked against the Triton route
        PYTHONPATH=/tmp/site:$PYTHONPATH_EXTRA:$PWD TRITON_INTERPRET=0 python3 bench/chunked_prefill.py llama8b \
          --ctx 65536 --chunk 65536 --out $O/cp_whole > $O/cp_whole.log 2>&1 ;;
    grid) OUT=$O/llama LLAMA_SERVERS=flashinfer,shplb LLAMA_FLAGS="--context-length 131200 --repeats 2" \
            bash bench/serve_gpu.sh llama8b > $O/llama_run.log 2>&1 ;;
    plug) OUT=$O/plug LLAMA_SERVERS=shplb_sglang LLAMA_FLAGS="--lengths 65536,131072 --batches 1 --context-length 131200" \
            bash bench/serve_gpu.sh llama8b > $O/plug_run.log 2>&1 ;;
    ab) OUT=$O/ab LLAMA_SERVERS=flashinfer,shplb,shplb_bucketed,shplb_route1 \
          LLAMA_FLAGS="--lengths 32768,65536,131072 --batches 1 --context-length 131200 --repeats 2" \
          bash bench/serve_gpu.sh llama8b > $O/ab_run.log 2>&1 ;;
    smol) OUT=$O bash bench/serve_gpu.sh smollm2 > $O/smol_run.log 2>&1 ;;
    *) echo "unknown step $step (cp, grid, plug, ab, smol)" ;;
  esac
  echo "round28 step $step rc=$? $(( $(date +%s) - t0 )) s"
done
echo "round28 done"
