"""Where sparse pays: per phase (prefill, decode), bucket and layer, the sparse path or the stock backend.

A user who switches ``--attention-backend flashinfer`` for ``shplb`` must never lose. The plan therefore
marks a layer *stock* in a (phase, bucket) where the cost model does not predict the sparse path to win
by a margin; the server runs the stock backend for the whole layer there
(:class:`~sglang_shplb.serving.backend.ShplbAttnBackend`). Everything here is a pure function of the
budgets, the :class:`~sglang_shplb.planning.cost_model.CostModel` and :class:`StockOptions` (no I/O, no
device), so it is unit-tested at its edges and recomputed by the report from the plan alone.

Rule (:func:`choose_stock`)
---------------------------
A layer runs sparse iff ``stock_s > 0 and sparse_s <= margin * stock_s`` (``margin`` default 0.95,
``place --sparse-margin``): exactly at the margin it is sparse; with nothing to compute (``stock_s <= 0``,
a zero-length bucket) it is stock, since there is nothing to win.

Length of a bucket (:func:`bucket_length`)
------------------------------------------
A bucket holds lengths ``(edges[i-1], edges[i]]``. The decision must hold for every batch of the bucket, and
sparse gains grow with the length, so by default a bucket is judged at its *shortest* length
(``Buckets.lower``: 1 token for bucket 0, which is therefore always stock); ``at="upper"`` judges it at the
edge the placement is solved at.

Prefill (:func:`layer_times`, ``phase="prefill"``)
-------------------------------------------------
One request of ``L`` tokens, no cached prefix, as the placement prices it::

    sparse_s = sum_h cost.head_time(budget_h, L) + prefill_layer_overhead_s
    stock_s  = sum_h cost.head_time(dense, L)

The stock time is the cost model's ``dense`` pattern: in the calibrations whose dense records time the stock
path (``bench/results/calibration_h100_round2.json`` / ``calibration_h100_tiles.json``: cuDNN SDPA) that is
the GPU's dense time; FlashInfer was 6-13 % faster than SDPA in ``bench/results/layer_path_*.json`` (H100,
8K-64K), which the 5 % margin only partly covers. ``prefill_layer_overhead_s`` (default 1 ms) is the host and
launch time the sparse layer path adds per layer (index build, per-pattern launches, decode page summaries):
``bench/results/layer_path_smollm2.json`` (H100, 2026-11-23) measured 28-45 ms of attention per forward of
25 sparse layers at 2K-8K where the GPU work is a few ms, about 1.1-1.8 ms per layer; with 1 ms,
``layer_path_llama8b.json`` at 16K (69 ms / 32 layers) is reproduced within a few percent. Lower it
(``place --prefill-layer-overhead-us``) as that host time shrinks.

Decode (:func:`layer_times`, ``phase="decode"``; no calibration exists for it)
-------------------------------------------------------------------------
Decode is bound by the KV bytes read. Per layer, ``decode_batch`` requests of context ``L``,
``npages = ceil(L / 64)``, a page of one KV head ``64 * head_dim * 2 (K and V) * kv_dtype_bytes`` bytes::

    stock_s  = decode_base_s + decode_batch * Hkv * npages * page_bytes / hbm_bytes_per_s
    sparse_s = decode_base_s + decode_layer_overhead_s
               + decode_batch * sum_g pages_g * page_bytes / hbm_bytes_per_s

``pages_g``, the pages the group kernel loads for KV head ``g`` (each page once per group): ``npages`` when a
head of the group is dense; else ``min(npages, streaming union + sum of the selected heads' pages)`` with
the streaming union ``max sink + max window`` (the sink pages and the window pages of every streaming head
overlap) and a top-k / vertical-slash head's pages ``HeadBudget.decode_pages`` (the
kernels' rule), assumed disjoint: an upper bound on what sparse reads. The budgets are those decode follows
(:func:`~sglang_shplb.core.patterns.decode_budgets`: a streaming head below the decode floor reads Quest pages). Defaults fitted to
the served decode on an H200 (``bench/results/serve_h200/2026-12-03-run2``: Llama-3-8B shape, CUDA graphs,
batch 1, a 131,200-token server): FlashInfer's step grows by the KV bytes at about 4.3 TB/s
(``hbm_bytes_per_s``; ``decode_base_s`` 10 us), and the sparse step costs about 90 us per layer more than the
bytes it reads, the same at 32K, 64K and 128K (``decode_layer_overhead_s``, ``place
--decode-layer-overhead-us``): the selection and the group kernel are sized for the server's context, not the
request's (``bench/decode.py --server-ctx``: 103.7 us per layer sized for 131K against 53.5 us sized for 32K,
same request). The earlier fit (``bench/results/layer_path_llama8b.json``, H100, a 16K-64K context: 18 us,
3.0 TB/s) made the plan decode sparse from the 64K bucket, where the server then decoded 0.73-0.83x as fast as
FlashInfer. ``decode_batch`` 1 is the case where that fixed cost weighs most (the conservative one).

TP (:func:`rank_times`): the decision is per layer for the whole model (every rank must take the same path in
a layer), and one set of marks serves every TP size the plan is placed for, so a layer runs sparse in a
(phase, bucket) only where sparse wins by the margin at *each* of them. At TP ``t`` each rank's stock time is
the TP-1 stock time over ``t`` (dense heads split evenly), while the sparse layer waits for its slowest rank,
and the fixed per-layer costs (``prefill_layer_overhead_s``, ``decode_layer_overhead_s``) do not shrink with
``t`` (TP sizes SGLang cannot serve the model at, :func:`~sglang_shplb.core.head_map.check_tp`, are left out):
prefill at the plan's placement for (``t``, bucket) (the solver's per-rank loads, moved work and its
transfer included: :func:`~sglang_shplb.planning.place.evaluate_placement`), decode at home (SGLang's
contiguous slicing; decode never moves work), the pages of each rank's own heads
(:func:`stock_at_tp`; :func:`~sglang_shplb.planning.place.decide_stock_at_tps` adds its marks to
:func:`decide_stock`'s). A plan placed for TP 1 only is decided as before; ``bench/decode_balance.py`` shows
why this matters for decode (at batch 4 the mixed Llama-3-8B plan decodes 1.9x faster than dense at TP 1 and
128K but 0.72x / 0.45x at TP 4 / 8). The report's times are TP 1's.

The report's table: :func:`sparse_vs_stock` (per bucket and phase: predicted sparse time, stock time, the
layers marked stock, and the time of the plan as served).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from sglang_shplb.core.buckets import Buckets
from sglang_shplb.core.head_map import HeadMapError, check_tp, rank_heads
from sglang_shplb.core.model_spec import ModelSpec
from sglang_shplb.core.patterns import BLOCK, HeadBudget, Pattern, decode_budgets
from sglang_shplb.core.plan import PHASES, Plan
from sglang_shplb.planning.cost_model import CostModel, plan_cost_model

DEFAULT_MARGIN = 0.95
DEFAULT_PREFILL_LAYER_OVERHEAD_S = 1e-3
DEFAULT_DECODE_LAYER_OVERHEAD_S = 90e-6
DEFAULT_DECODE_BASE_S = 10e-6
DEFAULT_HBM_BYTES_PER_S = 4.3e12
_DENSE = HeadBudget.dense()


@dataclass(frozen=True)
class StockOptions:
    """The decision's parameters (module docstring). ``enabled=False`` marks nothing stock."""

    margin: float = DEFAULT_MARGIN
    prefill_layer_overhead_s: float = DEFAULT_PREFILL_LAYER_OVERHEAD_S
    decode_layer_overhead_s: float = DEFAULT_DECODE_LAYER_OVERHEAD_S
    decode_base_s: float = DEFAULT_DECODE_BASE_S
    hbm_bytes_per_s: float = DEFAULT_HBM_BYTES_PER_S
    decode_batch: int = 1
    kv_dtype_bytes: int = 2
    at: str = "lower"
    enabled: bool = True
    #: phases whose every layer runs the stock backend whatever the times (``("decode",)``: sparse prefill
    #: only, MInference's split); ``enabled=False`` does not clear them
    stock_phases: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "stock_phases", tuple(self.stock_phases))
        if not set(self.stock_phases) <= set(PHASES):
            raise ValueError(f"stock phases must be among {PHASES}, got {self.stock_phases}")
        if not 0.0 < self.margin <= 1.0:
            raise ValueError(f"the sparse margin must be in (0, 1] (sparse must take at most margin x stock), "
                             f"got {self.margin}")
        if min(self.prefill_layer_overhead_s, self.decode_layer_overhead_s, self.decode_base_s) < 0:
            raise ValueError("the per-layer overheads must be >= 0")
        if not self.hbm_bytes_per_s > 0 or self.decode_batch < 1 or self.kv_dtype_bytes < 1:
            raise ValueError(f"hbm_bytes_per_s must be > 0, decode_batch and kv_dtype_bytes >= 1, got "
                             f"{self.hbm_bytes_per_s}, {self.decode_batch}, {self.kv_dtype_bytes}")
        if self.at not in ("lower", "upper"):
            raise ValueError(f"at must be 'lower' or 'upper', got {self.at!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict | None) -> "StockOptions":
        return StockOptions(**(d or {}))


def choose_stock(sparse_s: float, stock_s: float, margin: float = DEFAULT_MARGIN) -> bool:
    """True (run the stock backend) unless sparse wins by the margin: ``stock_s > 0 and sparse_s <= margin *
    stock_s``. Exactly at the margin: sparse. Nothing to compute (``stock_s <= 0``): stock."""
    return not (stock_s > 0 and sparse_s <= margin * stock_s)


def bucket_length(buckets: Buckets, bucket: int, at: str = "lower") -> int:
    """The length a bucket is judged at: its shortest (``lower``, default) or its edge (``upper``)."""
    return buckets.lower(bucket) if at == "lower" else buckets.upper(bucket)


def group_pages(budgets: Sequence[HeadBudget], npages: int) -> int:
    """Pages the decode kernel loads for one KV group (its query heads' budgets), each page once: all when a
    head is dense, else the streaming union plus the selected heads' pages, capped at ``npages``."""
    if npages <= 0:
        return 0
    if any(b.pattern is Pattern.DENSE for b in budgets):
        return npages
    stream = [b for b in budgets if b.pattern is Pattern.STREAMING]
    union = max((b.sink_blocks for b in stream), default=0) + max((b.decode_window_blocks for b in stream), default=0)
    union += sum(b.decode_pages(npages) for b in budgets if b.pattern is not Pattern.STREAMING)
    return min(npages, union)


def layer_times(phase: str, budgets: Sequence[HeadBudget], seq_len: int, spec: ModelSpec, cost_model: CostModel,
                options: StockOptions = StockOptions()) -> tuple[float, float]:
    """``(sparse_s, stock_s)`` of one layer (all its query heads, ``budgets``) at ``seq_len`` in ``phase``
    (module docstring). A zero (or negative) length has nothing to compute: ``(0.0, 0.0)``."""
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    if seq_len <= 0:
        return 0.0, 0.0
    if phase == "prefill":
        sparse = float(cost_model.layer_costs(list(budgets), seq_len, spec.head_dim, spec.group_size).sum())
        stock = float(cost_model.layer_costs([_DENSE] * len(budgets), seq_len, spec.head_dim,
                                             spec.group_size).sum())
        return sparse + options.prefill_layer_overhead_s, stock
    gs = spec.group_size
    if len(budgets) % gs:
        raise ValueError(f"{len(budgets)} heads do not make whole KV groups of {gs}")
    at_decode = decode_budgets(budgets)
    sparse, stock, _ = decode_group_times([at_decode[i:i + gs] for i in range(0, len(budgets), gs)],
                                          math.ceil(seq_len / BLOCK), spec, options)
    return sparse, stock


def decode_group_times(groups: Sequence[Sequence[HeadBudget]], npages: int, spec: ModelSpec,
                       options: StockOptions) -> tuple[float, float, int]:
    """``(sparse_s, stock_s, pages)`` of one decode step over ``groups`` (per KV head, the decode budgets of its
    query heads here) at ``npages`` pages (module docstring): pages read sparse by :func:`group_pages`."""
    per_page = options.decode_batch * BLOCK * spec.head_dim * 2 * options.kv_dtype_bytes / options.hbm_bytes_per_s
    pages = sum(group_pages(g, npages) for g in groups)
    stock = options.decode_base_s + len(groups) * npages * per_page
    return options.decode_base_s + options.decode_layer_overhead_s + pages * per_page, stock, pages


def rank_decode_times(budgets: Sequence[HeadBudget], seq_len: int, spec: ModelSpec, tp: int,
                      options: StockOptions = StockOptions()) -> list[tuple[float, float, int]]:
    """Per rank of TP ``tp``, :func:`decode_group_times` of one layer's home heads (SGLang's contiguous slice;
    a rank holding part of a replicated KV group reads that group for its own heads)."""
    gs, at_decode, out = spec.group_size, decode_budgets(budgets), []
    for r in range(tp):
        groups: dict[int, list[HeadBudget]] = {}
        for h in rank_heads(spec.num_heads, tp, r):
            groups.setdefault(h // gs, []).append(at_decode[h])
        out.append(decode_group_times(list(groups.values()), math.ceil(seq_len / BLOCK), spec, options))
    return out


def rank_times(phase: str, budgets: Sequence[HeadBudget], seq_len: int, spec: ModelSpec, cost_model: CostModel,
               tp: int, options: StockOptions = StockOptions(),
               prefill_rank_s: Sequence[float] | None = None) -> tuple[float, float]:
    """``(sparse_s, stock_s)`` of one layer at TP ``tp`` (module docstring): the slowest rank's sparse time and a
    rank's stock time. Prefill takes the per-rank sparse loads of the plan's placement (``prefill_rank_s``,
    seconds, without the fixed overhead, which is added); decode the home heads of each rank."""
    if seq_len <= 0:
        return 0.0, 0.0
    if phase == "prefill":
        if prefill_rank_s is None or len(prefill_rank_s) != tp:
            raise ValueError(f"prefill at TP {tp} needs the placement's {tp} per-rank loads")
        _, stock1 = layer_times(phase, budgets, seq_len, spec, cost_model, options)
        return max(prefill_rank_s) + options.prefill_layer_overhead_s, stock1 / tp
    ranks = rank_decode_times(budgets, seq_len, spec, tp, options)
    return max(x[0] for x in ranks), max(x[1] for x in ranks)


@dataclass
class StockDecision:
    """The decision and what it was made from: ``stock`` bool, ``sparse_s`` / ``stock_s`` float64, all
    ``[len(PHASES), buckets, layers]``; ``lengths[b]``: the length bucket ``b`` was judged at."""

    stock: np.ndarray
    sparse_s: np.ndarray
    stock_s: np.ndarray
    lengths: list[int]
    options: StockOptions

    def layers(self, phase: str, bucket: int) -> list[int]:
        return [int(i) for i in np.flatnonzero(self.stock[PHASES.index(phase), bucket])]


def decide_stock(spec: ModelSpec, budgets: Sequence[Sequence[HeadBudget]], buckets: Buckets, cost_model: CostModel,
                 options: StockOptions = StockOptions()) -> StockDecision:
    """Every (phase, bucket, layer) at TP 1: :func:`layer_times` then :func:`choose_stock`. Pure. With
    ``options.enabled`` False nothing is marked stock (the times are still given) but the phases of
    ``options.stock_phases``, which are stock in every bucket and layer. The marks at the plan's other TP sizes
    (:func:`stock_at_tp`) are added by :func:`~sglang_shplb.planning.place.decide_stock_at_tps`."""
    if len(budgets) != spec.num_layers or any(len(layer) != spec.num_heads for layer in budgets):
        raise ValueError(f"budgets must be {spec.num_layers} layers x {spec.num_heads} heads")
    shape = (len(PHASES), len(buckets), spec.num_layers)
    stock = np.zeros(shape, dtype=bool)
    sparse_s, stock_s = np.zeros(shape), np.zeros(shape)
    lengths = [bucket_length(buckets, b, options.at) for b in range(len(buckets))]
    for p, phase in enumerate(PHASES):
        for b, n in enumerate(lengths):
            for li, layer in enumerate(budgets):
                sp, st = layer_times(phase, layer, n, spec, cost_model, options)
                sparse_s[p, b, li], stock_s[p, b, li] = sp, st
                stock[p, b, li] = phase in options.stock_phases or (options.enabled and choose_stock(sp, st, options.margin))
    return StockDecision(stock, sparse_s, stock_s, lengths, options)


def servable(spec: ModelSpec, tp: int) -> bool:
    """Whether SGLang can serve the model at TP ``tp`` without padding heads (the server refuses the others, so
    their placements, solved for the report, do not constrain the marks)."""
    try:
        check_tp(spec.num_heads, spec.num_kv_heads, tp)
    except HeadMapError:
        return False
    return True


def stock_at_tp(spec: ModelSpec, budgets: Sequence[Sequence[HeadBudget]], lengths: Sequence[int],
                cost_model: CostModel, options: StockOptions, tp: int, prefill_loads: np.ndarray) -> np.ndarray:
    """The marks ``[phases, buckets, layers]`` at TP ``tp`` alone (:func:`rank_times`); ``prefill_loads[b, li]``:
    the per-rank sparse prefill seconds of layer ``li`` under the plan's placement for (``tp``, bucket ``b``)
    at ``lengths[b]``."""
    stock = np.zeros((len(PHASES), len(lengths), spec.num_layers), dtype=bool)
    for b, n in enumerate(lengths):
        for li, layer in enumerate(budgets):
            for p, phase in enumerate(PHASES):
                sp, st = rank_times(phase, layer, n, spec, cost_model, tp, options,
                                    prefill_loads[b, li] if phase == "prefill" else None)
                stock[p, b, li] = choose_stock(sp, st, options.margin)
    return stock


def sparse_vs_stock(plan: Plan, cost_model: CostModel | None = None,
                    options: StockOptions | None = None) -> list[dict]:
    """The report's table, one row per (bucket, phase), recomputed from the plan (its cost model and
    ``meta['stock_decision']`` unless given): ``bucket``, ``upper`` (its edge), ``seq_len`` (the length
    judged), ``phase``, ``sparse_s`` (every layer sparse), ``stock_s`` (every layer stock), ``served_s``
    (the plan as served: stock where it marks a layer stock), ``stock_layers`` (the plan's marks; a plan
    without the array marks none) and ``n_stock``. Seconds per forward over all layers, per the module
    docstring's models (prefill: one request; decode: ``decode_batch`` requests, one step)."""
    cost_model = cost_model or plan_cost_model(plan.meta)
    if options is None:
        options = StockOptions.from_dict({k: v for k, v in (plan.meta.get("stock_decision") or {}).items()
                                          if k in StockOptions.__dataclass_fields__})
    dec = decide_stock(plan.model, plan.budgets, plan.buckets, cost_model, options)
    rows = []
    for b in range(len(plan.buckets)):
        for p, phase in enumerate(PHASES):
            marked = sorted(plan.stock_layers(phase, b))
            served = np.where(np.isin(np.arange(plan.model.num_layers), marked), dec.stock_s[p, b], dec.sparse_s[p, b])
            rows.append({"bucket": b, "upper": plan.buckets.upper(b), "seq_len": dec.lengths[b], "phase": phase,
                         "sparse_s": float(dec.sparse_s[p, b].sum()), "stock_s": float(dec.stock_s[p, b].sum()),
                         "served_s": float(served.sum()), "stock_layers": marked, "n_stock": len(marked)})
    return rows
