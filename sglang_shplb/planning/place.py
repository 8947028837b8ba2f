"""S-HPLB placement: which GPU computes which (query head, query-block range), per layer, TP size and
context-length bucket, minimising the slowest GPU's predicted attention time.

Public API
----------
``solve_layer(costs, group_size, tp, solver="shplb", *, profiles=None, transfer=None, **options) -> LayerResult``
    One layer, from per-head costs (seconds). ``solver`` is ``"contiguous"`` (SGLang's slicing, the
    home placement), ``"lpt"`` (greedy over whole GQA groups), ``"shplb"`` (home-aware heuristic) or
    ``"shplb_exact"`` (compute MILP). Options: ``max_replicated_kv`` (int or None: cap on extra KV-head
    copies in the layer), ``allow_split_heads`` (bool, default True), ``equal_heads`` (bool: same number
    of whole heads per GPU; ValueError when H % tp != 0), ``piece_overhead`` (seconds every extra piece
    of a split head pays), ``time_limit`` (seconds, exact solver). ``profiles``: per-head
    :class:`CostProfile` (or a callable ``h -> CostProfile``) used to cut split heads into query blocks;
    ``None`` = uniform. ``transfer``: the :class:`~sglang_shplb.planning.cost_model.Transfer` term
    (``CostModel.transfer(seq_len, head_dim)``); ``None`` = compute only. The result's loads are the
    per-rank times of :mod:`sglang_shplb.planning.solvers.objective`.
``solve_plan_placements(spec, budgets, buckets, tp_sizes, cost_model, solver="shplb", **options)``
    ``-> dict[tp, list[Placement]]`` (one per bucket, solved at the bucket's upper edge), the form
    :class:`~sglang_shplb.core.plan.Plan` stores; each ``Placement.predicted`` holds the summary below.
``evaluate_placement(placement, spec, budgets, cost_model, seq_len=None, kv_dtype_bytes=None)``
    ``-> PlacementEval``: per-layer per-GPU loads of ANY placement (e.g. one loaded from a plan) and
    the summary: ``slowest_s`` (sum over layers of the slowest GPU's time: compute + unit overhead +
    exposed transfer), ``mean_s``, ``bubble`` (1 - mean/slowest), ``compute_slowest_s`` (compute only),
    ``transfer_s`` (sum over layers of the largest exposed transfer of a rank), ``replicated_kv_heads``
    (summed over layers), ``max_replicated_kv_per_layer``, ``split_pieces``, ``units_per_layer`` and
    ``moved_bytes_per_layer`` (lists, one per layer), ``replicated_kv_bytes_per_token`` (when
    ``kv_dtype_bytes`` is given).
``compare_solvers(spec, budgets, buckets, tp_sizes, cost_model, solvers=(...), **options) -> list[dict]``
    One row per (tp, bucket, solver) with that summary and ``speedup_vs_contiguous``: the report table.
``place_budgets(budgets_file, buckets, tp_sizes, cost_model, solver="shplb", solve_options=None,
stock_options=None) -> Plan``
    Stage 3-5 of the pipeline: the plan of a :class:`~sglang_shplb.planning.budget.BudgetsFile`, solved
    per TP size with :func:`resolve_solve_opts`, its ``meta`` saying how; its ``stock`` array (where the
    server runs the stock backend for a whole layer, per phase and bucket) from
    :func:`~sglang_shplb.planning.stock_decision.decide_stock` with ``stock_options``
    (``meta['stock_decision']`` records them).
``placement_for(plan_placements, tp, bucket)`` / ``placement_for_length(plan_placements, buckets, tp, n)``
    The per-batch lookup: a dict index (and ``Buckets.index``).
``cost_fraction_to_query_fraction(budget, seq_len, cost_fraction) -> float``
    The query-block boundary (a multiple of 1/nb) carrying ``cost_fraction`` of a head's cost.

Work units and costs: see :mod:`sglang_shplb.planning.solvers`. A whole head costs ``c[h]``; a piece with cost
share ``s`` costs ``fixed + s * (c[h] - fixed)``, ``fixed = min(piece_overhead, c[h])``. Shares are turned
into query-block fractions with the head's causal cost profile at the bucket's representative length
(the ``Piece`` fractions are multiples of ``1/nb`` there), and the loads reported are recomputed from the
resulting pieces, so they include that rounding. Work away from its home rank (a unit of
:mod:`sglang_shplb.core.head_map`) adds the cost model's unit overhead and its exposed transfer at that
length (:mod:`sglang_shplb.planning.solvers.objective`); a placement equal to home has neither, and the
runtime runs it on the single-rank path.

KV memory: a GPU holding any piece of a head needs its KV head; copies beyond one per KV head are
replicas. SGLang's own layout replicates KV heads when ``tp > Hkv`` (``contiguous`` counts those);
:func:`baseline_replicated_kv` gives that number.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from sglang_shplb.core.buckets import Buckets
from sglang_shplb.core.head_map import home_heads
from sglang_shplb.core.model_spec import ModelSpec
from sglang_shplb.core.patterns import HeadBudget
from sglang_shplb.core.placement_types import LayerPlacement, Placement
from sglang_shplb.core.plan import Plan
from sglang_shplb.planning.budget import BudgetsFile
from sglang_shplb.planning.cost_model import CostModel, CostProfile, Transfer
from sglang_shplb.planning.rank_feedback import HeadScales, HeadScalesError, derives
from sglang_shplb.planning.solvers import SOLVERS, LayerProblem
from sglang_shplb.planning.solvers.common import LayerTimes, Profiles, feasible
from sglang_shplb.planning.solvers.greedy import sglang_kv_heads  # noqa: F401  (re-exported)
from sglang_shplb.planning.solvers.objective import (assignment_to_layer, layer_times,  # noqa: F401
                                                     piece_load)  # (piece_load re-exported)
from sglang_shplb.planning.stock_decision import StockDecision, StockOptions, decide_stock, servable, stock_at_tp

SOLVER_NAMES = tuple(SOLVERS)
_OPTION_NAMES = ("max_replicated_kv", "allow_split_heads", "equal_heads", "piece_overhead", "time_limit")


# ---- one layer -----------------------------------------------------------------------------------------

@dataclass
class LayerResult:
    placement: LayerPlacement
    times: LayerTimes  # per rank compute and time (compute + unit overhead + exposed transfer), units, bytes
    replicated_kv: int
    solver: str
    optimal: bool | None = None  # exact solver: proven optimal
    bound: float | None = None  # exact solver: proven lower bound on the compute makespan (share space)
    info: dict = field(default_factory=dict)

    @property
    def loads(self) -> np.ndarray:
        """Seconds per GPU, from the pieces: the objective's per-rank times."""
        return self.times.total

    @property
    def slowest(self) -> float:
        return float(self.loads.max())

    @property
    def mean(self) -> float:
        return float(self.loads.mean())

    @property
    def bubble(self) -> float:
        m = self.slowest
        return 0.0 if m <= 0 else 1.0 - self.mean / m

    def objective(self) -> dict:
        return {"solver": self.solver, "slowest_s": self.slowest, "mean_s": self.mean, "bubble": self.bubble,
                "compute_slowest_s": float(self.times.compute.max()), "units": int(self.times.units.sum()),
                "moved_units": self.times.moved_units, "moved_bytes": self.times.moved_bytes,
                "replicated_kv": self.replicated_kv, "optimal": self.optimal}

    def __str__(self) -> str:
        return (f"{self.solver}: slowest {self.slowest * 1e6:.1f} us (compute {self.times.compute.max() * 1e6:.1f}), "
                f"mean {self.mean * 1e6:.1f} us, bubble {self.bubble:.1%}, {int(self.times.units.sum())} units "
                f"({self.times.moved_units} moved, {self.times.moved_bytes / 2**20:.2f} MiB), "
                f"replicated KV {self.replicated_kv}")


def solve_layer(costs, group_size: int, tp: int, solver: str = "shplb", *, profiles: Profiles = None,
                transfer: Transfer | None = None, max_replicated_kv: int | None = None,
                allow_split_heads: bool = True, equal_heads: bool = False, piece_overhead: float = 0.0,
                time_limit: float = 10.0, whole_heads=frozenset(),
                measured_cuts: LayerPlacement | None = None) -> LayerResult:
    """Place one layer's query heads on ``tp`` GPUs (see the module docstring); ``whole_heads`` are never cut
    (:func:`whole_heads`). Deterministic. ``measured_cuts``: cuts a device measured best for this solve's placement
    (:func:`~.rank_feedback.refine_cuts`, :func:`~.rank_feedback.open_cut`), adopted in its place;
    :class:`~.rank_feedback.HeadScalesError` when the solve gives another placement than the one they were made
    from (:func:`~.rank_feedback.derives`)."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose from {list(SOLVERS)}")
    prob = LayerProblem(np.asarray(costs, dtype=np.float64), group_size, tp, piece_overhead, max_replicated_kv,
                        allow_split_heads, equal_heads, time_limit, profiles, transfer, whole_heads)
    res = SOLVERS[solver](prob)
    lp = res.placement or assignment_to_layer(res.assignment, profiles)
    times = layer_times(lp, prob) if res.times is None else res.times
    if solver == "shplb_exact":
        # the MILP is transfer-unaware and its shares are rounded to query blocks: never return worse than
        # SGLang's slicing when that slicing meets the options (shplb guards itself)
        base = SOLVERS["contiguous"](prob).assignment
        if feasible(prob, base):
            blp = assignment_to_layer(base)
            bt = layer_times(blp, prob)
            if bt.key() < times.key():
                lp, times = blp, bt
                res.info["fallback"] = "contiguous"
    if measured_cuts is not None:
        if not derives(measured_cuts, lp):
            raise HeadScalesError("the measured cuts refined another placement than this solve's (solved with other "
                                  "options than the measurement: --solver, --max-replicated-kv); measure again")
        lp, times = measured_cuts, layer_times(measured_cuts, prob)
        res.info["measured_cuts"] = True
    return LayerResult(lp, times, lp.replicated_kv(group_size), solver, res.optimal, res.bound, res.info)


def cost_fraction_to_query_fraction(budget: HeadBudget, seq_len: int, cost_fraction: float) -> float:
    """Query-block fraction ``b / nb`` at ``seq_len`` whose blocks ``[0, b)`` hold the cost share nearest
    ``cost_fraction`` of the head (dense: block ``i`` costs ``i + 1``; streaming: about constant; top-k:
    ``max(min_blocks, fraction * (i + 1))``)."""
    return CostProfile.of(budget, seq_len).query_fraction(cost_fraction)


def baseline_replicated_kv(num_heads: int, num_kv_heads: int, tp: int) -> int:
    """Replicated KV heads per layer of SGLang's contiguous layout (``max(0, tp - Hkv)`` when tp divides
    the heads; the contiguous near-even split's count otherwise)."""
    gs = num_heads // num_kv_heads
    copies = sum(len({h // gs for h in heads}) for heads in home_heads(num_heads, tp))
    return copies - num_kv_heads


# ---- whole plans ---------------------------------------------------------------------------------------

@dataclass
class PlacementEval:
    """A placement's layers under :func:`~sglang_shplb.planning.solvers.objective.layer_times`, and its
    KV replicas and split pieces."""
    layers: list[LayerTimes]
    replicated_kv: np.ndarray  # [layers]
    split_pieces: int
    kv_bytes_per_head_token: float | None = None

    @staticmethod
    def of(placements: Sequence[LayerPlacement], times: Sequence[LayerTimes], group_size: int,
           kv_dtype_bytes: int | None, head_dim: int) -> "PlacementEval":
        reps = np.array([lp.replicated_kv(group_size) for lp in placements], dtype=np.int64)
        pieces = sum(1 for lp in placements for g in lp.gpus for p in g if not p.whole)
        return PlacementEval(list(times), reps, pieces,
                             None if kv_dtype_bytes is None else 2.0 * head_dim * kv_dtype_bytes)

    @property
    def loads(self) -> np.ndarray:
        """[layers, tp] seconds: compute + unit overhead + exposed transfer."""
        return np.array([t.total for t in self.layers])

    @property
    def slowest_s(self) -> float:
        return float(self.loads.max(axis=1).sum())

    @property
    def mean_s(self) -> float:
        return float(self.loads.mean(axis=1).sum())

    def summary(self) -> dict:
        slow, mean = self.slowest_s, self.mean_s
        d = {"slowest_s": slow, "mean_s": mean, "bubble": 0.0 if slow <= 0 else 1.0 - mean / slow,
             "compute_slowest_s": float(sum(t.compute.max() for t in self.layers)),
             "transfer_s": float(sum(t.exposed.max() for t in self.layers)),
             "units_per_layer": [int(t.units.sum()) for t in self.layers],
             "moved_bytes_per_layer": [t.moved_bytes for t in self.layers],
             "replicated_kv_heads": int(self.replicated_kv.sum()),
             "max_replicated_kv_per_layer": int(self.replicated_kv.max()) if len(self.replicated_kv) else 0,
             "split_pieces": self.split_pieces}
        if self.kv_bytes_per_head_token is not None:
            d["replicated_kv_bytes_per_token"] = float(self.replicated_kv.sum() * self.kv_bytes_per_head_token)
        return d


def layer_inputs(spec: ModelSpec, layer_budgets: list[HeadBudget], cost_model: CostModel, seq_len: int):
    """Per-head costs of one layer at ``seq_len`` and a lazy ``head -> CostProfile`` lookup."""
    costs = cost_model.layer_costs(layer_budgets, seq_len, spec.head_dim, spec.group_size)
    cache: dict[int, CostProfile] = {}

    def profile(h: int) -> CostProfile:
        if h not in cache:
            cache[h] = CostProfile.of(layer_budgets[h], seq_len)
        return cache[h]
    return costs, profile


def whole_heads(layer_budgets: Sequence[HeadBudget]) -> frozenset[int]:
    """The heads of a layer no placement may cut (:attr:`HeadBudget.splittable`)."""
    return frozenset(h for h, b in enumerate(layer_budgets) if not b.splittable)


def _check_budgets(spec: ModelSpec, budgets) -> None:
    if len(budgets) != spec.num_layers or any(len(b) != spec.num_heads for b in budgets):
        raise ValueError(f"budgets must be {spec.num_layers} layers x {spec.num_heads} heads")


def evaluate_placement(placement: Placement, spec: ModelSpec, budgets: list[list[HeadBudget]],
                       cost_model: CostModel, seq_len: int | None = None,
                       kv_dtype_bytes: int | None = None) -> PlacementEval:
    """Per-GPU times of any placement under ``cost_model`` (its transfer term included) at ``seq_len``
    (default: the length stored in ``placement.predicted['seq_len']``)."""
    _check_budgets(spec, budgets)
    if seq_len is None:
        seq_len = int(placement.predicted["seq_len"])
    transfer = cost_model.transfer(seq_len, spec.head_dim)
    times = []
    for li, lp in enumerate(placement.layers):
        costs, prof = layer_inputs(spec, budgets[li], cost_model, seq_len)
        prob = LayerProblem(costs, spec.group_size, placement.tp, cost_model.piece_overhead, profiles=prof,
                            transfer=transfer)
        times.append(layer_times(lp, prob))
    return PlacementEval.of(placement.layers, times, spec.group_size, kv_dtype_bytes, spec.head_dim)


def resolve_solve_opts(opts: dict, tp: int) -> dict:
    """Placement options for one TP size (``max_replicated_kv='auto'`` → ``tp - 1``)."""
    out = dict(opts)
    if out.get("max_replicated_kv") == "auto":
        out["max_replicated_kv"] = tp - 1
    return out


def solve_plan_placements(spec: ModelSpec, budgets: list[list[HeadBudget]], buckets: Buckets,
                          tp_sizes: Sequence[int], cost_model: CostModel, solver: str = "shplb", *,
                          kv_dtype_bytes: int | None = None, progress: Callable | None = None,
                          head_scale: Callable[[int, int, int], np.ndarray | None] | None = None,
                          measured_cuts: Callable[[int, int, int], LayerPlacement | None] | None = None,
                          **options) -> dict[int, list[Placement]]:
    """Solve every (TP size, bucket, layer). Options as :func:`solve_layer`; ``piece_overhead`` defaults to
    ``cost_model.piece_overhead``, the transfer term is ``cost_model.transfer`` at the bucket's length.
    ``kv_dtype_bytes`` (e.g. 2 for bf16) adds the replicated KV bytes per token to ``predicted``.
    ``progress``: optional callable wrapping an iterable (e.g. ``tqdm``). ``head_scale(tp, bucket, layer)``:
    per-head cost multipliers from measured feedback (:mod:`.rank_feedback`), or None for the model's costs;
    ``measured_cuts(tp, bucket, layer)``: a refinement of that solve measured best, or None (:func:`solve_layer`)."""
    _check_budgets(spec, budgets)
    unknown = set(options) - set(_OPTION_NAMES)
    if unknown:
        raise TypeError(f"unknown placement options {sorted(unknown)}; known: {list(_OPTION_NAMES)}")
    options.setdefault("piece_overhead", cost_model.piece_overhead)
    inputs = {}  # (bucket, layer) -> (costs, profile); shared by the TP sizes
    out: dict[int, list[Placement]] = {}
    jobs = [(tp, b) for tp in tp_sizes for b in range(len(buckets))]
    for tp, b in (progress(jobs) if progress else jobs):
        seq_len = buckets.upper(b)
        transfer = cost_model.transfer(seq_len, spec.head_dim)
        t0 = time.perf_counter()
        results = []
        for li in range(spec.num_layers):
            if (b, li) not in inputs:
                inputs[(b, li)] = layer_inputs(spec, budgets[li], cost_model, seq_len)
            costs, prof = inputs[(b, li)]
            scale = head_scale(tp, b, li) if head_scale is not None else None
            if scale is not None:
                costs = costs * np.asarray(scale, dtype=np.float64)
            cuts = measured_cuts(tp, b, li) if measured_cuts is not None else None
            try:
                results.append(solve_layer(costs, spec.group_size, tp, solver, profiles=prof, transfer=transfer,
                                           whole_heads=whole_heads(budgets[li]), measured_cuts=cuts, **options))
            except HeadScalesError as e:
                raise HeadScalesError(f"TP {tp}, bucket {seq_len}, layer {li}: {e}") from None
        layers = [r.placement for r in results]
        ev = PlacementEval.of(layers, [r.times for r in results], spec.group_size, kv_dtype_bytes, spec.head_dim)
        optimal = [r.optimal for r in results]
        predicted = {"seq_len": seq_len, **ev.summary(), "solve_s": time.perf_counter() - t0}
        if solver == "shplb_exact":
            predicted["proven_optimal_layers"] = sum(1 for o in optimal if o)
        out.setdefault(tp, []).append(Placement(tp, b, solver, layers, predicted))
    return out


def decide_stock_at_tps(spec: ModelSpec, budgets: list[list[HeadBudget]], buckets: Buckets, cost_model: CostModel,
                        options: StockOptions, placements: dict[int, list[Placement]]) -> StockDecision:
    """:func:`~sglang_shplb.planning.stock_decision.decide_stock` (TP 1), plus the marks at every TP size above 1
    of ``placements`` that SGLang can serve (:func:`~sglang_shplb.planning.stock_decision.stock_at_tp`: prefill
    from each bucket's placement loads, transfer included): a layer is sparse only where it wins at each."""
    dec = decide_stock(spec, budgets, buckets, cost_model, options)
    if not options.enabled:
        return dec
    for tp in sorted(t for t in placements if t > 1 and servable(spec, t)):
        loads = np.stack([evaluate_placement(placements[tp][b], spec, budgets, cost_model, seq_len=n).loads
                          if n > 0 else np.zeros((spec.num_layers, tp)) for b, n in enumerate(dec.lengths)])
        dec.stock |= stock_at_tp(spec, budgets, dec.lengths, cost_model, options, tp, loads)
    return dec


def place_budgets(budgets: BudgetsFile, buckets: Buckets, tp_sizes: Sequence[int], cost_model: CostModel,
                  solver: str = "shplb", solve_options: dict | None = None, *,
                  progress: Callable | None = None, stock_options: StockOptions | None = None,
                  head_scales: HeadScales | None = None) -> Plan:
    """The plan of a budgets file: every TP size solved with ``resolve_solve_opts(solve_options, tp)``,
    replicated KV bytes for a bf16 cache in ``predicted``; ``meta`` records the inputs, solver, options and
    time. ``progress``: optional callable wrapping each TP size's (TP size, bucket) jobs. ``stock_options``
    (default :class:`StockOptions()`: margin 0.95): the layers run on the stock backend per phase and
    bucket (``enabled=False``: none). ``head_scales``: measured feedback
    (:func:`~sglang_shplb.planning.rank_feedback.load_head_scales`: multipliers, and cuts where a refinement measured
    best; its summary goes in ``meta['head_scales']``)."""
    stock_options = stock_options or StockOptions()
    solve_options = dict(solve_options or {})
    spec = budgets.spec
    t0 = time.perf_counter()
    placements: dict[int, list[Placement]] = {}
    for tp in tp_sizes:
        placements.update(solve_plan_placements(spec, budgets.budgets, buckets, [tp], cost_model, solver,
                                                kv_dtype_bytes=2, progress=progress,
                                                head_scale=head_scales.scale if head_scales else None,
                                                measured_cuts=head_scales.measured_cuts if head_scales else None,
                                                **resolve_solve_opts(solve_options, tp)))
    decision = decide_stock_at_tps(spec, budgets.budgets, buckets, cost_model, stock_options, placements)
    meta = {"created": time.strftime("%Y-%m-%d %H:%M:%S"), "budget_mode": budgets.mode, "tau": budgets.tau,
            "ref_len": budgets.ref_len, "solver": solver, "solve_s": time.perf_counter() - t0,
            "cost_model": cost_model.to_dict(), "solve_options": solve_options,
            "checkpoint": budgets.model.get("checkpoint"), "stock_decision": stock_options.to_dict(),
            "head_scales": head_scales.summary if head_scales else None}
    if budgets.stability is not None:
        st = budgets.stability
        meta["stability"] = {"spearman": st.spearman, "pvalue": st.pvalue, "same_family": st.same_family,
                             "tau": st.tau}
    return Plan(spec, buckets, budgets.budgets, placements, meta, decision.stock)


def compare_solvers(spec: ModelSpec, budgets: list[list[HeadBudget]], buckets: Buckets, tp_sizes: Sequence[int],
                    cost_model: CostModel, solvers: Sequence[str] = ("contiguous", "lpt", "shplb"), *,
                    kv_dtype_bytes: int | None = None, **options) -> list[dict]:
    """Rows ``{tp, bucket, seq_len, solver, slowest_s, mean_s, bubble, replicated_kv_heads, ...,
    speedup_vs_contiguous}`` for every TP size, bucket and solver (contiguous is always solved)."""
    solved = {s: solve_plan_placements(spec, budgets, buckets, tp_sizes, cost_model, s,
                                       kv_dtype_bytes=kv_dtype_bytes, **options)
              for s in dict.fromkeys(["contiguous", *solvers])}
    rows = []
    for tp in tp_sizes:
        for b in range(len(buckets)):
            base = solved["contiguous"][tp][b].predicted["slowest_s"]
            for s in solvers:
                p = solved[s][tp][b].predicted
                rows.append({"tp": tp, "bucket": b, "solver": s, **p,
                             "speedup_vs_contiguous": base / p["slowest_s"] if p["slowest_s"] > 0 else 1.0})
    return rows


def placement_for(plan_placements: dict[int, list[Placement]], tp: int, bucket: int) -> Placement:
    """The per-batch lookup: ``plan_placements[tp][bucket]``."""
    return plan_placements[tp][bucket]


def placement_for_length(plan_placements: dict[int, list[Placement]], buckets: Buckets, tp: int,
                         length: int) -> Placement:
    """The placement for a batch whose context length is ``length``: ``Buckets.index`` then a dict index."""
    return plan_placements[tp][buckets.index(length)]
