# Round 11: a float32 refine of needle_d10_min16 to 0.20 at 8K with the tail counted, placed sparse everywhere,
# then its eval at 2K on the four tasks dense SmolLM2 can do: the refined method's next point below round 10's
# cpu10_d25 (0.252, within -2 on all four tasks in bf16 and on the pass key in float32).
set -e
cd /work/main
. .venv/bin/activate
R=bench/results/eval_h200_round5/plans
W=/tmp/work/r11/cpu11_d20
echo start $(date -u +%T)
OMP_NUM_THREADS=1 python -m sglang_shplb refine --budgets $R/needle_d10_min16 --profile bench/results/eval_h200/profile \
  --density-target 0.20 --refine-prompts 16 --refine-lengths 2048 --out $W
python -m sglang_shplb place --budgets $W --tp 3 --no-stock-fallback --out $W
echo refined $(date -u +%T)
python -m sglang_shplb eval --plan $W --device cpu --lengths 2048 --per-task 20 --tasks passkey multikey multivalue qa
echo done $(date -u +%T)
