#!/usr/bin/env bash
# Round 29's GPU job for the next session (README.md beside it: what ran this round used ../gpu_round28/job.sh).
# Steps as arguments (default `tail grid smol`):
#   tail  the dense tail of a chunked prefill, one Llama-3-8B layer: bench/tail.py at every 8K chunk end up to 128K,
#         summed per prompt over every chunk (as served until ffc249b) against the last chunk only (now). No SGLang.
#   grid  stock FlashInfer then shplb, Llama-3-8B shape (dummy weights), 32K-128K at batch 1 and 32K-64K at batch 4,
#         131,200-token context, two measured passes: the TTFT with the tail in the prompt's last chunk only (the
#         change since round 29's `ab`: 5.047 s at 128K, 2.165 s at 64K, 1.033 s at 32K, FlashInfer 15.066 / 4.455 /
#         1.461 s on one H100).
#   smol  SmolLM2, the default plan (stock in every layer up to 8K), servers alternating (shplb,flashinfer,shplb#2,
#         flashinfer#2), 2K-8K x batch 1/4/16, five passes: round 29's grid (flashinfer,shplb,flashinfer#2) had the
#         A/A pair itself at 0.69-0.99 in TTFT (medians) and shplb behind at batch 16 by its fastest passes.
# Calls, one warm machine, back to back, after `bash bench/device_tree.sh on`:
#   1-4  ../shared/gpu/README.md's bundle parts d00..d03, the last with `bash /tmp/parts/install-on-device`
#   5    carry [".whl/one", "bench/results/gpu_round29/job.sh", "bench/results/default_plan/budgets.json"]:
#        rm -rf /tmp/repo && mkdir -p /tmp/repo /tmp/out && tar cf - . | tar xf - -C /tmp/repo && cd /tmp/repo &&
#        (setsid nohup bash bench/results/gpu_round29/job.sh > /tmp/run.log 2>&1 < /dev/null &); bash bench/gpu_poll.sh 560 "round29 done"
#   6..  bash bench/gpu_poll.sh 560 "round29 done"      (while the machine is warm: results in $OUT/r.tgz)
set -u
export PYTHONUNBUFFERED=1
O=/tmp/out
mkdir -p $O
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $O/gpu.txt
. bench/cudnn_site.sh $O
for step in ${*:-tail grid smol}; do
  t0=$(date +%s)
  case $step in
    tail) PYTHONPATH=$PWD TRITON_INTERPRET=0 python3 bench/tail.py --shapes llama8b_tp1 --batches 1 \
            --lengths "$(seq -s, 8192 8192 131072)" --out $O/tail > $O/tail.log 2>&1 ;;
    grid) OUT=$O/llama LLAMA_SERVERS=flashinfer,shplb \
            LLAMA_FLAGS="--lengths 32768,65536,131072 --batches 1,4 --context-length 131200 --repeats 2" \
            bash bench/serve_gpu.sh llama8b > $O/llama_run.log 2>&1 ;;
    smol) OUT=$O SMOL_SERVERS=shplb,flashinfer,shplb#2,flashinfer#2 bash bench/serve_gpu.sh smollm2 \
            > $O/smol_run.log 2>&1 ;;
    *) echo "unknown step $step (tail, grid, smol)" ;;
  esac
  echo "round29 step $step rc=$? $(( $(date +%s) - t0 )) s"
done
echo "round29 done"
