"""Round 13's diagnostic: the default run's budgets (bench/results/default_plan) with the query heads named on the
command line made dense, placed for TP 3 with every layer sparse, as a plan folder for `python -m sglang_shplb eval`.
The default budgets and cpu10_d25's (round 10, same recipe from the H200's bf16 profile) share 256 of 270 patterns;
three heads dense in cpu10_d25 only are (14, 1), (17, 4), (21, 8).

    python bench/results/eval_cpu/round13/dense_heads.py OUT 14:1 17:4 21:8
"""
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from sglang_shplb.core.patterns import HeadBudget
from sglang_shplb.planning.budget import load_budgets, save_budgets

out, heads = Path(sys.argv[1]), [tuple(int(x) for x in h.split(":")) for h in sys.argv[2:]]
b = load_budgets("bench/results/default_plan")
for li, hi in heads:
    b.budgets[li][hi] = HeadBudget.dense()
    b.density[li, hi] = 1.0
save_budgets(replace(b, mode=b.mode + f", dense {heads}"), out)
subprocess.run([sys.executable, "-m", "sglang_shplb", "place", "--budgets", str(out), "--tp", "3", "--no-stock-fallback",
                "--out", str(out)], check=True)
