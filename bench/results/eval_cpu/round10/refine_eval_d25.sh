# Round 10: a float32 refine of needle_d20_min16 to 0.25 at 8K with the tail counted (one round), then the eval
# of it at 2K on the pass key (the task needle_d20_tail lost; CPU time): the frontier point between round 9's
# cpu9_d30 (0.300) and needle_d20_tail (0.213).
set -e
cd /work/main
. .venv/bin/activate
R=bench/results/eval_h200_round5/plans
W=/tmp/work/r10/cpu10_d25
echo start $(date -u +%T)
OMP_NUM_THREADS=1 python -m sglang_shplb refine --budgets $R/needle_d20_min16 --profile bench/results/eval_h200/profile \
  --density-target 0.25 --refine-prompts 16 --refine-lengths 2048 --out $W
python -m sglang_shplb place --budgets $W --tp 3 --no-stock-fallback --out $W
echo refined $(date -u +%T)
python -m sglang_shplb eval --plan $W --device cpu --lengths 2048 --per-task 20 --tasks passkey
echo done $(date -u +%T)
