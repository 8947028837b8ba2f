"""Measured feedback for the placement: per-head cost multipliers from one placement's measured per-rank
times, so that the next solve sees what the cost model missed on that device.

The objective (:mod:`.solvers.objective`) predicts rank ``r``'s time ``p_r``; the device measures ``m_r``. The
two differ by a part common to every rank (the home call's fixed cost, which the objective leaves out) and
by what the cost model misprices on that rank (e.g. a mix of short heads running with a cold L2, round 17).
Only the second moves the slowest rank, so only it is charged::

    e_r     = (m_r - mean(m)) - (p_r - mean(p))          rank r's mispricing, in the prediction's units
    alpha_r = clip(1 + e_r / C_r)                         C_r: the compute the prediction gives rank r
    scale_h = sum_r load_hr * alpha_r / sum_r load_hr     load_hr: head h's piece load on rank r

A head computed on one rank takes that rank's ``alpha``; a head cut over ranks the load-weighted mean. Feeding
``costs * scale`` back to the solver and measuring again is a fixed-point iteration: its fixed point is a
placement whose measured ranks are as even as the pieces allow (``bench/head_parallel.py --feedback``).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from sglang_shplb.core.placement_types import LayerPlacement
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


def head_cost_scale(lp: LayerPlacement, prob: LayerProblem, measured: Sequence[float]) -> np.ndarray:
    """Multipliers of ``prob.costs`` (one per query head) from ``lp``'s measured per-rank times, in the units of
    ``prob.costs`` (the module docstring). Heads on no rank (impossible for a valid placement) keep 1."""
    if len(measured) != prob.tp or len(lp.gpus) != prob.tp:
        raise ValueError(f"need one measured time per rank of TP {prob.tp}, got {len(measured)}")
    times = layer_times(lp, prob)
    err = rank_mispricing(times.total, measured)
    loads = [[(pc.head, piece_load(pc, prob.costs, prob.piece_overhead, prob.profiles)) for pc in gpu]
             for gpu in lp.gpus]
    alpha = np.clip(1.0 + err / np.maximum(times.compute, 1e-12), *ALPHA_RANGE)
    num, den = np.zeros(prob.num_heads), np.zeros(prob.num_heads)
    for r, gpu in enumerate(loads):
        for h, c in gpu:
            num[h] += c * alpha[r]
            den[h] += c
    return np.where(den > 0, num / np.maximum(den, 1e-300), 1.0)
