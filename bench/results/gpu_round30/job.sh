#!/usr/bin/env bash
# Round 30's GPU job for the next session (README.md beside it: what ran this round used ../gpu_round29/job.sh).
# Steps as arguments (default `onebatch prof smol`), all SmolLM2, the default plan (stock in every layer):
#   onebatch  bench/one_batch.py: SGLang's one_batch (the model runner alone: no scheduler, no HTTP), FlashInfer
#             against shplb, 3 rounds alternating, batch 1/4/16 x 2K/8K: is round 30's SmolLM2 gap (shplb#2 against
#             flashinfer#2: decode 0.94-0.98x, TTFT 0.95-1.00x by medians) inside the forward or outside it? Its
#             first FlashInfer run also fills FlashInfer's JIT cache for SmolLM2's shapes, which round 30's first
#             server paid in its passes.
#   prof      the same, 2 rounds at batch 1 and 16 x 2K, torch profiler (CPU + GPU) over 5 decode steps from step 32:
#             per run a trace in one_batch/<backend>_round<r>_profile and the key-averages table in its log.
#   smol      SmolLM2's serving grid, servers alternating with FlashInfer first (flashinfer,shplb,flashinfer#2,shplb#2:
#             round 30 had shplb first in each pair), 2K-8K x batch 1/4/16, five passes, on a machine whose JIT
#             cache onebatch filled (round 30's first server paid it in its passes).
# Calls, one warm machine, back to back, after `bash bench/device_tree.sh on`:
#   1-4  ../shared/gpu/README.md's bundle parts d00..d03, the last with `bash /tmp/parts/install-on-device`
#   5    carry ["bench/results/gpu_round30/job.sh", "bench/results/default_plan/budgets.json"]:
#        rm -rf /tmp/repo && mkdir -p /tmp/repo /tmp/out && tar cf - . | tar xf - -C /tmp/repo && cd /tmp/repo &&
#        (setsid nohup bash bench/results/gpu_round30/job.sh > /tmp/run.log 2>&1 < /dev/null &); bash bench/gpu_poll.sh 560 "round30 done"
#   6..  bash bench/gpu_poll.sh 560 "round30 done"      (while the machine is warm: results in $OUT/r.tgz)
set -u
export PYTHONUNBUFFERED=1
O=/tmp/out
mkdir -p $O
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $O/gpu.txt
for step in ${*:-onebatch prof smol}; do
  t0=$(date +%s)
  case $step in
    onebatch) OUT=$O ONEBATCH_FLAGS="--rounds 3" bash bench/serve_gpu.sh onebatch > $O/onebatch_run.log 2>&1 ;;
    prof) OUT=$O/prof ONEBATCH_FLAGS="--rounds 2 --batches 1,16 --input-lens 2048 -- --profile --profile-stage decode
            --profile-steps 5" bash bench/serve_gpu.sh onebatch > $O/prof_run.log 2>&1 ;;
    smol) OUT=$O SMOL_SERVERS=flashinfer,shplb,flashinfer#2,shplb#2 bash bench/serve_gpu.sh smollm2 \
            > $O/smol_run.log 2>&1 ;;
    *) echo "unknown step $step (onebatch, prof, smol)" ;;
  esac
  echo "round30 step $step rc=$? $(( $(date +%s) - t0 )) s"
done
echo "round30 done"
