#!/usr/bin/env bash
# Poll a detached GPU job for up to $1 seconds (default 500): every 30 s, tar what exists (plans' weights, the
# dummy model's tokenizer and torch profiler traces left out: a returned file is at most 16 MiB) into $OUT/r.tgz,
# atomically, so a call cut at its limit still brings back the newest copy; stops early once /tmp/run.log shows $2
# (default "job done").
#   bash bench/gpu_poll.sh 480 ["job done"]
end=$(( $(date +%s) + ${1:-500} ))
marker=${2:-job done}
snap() {
  tar czf /tmp/r.tgz --exclude='*.safetensors' --exclude='jit_warm.log' --exclude='llama8b_cfg' \
    --exclude='*.trace.json.gz' /tmp/out \
    /tmp/eval_run /tmp/refine_run /tmp/run.log 2>/dev/null
  cp /tmp/r.tgz "$OUT/r.tgz.part" && mv "$OUT/r.tgz.part" "$OUT/r.tgz"
}
while [ "$(date +%s)" -lt "$end" ]; do
  sleep 30; snap
  grep -q "$marker" /tmp/run.log 2>/dev/null && break
done
tail -n 8 /tmp/run.log; tr '\r' '\n' < /tmp/eval_run/eval.log 2>/dev/null | grep -v '^\s*$' | tail -n 3
