set -e
cd /work/main
. .venv/bin/activate
R=bench/results/eval_h200_round5/plans
name=$1; shift
echo start $(date -u +%T)
OMP_NUM_THREADS=1 python -m sglang_shplb refine --budgets $R/needle_d20_min16 --profile bench/results/eval_h200/profile \
  --density-target 0.3 --refine-prompts 16 --refine-lengths 2048 "$@" --out /tmp/work/r9/$name
python -m sglang_shplb place --budgets /tmp/work/r9/$name --tp 3 --no-stock-fallback --out /tmp/work/r9/$name
echo done $(date -u +%T)
