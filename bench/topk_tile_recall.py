"""Quality side of ``HeadBudget(tile=128)``: attention-mass recall of top-k at 64-token blocks vs 128-token
superblocks, same fractions, same prompts, every head of SmolLM2-135M-Instruct (CPU, float32), estimator
(pooled q·k, what the kernels use) and oracle (true block mass) selections.

    python bench/topk_tile_recall.py --out bench/results      # ~2 min on 2 CPU cores
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sglang_shplb.planning.profile import default_options, profile_model  # noqa: E402
from sglang_shplb.planning.model_store import default_checkpoint  # noqa: E402
from sglang_shplb.core.patterns import Pattern  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    a = ap.parse_args()
    t0 = time.time()
    opts = default_options(topk_tiles=(64, 128))
    res = profile_model(default_checkpoint(), a.lengths, ("A",), 1, "cpu", 4, None, options=opts)
    table: dict[str, dict[str, dict[str, float]]] = {}
    for (_, n), r in sorted(res.recall.items(), key=lambda x: x[0][1]):
        for j, o in enumerate(opts):
            if o.budget.pattern is Pattern.TOPK:
                flat = r[:, :, j].flatten()
                table.setdefault(str(n), {})[o.label()] = {
                    "mean_recall": float(flat.mean()), "p10_recall": float(flat.quantile(0.1)),
                    "density": o.budget.density(n)}
    print(f"{'ctx':>5s} {'selection':10s} {'fraction':>8s} | {'64: density  recall':>20s} | {'128: density  recall':>21s}")
    for n, d in table.items():
        for fam in ("", "oracle-"):
            for o in opts:
                b = o.budget
                if o.family.startswith("topk") and b.tile == 64 and o.label().startswith(fam) and \
                        (fam or o.family == "topk"):
                    a64 = d[o.label()]
                    a128 = d[o.label().replace(")", ",tile=128)")]
                    print(f"{n:>5s} {'oracle' if fam else 'estimate':10s} {b.fraction:8.2f} | "
                          f"{a64['density']:9.3f} {a64['mean_recall']:9.4f} | {a128['density']:9.3f} "
                          f"{a128['mean_recall']:9.4f}  ({a128['mean_recall'] - a64['mean_recall']:+.4f})")
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "topk_tile_recall.json"), "w") as f:
        json.dump({"model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantised, float32, CPU)",
                   "date": _dt.date.today().isoformat(), "prompts": res.prompts, "recall": table,
                   "wall_s": time.time() - t0}, f, indent=1)


if __name__ == "__main__":
    main()
