"""Stage 2: head-adaptive budgets from the elasticity profile, and the stability of the need.

Each deployable option (pattern, budget) has, per head, a recall: the worst over the profiled
context lengths (a budget must hold at every length) of what ``rows`` names (see
:mod:`sglang_shplb.planning.profile` for the metrics):

* ``"all"``: the attention mass kept over all sampled rows (the method until 2026-12-02). It lets a head
  that carries retrieval become a streaming head: its local rows keep 0.95 of their mass while its
  question rows lose the needle. That plan lost the passkey in bf16.
* ``"question"``: the worse of that and the mass kept on the question rows.
* ``"needle"`` (default): the worst of those and the needle recall weighted by the head's needle mass,
  ``1 − min(1, m / needle_scale) · (1 − needle recall)``: a head whose question rows put ``m`` ≥
  ``needle_scale`` of their attention on the answer's needle (a retrieval head) must keep that share of
  the needle, a head that barely looks at it is not held to it.

Its cost is its density at the reference length (the longest profiled). ``topk_min_blocks`` lifts every
top-k option's floor of blocks per query block (:func:`with_topk_floor`): a top-k head then keeps at least
that many blocks, which costs little at 8K and most at 2K, where a 2–5 % budget keeps only the profile's
4 blocks and lost QA answers (``bench/pattern_ablation.py``). The floored option keeps a superset of the
profiled option's blocks, so the profiled recall is a lower bound of its recall. Two ways to choose:

* :func:`budgets_by_tau`: per head, the cheapest option with recall ≥ τ (dense if none).
* :func:`budgets_by_density_target`: meet a mean-density target while maximising the worst head's
  recall: binary search on the recall level r (each head takes its cheapest option with recall ≥ r;
  feasible iff the mean density ≤ target — monotone in r, so the search is exact), then spend what
  is left greedily on the best recall gain per unit of density.

The stage's output is ``budgets.json`` (schema ``shplb-budgets/1``, :class:`BudgetsFile`): the model
identity, the chosen budgets with their recall and density, and the stability of the need.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from sglang_shplb.core.model_spec import ModelSpec
from sglang_shplb.core.patterns import HeadBudget, Pattern
from sglang_shplb.planning.profile import Option, ProfileResult

BUDGETS_SCHEMA = "shplb-budgets/1"
BUDGETS_NAME = "budgets.json"


@dataclass
class BudgetResult:
    budgets: list[list[HeadBudget]]
    choice: np.ndarray  # [layers, heads] index into the deployable options
    recall: np.ndarray  # [layers, heads] worst-length recall of the chosen option
    density: np.ndarray  # [layers, heads] density at ref_len
    ref_len: int
    mode: str

    @property
    def mean_density(self) -> float:
        return float(self.density.mean())

    @property
    def min_recall(self) -> float:
        return float(self.recall.min())

    def pattern_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for layer in self.budgets:
            for b in layer:
                out[b.pattern.value] = out.get(b.pattern.value, 0) + 1
        return out


ROWS = ("needle", "question", "all")
#: needle mass from which a head must keep its whole needle share (see the module docstring)
NEEDLE_SCALE = 0.1
#: the default recipe of the budget stage (``plan`` and ``budget`` without --tau / --density-target): a mean
#: density target at the longest profiled length, top-k heads kept at >= 16 blocks per query block; ``plan`` then
#: refines it on answers (:data:`sglang_shplb.planning.refine.DEFAULT_REFINE_TO`). Measured against dense through
#: real servers in bench/results/eval_* (the tau rule alone lost the pass key at 4K, eval_cpu round 12)
DEFAULT_DENSITY_TARGET = 0.2
DEFAULT_TOPK_MIN_BLOCKS = 16
#: the recall rule's threshold in this module's functions, and the stability report's (``plan`` / ``budget``)
DEFAULT_TAU = 0.95


def _per_length(profile: ProfileResult, what: str, calib_set: str | None) -> list[torch.Tensor]:
    if calib_set is None:
        return list(profile.pooled(what).values())
    src = getattr(profile, what)
    return [src[(calib_set, n)] for n in profile.lengths if (calib_set, n) in src]


def with_topk_floor(option: Option, min_blocks: int) -> Option:
    """The option with its top-k floor lifted to ``min_blocks`` blocks (other patterns unchanged)."""
    b = option.budget
    if b.pattern is not Pattern.TOPK or b.min_blocks >= min_blocks:
        return option
    return replace(option, budget=replace(b, min_blocks=min_blocks))


def topk_floor(budgets: list[list[HeadBudget]]) -> int:
    """The smallest floor of the budgets' top-k heads (0 without top-k heads): the ``topk_min_blocks`` they
    were chosen with."""
    return min((b.min_blocks for row in budgets for b in row if b.pattern is Pattern.TOPK), default=0)


def option_table(profile: ProfileResult, ref_len: int | None = None, calib_set: str | None = None,
                 rows: str = "needle", needle_scale: float = NEEDLE_SCALE, topk_min_blocks: int = 0):
    """Deployable options (top-k floors lifted to ``topk_min_blocks``), their densities ``[O]`` and the
    recall ``[L, H, O]`` named by ``rows``, the worst over lengths."""
    if rows not in ROWS:
        raise ValueError(f"rows must be one of {ROWS}, got {rows!r}")
    missing = {"question": ["qrecall"], "needle": ["qrecall", "nrecall"]}.get(rows, [])
    if any(not getattr(profile, m) for m in missing):
        raise ValueError(f"this profile has no {rows}-row recall (it predates it): profile again, or choose "
                         f"budgets on all rows (--recall-rows all)")
    if not needle_scale > 0:
        raise ValueError(f"needle_scale must be > 0, got {needle_scale}")
    ref_len = ref_len or max(profile.lengths)
    keep = [i for i, o in enumerate(profile.options) if o.deployable]
    opts = [with_topk_floor(profile.options[i], topk_min_blocks) for i in keep]
    dens = np.array([o.budget.density(ref_len) for o in opts])
    per_len = _per_length(profile, "recall", calib_set)
    if rows in ("question", "needle"):
        per_len += _per_length(profile, "qrecall", calib_set)
    if rows == "needle":
        for m, r in zip(_per_length(profile, "nmass", calib_set), _per_length(profile, "nrecall", calib_set)):
            weight = (m / needle_scale).clamp(max=1.0)[..., None]
            per_len.append(1 - weight * (1 - r))
    worst = torch.stack(per_len).min(0).values[..., keep].numpy()
    return opts, dens, worst


def _cheapest_at(dens: np.ndarray, recall: np.ndarray, level: float) -> np.ndarray:
    """Per head, the index of the cheapest option with recall ≥ level (dense has recall 1)."""
    ok = recall >= level - 1e-9
    cost = np.where(ok, dens[None, None, :], np.inf)
    return cost.argmin(-1)


def budgets_of(opts: list[Option], choice: np.ndarray) -> list[list[HeadBudget]]:
    """The budgets ``[L][H]`` of the option indices ``choice [L, H]``."""
    return [[opts[c].budget for c in row] for row in choice]


def budget_result(opts: list[Option], dens, worst, choice, ref_len, mode) -> BudgetResult:
    """The result of choosing option ``choice [L, H]`` from :func:`option_table`'s ``opts, dens, worst``."""
    rec = np.take_along_axis(worst, choice[..., None], -1)[..., 0]
    return BudgetResult(budgets_of(opts, choice), choice, rec, dens[choice], ref_len, mode)


def _mode(what: str, rows: str, topk_min_blocks: int) -> str:
    return f"{what}, {rows} rows" + (f", top-k >= {topk_min_blocks} blocks" if topk_min_blocks else "")


def budgets_by_tau(profile: ProfileResult, tau: float = DEFAULT_TAU, ref_len: int | None = None,
                   rows: str = "needle", needle_scale: float = NEEDLE_SCALE, topk_min_blocks: int = 0) -> BudgetResult:
    if not 0.0 < tau <= 1.0:
        raise ValueError(f"tau must be in (0, 1], got {tau}")
    opts, dens, worst = option_table(profile, ref_len, rows=rows, needle_scale=needle_scale,
                                     topk_min_blocks=topk_min_blocks)
    _require_dense(opts)
    return budget_result(opts, dens, worst, _cheapest_at(dens, worst, tau), ref_len or max(profile.lengths),
                         _mode(f"tau={tau}", rows, topk_min_blocks))


def choose_budgets(profile: ProfileResult, tau: float = DEFAULT_TAU, density_target: float | None = None,
                   rows: str = "needle", needle_scale: float = NEEDLE_SCALE, topk_min_blocks: int = 0) -> BudgetResult:
    """:func:`budgets_by_density_target` when a target is given, else :func:`budgets_by_tau`."""
    if density_target is not None:
        return budgets_by_density_target(profile, density_target, rows=rows, needle_scale=needle_scale,
                                         topk_min_blocks=topk_min_blocks)
    return budgets_by_tau(profile, tau, rows=rows, needle_scale=needle_scale, topk_min_blocks=topk_min_blocks)


def budgets_by_density_target(profile: ProfileResult, target: float, ref_len: int | None = None,
                              rows: str = "needle", needle_scale: float = NEEDLE_SCALE,
                              topk_min_blocks: int = 0) -> BudgetResult:
    opts, dens, worst = option_table(profile, ref_len, rows=rows, needle_scale=needle_scale,
                                     topk_min_blocks=topk_min_blocks)
    _require_dense(opts)
    floor = _cheapest_at(dens, worst, 0.0)
    if dens[floor].mean() > target + 1e-12:
        raise ValueError(f"density target {target} is below the cheapest option of every head "
                         f"({dens[floor].mean():.4f}): ask for a higher target, or the tau rule")
    levels = np.unique(worst)
    lo, hi = 0, len(levels) - 1  # levels[lo] feasible
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if dens[_cheapest_at(dens, worst, levels[mid])].mean() <= target + 1e-12:
            lo = mid
        else:
            hi = mid - 1
    choice = _cheapest_at(dens, worst, levels[lo])
    choice = _greedy_fill(choice, dens, worst, target)
    return budget_result(opts, dens, worst, choice, ref_len or max(profile.lengths),
                         _mode(f"density<={target}", rows, topk_min_blocks))


def _greedy_fill(choice: np.ndarray, dens: np.ndarray, worst: np.ndarray, target: float) -> np.ndarray:
    """Upgrade heads by best recall gain per extra density while the mean stays within target."""
    def gain(choice: np.ndarray) -> np.ndarray:
        return worst - np.take_along_axis(worst, choice[..., None], -1)

    return greedy_upgrade(choice, dens, target - dens[choice].mean(), gain)


def upgrades_within(choice: np.ndarray, dens: np.ndarray, spend: float) -> tuple[np.ndarray, np.ndarray]:
    """``[L, H, O]``: the density each head's move to each option adds, and whether that move is an upgrade
    whose added mean density fits in ``spend``."""
    extra = dens[None, None, :] - dens[choice][..., None]
    return extra, (extra > 1e-12) & (extra <= spend * choice.size + 1e-12)


def greedy_upgrade(choice: np.ndarray, dens: np.ndarray, spend: float, gain) -> np.ndarray:
    """Move heads ``[L, H]`` to other options, best ``gain(choice) [L, H, O]`` per unit of extra density first,
    while the mean density added stays within ``spend``. Pure."""
    choice = choice.copy()
    left = spend
    while True:
        extra, fits = upgrades_within(choice, dens, left)
        g = gain(choice)
        ratio = np.where(fits & (g > 1e-9), g / np.maximum(extra, 1e-12), -1)
        flat = int(ratio.argmax())
        if ratio.flat[flat] <= 0:
            return choice
        li, h, o = np.unravel_index(flat, ratio.shape)
        left -= extra[li, h, o] / choice.size
        choice[li, h] = o


def _require_dense(opts: list[Option]) -> None:
    if not any(o.family == "dense" for o in opts):
        raise ValueError("the profile has no dense option: every head needs a fallback")


@dataclass
class Stability:
    spearman: float  # rank correlation of the needed density between calibration sets A and B
    pvalue: float
    need_a: np.ndarray  # [layers, heads] density each head needs on set A (at tau)
    need_b: np.ndarray
    same_family: float  # share of heads whose cheapest family agrees between the sets
    tau: float


def stability(profile: ProfileResult, tau: float = DEFAULT_TAU, ref_len: int | None = None,
              rows: str = "needle", needle_scale: float = NEEDLE_SCALE) -> Stability:
    """Is each head's need "heterogeneous yet stable"? Budgets chosen on set A vs on set B."""
    from scipy.stats import spearmanr

    sets = profile.sets
    if len(sets) < 2:
        raise ValueError("stability needs two calibration sets (profile with --sets A B)")
    needs, fams = [], []
    for s in sets[:2]:
        opts, dens, worst = option_table(profile, ref_len, calib_set=s, rows=rows, needle_scale=needle_scale)
        c = _cheapest_at(dens, worst, tau)
        needs.append(dens[c])
        fams.append(np.array([[opts[i].family for i in row] for row in c]))
    if any(np.ptp(n) == 0 for n in needs):  # a need that does not vary has no rank correlation (no scipy warning)
        rho, p = float("nan"), float("nan")
    else:
        rho, p = spearmanr(needs[0].ravel(), needs[1].ravel())
    return Stability(float(rho), float(p), needs[0], needs[1], float((fams[0] == fams[1]).mean()), tau)


# ---- budgets.json ----------------------------------------------------------------------------------

class BudgetsFileError(ValueError):
    """A file that is not a ``budgets.json`` of the budget stage."""


@dataclass
class BudgetsFile:
    """``budgets.json``: what the budget stage hands to the placement and the report."""

    model: dict  # ModelSpec fields, plus "checkpoint" when the profile named one
    mode: str
    ref_len: int
    tau: float
    budgets: list[list[HeadBudget]]
    recall: np.ndarray  # [layers, heads]
    density: np.ndarray  # [layers, heads]
    stability: Stability | None = None

    @staticmethod
    def of(profile: ProfileResult, res: BudgetResult, tau: float, stab: Stability | None) -> "BudgetsFile":
        return BudgetsFile(profile.model, res.mode, res.ref_len, tau, res.budgets, res.recall, res.density, stab)

    @property
    def spec(self) -> ModelSpec:
        return ModelSpec(**{k: v for k, v in self.model.items() if k != "checkpoint"})

    def to_dict(self) -> dict:
        doc = {"schema": BUDGETS_SCHEMA, "model": self.model, "mode": self.mode, "ref_len": self.ref_len,
               "tau": self.tau, "budgets": [[b.to_dict() for b in layer] for layer in self.budgets],
               "recall": self.recall.round(5).tolist(), "density": self.density.round(5).tolist()}
        if self.stability is not None:
            st = self.stability
            doc["stability"] = {"spearman": st.spearman, "pvalue": st.pvalue, "same_family": st.same_family,
                                "tau": st.tau, "need_a": st.need_a.round(5).tolist(),
                                "need_b": st.need_b.round(5).tolist()}
        return doc

    @staticmethod
    def from_dict(doc: dict) -> "BudgetsFile":
        st = doc.get("stability")
        stab = None if not st else Stability(st["spearman"], st["pvalue"], np.array(st["need_a"]),
                                             np.array(st["need_b"]), st["same_family"], st["tau"])
        return BudgetsFile(doc["model"], doc["mode"], doc["ref_len"], doc.get("tau"),
                           [[HeadBudget.from_dict(b) for b in layer] for layer in doc["budgets"]],
                           np.array(doc["recall"]), np.array(doc["density"]), stab)


def save_budgets(budgets: BudgetsFile, out_dir) -> Path:
    """Write ``out_dir/budgets.json``; return its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / BUDGETS_NAME
    path.write_text(json.dumps(budgets.to_dict()))
    return path


def load_budgets(path) -> BudgetsFile:
    """Read ``budgets.json`` (or the folder holding it); :class:`BudgetsFileError` if it is another file."""
    path = Path(path)
    if path.is_dir():
        path = path / BUDGETS_NAME
    doc = json.loads(path.read_text())
    if doc.get("schema") != BUDGETS_SCHEMA:
        raise BudgetsFileError(f"{path} is not a budgets file of the budget stage")
    return BudgetsFile.from_dict(doc)
