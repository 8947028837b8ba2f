#!/usr/bin/env bash
# Round 32's GPU job: SmolLM2 side by side, the machine's drift cancelled (what ran: README.md beside this file).
# Round 31 (../gpu_round31/README.md) found that a SmolLM2 server's decode moves 430 -> 711 tok/s from pass to pass with
# the clock, more than servers differ, so servers run one after the other compare times, not servers. Step:
#   smoli     bench/serve_gpu.py smollm2 --interleave: flashinfer, shplb_always (through our backend, every layer
#             delegated) and shplb (the launcher serves FlashInfer outright: an A/A pair with flashinfer, the noise
#             floor) up at once, each holding a third of the card's
#             --mem-fraction-static 0.5 (serve_gpu.share_memory) and --sleep-on-idle; a warm-up pass
#             each, then 6 rounds in which every server takes one pass over 2K-8K x batch 1/4/16, the order rotated
#             each round (SMOL_ROUNDS, default 6: each server first twice). Medians per cell.
#   llamai    the Llama-3-8B shape (dummy weights) the same way, flashinfer and shplb (the mixed plan) up at once, each
#             holding half of --mem-fraction-static 0.85: 2K-64K at batch 1, 2K-16K at batch 4 (--max-batch-tokens 65536:
#             an H100's half holds 16 GB of weights and ~17 GB of KV, too little for 128K), 4 rounds. The stock
#             buckets (<= 16K) are issue 15's never-slower cells for this model, drift cancelled.
# Calls, one warm machine, back to back, after `bash bench/device_tree.sh on`:
#   1-4  ../shared/gpu/README.md's bundle parts d00..d03, the last with `bash /tmp/parts/install-on-device`
#   5    carry ["bench/results/gpu_round32/job.sh", "bench/results/default_plan/budgets.json"]:
#        rm -rf /tmp/repo && mkdir -p /tmp/repo /tmp/out && tar cf - --exclude=./.gpu . | tar xf - -C /tmp/repo && cd /tmp/repo &&
#        (setsid nohup bash bench/results/gpu_round32/job.sh > /tmp/run.log 2>&1 < /dev/null &); bash bench/gpu_poll.sh 480 "round32 done"
#   6..  bash bench/gpu_poll.sh 480 "round32 done"      (while the machine is warm: results in $OUT/r.tgz)
# (Calls 4 and 5 fit one call: carry .gpu/d03 with the two files, install, then start the job; round 31 did.)
set -u
export PYTHONUNBUFFERED=1
O=/tmp/out
mkdir -p $O
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $O/gpu.txt
for step in ${*:-smoli llamai}; do
  t0=$(date +%s)
  case $step in
    smoli) OUT=$O SMOL_SERVERS=${SMOL_SERVERS:-flashinfer,shplb_always,shplb} SMOL_FLAGS="--interleave --repeats ${SMOL_ROUNDS:-6}" \
             bash bench/serve_gpu.sh smollm2 > $O/smol_run.log 2>&1 ;;
    llamai) OUT=$O LLAMA_SERVERS=flashinfer,shplb LLAMA_FLAGS="--interleave --repeats 4 --batches 1,4
              --lengths 2048,4096,8192,16384,32768,65536 --max-batch-tokens 65536" \
              bash bench/serve_gpu.sh llama8b > $O/llama_run.log 2>&1 ;;
    *) echo "unknown step $step (smoli, llamai)" ;;
  esac
  echo "round32 step $step rc=$? $(( $(date +%s) - t0 )) s"
done
echo "round32 done"
