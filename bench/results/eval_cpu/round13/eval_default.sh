# Round 13: the budgets `python -m sglang_shplb plan` now makes by default (bench/results/default_plan), placed
# with every layer sparse (default13_sparse: place --tp 3 --no-stock-fallback; the default plan itself runs the
# stock backend at every length SmolLM2 serves), in float32 on
# this CPU, six tasks, 20 per task at 2K and 4K. Each of the four runs repeats the settings of an earlier run
# whose dense answers it reuses (bench/reuse_dense_answers.py: same dense command line, same prompts; rounds 11
# and 12 gave identical dense answers for all 160 prompts they share, under two different command lines), so
# only the sparse server runs.
set -e
cd /work/main
. .venv/bin/activate
E=bench/results/eval_cpu
W=/tmp/work/r13
run() {  # name, earlier eval folder, eval flags
  local name=$1 old=$2; shift 2
  mkdir -p $W/$name
  python bench/reuse_dense_answers.py $E/$old/eval.json $W/$name
  python -m sglang_shplb eval --plan bench/results/eval_cpu/round13/default13_sparse --device cpu --per-task 20 "$@" --out $W/$name
  echo "$name done $(date -u +%T)"
}
echo start $(date -u +%T)
run default_2k round12/default_plan_2k --lengths 2048 --tasks passkey multikey multivalue qa
run default_vt_cwe_2k round11/cpu10_d25_vt_cwe --lengths 2048 --tasks vt cwe
run default_4k round12/default_plan_4k --lengths 4096 --tasks passkey multikey multivalue qa
run default_vt_cwe_4k round12/cpu10_d25_vt_cwe_4k --lengths 4096 --tasks vt cwe
