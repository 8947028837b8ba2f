"""``shplb_exact``: the layer placement as a mixed-integer linear program (``scipy.optimize.milp``, HiGHS).

Variables, for query head ``h``, KV head ``k`` and GPU ``g``:

* ``x[h,g]`` in [0, 1]: share of head ``h``'s cost computed on ``g`` (binary when heads may not split);
* ``y[h,g]`` binary: ``g`` holds a piece of ``h``;
* ``z[k,g]`` binary: ``g`` holds KV head ``k``;
* ``T``: the makespan.

Constraints: ``sum_g x[h,g] = 1``; ``x <= y``; ``y[h,g] <= z[kv(h),g]``;
``load_g = sum_h var_h x[h,g] + fixed_h y[h,g] <= T`` (a whole head costs ``fixed + var = cost``, every
extra piece pays ``fixed`` again); ``sum z - Hkv <= max_replicated_kv``; with ``equal_heads``
``sum_h x[h,g] = H / G``; symmetry breaking ``load_0 >= load_1 >= ...``; ``T`` at most the heuristic's
makespan. Objective: ``T`` plus 1e-8 (relative to the mean load) per piece and per KV copy, which prefers,
among placements of equal makespan, one with fewer pieces and replicas.

Costs are scaled so the mean GPU load is 1. On a time limit the best solution found is returned
(``optimal`` False, ``bound`` the proven lower bound); if none was found, the heuristic's.

The MILP is transfer-unaware: it minimises compute only (``optimal`` and ``bound`` are about that), its
GPUs are then renumbered to keep the most work home (:func:`~.common.relabel_to_home`), and the result is
priced like any other with the transfer term (:mod:`.objective`) by the caller.
"""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_matrix

from sglang_shplb.planning.solvers.common import Assignment, LayerProblem, SolverResult, relabel_to_home, share_loads
from sglang_shplb.planning.solvers.home import solve_shplb

EPS_COUNT = 1e-8


@contextmanager
def _solver_output_silenced():
    """HiGHS prints some internal messages straight to the process's stdout/stderr, whatever ``disp`` says:
    both file descriptors go to /dev/null for the solve."""
    sys.stdout.flush(), sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in saved:
            os.dup2(devnull, fd)
        yield
    finally:
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)
        os.close(devnull)


def solve_exact(p: LayerProblem) -> SolverResult:
    H, G, K = p.num_heads, p.tp, p.num_kv
    heur = solve_shplb(p)
    ub = float(share_loads(p, heur.assignment).max())
    total = float(p.costs.sum())
    if total <= 0.0:
        return SolverResult(heur.assignment, heur.placement, heur.times, optimal=True, bound=0.0)
    scale = total / G
    var, fixed = p.var / scale, p.fixed / scale

    nx = H * G
    ix = lambda h, g: h * G + g  # noqa: E731
    iy = lambda h, g: nx + h * G + g  # noqa: E731
    iz = lambda k, g: 2 * nx + k * G + g  # noqa: E731
    iT = 2 * nx + K * G
    n = iT + 1

    rows, cols, vals, lo, hi = [], [], [], [], []
    r = 0

    def add(entries, lb, ubd):
        nonlocal r
        for c, v in entries:
            rows.append(r)
            cols.append(c)
            vals.append(v)
        lo.append(lb)
        hi.append(ubd)
        r += 1

    for h in range(H):
        add([(ix(h, g), 1.0) for g in range(G)], 1.0, 1.0)
    for h in range(H):
        for g in range(G):
            add([(ix(h, g), 1.0), (iy(h, g), -1.0)], -np.inf, 0.0)
            add([(iy(h, g), 1.0), (iz(p.kv(h), g), -1.0)], -np.inf, 0.0)

    def load_terms(g, sign=1.0):
        t = []
        for h in range(H):
            if var[h]:
                t.append((ix(h, g), sign * var[h]))
            if fixed[h]:
                t.append((iy(h, g), sign * fixed[h]))
        return t

    for g in range(G):
        add(load_terms(g) + [(iT, -1.0)], -np.inf, 0.0)
    for g in range(G - 1):  # symmetry breaking: GPUs are interchangeable
        add(load_terms(g) + load_terms(g + 1, -1.0), 0.0, np.inf)
    if p.max_replicated_kv is not None:
        add([(iz(k, g), 1.0) for k in range(K) for g in range(G)], -np.inf, K + p.max_replicated_kv)
    if p.equal_heads:
        per = H // G
        for g in range(G):
            add([(ix(h, g), 1.0) for h in range(H)], per, per)

    A = csr_matrix((vals, (rows, cols)), shape=(r, n))
    c = np.zeros(n)
    c[iT] = 1.0
    c[nx:2 * nx] = EPS_COUNT
    c[2 * nx:iT] = EPS_COUNT
    integrality = np.ones(n)
    integrality[iT] = 0
    for h in range(H):
        if p.may_cut(h):
            integrality[ix(h, 0):ix(h, 0) + G] = 0
    upper = np.ones(n)
    upper[iT] = ub / scale * (1 + 1e-6) + 1e-9
    with _solver_output_silenced():
        res = milp(c, constraints=LinearConstraint(A, lo, hi), integrality=integrality,
                   bounds=Bounds(np.zeros(n), upper),
                   options={"time_limit": float(p.time_limit), "mip_rel_gap": 1e-6, "presolve": True})
    bound = getattr(res, "mip_dual_bound", None)
    bound = None if bound is None or not np.isfinite(bound) else max(0.0, float(bound) - EPS_COUNT * (2 * nx)) * scale
    if res.x is None:
        return SolverResult(heur.assignment, heur.placement, heur.times, optimal=False, bound=bound,
                            info={"status": int(res.status), "fallback": "shplb"})
    x = res.x[:nx].reshape(H, G)
    assign: Assignment = [[] for _ in range(G)]
    for h in range(H):
        row = np.where(x[h] > 1e-7, x[h], 0.0)
        row = row / row.sum()
        for g in range(G):
            if row[g] > 0:
                assign[g].append((h, 1.0 if row[g] >= 1.0 - 1e-9 else float(row[g])))
    optimal = res.status == 0
    m = float(share_loads(p, assign).max())
    if m > ub * (1 + 1e-9):  # rounding of a time-limited solution lost against the heuristic
        return SolverResult(heur.assignment, heur.placement, heur.times, optimal=False, bound=bound,
                            info={"status": int(res.status), "fallback": "shplb"})
    if optimal:
        bound = m / (1 + 1e-6) if bound is None else bound
    return SolverResult(relabel_to_home(p, assign), optimal=optimal, bound=bound,
                        info={"status": int(res.status), "milp_T": float(res.x[iT]) * scale})
