"""What a unit of work away from the single-rank path costs on a device, fitted from measured per-rank times
(``bench/head_parallel.py``), as a record the cost model reads (schema ``shplb-move-calibration/1``).

Model (measured seconds, per rank ``r`` of an emulated layer; ``pred`` = the kernel cost model's seconds)::

    home_r         = sigma * pred(whole heads at home)                            (device compute scale)
    units_r        = u * n_units_r + (sigma / eff) * pred(units r computes)       (units shipped here)
    local_units_r  = u * n_local_r + (sigma / eff) * pred(local units) + staged_local_bytes_r / g
    pack_r         = gathered_bytes_r / g                                         (prefixes + q rows shipped)

* ``sigma``: measured home time over the kernel table's prediction (an H100 table on an H200: < 1);
* ``u``: per-unit overhead (an extra attention call, q-row stacking, output copies, its share of the
  collectives' bookkeeping);
* ``g``: bytes per second of the staging gathers (K/V prefixes out of the paged pool, q rows);
* ``eff``: moved-piece efficiency, a piece's time in the head-parallel executor relative to the same work
  inside the home's fused call (``eff < 1``: pieces are slower per FLOP).

``sigma`` is fitted first (least squares through 0 on the home times), then ``u``, ``1/g`` and
``sigma/eff`` jointly by non-negative least squares on the unit / local-unit / pack equations, each
equation weighted by ``1 / measured`` (relative residuals: a 30 µs term is not drowned by a 30 ms one).

The cost model prices in its own seconds (the kernel table's), so the record is applied there in those
units (:func:`apply_to_cost_model`): ``unit_overhead_s = u / sigma``, ``gather_bytes_per_s = g * sigma``,
``piece_efficiency = eff``. A moved unit then costs ``u + bytes / g + piece / eff`` in the objective
(:mod:`sglang_shplb.planning.solvers.objective`); without a record the documented defaults hold (50 µs per
unit, gathers free, efficiency 1).

Record (JSON)::

    {"schema": "shplb-move-calibration/1", "device": ..., "date": ..., "source": [files fitted],
     "kernel_calibration": "calibration_h100_tiles.json",   # the table the predictions came from (relative
                                                            # to this file, or absolute); optional
     "compute_scale": sigma, "unit_overhead_s": u, "gather_bytes_per_s": g, "piece_efficiency": eff,
     "call_overhead_s": .., "piece_efficiency_by_kind": {"dense_after_prefix": .., ...},  # informative
     "residuals": {...}, "points": n}
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy.optimize import nnls

from sglang_shplb.planning.cost_model import (MOVE_CALIBRATION_SCHEMA, CostProfile, is_move_calibration,
                                              kernel_calibration_path, model_terms, validate_move_calibration)

__all__ = ["MOVE_CALIBRATION_SCHEMA", "KINDS", "MoveFit", "RankRecord", "fit_moves", "format_fit",
           "is_move_calibration", "kernel_calibration_path", "model_terms", "piece_kind", "rank_predictions",
           "validate_move_calibration", "write_move_calibration"]


@dataclass
class RankRecord:
    """One rank of one emulated layer: measured milliseconds and what the cost model predicted / what moved.

    ``home_pred_s``: kernel cost-model seconds of the whole heads at home. ``units``: one dict per unit
    this rank computes (``pred_s`` its cost-model seconds, ``pattern``, ``start`` its first query-block
    fraction, ``home`` its home rank: units shipped here have ``home != rank``, local units, split pieces
    that stay home, ``home == rank``). ``gathered_bytes``: K/V prefixes + q rows this rank packs for other
    ranks; ``local_staged_bytes``: K/V prefixes its local units gather from its own pool."""
    rank: int
    home_ms: float
    home_pred_s: float
    units: list = field(default_factory=list)
    units_ms: float = 0.0
    local_units_ms: float = 0.0
    pack_ms: float = 0.0
    gathered_bytes: int = 0
    local_staged_bytes: int = 0
    tag: str = ""

    @staticmethod
    def from_dict(d: dict) -> "RankRecord":
        keys = RankRecord.__dataclass_fields__
        return RankRecord(**{k: v for k, v in d.items() if k in keys})

    def part(self, local: bool) -> list:
        return [u for u in self.units if (u["home"] == self.rank) == local]


#: piece kinds of the per-kind (informative) fit: dense after a prefix, dense from query 0, sparse
KINDS = ("dense_after_prefix", "dense_from_start", "sparse")


def piece_kind(u: dict) -> str:
    if u["pattern"] != "dense":
        return "sparse"
    return "dense_after_prefix" if u["start"] > 0 else "dense_from_start"


@dataclass
class MoveFit:
    sigma: float                    # measured home seconds per cost-model second
    call_overhead_s: float          # the home call's fixed part (measured; informative)
    unit_overhead_s: float          # measured seconds
    gather_bytes_per_s: float       # measured bytes / s (inf when the gathers cost nothing measurable)
    piece_efficiency: float
    efficiency_by_kind: dict = field(default_factory=dict)
    residuals: dict = field(default_factory=dict)
    points: int = 0

    def record(self, device: str, date: str, source: Sequence[str], kernel_calibration: str | None) -> dict:
        g = self.gather_bytes_per_s
        return {"schema": MOVE_CALIBRATION_SCHEMA, "device": device, "date": date, "source": list(source),
                "kernel_calibration": kernel_calibration, "compute_scale": self.sigma,
                "call_overhead_s": self.call_overhead_s, "unit_overhead_s": self.unit_overhead_s,
                "gather_bytes_per_s": None if not math.isfinite(g) else g,
                "piece_efficiency": self.piece_efficiency,
                "piece_efficiency_by_kind": self.efficiency_by_kind,
                "residuals": self.residuals, "points": self.points}


def _rel_stats(pred: np.ndarray, meas: np.ndarray) -> dict:
    if len(meas) == 0:
        return {"n": 0}
    rel = (pred - meas) / meas
    return {"n": int(len(meas)), "rms_rel": float(np.sqrt(np.mean(rel ** 2))), "max_abs_rel": float(np.abs(rel).max()),
            "rms_ms": float(np.sqrt(np.mean((pred - meas) ** 2)) * 1e3)}


def _nnls_rel(A: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Non-negative least squares of ``A x = t`` on relative residuals (rows weighted by ``1 / t``)."""
    W = A / t[:, None]
    scale = np.abs(W).max(axis=0)
    scale[scale == 0] = 1.0
    coef, _ = nnls(W / scale, np.ones_like(t))
    return coef / scale


def fit_moves(records: Sequence[RankRecord], min_ms: float = 0.005) -> MoveFit:
    """Fit ``sigma``, ``u``, ``g`` and ``eff`` (the module docstring) from per-rank records. Timings under
    ``min_ms`` (the timer's floor: nothing ran) are left out. The home fit has an intercept (the call's
    fixed part: index build, launches), so ``sigma`` is the slope."""
    recs = list(records)
    home = [(r.home_ms * 1e-3, r.home_pred_s) for r in recs if r.home_pred_s > 0 and r.home_ms >= min_ms]
    if len(home) < 2:
        raise ValueError("too few home timings to fit the compute scale")
    hm, hp = np.array([h[0] for h in home]), np.array([h[1] for h in home])
    c0, sigma = (float(x) for x in _nnls_rel(np.stack([np.ones_like(hp), hp], 1), hm))
    if sigma <= 0:
        raise ValueError("home timings do not grow with the predicted compute")
    rows, meas, kinds = [], [], []
    for r in recs:
        for local, t_ms, nbytes in ((False, r.units_ms, 0), (True, r.local_units_ms, r.local_staged_bytes)):
            us = r.part(local)
            if us and t_ms >= min_ms:
                by = [sum(u["pred_s"] for u in us if piece_kind(u) == k) for k in KINDS]
                rows.append([len(us), nbytes, *by])
                meas.append(t_ms * 1e-3)
                kinds.append("local_units" if local else "units")
        if r.gathered_bytes and r.pack_ms >= min_ms:
            rows.append([0.0, r.gathered_bytes, 0.0, 0.0, 0.0])
            meas.append(r.pack_ms * 1e-3)
            kinds.append("pack")
    if not rows:
        raise ValueError("no unit timings to fit")
    A, t, kinds_a = np.array(rows, dtype=np.float64), np.array(meas), np.array(kinds)
    # one efficiency for every piece: what the objective uses (columns u, 1/g, sigma/eff)
    A1 = np.stack([A[:, 0], A[:, 1], A[:, 2:].sum(1)], axis=1)
    c1 = _nnls_rel(A1, t)
    u, inv_g, s_eff = (float(x) for x in c1)
    eff = sigma / s_eff if s_eff > 0 else float("inf")
    # per kind (informative: what each kind of piece runs at)
    c2 = _nnls_rel(A, t)
    by = {k: (sigma / c if c > 0 else float("inf")) for k, c, col in zip(KINDS, c2[2:], A[:, 2:].T) if np.any(col > 0)}
    pred = A1 @ c1
    res = {"home": _rel_stats(c0 + sigma * hp, hm)}
    for k in ("units", "local_units", "pack"):
        m = kinds_a == k
        res[k] = _rel_stats(pred[m], t[m])
    res["all_units"] = _rel_stats(pred, t)
    res["per_kind_fit"] = {**_rel_stats(A @ c2, t), "unit_overhead_s": float(c2[0]),
                           "gather_bytes_per_s": float(1 / c2[1]) if c2[1] > 0 else None}
    return MoveFit(sigma, c0, u, 1.0 / inv_g if inv_g > 0 else float("inf"), eff, by, res, len(t) + len(hm))


def format_fit(fit: MoveFit) -> str:
    g = fit.gather_bytes_per_s
    lines = [f"compute scale sigma (measured / kernel table, slope) {fit.sigma:.3f}",
             f"unit overhead {fit.unit_overhead_s * 1e6:.1f} us (measured); {fit.unit_overhead_s / fit.sigma * 1e6:.1f} us "
             f"in cost-model seconds",
             f"gather {g / 1e9:.0f} GB/s" if math.isfinite(g) else "gather: not measurable (free)",
             f"moved-piece efficiency {fit.piece_efficiency:.3f} (per kind: "
             + ", ".join(f"{k} {v:.3f}" for k, v in fit.efficiency_by_kind.items()) + ")",
             f"home call fixed part {fit.call_overhead_s * 1e6:.0f} us"]
    for k, v in fit.residuals.items():
        if v.get("n"):
            lines.append(f"  residuals {k:16s} n={v['n']:3d} rms {v['rms_rel']:6.1%} max {v['max_abs_rel']:6.1%} "
                         f"({v['rms_ms']:.3f} ms rms)")
    return "\n".join(lines)


# ---- the record (read by :func:`~sglang_shplb.planning.cost_model.load_cost_model`) -----------------------

def write_move_calibration(path: str | Path, record: dict) -> Path:
    """Write ``record`` to ``path``, its ``kernel_calibration`` made relative to ``path``'s folder (the
    record then travels with its kernel table, e.g. from a GPU machine's checkout into the repository)."""
    validate_move_calibration(record)
    path = Path(path)
    kernel = record.get("kernel_calibration")
    if kernel and Path(kernel).is_absolute():
        record = {**record, "kernel_calibration": os.path.relpath(kernel, path.resolve().parent)}
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


# ---- what a placement asks of each rank (the predictions a record is fitted against) --------------------

def rank_predictions(lp, budgets, cost_model, seq_len: int, num_kv_heads: int, tp: int, head_dim: int,
                     dtype_bytes: int = 2) -> list[dict]:
    """Per rank of layer placement ``lp`` (one request of ``seq_len`` tokens, no prefix): the
    :class:`RankRecord` fields other than the measured ones: the cost model's seconds of its whole home
    heads, its units (shipped here or local) with their predicted seconds, the bytes it gathers to ship
    (K/V bundles + q rows) and the K/V its local units stage from its own pool."""
    from sglang_shplb.core.exchange import kv_bundle_lens, piece_rows
    from sglang_shplb.core.head_map import layer_work
    from sglang_shplb.core.placement_types import Piece
    from sglang_shplb.planning.solvers.objective import piece_load

    hq = len(budgets)
    costs = cost_model.layer_costs(list(budgets), seq_len, head_dim, hq // num_kv_heads)
    profiles = [CostProfile.of(b, seq_len) for b in budgets]
    work = layer_work(lp, hq, num_kv_heads, tp)
    out = [{"rank": r, "home_pred_s": float(sum(costs[h] for h in work.whole[r])), "units": [],
            "gathered_bytes": 0, "local_staged_bytes": 0} for r in range(tp)]
    unit_rows = []
    for u in work.units:
        a, b = piece_rows(u.start, u.end, 0, seq_len)
        out[u.target]["units"].append({
            "head": u.head, "kv_head": u.kv_head, "start": u.start, "end": u.end, "home": u.home, "rows": [a, b],
            "pattern": budgets[u.head].pattern.value,
            "pred_s": piece_load(Piece(u.head, u.start, u.end), costs, cost_model.piece_overhead, profiles)})
        unit_rows.append(((u.home, u.target, u.kv_head), ((a, b),)))
        if u.moved:
            out[u.home]["gathered_bytes"] += (b - a) * head_dim * dtype_bytes
    for (s, t, _), (n,) in kv_bundle_lens(unit_rows, (0,)).items():
        out[s]["local_staged_bytes" if s == t else "gathered_bytes"] += 2 * n * head_dim * dtype_bytes
    for o in out:  # the executor's attention calls: one per (home, KV head, rows) of the units computed here
        o["calls"] = len({(u["home"], u["kv_head"], tuple(u["rows"])) for u in o["units"] if u["rows"][1] > u["rows"][0]})
    return out
