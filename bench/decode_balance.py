"""How unbalanced is decode at home placement? A cost model (no timing) per plan x TP x bucket.

    python bench/decode_balance.py [--out bench/results/decode_balance]

Decode stays on SGLang's home slicing: rank ``r`` of TP ``t`` holds the contiguous query heads
``rank_heads(Hq, t, r)``, i.e. ``Hkv / t`` whole KV groups (``t`` must divide ``Hkv``; a TP above ``Hkv``
replicates KV heads and is skipped). A dense KV group reads every page while a streaming one reads its sink +
window, so ranks read different numbers of pages, and per layer the step waits for the slowest rank.

Model: :func:`~sglang_shplb.planning.stock_decision.rank_decode_times` (the decode model of
:func:`~sglang_shplb.planning.stock_decision.layer_times` on one rank's heads, pages by ``group_pages`` over the
:func:`~sglang_shplb.core.patterns.decode_budgets`). A bucket is judged at its upper edge ``L``
(``npages = ceil(L / 64)``). Per rank of a layer::

    sparse = decode_base_s + decode_layer_overhead_s + pages_r * per_page
    dense  = decode_base_s + groups_r * npages * per_page
    per_page = decode_batch * 64 * head_dim * 2 (K, V) * kv_dtype_bytes / hbm_bytes_per_s

The constants are :class:`StockOptions()`'s defaults, the H200 fit of ``stock_decision.py``'s docstring
(``bench/results/serve_h200/2026-12-03-run2``: FlashInfer's step grows by the KV bytes at 4.3 TB/s, base 10 us;
the sparse step costs 90 us per layer more than its bytes; batch 1, bf16 KV). Each rank has its own HBM.

Per (plan, TP, bucket), summed over layers: ``sparse_slowest_s`` (every layer sparse, max over ranks),
``sparse_mean_s`` (mean over ranks: what a perfect decode balancer, a replica pool, could reach at best),
``dense_s`` (every layer stock: balanced), ``served_s`` (the plan's decode stock layers of the bucket dense,
the others sparse at their slowest rank), ``imbalance = sparse_slowest_s / sparse_mean_s`` and the speedups
over dense. ``worst_pages``: pages read per rank in the layer with the largest slowest-minus-mean gap;
``pages_imbalance``: the same max / mean over ranks for the pages alone (no fixed costs).

What it says (2026-12 defaults): pages are unbalanced (max/mean up to 3.0 for llama8b at TP 8, 2.1 for SmolLM2
at TP 3), but time barely is (<= 1.10): the 90 us fixed sparse cost per layer dominates, and it does not shrink
with TP while the dense bytes per rank do, so every layer sparse loses to dense (0.1-0.6x, 0.95x at TP 1 128K)
with or without a balancer, and the benchmark plans decode stock in every layer (served == dense;
``default_plan`` has no stock marks, so it is served all sparse). A replica pool pays only once that fixed cost
is gone: ``--decode-layer-overhead-us 0`` (bytes only; stock marks unchanged) gives llama8b imbalance 1.2-1.7 at
TP 4-8 and 32K-128K, the balanced ideal 1.2-2.4x over dense against 1.0-1.9x contiguous. At ``--decode-batch 4``
(``batch4/``; the served H200 grid of 2026-12-04 measured the sparse route 1.40x FlashInfer at 64K batch 4 where
this model gives 1.41x at TP 1) sparse decode pays at TP 1 from 64K (1.41x / 1.92x at 64K / 128K), but at TP 4 and 8
the fixed cost per rank keeps it below dense even perfectly balanced (128K: 0.72x / 0.45x contiguous, 0.95x / 0.60x
balanced, imbalance 1.33-1.35). So a replica pool would not make decode pay at TP >= 4 today; and the stock
decision, made at TP 1 (``stock_decision.py``), can mark decode sparse where it loses at TP >= 2 once
``decode_batch`` > 1 is planned for.

Plans (defaults): ``llama8b``, the mixed plan of ``bench/serve_gpu.py llama8b`` (its ``make_plans``: KV group 0
dense, odd groups top-k 10 %, even ones sink 128 + window 2048; stock marks by ``decide_stock`` with
``StockOptions()``, as ``synthetic_plan`` makes them), TP 1-8; ``smollm2_round5``, the budgets
``bench/results/eval_h200_round5/plans/refined5_d30`` with the stock marks ``place`` gives them by default (as
``serve_gpu.py smollm2`` served them until 2026-12-06), TP 1 and 3; ``default_plan``,
``bench/results/default_plan`` as stored.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Collection, Sequence

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from sglang_shplb.core.buckets import Buckets  # noqa: E402
from sglang_shplb.core.model_spec import ModelSpec  # noqa: E402
from sglang_shplb.core.patterns import BLOCK, HeadBudget  # noqa: E402
from sglang_shplb.core.plan import load_plan  # noqa: E402
from sglang_shplb.planning.cost_model import CostModel  # noqa: E402
from sglang_shplb.planning.stock_decision import StockOptions, decide_stock, rank_decode_times  # noqa: E402

Budgets = Sequence[Sequence[HeadBudget]]


@dataclass
class Row:
    tp: int
    bucket: int
    upper: int
    npages: int
    sparse_slowest_s: float
    sparse_mean_s: float
    dense_s: float
    served_s: float
    n_stock: int
    num_layers: int
    worst_layer: int
    worst_pages: list[int]
    pages_imbalance: float   # sum over layers of the max over ranks of the pages read / of their mean

    def to_dict(self) -> dict:
        return {**asdict(self), "imbalance": self.sparse_slowest_s / self.sparse_mean_s,
                "speedup_sparse": self.dense_s / self.sparse_slowest_s,
                "speedup_balanced": self.dense_s / self.sparse_mean_s, "speedup_served": self.dense_s / self.served_s}


@dataclass
class PlanInput:
    name: str
    spec: ModelSpec
    budgets: Budgets
    buckets: Buckets
    stock: list[Collection[int]]   # per bucket: the layers decoding on the stock backend
    tp_sizes: tuple[int, ...]


def decode_balance(plan_budgets: Budgets, spec: ModelSpec, buckets: Buckets,
                   stock_layers_by_bucket: Sequence[Collection[int]], tp: int,
                   options: StockOptions = StockOptions()) -> list[Row]:
    """One :class:`Row` per bucket (module docstring). ``ValueError`` unless ``tp`` divides the KV heads."""
    if tp < 1 or spec.num_kv_heads % tp:
        raise ValueError(f"TP {tp} does not divide the {spec.num_kv_heads} KV heads (home needs whole KV groups)")
    rows = []
    for b in range(len(buckets)):
        L, stock = buckets.upper(b), stock_layers_by_bucket[b]
        per_layer = [rank_decode_times(layer, L, spec, tp, options) for layer in plan_budgets]
        sp = [[x[0] for x in ranks] for ranks in per_layer]
        pages = [[x[2] for x in ranks] for ranks in per_layer]
        dense = [max(x[1] for x in ranks) for ranks in per_layer]   # dense is balanced: every rank the same
        gaps = [max(s) - sum(s) / tp for s in sp]
        worst = gaps.index(max(gaps))
        rows.append(Row(tp, b, L, math.ceil(L / BLOCK), sum(map(max, sp)), sum(sum(s) / tp for s in sp), sum(dense),
                        sum(d if li in stock else max(s) for li, (s, d) in enumerate(zip(sp, dense))),
                        len(stock), len(plan_budgets), worst, pages[worst],
                        sum(map(max, pages)) / (sum(map(sum, pages)) / tp)))
    return rows


def with_stock(name: str, spec: ModelSpec, budgets: Budgets, tp_sizes: tuple[int, ...]) -> PlanInput:
    """Stock marks as ``place`` / ``synthetic_plan`` give them with ``StockOptions()`` (default buckets)."""
    buckets = Buckets()
    dec = decide_stock(spec, budgets, buckets, CostModel.analytic(), StockOptions())
    return PlanInput(name, spec, budgets, buckets, [dec.layers("decode", b) for b in range(len(buckets))], tp_sizes)


def default_plans() -> list[PlanInput]:
    import serve_gpu
    from sglang_shplb.planning.budget import load_budgets
    from sglang_shplb.planning.synthetic_plans import serving_bench_budget

    spec = ModelSpec.from_config_dict({**serve_gpu.LLAMA8B, "max_position_embeddings": 131072 + 2 * 64})
    f = serving_bench_budget()
    llama = [[f(li, h, spec) for h in range(spec.num_heads)] for li in range(spec.num_layers)]
    r5 = load_budgets(HERE / "results" / "eval_h200_round5" / "plans" / "refined5_d30")
    plan = load_plan(HERE / "results" / "default_plan")
    return [with_stock("llama8b", spec, llama, (1, 2, 4, 8)),
            with_stock("smollm2_round5", r5.spec, r5.budgets, (1, 3)),
            PlanInput("default_plan", plan.model, plan.budgets, plan.buckets,
                      [plan.stock_layers("decode", b) for b in range(len(plan.buckets))], (1, 3))]


def run(plans: Sequence[PlanInput], options: StockOptions = StockOptions()) -> list[dict]:
    return [{"plan": p.name, **row.to_dict()} for p in plans for tp in p.tp_sizes
            if p.spec.num_kv_heads % tp == 0
            for row in decode_balance(p.budgets, p.spec, p.buckets, p.stock, tp, options)]


def table(rows: list[dict]) -> str:
    cols = ("imbalance", "pages_imbalance", "speedup_sparse", "speedup_balanced", "speedup_served")
    head = (f"{'plan':15} {'TP':>2} {'bucket':>6} {'imbal':>6} {'pg-imb':>6} {'dn/sp':>6} {'dn/bal':>6} "
            f"{'dn/srv':>6} {'stock':>6}  worst-layer pages per rank")
    lines = [head] + [f"{r['plan']:15} {r['tp']:>2} {r['upper'] // 1024:>5}K "
                      + " ".join(f"{r[c]:6.2f}" for c in cols)
                      + f" {r['n_stock']:>3}/{r['num_layers']:<2}  {r['worst_pages']}" for r in rows]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, options: StockOptions) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["plan"] for r in rows))
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        for i, tp in enumerate(sorted({r["tp"] for r in rows if r["plan"] == name})):
            rs = [r for r in rows if r["plan"] == name and r["tp"] == tp]
            x = [r["upper"] for r in rs]
            ax.plot(x, [r["speedup_sparse"] for r in rs], marker="o", color=f"C{i}", label=f"TP {tp} contiguous")
            ax.plot(x, [r["speedup_balanced"] for r in rs], ls="--", color=f"C{i}", label=f"TP {tp} balanced (ideal)")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set(title=name, xlabel="bucket upper length (tokens)", ylabel="decode speedup over dense (model)")
        ax.legend(fontsize=7)
    fig.suptitle(f"Sparse decode at home placement vs dense, every layer sparse (H200 fit, batch "
                 f"{options.decode_batch}, sparse overhead {options.decode_layer_overhead_s * 1e6:g} us/layer)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(HERE / "results" / "decode_balance"))
    ap.add_argument("--decode-layer-overhead-us", type=float, default=StockOptions().decode_layer_overhead_s * 1e6,
                    help="the sparse step's fixed cost per layer (default the H200 fit; 0: bytes only)")
    ap.add_argument("--decode-batch", type=int, default=1,
                    help="requests decoding together (the served grid: sparse decode wins from batch 4)")
    a = ap.parse_args()
    out = Path(a.out)
    options = StockOptions(decode_layer_overhead_s=a.decode_layer_overhead_us * 1e-6, decode_batch=a.decode_batch)
    out.mkdir(parents=True, exist_ok=True)
    rows = run(default_plans(), options)
    print(table(rows))
    (out / "decode_balance.json").write_text(json.dumps({"options": options.to_dict(), "rows": rows}, indent=1))
    plot(rows, out / "decode_balance.png", options)
    print("wrote", out / "decode_balance.json", out / "decode_balance.png")


if __name__ == "__main__":
    main()
