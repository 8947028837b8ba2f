#!/usr/bin/env bash
# Round 31's GPU job (README.md beside it): SmolLM2, the default plan (stock in every layer at 8K), two steps.
#   onebatch  bench/one_batch.py: SGLang's one_batch (the model runner alone: no scheduler, no HTTP), FlashInfer
#             against the shplb backend, 2 rounds alternating, batch 1/4/16 x 2K/8K: is round 30's SmolLM2 gap
#             (decode 0.94-0.98x by medians) inside the forward? Its first FlashInfer run also fills FlashInfer's
#             JIT cache for SmolLM2's shapes, which round 30's first server paid in its passes.
#   smol      SmolLM2's serving grid, 2K-8K x batch 1/4/16, five passes; servers SMOL_SERVERS (default
#             flashinfer,shplb_always: --shplb-always-backend, through the shplb backend as round 30 served it; add
#             shplb, for which the launcher now serves the stock backend outright, when device time allows).
# Calls, one warm machine, back to back, after `bash bench/device_tree.sh on`:
#   1-4  ../shared/gpu/README.md's bundle parts d00..d03, the last with `bash /tmp/parts/install-on-device`
#   5    carry ["bench/results/gpu_round31/job.sh", "bench/results/default_plan/budgets.json"]:
#        rm -rf /tmp/repo && mkdir -p /tmp/repo /tmp/out && tar cf - . | tar xf - -C /tmp/repo && cd /tmp/repo &&
#        (setsid nohup bash bench/results/gpu_round31/job.sh > /tmp/run.log 2>&1 < /dev/null &); bash bench/gpu_poll.sh 560 "round31 done"
#   6..  bash bench/gpu_poll.sh 560 "round31 done"      (while the machine is warm: results in $OUT/r.tgz)
set -u
export PYTHONUNBUFFERED=1
O=/tmp/out
mkdir -p $O
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $O/gpu.txt
for step in ${*:-onebatch smol}; do
  t0=$(date +%s)
  case $step in
    onebatch) OUT=$O ONEBATCH_FLAGS="--rounds 2" bash bench/serve_gpu.sh onebatch > $O/onebatch_run.log 2>&1 ;;
    smol) OUT=$O SMOL_SERVERS=${SMOL_SERVERS:-flashinfer,shplb_always} bash bench/serve_gpu.sh smollm2 > $O/smol_run.log 2>&1 ;;
    *) echo "unknown step $step (onebatch, smol)" ;;
  esac
  echo "round31 step $step rc=$? $(( $(date +%s) - t0 )) s"
done
echo "round31 done"
