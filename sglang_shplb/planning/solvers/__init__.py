"""Placement solvers: pure functions from one layer's head costs to a per-GPU assignment of cost shares.

* :mod:`.common`  the problem (:class:`LayerProblem`), the assignment form and its share-space loads;
* :mod:`.greedy`  ``contiguous`` (SGLang's slicing), ``lpt`` (greedy over whole GQA groups) and the fast
  S-HPLB heuristic ``shplb`` (wrap-around with overhead, LPT variants, local search);
* :mod:`.exact`   ``shplb_exact``: the MILP with ``scipy.optimize.milp``.

An assignment is ``list[list[(head, share)]]``: for each GPU the heads it computes and the share of
each head's variable cost it takes (1.0 = whole head). :mod:`sglang_shplb.planning.place` turns it into
:class:`~sglang_shplb.core.placement_types.LayerPlacement` pieces of query blocks.
"""
from sglang_shplb.planning.solvers.common import Assignment, LayerProblem, share_loads
from sglang_shplb.planning.solvers.exact import solve_exact
from sglang_shplb.planning.solvers.greedy import solve_contiguous, solve_lpt, solve_shplb

SOLVERS = {
    "contiguous": solve_contiguous,
    "lpt": solve_lpt,
    "shplb": solve_shplb,
    "shplb_exact": solve_exact,
}

__all__ = ["Assignment", "LayerProblem", "share_loads", "SOLVERS", "solve_contiguous", "solve_lpt",
           "solve_shplb", "solve_exact"]
