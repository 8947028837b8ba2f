"""The layer placement problem and the share-space assignment every solver returns."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

from sglang_shplb.core.head_map import home_rank
from sglang_shplb.core.placement_types import LayerPlacement
from sglang_shplb.planning.cost_model import CostProfile, Transfer

#: ``assignment[g]`` = list of ``(head, share)`` computed on GPU ``g``; the shares of a head sum to 1.
Assignment = list[list[tuple[int, float]]]
#: per-head causal cost profiles (a sequence, or a callable ``head -> CostProfile``); None = uniform
Profiles = Sequence[CostProfile] | Callable[[int], CostProfile] | None

def profile_of(profiles: Profiles, h: int) -> CostProfile | None:
    if profiles is None:
        return None
    return profiles(h) if callable(profiles) else profiles[h]


@dataclass
class LayerProblem:
    """One layer: per-query-head costs (seconds), the GQA group size and the TP size, plus options.

    A whole head ``h`` costs ``costs[h]``. A piece holding share ``s`` of a split head costs
    ``fixed[h] + s * var[h]`` with ``fixed[h] = min(piece_overhead, costs[h])`` and
    ``var[h] = costs[h] - fixed[h]``: every piece pays the fixed per-head cost again.

    ``max_replicated_kv``: cap on KV-head copies beyond one per KV head in this layer (``None`` = no cap).
    ``allow_split_heads``: may a head's query blocks be cut over several GPUs; ``whole_heads``: heads never cut
    even then (:attr:`~sglang_shplb.core.patterns.HeadBudget.splittable`).
    ``equal_heads``: every GPU computes the same number of whole query heads (needs ``H % tp == 0``).
    ``profiles``: the heads' causal cost profiles, to cut shares into query blocks (None = uniform).
    ``transfer``: the price of work away from its home rank (None: compute only, as without a length);
    :mod:`.objective` has the per-rank time every placement is judged by.
    """

    costs: np.ndarray
    group_size: int
    tp: int
    piece_overhead: float = 0.0
    max_replicated_kv: int | None = None
    allow_split_heads: bool = True
    equal_heads: bool = False
    time_limit: float = 10.0
    profiles: Profiles = field(default=None, repr=False)
    transfer: Transfer | None = None
    whole_heads: frozenset[int] = frozenset()
    fixed: np.ndarray = field(init=False, repr=False)
    var: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.costs = np.asarray(self.costs, dtype=np.float64)
        if self.costs.ndim != 1 or len(self.costs) == 0:
            raise ValueError("costs must be a non-empty 1-D array")
        if np.any(self.costs < 0) or not np.all(np.isfinite(self.costs)):
            raise ValueError("costs must be finite and non-negative")
        if self.group_size < 1 or len(self.costs) % self.group_size:
            raise ValueError(f"{len(self.costs)} query heads do not form groups of {self.group_size}")
        if self.tp < 1:
            raise ValueError(f"TP size must be >= 1, got {self.tp}")
        if self.piece_overhead < 0:
            raise ValueError("piece_overhead must be >= 0")
        if self.max_replicated_kv is not None and self.max_replicated_kv < 0:
            raise ValueError("max_replicated_kv must be >= 0 or None")
        if self.equal_heads and len(self.costs) % self.tp:
            raise ValueError(f"equal_heads needs the {len(self.costs)} query heads to divide by TP {self.tp}")
        self.whole_heads = frozenset(int(h) for h in self.whole_heads)
        if any(not 0 <= h < len(self.costs) for h in self.whole_heads):
            raise ValueError(f"whole_heads {sorted(self.whole_heads)} out of range for {len(self.costs)} heads")
        self.fixed = np.minimum(self.piece_overhead, self.costs)
        self.var = self.costs - self.fixed

    @property
    def num_heads(self) -> int:
        return len(self.costs)

    @property
    def num_kv(self) -> int:
        return self.num_heads // self.group_size

    def kv(self, h: int) -> int:
        return h // self.group_size

    @cached_property
    def home(self) -> list[int]:
        """Home rank of every head (:func:`~sglang_shplb.core.head_map.home_rank`)."""
        return [home_rank(h, self.num_heads, self.tp) for h in range(self.num_heads)]

    def profile(self, h: int) -> CostProfile | None:
        return profile_of(self.profiles, h)

    def may_cut(self, h: int) -> bool:
        """May a placement cut head ``h`` (the options and :attr:`whole_heads`)?"""
        return self.allow_split_heads and not self.equal_heads and h not in self.whole_heads

    def piece_cost(self, h: int, share: float) -> float:
        return float(self.costs[h]) if share >= 1.0 - 1e-12 else float(self.fixed[h] + share * self.var[h])

    def lower_bound(self) -> float:
        """A makespan no placement beats: the mean load, and the largest head when heads stay whole."""
        lb = float(self.costs.sum()) / self.tp
        uncut = [h for h in range(self.num_heads) if not self.may_cut(h)]
        if uncut:
            lb = max(lb, float(self.costs[uncut].max()))
        return lb


@dataclass(frozen=True)
class LayerTimes:
    """A layer placement priced by :func:`~.objective.layer_times`: per rank ``compute`` and ``total``
    (``T_r``) seconds and the units it computes (moved or not); the moved units and the bytes crossing
    links (inputs and outputs, all ranks); per rank ``busy``: the time of its attention calls, ``compute``
    plus its units' overhead and efficiency loss (``T_r`` less the gathers and the exposed links)."""

    compute: np.ndarray
    total: np.ndarray
    units: np.ndarray
    moved_units: int
    moved_bytes: int
    unit_overhead_s: float
    busy: np.ndarray

    @property
    def slowest(self) -> float:
        return float(self.total.max())

    @property
    def exposed(self) -> np.ndarray:
        """Per rank: transfer seconds not hidden behind home compute."""
        return np.maximum(self.total - self.compute - self.units * self.unit_overhead_s, 0.0)

    def key(self) -> tuple[float, int, int]:
        """Order of preference: the objective, then fewer units, then fewer bytes."""
        return self.slowest, int(self.units.sum()), self.moved_bytes


@dataclass
class SolverResult:
    assignment: Assignment
    placement: LayerPlacement | None = None  # the query-block pieces, when the solver cut them itself
    times: LayerTimes | None = None  # the placement's times, when the solver priced it
    optimal: bool | None = None  # True when proven optimal (exact solver); None for heuristics
    bound: float | None = None  # a proven lower bound on the makespan, when known
    info: dict = field(default_factory=dict)


def share_loads(problem: LayerProblem, assignment: Assignment) -> np.ndarray:
    """Per-GPU seconds of an assignment, in share space (before cutting into query blocks)."""
    return np.array([sum(problem.piece_cost(h, s) for h, s in gpu) for gpu in assignment], dtype=np.float64)


def replicas(problem: LayerProblem, assignment: Assignment) -> int:
    copies = sum(len({problem.kv(h) for h, _ in gpu}) for gpu in assignment)
    distinct = len({problem.kv(h) for gpu in assignment for h, _ in gpu})
    return copies - distinct


def num_pieces(assignment: Assignment) -> int:
    return sum(len(g) for g in assignment)


def relabel_to_home(problem: LayerProblem, assignment: Assignment) -> Assignment:
    """The same assignment with its GPUs renumbered so that the most cost stays on its home rank (GPUs
    are interchangeable for compute; a head away from home is a unit that moves)."""
    keep = np.zeros((problem.tp, problem.tp))
    for g, gpu in enumerate(assignment):
        for h, s in gpu:
            keep[g, problem.home[h]] += problem.piece_cost(h, s)
    gpus, ranks = linear_sum_assignment(keep, maximize=True)
    out: Assignment = [[] for _ in assignment]
    for g, r in zip(gpus, ranks):
        out[r] = list(assignment[g])
    return out


def feasible(problem: LayerProblem, assignment: Assignment) -> bool:
    """Respects the replica cap, equal_heads, allow_split_heads and whole_heads."""
    if problem.max_replicated_kv is not None and replicas(problem, assignment) > problem.max_replicated_kv:
        return False
    if any(s < 1.0 - 1e-12 and not problem.may_cut(h) for g in assignment for h, s in g):
        return False
    if problem.equal_heads:
        per = problem.num_heads // problem.tp
        if any(len(g) != per for g in assignment):
            return False
    return True
