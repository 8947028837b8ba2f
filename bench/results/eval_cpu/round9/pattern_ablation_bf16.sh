cd /work/main
. .venv/bin/activate
P=bench/results/eval_h200_round8/plans/refined8_d30
export OMP_NUM_THREADS=1
python bench/pattern_ablation.py $P --task qa --length 2048 --prompts 24 --dtype bfloat16 --variants plan "plan, no dense tail" --out /tmp/work/r9/abl
python bench/pattern_ablation.py $P --task passkey --length 4096 --prompts 24 --dtype bfloat16 --variants plan "plan, no dense tail" --out /tmp/work/r9/abl
echo done $(date -u +%T)
