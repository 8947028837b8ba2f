"""S-HPLB placement: which GPU computes which (query head, query-block range), per layer, TP size and
context-length bucket, minimising the slowest GPU's predicted attention time.

Public API
----------
``solve_layer(costs, group_size, tp, solver="shplb", *, profiles=None, **options) -> LayerResult``
    One layer, from per-head costs (seconds). ``solver`` is ``"contiguous"`` (SGLang's slicing),
    ``"lpt"`` (greedy over whole GQA groups), ``"shplb"`` (fast heuristic) or ``"shplb_exact"`` (MILP).
    Options: ``max_replicated_kv`` (int or None: cap on extra KV-head copies in the layer),
    ``allow_split_heads`` (bool, default True), ``equal_heads`` (bool: same number of whole heads per
    GPU; ValueError when H % tp != 0), ``piece_overhead`` (seconds every extra piece of a split head
    pays), ``time_limit`` (seconds, exact solver). ``profiles``: per-head :class:`CostProfile` (or a
    callable ``h -> CostProfile``) used to cut split heads into query blocks; ``None`` = uniform.
``solve_plan_placements(spec, budgets, buckets, tp_sizes, cost_model, solver="shplb", **options)``
    ``-> dict[tp, list[Placement]]`` (one per bucket, solved at the bucket's upper edge), the form
    :class:`~sglang_shplb.core.plan.Plan` stores; each ``Placement.predicted`` holds the summary below.
``evaluate_placement(placement, spec, budgets, cost_model, seq_len=None, kv_dtype_bytes=None)``
    ``-> PlacementEval``: per-layer per-GPU loads of ANY placement (e.g. one loaded from a plan) and
    the summary: ``slowest_s`` (sum over layers of the slowest GPU), ``mean_s``, ``bubble`` (1 -
    mean/slowest), ``replicated_kv_heads`` (summed over layers), ``max_replicated_kv_per_layer``,
    ``split_pieces``, ``replicated_kv_bytes_per_token`` (when ``kv_dtype_bytes`` is given).
``compare_solvers(spec, budgets, buckets, tp_sizes, cost_model, solvers=(...), **options) -> list[dict]``
    One row per (tp, bucket, solver) with that summary and ``speedup_vs_contiguous``: the report table.
``place_budgets(budgets_file, buckets, tp_sizes, cost_model, solver="shplb", solve_options=None) -> Plan``
    Stage 3-5 of the pipeline: the plan of a :class:`~sglang_shplb.planning.budget.BudgetsFile`, solved
    per TP size with :func:`resolve_solve_opts`, its ``meta`` saying how.
``placement_for(plan_placements, tp, bucket)`` / ``placement_for_length(plan_placements, buckets, tp, n)``
    The per-batch lookup: a dict index (and ``Buckets.index``).
``cost_fraction_to_query_fraction(budget, seq_len, cost_fraction) -> float``
    The query-block boundary (a multiple of 1/nb) carrying ``cost_fraction`` of a head's cost.

Work units and costs: see :mod:`sglang_shplb.planning.solvers`. A whole head costs ``c[h]``; a piece with cost
share ``s`` costs ``fixed + s * (c[h] - fixed)``, ``fixed = min(piece_overhead, c[h])``. Shares are turned
into query-block fractions with the head's causal cost profile at the bucket's representative length
(the ``Piece`` fractions are multiples of ``1/nb`` there), and the loads reported are recomputed from the
resulting pieces, so they include that rounding.

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
from sglang_shplb.core.model_spec import ModelSpec
from sglang_shplb.core.patterns import HeadBudget
from sglang_shplb.core.placement_types import LayerPlacement, Piece, Placement
from sglang_shplb.core.plan import Plan
from sglang_shplb.planning.budget import BudgetsFile
from sglang_shplb.planning.cost_model import CostModel, CostProfile
from sglang_shplb.planning.solvers import SOLVERS, LayerProblem
from sglang_shplb.planning.solvers.common import Assignment
from sglang_shplb.planning.solvers.greedy import contiguous_heads, sglang_kv_heads  # noqa: F401  (re-exported)

SOLVER_NAMES = tuple(SOLVERS)
_OPTION_NAMES = ("max_replicated_kv", "allow_split_heads", "equal_heads", "piece_overhead", "time_limit")

Profiles = Sequence[CostProfile] | Callable[[int], CostProfile] | None


# ---- one layer -----------------------------------------------------------------------------------------

@dataclass
class LayerResult:
    placement: LayerPlacement
    loads: np.ndarray  # seconds per GPU, from the pieces
    replicated_kv: int
    solver: str
    optimal: bool | None = None  # exact solver: proven optimal
    bound: float | None = None  # exact solver: proven lower bound on the makespan (share space)
    info: dict = field(default_factory=dict)

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
                "replicated_kv": self.replicated_kv, "optimal": self.optimal}

    def __str__(self) -> str:
        return (f"{self.solver}: slowest {self.slowest * 1e6:.1f} us, mean {self.mean * 1e6:.1f} us, "
                f"bubble {self.bubble:.1%}, replicated KV {self.replicated_kv}")


def _profile(profiles: Profiles, h: int) -> CostProfile | None:
    if profiles is None:
        return None
    return profiles(h) if callable(profiles) else profiles[h]


def assignment_to_layer(assign: Assignment, profiles: Profiles = None) -> LayerPlacement:
    """Cut share-space assignments into query-block pieces. Pieces of a head are laid out in GPU order;
    a boundary is the query-block fraction whose cumulative cost is nearest the cumulative share; pieces
    that round to nothing are dropped (their share goes to the neighbour)."""
    gpus: list[list[Piece]] = [[] for _ in assign]
    split: dict[int, list[tuple[int, float]]] = {}
    for g, gpu in enumerate(assign):
        for h, s in gpu:
            if s >= 1.0 - 1e-12:
                gpus[g].append(Piece(h))
            else:
                split.setdefault(h, []).append((g, s))
    for h in sorted(split):
        parts = split[h]
        prof = _profile(profiles, h)
        total = sum(s for _, s in parts)
        cum, bounds = 0.0, [0.0]
        for _, s in parts[:-1]:
            cum += s / total
            bounds.append(prof.query_fraction(cum) if prof is not None else cum)
        bounds.append(1.0)
        kept = [(g, a, b) for (g, _), a, b in zip(parts, bounds, bounds[1:]) if b > a]
        # re-tile: dropped pieces leave gaps; give each kept piece the range up to the next kept start
        for i, (g, a, _) in enumerate(kept):
            start = 0.0 if i == 0 else a
            end = kept[i + 1][1] if i + 1 < len(kept) else 1.0
            gpus[g].append(Piece(h) if (start == 0.0 and end == 1.0) else Piece(h, start, end))
    for g in gpus:
        g.sort(key=lambda p: (p.head, p.start))
    return LayerPlacement(gpus)


def piece_load(p: Piece, costs, piece_overhead: float = 0.0, profiles: Profiles = None) -> float:
    """Seconds of one piece: a whole head costs ``costs[h]``, a piece of a split head
    ``fixed + share * (costs[h] - fixed)``, its share from the head's cost profile (uniform if None)."""
    c = float(costs[p.head])
    if p.whole:
        return c
    prof = _profile(profiles, p.head)
    share = prof.share(p.start, p.end) if prof is not None else p.end - p.start
    fixed = min(piece_overhead, c)
    return fixed + share * (c - fixed)


def layer_loads(lp: LayerPlacement, costs, piece_overhead: float = 0.0, profiles: Profiles = None) -> np.ndarray:
    """Seconds per GPU of a layer placement (the sum of :func:`piece_load` over its pieces)."""
    costs = np.asarray(costs, dtype=np.float64)
    return np.array([sum(piece_load(p, costs, piece_overhead, profiles) for p in pieces) for pieces in lp.gpus],
                    dtype=np.float64)


def solve_layer(costs, group_size: int, tp: int, solver: str = "shplb", *, profiles: Profiles = None,
                max_replicated_kv: int | None = None, allow_split_heads: bool = True, equal_heads: bool = False,
                piece_overhead: float = 0.0, time_limit: float = 10.0) -> LayerResult:
    """Place one layer's query heads on ``tp`` GPUs (see the module docstring). Deterministic."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose from {list(SOLVERS)}")
    prob = LayerProblem(np.asarray(costs, dtype=np.float64), group_size, tp, piece_overhead, max_replicated_kv,
                        allow_split_heads, equal_heads, time_limit)
    res = SOLVERS[solver](prob)
    lp = assignment_to_layer(res.assignment, profiles)
    loads = layer_loads(lp, prob.costs, piece_overhead, profiles)
    if solver in ("shplb", "shplb_exact"):
        # cutting into query blocks may cost a little: never return worse than SGLang's slicing when
        # that slicing meets the options
        base = SOLVERS["contiguous"](prob).assignment
        from sglang_shplb.planning.solvers.common import feasible
        if feasible(prob, base):
            blp = assignment_to_layer(base, None)
            bl = layer_loads(blp, prob.costs, piece_overhead, None)
            if bl.max() < loads.max() * (1 - 1e-12):
                lp, loads = blp, bl
                res.info["fallback"] = "contiguous"
    return LayerResult(lp, loads, lp.replicated_kv(group_size), solver, res.optimal, res.bound, res.info)


def cost_fraction_to_query_fraction(budget: HeadBudget, seq_len: int, cost_fraction: float) -> float:
    """Query-block fraction ``b / nb`` at ``seq_len`` whose blocks ``[0, b)`` hold the cost share nearest
    ``cost_fraction`` of the head (dense: block ``i`` costs ``i + 1``; streaming: about constant; top-k:
    ``max(min_blocks, fraction * (i + 1))``)."""
    return CostProfile.of(budget, seq_len).query_fraction(cost_fraction)


def baseline_replicated_kv(num_heads: int, num_kv_heads: int, tp: int) -> int:
    """Replicated KV heads per layer of SGLang's contiguous layout (``max(0, tp - Hkv)`` when tp divides
    the heads; the contiguous near-even split's count otherwise)."""
    gs = num_heads // num_kv_heads
    copies = sum(len({h // gs for h in heads}) for heads in contiguous_heads(num_heads, tp))
    return copies - num_kv_heads


# ---- whole plans ---------------------------------------------------------------------------------------

@dataclass
class PlacementEval:
    loads: np.ndarray  # [layers, tp] seconds
    replicated_kv: np.ndarray  # [layers]
    split_pieces: int
    kv_bytes_per_head_token: float | None = None

    @property
    def slowest_s(self) -> float:
        return float(self.loads.max(axis=1).sum())

    @property
    def mean_s(self) -> float:
        return float(self.loads.mean(axis=1).sum())

    def summary(self) -> dict:
        slow, mean = self.slowest_s, self.mean_s
        d = {"slowest_s": slow, "mean_s": mean, "bubble": 0.0 if slow <= 0 else 1.0 - mean / slow,
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


def _check_budgets(spec: ModelSpec, budgets) -> None:
    if len(budgets) != spec.num_layers or any(len(b) != spec.num_heads for b in budgets):
        raise ValueError(f"budgets must be {spec.num_layers} layers x {spec.num_heads} heads")


def evaluate_placement(placement: Placement, spec: ModelSpec, budgets: list[list[HeadBudget]],
                       cost_model: CostModel, seq_len: int | None = None,
                       kv_dtype_bytes: int | None = None) -> PlacementEval:
    """Per-GPU loads of any placement under ``cost_model`` at ``seq_len`` (default: the length stored in
    ``placement.predicted['seq_len']``)."""
    _check_budgets(spec, budgets)
    if seq_len is None:
        seq_len = int(placement.predicted["seq_len"])
    loads = np.zeros((len(placement.layers), placement.tp))
    reps = np.zeros(len(placement.layers), dtype=np.int64)
    pieces = 0
    for li, lp in enumerate(placement.layers):
        costs, prof = layer_inputs(spec, budgets[li], cost_model, seq_len)
        loads[li] = layer_loads(lp, costs, cost_model.piece_overhead, prof)
        reps[li] = lp.replicated_kv(spec.group_size)
        pieces += sum(1 for g in lp.gpus for p in g if not p.whole)
    kvb = None if kv_dtype_bytes is None else 2.0 * spec.head_dim * kv_dtype_bytes
    return PlacementEval(loads, reps, pieces, kvb)


def resolve_solve_opts(opts: dict, tp: int) -> dict:
    """Placement options for one TP size (``max_replicated_kv='auto'`` → ``tp - 1``)."""
    out = dict(opts)
    if out.get("max_replicated_kv") == "auto":
        out["max_replicated_kv"] = tp - 1
    return out


def solve_plan_placements(spec: ModelSpec, budgets: list[list[HeadBudget]], buckets: Buckets,
                          tp_sizes: Sequence[int], cost_model: CostModel, solver: str = "shplb", *,
                          kv_dtype_bytes: int | None = None, progress: Callable | None = None,
                          **options) -> dict[int, list[Placement]]:
    """Solve every (TP size, bucket, layer). Options as :func:`solve_layer`; ``piece_overhead`` defaults to
    ``cost_model.piece_overhead``. ``kv_dtype_bytes`` (e.g. 2 for bf16) adds the replicated KV bytes per
    token to ``predicted``. ``progress``: optional callable wrapping an iterable (e.g. ``tqdm``)."""
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
        t0 = time.perf_counter()
        layers, loads, reps, pieces, optimal = [], [], [], 0, []
        for li in range(spec.num_layers):
            if (b, li) not in inputs:
                inputs[(b, li)] = layer_inputs(spec, budgets[li], cost_model, seq_len)
            costs, prof = inputs[(b, li)]
            r = solve_layer(costs, spec.group_size, tp, solver, profiles=prof, **options)
            layers.append(r.placement)
            loads.append(r.loads)
            reps.append(r.replicated_kv)
            pieces += sum(1 for g in r.placement.gpus for p in g if not p.whole)
            optimal.append(r.optimal)
        ev = PlacementEval(np.array(loads), np.array(reps), pieces,
                           None if kv_dtype_bytes is None else 2.0 * spec.head_dim * kv_dtype_bytes)
        predicted = {"seq_len": seq_len, **ev.summary(), "solve_s": time.perf_counter() - t0}
        if solver == "shplb_exact":
            predicted["proven_optimal_layers"] = sum(1 for o in optimal if o)
        out.setdefault(tp, []).append(Placement(tp, b, solver, layers, predicted))
    return out


def place_budgets(budgets: BudgetsFile, buckets: Buckets, tp_sizes: Sequence[int], cost_model: CostModel,
                  solver: str = "shplb", solve_options: dict | None = None, *,
                  progress: Callable | None = None) -> Plan:
    """The plan of a budgets file: every TP size solved with ``resolve_solve_opts(solve_options, tp)``,
    replicated KV bytes for a bf16 cache in ``predicted``; ``meta`` records the inputs, solver, options and
    time. ``progress``: optional callable wrapping the TP sizes (e.g. ``tqdm``)."""
    solve_options = dict(solve_options or {})
    spec = budgets.spec
    t0 = time.perf_counter()
    placements: dict[int, list[Placement]] = {}
    for tp in (progress(tp_sizes) if progress else tp_sizes):
        placements.update(solve_plan_placements(spec, budgets.budgets, buckets, [tp], cost_model, solver,
                                                kv_dtype_bytes=2, **resolve_solve_opts(solve_options, tp)))
    meta = {"created": time.strftime("%Y-%m-%d %H:%M:%S"), "budget_mode": budgets.mode, "tau": budgets.tau,
            "ref_len": budgets.ref_len, "solver": solver, "solve_s": time.perf_counter() - t0,
            "cost_model": cost_model.to_dict(), "solve_options": solve_options,
            "checkpoint": budgets.model.get("checkpoint")}
    if budgets.stability is not None:
        st = budgets.stability
        meta["stability"] = {"spearman": st.spearman, "pvalue": st.pvalue, "same_family": st.same_family,
                             "tau": st.tau}
    return Plan(spec, buckets, budgets.budgets, placements, meta)


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
