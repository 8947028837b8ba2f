"""How much faster than FlashInfer can a plan make batch-1 decode at most? An Amdahl bound from FlashInfer's own
decode rate in a ``bench/serve_gpu.py`` result, with the pages the plan's decode reads.

* **Fit.** FlashInfer's time per decode step over the lengths is ``t(n) = c + a n``: ``a n`` reads every KV page
  of every layer once, ``c`` the rest of the step (the weights, norms, sampling, launches), which no attention
  backend changes. Least squares over the cells (batch 1).
* **Plan.** A KV group reads at least the pages of its widest head and at most all of its heads' pages
  (:meth:`HeadBudget.decode_pages` of :func:`decode_budget`); its share of the group's pages at ``n`` tokens,
  averaged over the layer's groups and the layers, is ``r(n)``. Read as fast per byte as FlashInfer reads, the
  step is at best ``c + a n r(n)`` (``r`` at the widest head: the bound); with attention free, ``c``.
* **Printed, per length:** FlashInfer's step and the fit, the plan's page share, the two bounds as steps and as
  ratios over FlashInfer, and the plan's measured ratio (``shplb``, where its run decoded sparse: a plan that
  decodes stock shows 1.00 by construction), against the goals (``--goal 65536:1.6``).

    python bench/decode_bound.py bench/results/serve_h100_round16/serve_llama8b_h100.json \\
        bench/results/serve_h100_round16/plan_shplb.json --out bench/results/decode_bound
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ttft_bound import bound_parser, goals_of, write_bound  # noqa: E402  (bench/ttft_bound.py)

from sglang_shplb.core.patterns import BLOCK, HeadBudget, decode_budget  # noqa: E402


def rates(doc: dict, server: str) -> dict[int, float]:
    """Batch-1 decode tokens/s of ``server`` per prompt length."""
    run = next((r for r in doc["runs"] if r["server"] == server), None)
    if run is None:
        raise SystemExit(f"no {server!r} run in the result (servers: {[r['server'] for r in doc['runs']]})")
    return {c["length"]: c["decode_tok_s"] for c in run["cells"]
            if c["batch"] == 1 and c.get("decode_tok_s") == c.get("decode_tok_s")}


def fit(ns: list[int], steps: list[float]) -> tuple[float, float]:
    """``(c, a)`` of ``t = c + a n`` (seconds per step, per token of context) by least squares."""
    if len(ns) < 2:
        raise SystemExit(f"FlashInfer decoded at {len(ns)} length(s) at batch 1: the fit needs two or more")
    x = np.array([[1.0, n] for n in ns])
    c, a = np.linalg.lstsq(x, np.array(steps), rcond=None)[0]
    return float(c), float(a)


def page_share(budgets: list[list[HeadBudget]], n: int, num_kv_heads: int) -> tuple[float, float]:
    """``(widest, summed)``: the share of the pages a KV group reads at ``n`` tokens at its widest head's count
    (the least its union can be) and at its heads' sum capped at all pages (the most), averaged over groups."""
    pages = -(-n // BLOCK)
    lo, hi = [], []
    for layer in budgets:
        group = len(layer) // num_kv_heads
        for g in range(num_kv_heads):
            per = [decode_budget(b).decode_pages(pages) for b in layer[g * group:(g + 1) * group]]
            lo.append(max(per) / pages)
            hi.append(min(pages, sum(per)) / pages)
    return float(np.mean(lo)), float(np.mean(hi))


def bound_rows(doc: dict, budgets: list[list[HeadBudget]], num_kv_heads: int, goals: dict[int, float]) -> dict:
    fi, ours = rates(doc, "flashinfer"), rates(doc, "shplb")
    ns = sorted(fi)
    c, a = fit(ns, [1.0 / fi[n] for n in ns])
    rows = []
    for n in ns:
        step, attn = 1.0 / fi[n], a * n
        lo, hi = page_share(budgets, n, num_kv_heads)
        row = {"length": n, "flashinfer_step_ms": step * 1e3, "fit_step_ms": (c + attn) * 1e3,
               "attention_ms": attn * 1e3, "page_share_widest": lo, "page_share_summed": hi,
               "bound_plan_ms": (c + attn * lo) * 1e3, "bound_free_ms": c * 1e3}
        row["ratio_bound_plan"] = step / (c + attn * lo)
        row["ratio_bound_free"] = step / c
        if n in ours:
            row["ratio_measured"] = ours[n] / fi[n]
        if n in goals:
            row["goal"] = goals[n]
            row["goal_reachable"] = goals[n] <= row["ratio_bound_free"]
        rows.append(row)
    return {"fit": {"c_ms": c * 1e3, "a_ms_per_1k_tokens": a * 1e6, "lengths": ns}, "rows": rows}


def table(res: dict) -> str:
    f = res["fit"]
    out = [f"FlashInfer decode step fit over {f['lengths']}: t = {f['c_ms']:.2f} ms + {f['a_ms_per_1k_tokens']:.4f} "
           f"ms per 1K tokens of context",
           "| length | FlashInfer step ms (fit) | attention ms | plan's page share (widest–summed) | bound, plan's "
           "pages ms (×) | bound, attention free ms (×) | shplb × measured | goal × (reachable) |",
           "|---:|---|---:|---|---|---|---:|---|"]
    for r in res["rows"]:
        goal = f"{r['goal']:g} ({'yes' if r['goal_reachable'] else 'no'})" if "goal" in r else ""
        meas = f"{r['ratio_measured']:.2f}" if "ratio_measured" in r else "—"
        out.append(f"| {r['length']:,} | {r['flashinfer_step_ms']:.2f} ({r['fit_step_ms']:.2f}) | "
                   f"{r['attention_ms']:.2f} | {r['page_share_widest']:.3f}–{r['page_share_summed']:.3f} | "
                   f"{r['bound_plan_ms']:.2f} ({r['ratio_bound_plan']:.2f}) | {r['bound_free_ms']:.2f} "
                   f"({r['ratio_bound_free']:.2f}) | {meas} | {goal} |")
    return "\n".join(out)


def main() -> None:
    a = bound_parser(__doc__.split("\n\n")[0], "a decode ratio over FlashInfer to check (default 16384:1 and "
                     "65536:1.6, issue 15's)", "decode_bound").parse_args()
    doc = json.loads(a.serve_json.read_text())
    plan = json.loads(a.plan_json.read_text())
    budgets = [[HeadBudget.from_dict(b) for b in layer] for layer in plan["budgets"]]
    res = bound_rows(doc, budgets, int(plan["model"]["num_kv_heads"]), goals_of(a.goal, ["16384:1", "65536:1.6"]))
    write_bound(res, table(res), a, doc, "decode_bound")


if __name__ == "__main__":
    main()
