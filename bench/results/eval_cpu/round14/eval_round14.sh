# Round 14 (2026-12-05 23:20 - 2026-12-06 00:10 UTC, commit 840d616, this 2-core CPU): the multi-value needle at 2K,
# 60 prompts (round 13's 20 and 40 more), the default budgets placed all-sparse beside cpu10_d25, one dense run.
# The plans are copied first: eval writes its answers into the plan folder it is given.
set -e
cd /work/main
. .venv/bin/activate
W=/tmp/work/r14
mkdir -p $W && cp -r bench/results/eval_cpu/round13/default13_sparse bench/results/eval_cpu/round10/cpu10_d25 $W/
cd $W
python -m sglang_shplb eval --plan default13_sparse cpu10_d25 --device cpu --lengths 2048 --per-task 60 \
  --tasks multivalue --out $W/mv60
# then, 00:38-00:56 UTC, the pass key at 2K the same way (the default budgets only), commit 625c052's eval:
python -m sglang_shplb eval --plan default13_sparse --device cpu --lengths 2048 --per-task 60 --tasks passkey --out $W/pk60
# and, 01:14-01:30 UTC, the fact-list question at 2K (commit 4545ac4's eval):
python -m sglang_shplb eval --plan default13_sparse --device cpu --lengths 2048 --per-task 60 --tasks qa --out $W/qa60
