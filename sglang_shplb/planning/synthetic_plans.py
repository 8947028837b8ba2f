"""Synthetic plans for tests and benchmarks (no profiling): budgets chosen by rule, placements for the
given TP sizes by SGLang's contiguous slicing. Real plans come from ``python -m sglang_shplb``."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from sglang_shplb.core.buckets import Buckets
from sglang_shplb.core.head_map import rank_heads
from sglang_shplb.core.model_spec import ModelSpec
from sglang_shplb.core.patterns import BLOCK, HeadBudget
from sglang_shplb.core.placement_types import LayerPlacement, Piece, Placement
from sglang_shplb.core.plan import Plan, save_plan
from sglang_shplb.planning.cost_model import CostModel
from sglang_shplb.planning.place import decide_stock_at_tps
from sglang_shplb.planning.stock_decision import StockOptions


def synthetic_plan(model_dir: str | Path, budget: Callable[[int, int, ModelSpec], HeadBudget],
                   out_dir: str | Path, *, buckets: Buckets | None = None, tp_sizes=(1,),
                   meta: dict | None = None, stock: StockOptions | None = None) -> Path:
    """``budget(layer, q_head, spec)`` → HeadBudget. Writes the plan to ``out_dir``; returns plan.json.
    ``stock``: mark the layers where sparse does not pay as ``place`` does (the analytic cost model);
    ``None``: every layer with sparse heads runs sparse in every bucket."""
    spec = ModelSpec.from_config(model_dir)
    buckets = buckets or Buckets()
    budgets = [[budget(li, h, spec) for h in range(spec.num_heads)] for li in range(spec.num_layers)]
    placements = {}
    for tp in tp_sizes:
        per_bucket = []
        for b in range(len(buckets)):
            layers = [LayerPlacement([[Piece(h) for h in rank_heads(spec.num_heads, tp, r)] for r in range(tp)])
                      for li in range(spec.num_layers)]
            per_bucket.append(Placement(tp, b, "contiguous", layers, {}))
        placements[tp] = per_bucket
    meta = dict(meta or {"source": "synthetic"})
    marks = None
    if stock is not None:
        cost_model = CostModel.analytic()
        marks = decide_stock_at_tps(spec, budgets, buckets, cost_model, stock, placements).stock
        meta.update(cost_model=cost_model.to_dict(), stock_decision=stock.to_dict())
    return save_plan(Plan(spec, buckets, budgets, placements, meta, marks), out_dir)


def dense_budget(layer: int, head: int, spec: ModelSpec) -> HeadBudget:
    return HeadBudget.dense()


def mixed_budget(sink_tokens: int = 64, window_tokens: int = 256, topk_fraction: float = 0.25,
                 dense_kv_groups: int = 1, topk_tile: int = BLOCK) -> Callable[[int, int, ModelSpec], HeadBudget]:
    """The first ``dense_kv_groups`` KV groups of every layer dense; of the rest, even KV groups streaming
    (sink + window) and odd ones top-k at ``topk_fraction`` selecting ``topk_tile``-token blocks (128: per
    query pair, the 128 x 128 tile kernel). ``topk_fraction=None``: all streaming."""
    def f(layer: int, head: int, spec: ModelSpec) -> HeadBudget:
        g = spec.kv_head_of(head)
        if g < dense_kv_groups:
            return HeadBudget.dense()
        if topk_fraction is None or g % 2 == 0:
            return HeadBudget.streaming(sink_tokens, window_tokens)
        return HeadBudget.topk(topk_fraction, min_blocks=2, tile=topk_tile)
    return f


def serving_bench_budget(topk_tile: int = BLOCK) -> Callable[[int, int, ModelSpec], HeadBudget]:
    """The serving benchmark's mixed plan (``bench/serve_gpu.py llama8b``, and every benchmark and test that
    compares with it): KV group 0 dense, then streaming (sink 128 + window 2048 tokens) and top-k 10 % groups in
    turn; ``topk_tile``: the top-k heads' selection tile."""
    return mixed_budget(128, 2048, 0.1, topk_tile=topk_tile)
