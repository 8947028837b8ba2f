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

Staging (the gathers a home makes to ship work) and link time are not charged: they are the move calibration's
(:mod:`.move_calibration`). Charging them to the heads a rank computes points the wrong way: a home slow from
shipping would look dear, and the next solve would ship more from it. Round 21 charged whole rank times and saw
this (H100, llama70b 64K mixed TP 8: a home's gathers 2.11 ms against 0.80 predicted, then more moved off it).
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


def head_cost_scale(lp: LayerPlacement, prob: LayerProblem, measured_busy: Sequence[float]) -> np.ndarray:
    """Multipliers of ``prob.costs`` (one per query head) from the measured time of each rank's attention calls
    under ``lp``, in the units of ``prob.costs`` (the module docstring). Heads on no rank (impossible for a
    valid placement) keep 1."""
    if len(measured_busy) != prob.tp or len(lp.gpus) != prob.tp:
        raise ValueError(f"need one measured time per rank of TP {prob.tp}, got {len(measured_busy)}")
    times = layer_times(lp, prob)
    err = rank_mispricing(times.busy, measured_busy)
    alpha = np.clip(1.0 + err / np.maximum(times.compute, 1e-12), *ALPHA_RANGE)
    num, den = np.zeros(prob.num_heads), np.zeros(prob.num_heads)
    for r, gpu in enumerate(lp.gpus):
        for pc in gpu:
            c = piece_load(pc, prob.costs, prob.piece_overhead, prob.profiles)
            num[pc.head] += c * alpha[r]
            den[pc.head] += c
    return np.where(den > 0, num / np.maximum(den, 1e-300), 1.0)
