"""Measured feedback for the placement: per-head cost multipliers from one placement's measured per-rank times,
so that the next solve sees what the cost model missed on that device.

The objective (:mod:`.solvers.objective`) predicts how long rank ``r``'s attention calls take, ``b_r``
(``LayerTimes.busy``: its pieces' compute plus its units' overhead and efficiency loss); the device measures
``m_r`` for the same calls (the rank's home call, its units, its dense tail). The two differ by a part common to
every rank (the home call's fixed cost, which the objective leaves out) and by what the cost model misprices on
that rank (e.g. a mix of short heads running with a cold L2, round 17). Only the second moves the slowest rank,
so only it is charged::

    e_r     = (m_r - mean(m)) - (b_r - mean(b))          rank r's mispricing, in the prediction's units
    alpha_r = clip(1 + e_r / C_r)                         C_r: the pieces' compute the prediction gives rank r
    scale_h = sum_r load_hr * alpha_r / sum_r load_hr     load_hr: head h's piece load on rank r

A head computed on one rank takes that rank's ``alpha``; a head cut over ranks the load-weighted mean. Feeding
``costs * scale`` back to the solver and measuring again is a fixed-point iteration: its fixed point is a
placement whose measured ranks are as even as the pieces allow (``bench/head_parallel.py --feedback``).

The solve may answer a corrected head with another structure (other heads cut, other ranks), whose pieces the
device then misprices anew; per-head multipliers cannot say that a piece after a long prefix runs slower than one
from query 0. :func:`refine_cuts` therefore also keeps a measured placement's structure and moves only its cuts:
with ``M_r`` rank ``r``'s measured time and ``alpha_r`` as above (its measured seconds per predicted second), the
cut points ``y`` (cumulative cost shares of the cut heads) solve the linear program::

    minimise  T    s.t.  M_r + alpha_r * sum_{pieces p on r} var_h(p) (s_p(y) - s_p(y_old)) <= T   for every rank
                         consecutive cuts of a head at least MIN_PIECE_SHARE apart, |y - y_old| <= MAX_CUT_STEP

(``s_p``: the piece's share, linear in ``y``). Its fixed point is a placement whose ranks joined by cut heads
measure alike (``bench/head_parallel.py --refine``).

Staging (the gathers a home makes to ship work) and link time are not charged: they are the move calibration's
(:mod:`.move_calibration`). Charging them to the heads a rank computes points the wrong way: a home slow from
shipping would look dear, and the next solve would ship more from it. Round 21 charged whole rank times and saw
this (H100, llama70b 64K mixed TP 8: a home's gathers 2.11 ms against 0.80 predicted, then more moved off it).

A served plan takes the multipliers (and, where a refinement measured best, its cuts) from a **head-scales
file** (:func:`save_head_scales`, JSON, schema :data:`HEAD_SCALES_SCHEMA`): ``bench/head_parallel.py --plan``
measures the plan's own layers on a GPU, and
``place --head-scales`` solves with them (:func:`load_head_scales`). The file names the model's shape and the
cost model and budgets it was measured with; placing with others is refused, since the multipliers correct that
model's prices of those heads and nothing else. An entry's measured cuts (``pieces``) are adopted only where the
solve with its multipliers gives the placement they were made from (:func:`derives`: their cuts moved, whole
heads of its cut where no cut could move); anything else is refused.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy.optimize import linprog

from sglang_shplb.core.buckets import Buckets
from sglang_shplb.core.model_spec import ModelSpec
from sglang_shplb.core.patterns import HeadBudget
from sglang_shplb.core.placement_types import LayerPlacement, Piece, Placement, PlacementCoverageError, check_coverage
from sglang_shplb.planning.solvers import LayerProblem, layer_times
from sglang_shplb.planning.solvers.objective import piece_load

#: the most one round of feedback may change a rank's price, either way
ALPHA_RANGE = (0.5, 2.0)


def rank_mispricing(predicted: Sequence[float], measured: Sequence[float]) -> np.ndarray:
    """``e_r``: each rank's measured deviation from the ranks' mean minus its predicted one (same units)."""
    p, m = np.asarray(predicted, dtype=np.float64), np.asarray(measured, dtype=np.float64)
    if p.shape != m.shape or p.ndim != 1:
        raise ValueError(f"predicted {p.shape} and measured {m.shape} must be one time per rank")
    return (m - m.mean()) - (p - p.mean())


def rank_alpha(lp: LayerPlacement, prob: LayerProblem, measured_busy: Sequence[float]) -> np.ndarray:
    """``alpha_r`` (the module docstring): rank ``r``'s measured seconds per predicted second of its pieces'
    compute, from the measured time of its attention calls under ``lp`` (in the units of ``prob.costs``)."""
    if len(measured_busy) != prob.tp or len(lp.gpus) != prob.tp:
        raise ValueError(f"need one measured time per rank of TP {prob.tp}, got {len(measured_busy)}")
    times = layer_times(lp, prob)
    err = rank_mispricing(times.busy, measured_busy)
    return np.clip(1.0 + err / np.maximum(times.compute, 1e-12), *ALPHA_RANGE)


def head_cost_scale(lp: LayerPlacement, prob: LayerProblem, measured_busy: Sequence[float]) -> np.ndarray:
    """Multipliers of ``prob.costs`` (one per query head) from the measured time of each rank's attention calls
    under ``lp``, in the units of ``prob.costs`` (the module docstring). Heads on no rank (impossible for a
    valid placement) keep 1."""
    alpha = rank_alpha(lp, prob, measured_busy)
    num, den = np.zeros(prob.num_heads), np.zeros(prob.num_heads)
    for r, gpu in enumerate(lp.gpus):
        for pc in gpu:
            c = piece_load(pc, prob.costs, prob.piece_overhead, prob.profiles)
            num[pc.head] += c * alpha[r]
            den[pc.head] += c
    return np.where(den > 0, num / np.maximum(den, 1e-300), 1.0)


#: the most one refinement moves a cut, in shares of the head's cost (keeps the linear model near where it was measured)
MAX_CUT_STEP = 0.25
#: the least share of a head a piece keeps after a refinement (a piece is not removed: that would change the structure)
MIN_PIECE_SHARE = 0.02
#: weight of the cuts' movement in the refinement's objective (in the objective's seconds per share moved): among
#: cuts that give the same slowest rank, the ones that move least
_MOVE_WEIGHT = 1e-6


def cut_heads(lp: LayerPlacement) -> dict[int, list[tuple[int, Piece]]]:
    """The heads computed in more than one piece: ``head -> [(rank, piece)]`` in query order."""
    by_head: dict[int, list[tuple[int, Piece]]] = {}
    for r, gpu in enumerate(lp.gpus):
        for pc in gpu:
            by_head.setdefault(pc.head, []).append((r, pc))
    return {h: sorted(ps, key=lambda x: x[1].start) for h, ps in sorted(by_head.items()) if len(ps) > 1}


def structure(lp: LayerPlacement) -> tuple:
    """What :func:`refine_cuts` keeps: the rank of every whole head and, per cut head, its ranks in query order."""
    whole = tuple(sorted((pc.head, r) for r, gpu in enumerate(lp.gpus) for pc in gpu if pc.whole))
    return whole, tuple((h, tuple(r for r, _ in ps)) for h, ps in cut_heads(lp).items())


def derives(measured: LayerPlacement, solved: LayerPlacement) -> bool:
    """Could feedback rounds have made ``measured`` from ``solved``? :func:`refine_cuts` keeps the
    :func:`structure` and :func:`open_cut` cuts a whole head on its rank ``r`` into pieces whose last is on ``r``:
    so every cut head of ``solved`` is cut over the same ranks in ``measured``, and every whole head is whole on
    the same rank or cut with its last piece there."""
    if len(measured.gpus) != len(solved.gpus):
        return False
    (whole_s, cuts_s), (whole_m, cuts_m) = structure(solved), structure(measured)
    cuts_m, on_m = dict(cuts_m), dict(whole_m)
    if any(cuts_m.get(h) != ranks for h, ranks in cuts_s):
        return False
    opened = {h for h in cuts_m if h not in dict(cuts_s)}
    return (len(whole_m) + len(opened) == len(whole_s)
            and all(on_m.get(h) == r if h not in opened else cuts_m[h][-1] == r for h, r in whole_s))


def refine_cuts(lp: LayerPlacement, prob: LayerProblem, measured_total: Sequence[float],
                measured_busy: Sequence[float], max_step: float = MAX_CUT_STEP) -> tuple[LayerPlacement, float]:
    """``lp`` with its cut points moved to even out the measured ranks (the linear program of the module
    docstring; ``measured_total``: each rank's layer time, ``measured_busy``: its attention calls, both in the
    units of ``prob.costs``), and the slowest rank the program predicts. Whole heads stay where they are; a head
    whose new cuts round to an empty piece at the profile's query blocks keeps its old cuts. ``lp`` itself when it
    cuts no head."""
    cuts = cut_heads(lp)
    if not cuts:
        return lp, float(max(measured_total))
    if len(measured_total) != prob.tp:
        raise ValueError(f"need one measured time per rank of TP {prob.tp}, got {len(measured_total)}")
    alpha = rank_alpha(lp, prob, measured_busy)
    # variables: the interior cuts of every cut head (cumulative cost share), then T
    var_of: dict[tuple[int, int], int] = {}
    y_old: list[float] = []
    for h, ps in cuts.items():
        prof = prob.profile(h)
        for j, (_, pc) in enumerate(ps[1:], start=1):
            var_of[(h, j)] = len(y_old)
            y_old.append(prof.share(0.0, pc.start) if prof is not None else pc.start)
    nv = len(y_old)
    t_col = nv
    a_ub, b_ub = [], []
    for r in range(prob.tp):
        row, const = np.zeros(nv + 1), float(measured_total[r])
        for h, ps in cuts.items():
            for j, (g, _) in enumerate(ps):
                if g != r:
                    continue
                w = alpha[r] * prob.var[h]      # share s_p = y_end - y_start (y_0 = 0, y_k = 1)
                for idx, sign in (((h, j + 1), 1.0), ((h, j), -1.0)):
                    if idx in var_of:
                        row[var_of[idx]] += sign * w
                        const -= sign * w * y_old[var_of[idx]]
        row[t_col] = -1.0
        a_ub.append(row)
        b_ub.append(-const)
    for h, ps in cuts.items():           # consecutive cuts at least MIN_PIECE_SHARE apart
        for j in range(1, len(ps) + 1):
            row, lo, hi = np.zeros(nv + 1), var_of.get((h, j - 1)), var_of.get((h, j))
            rhs = -MIN_PIECE_SHARE
            if hi is not None:
                row[hi] -= 1.0
            else:
                rhs += 1.0
            if lo is not None:
                row[lo] += 1.0
            a_ub.append(row)
            b_ub.append(rhs)
    # |y - y_old| as two non-negative parts, weighted lightly: x = [y, T, d+, d-], y = y_old + d+ - d-
    a = np.hstack([np.array(a_ub), np.zeros((len(a_ub), 2 * nv))])
    a_eq = np.hstack([np.eye(nv), np.zeros((nv, 1)), -np.eye(nv), np.eye(nv)])
    bounds = ([(max(MIN_PIECE_SHARE, y - max_step), min(1.0 - MIN_PIECE_SHARE, y + max_step)) for y in y_old]
              + [(None, None)] + [(0.0, None)] * (2 * nv))
    c = np.concatenate([np.zeros(nv), [1.0], np.full(2 * nv, _MOVE_WEIGHT * float(prob.costs.max()))])
    res = linprog(c, A_ub=a, b_ub=np.array(b_ub), A_eq=a_eq, b_eq=np.array(y_old), bounds=bounds, method="highs")
    if res.status != 0:
        return lp, float(max(measured_total))
    y = res.x[:nv]
    moved: dict[tuple[int, Piece], Piece] = {}       # (rank, old piece) -> new piece
    for h, ps in cuts.items():
        prof = prob.profile(h)
        xs = [0.0] + [prof.query_fraction(float(y[var_of[(h, j)]])) if prof is not None else float(y[var_of[(h, j)]])
                      for j in range(1, len(ps))] + [1.0]
        if any(b <= a_ for a_, b in zip(xs, xs[1:])):
            continue
        for j, (g, pc) in enumerate(ps):
            moved[(g, pc)] = Piece(h, xs[j], xs[j + 1])
    gpus = [sorted((moved.get((r, pc), pc) for pc in gpu), key=lambda p: (p.head, p.start))
            for r, gpu in enumerate(lp.gpus)]
    return LayerPlacement(gpus), float(res.x[t_col])


#: the first shares :func:`open_cut` tries to give away (of the cut head's cost; at most one refinement's step)
OPEN_CUT_SHARES = tuple(float(x) for x in np.linspace(MIN_PIECE_SHARE, MAX_CUT_STEP, 12))
#: the least a new cut must lower the predicted slowest rank, as a fraction of the measured one, to be tried
OPEN_CUT_MIN_GAIN = 0.01


def open_cut(lp: LayerPlacement, prob: LayerProblem, measured_total: Sequence[float],
             measured_busy: Sequence[float]) -> tuple[LayerPlacement, float]:
    """``lp`` with one more head cut, where :func:`refine_cuts` has no cut to move: the slowest measured rank
    gives the first share ``s`` of one of its whole heads (one ``prob.may_cut``) to another rank. A first piece
    reads the shortest prefix, and round 23 measured such pieces within -4 to +33 % of their price, against 5-38x
    for a short piece after a long prefix. Each candidate (head, rank, ``s`` in :data:`OPEN_CUT_SHARES`) is
    predicted from the measurement by the objective's change, scaled by the rank's measured seconds per predicted
    second (``alpha_r``, :func:`rank_alpha`)::

        T'_r = M_r + alpha_r (T_r(candidate) - T_r(lp))            (T: :func:`~.objective.layer_times`' total)

    so its unit overhead, gathers and links count. Returns the candidate with the lowest predicted slowest rank
    when it is below the measured slowest by :data:`OPEN_CUT_MIN_GAIN`, with that prediction; else ``lp`` and
    the measured slowest."""
    m = np.asarray(measured_total, dtype=np.float64)
    if len(m) != prob.tp or len(lp.gpus) != prob.tp:
        raise ValueError(f"need one measured time per rank of TP {prob.tp}, got {len(m)}")
    slow = int(np.argmax(m))
    if prob.tp < 2:
        return lp, float(m[slow])
    alpha = rank_alpha(lp, prob, measured_busy)
    base = layer_times(lp, prob).total
    best, best_t = lp, float(m[slow]) * (1.0 - OPEN_CUT_MIN_GAIN)
    for pc in lp.gpus[slow]:
        h = pc.head
        if not pc.whole or not prob.may_cut(h) or prob.var[h] <= 0:
            continue
        prof = prob.profile(h)
        for s in OPEN_CUT_SHARES:
            x = prof.query_fraction(s) if prof is not None else s
            if not 0.0 < x < 1.0:
                continue
            for g in range(prob.tp):
                if g == slow:
                    continue
                gpus = [list(gpu) for gpu in lp.gpus]
                gpus[slow] = sorted([p for p in gpus[slow] if p.head != h] + [Piece(h, x, 1.0)],
                                    key=lambda p: (p.head, p.start))
                gpus[g] = sorted(gpus[g] + [Piece(h, 0.0, x)], key=lambda p: (p.head, p.start))
                cand = LayerPlacement(gpus)
                t = float((m + alpha * (layer_times(cand, prob).total - base)).max())
                if t < best_t:
                    best, best_t = cand, t
    return (best, best_t) if best is not lp else (lp, float(m[slow]))


HEAD_SCALES_SCHEMA = "shplb-head-scales/1"


class HeadScalesError(ValueError):
    """A head-scales file that does not fit the plan being placed; the message names the cause."""


def cost_fingerprint(cost_dict: dict) -> str:
    """sha256 of a cost model's description (``CostModel.to_dict()``) without its file paths and with its numbers
    to 12 significant digits: two models price alike when their fingerprints agree, wherever their calibration
    files were read from and however a flag's units were converted (``--unit-overhead-us 50`` gives 5e-05 s
    within a rounding)."""
    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in sorted(x.items()) if k != "path"}
        if isinstance(x, float):
            return float(f"{x:.12g}")
        return [strip(v) for v in x] if isinstance(x, (list, tuple)) else x
    return hashlib.sha256(json.dumps(strip(cost_dict), sort_keys=True).encode()).hexdigest()


def budgets_fingerprint(budgets: Sequence[Sequence[HeadBudget]]) -> str:
    """sha256 of a model's per-layer budgets: the heads the multipliers were measured on."""
    doc = [[b.to_dict() for b in layer] for layer in budgets]
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def _shape(spec: ModelSpec) -> dict:
    return {"num_layers": spec.num_layers, "num_heads": spec.num_heads, "num_kv_heads": spec.num_kv_heads,
            "head_dim": spec.head_dim}


def save_head_scales(path: str | Path, spec: ModelSpec, budgets: Sequence[Sequence[HeadBudget]], cost_dict: dict,
                     entries: Sequence[dict], **provenance) -> Path:
    """Write a head-scales file measured on ``budgets`` priced by ``cost_dict``. ``entries``: ``{"tp", "seq_len",
    "layer", "scale": one multiplier per query head}`` (more keys are kept as the record); ``provenance`` (device,
    date, command, ...) goes in as is."""
    for e in entries:
        if len(e["scale"]) != spec.num_heads:
            raise ValueError(f"entry {e['tp'], e['seq_len'], e['layer']}: {len(e['scale'])} multipliers for "
                             f"{spec.num_heads} query heads")
    doc = {"schema": HEAD_SCALES_SCHEMA, "model": _shape(spec), "budgets_fingerprint": budgets_fingerprint(budgets),
           "cost_model": cost_dict, "cost_fingerprint": cost_fingerprint(cost_dict), **provenance,
           "entries": [{**e, "scale": [float(x) for x in e["scale"]]} for e in entries]}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1))
    return path


@dataclass(frozen=True)
class HeadScales:
    """A head-scales file read for one plan (:func:`load_head_scales`). ``scale(tp, bucket, layer)`` (what
    ``solve_plan_placements`` takes as ``head_scale``) gives the file's multipliers, or None where it measured
    nothing (the model's costs); ``measured_cuts(tp, bucket, layer)`` the placement a refinement measured best
    there, or None. ``summary`` is for the plan's meta: the file's name, fingerprint, provenance and entry count."""

    buckets: Buckets
    scales: dict = field(repr=False)      # (tp, bucket edge, layer) -> multipliers
    cuts: dict = field(repr=False)        # (tp, bucket edge, layer) -> LayerPlacement
    summary: dict

    def scale(self, tp: int, bucket: int, layer: int) -> np.ndarray | None:
        return self.scales.get((tp, self.buckets.upper(bucket), layer))

    def measured_cuts(self, tp: int, bucket: int, layer: int) -> LayerPlacement | None:
        return self.cuts.get((tp, self.buckets.upper(bucket), layer))


def _entry_cuts(pieces, key, spec: ModelSpec, layer_budgets: Sequence[HeadBudget]) -> LayerPlacement:
    """An entry's measured cuts (``[[head, start, end], ...]`` per rank), checked: one list per rank, every head
    covered once, no head cut that may not be (:attr:`HeadBudget.splittable`)."""
    tp, edge, layer = key
    try:
        lp = LayerPlacement([[Piece(int(h), float(a), float(b)) for h, a, b in gpu] for gpu in pieces])
        check_coverage(Placement(tp, edge, "measured", [lp]), spec.num_heads)
    except (TypeError, ValueError, PlacementCoverageError) as e:
        raise HeadScalesError(f"entry {key}: pieces are not a placement of the {spec.num_heads} heads at TP {tp} "
                              f"({e})") from None
    bad = lp.cut_not_splittable(layer_budgets)
    if bad:
        raise HeadScalesError(f"entry {key}: pieces cut heads {bad}, whose pattern may not be cut")
    return lp


def load_head_scales(path: str | Path, spec: ModelSpec, budgets: Sequence[Sequence[HeadBudget]], buckets: Buckets,
                     cost_dict: dict) -> HeadScales:
    """A head-scales file, checked against the model, its budgets, the plan's buckets and the cost model being
    placed with (:class:`HeadScalesError` naming the mismatch)."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise HeadScalesError(f"{path}: not a readable head-scales file ({e})") from None
    if not isinstance(doc, dict) or doc.get("schema") != HEAD_SCALES_SCHEMA:
        raise HeadScalesError(f"{path}: schema must be {HEAD_SCALES_SCHEMA!r}, got "
                              f"{doc.get('schema') if isinstance(doc, dict) else type(doc).__name__!r}")
    if doc.get("model") != _shape(spec):
        raise HeadScalesError(f"{path}: measured on a model shaped {doc.get('model')}, the plan's is {_shape(spec)}")
    if doc.get("budgets_fingerprint") != budgets_fingerprint(budgets):
        raise HeadScalesError(f"{path}: measured on other budgets than these (the multipliers belong to the heads "
                              f"they were measured on); measure this plan's layers again")
    if doc.get("cost_fingerprint") != cost_fingerprint(cost_dict):
        raise HeadScalesError(
            f"{path}: measured against another cost model (file: {doc.get('cost_model', {}).get('source')}, "
            f"calibration {(doc.get('cost_model', {}).get('calibration') or {}).get('path')}); place with the "
            f"same --calibration / --link-gbps / --unit-overhead-us as the measurement, or measure again")
    table: dict[tuple[int, int, int], np.ndarray] = {}
    cuts: dict[tuple[int, int, int], LayerPlacement] = {}
    for e in doc.get("entries", []):
        key = (e.get("tp"), e.get("seq_len"), e.get("layer"))
        if e.get("seq_len") not in buckets.edges:
            raise HeadScalesError(f"{path}: entry {key} is at {e.get('seq_len')} tokens, not a bucket edge of "
                                  f"the plan ({list(buckets.edges)})")
        if not (isinstance(e.get("tp"), int) and e["tp"] >= 2 and isinstance(e.get("layer"), int)
                and 0 <= e["layer"] < spec.num_layers):
            raise HeadScalesError(f"{path}: entry {key}: TP must be >= 2 and the layer in [0, {spec.num_layers})")
        s = e.get("scale")
        if not (isinstance(s, list) and len(s) == spec.num_heads
                and all(isinstance(x, (int, float)) and math.isfinite(x) and x > 0 for x in s)):
            raise HeadScalesError(f"{path}: entry {key}: scale must be {spec.num_heads} finite positive numbers")
        if key in table:
            raise HeadScalesError(f"{path}: entry {key} appears twice")
        table[key] = np.asarray(s, dtype=np.float64)
        if e.get("pieces") is not None:
            try:
                cuts[key] = _entry_cuts(e["pieces"], key, spec, budgets[e["layer"]])
            except HeadScalesError as err:
                raise HeadScalesError(f"{path}: {err}") from None
    summary = {"file": path.name, "cost_fingerprint": doc["cost_fingerprint"], "entries": len(table),
               "measured_cuts": len(cuts), **{k: doc[k] for k in ("device", "date", "command") if k in doc}}
    return HeadScales(buckets, table, cuts, summary)
