#!/usr/bin/env bash
# Round 33's GPU job: round 32's side-by-side SmolLM2 run in full, with the A/A pair and a profile of batch 16, whose
# prefill was 6-15 % slower through our backend (every layer delegated to FlashInfer) in every pass of round 32
# (../gpu_round32/README.md); then the Llama-3-8B shape the same way. Steps:
#   smoli     bench/serve_gpu.py smollm2 --interleave: flashinfer, shplb_always (our backend, every layer delegated) and
#             shplb (the launcher serves FlashInfer outright: an A/A pair with flashinfer, the noise floor) up at once,
#             each a third of --mem-fraction-static 0.5 (serve_gpu.share_memory), --sleep-on-idle; a warm-up pass
#             each, then SMOL_ROUNDS (default 3) rounds, the order rotated; then each server runs the cells of
#             SMOL_PROFILE (default 2048x16,8000x16) once more under SGLang's torch profiler (--profile: GPU busy
#             against idle, the longest idle gaps, the runtime calls that wait on the device; bench/trace_summary.py).
#   llamai    the Llama-3-8B shape (dummy weights), flashinfer and shplb (the mixed plan) up at once, each half of
#             --mem-fraction-static 0.85: 2K-64K at batch 1, 2K-16K at batch 4, LLAMA_ROUNDS (default 3) rounds.
# Calls, one warm machine, back to back, after `bash bench/device_tree.sh on`:
#   1-3  ../shared/gpu/README.md's bundle parts d00..d02
#   4    carry [".gpu/d03", "bench/results/gpu_round33/job.sh", "bench/results/default_plan/budgets.json"]:
#        cp .gpu/d03/* /tmp/parts/ && bash /tmp/parts/install-on-device 2>&1|tail -3 && rm -rf /tmp/repo &&
#        mkdir -p /tmp/repo /tmp/out && tar cf - --exclude=./.gpu . | tar xf - -C /tmp/repo && cd /tmp/repo &&
#        (setsid nohup bash bench/results/gpu_round33/job.sh > /tmp/run.log 2>&1 < /dev/null &);
#        bash bench/gpu_poll.sh 450 "round33 done"
#   5..  bash bench/gpu_poll.sh 470 "round33 done"      (while the machine is warm: results in $OUT/r.tgz)
set -u
export PYTHONUNBUFFERED=1
O=/tmp/out
mkdir -p $O
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $O/gpu.txt
for step in ${*:-smoli llamai}; do
  t0=$(date +%s)
  case $step in
    smoli) OUT=$O SMOL_SERVERS=${SMOL_SERVERS:-flashinfer,shplb_always,shplb} \
             SMOL_FLAGS="--interleave --repeats ${SMOL_ROUNDS:-3} --profile ${SMOL_PROFILE:-2048x16,8000x16}" \
             bash bench/serve_gpu.sh smollm2 > $O/smol_run.log 2>&1 ;;
    llamai) OUT=$O LLAMA_SERVERS=flashinfer,shplb LLAMA_FLAGS="--interleave --repeats ${LLAMA_ROUNDS:-3} --batches 1,4
              --lengths 2048,4096,8192,16384,32768,65536 --max-batch-tokens 65536" \
              bash bench/serve_gpu.sh llama8b > $O/llama_run.log 2>&1 ;;
    *) echo "unknown step $step (smoli, llamai)" ;;
  esac
  echo "round33 step $step rc=$? $(( $(date +%s) - t0 )) s"
done
echo "round33 done"
