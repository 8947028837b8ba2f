"""Placement solvers: pure functions from one layer's head costs to a per-GPU assignment.

* :mod:`.common`     the problem (:class:`LayerProblem`: costs, options, cost profiles, transfer term), the
  assignment form and its share-space loads;
* :mod:`.objective`  what a placement costs: per rank compute + unit overhead + exposed transfer, the
  layer's time the slowest rank's (:func:`layer_times`); every solver's result is judged by it;
* :mod:`.greedy`     ``contiguous`` (SGLang's slicing, the home placement) and ``lpt`` (greedy over whole
  GQA groups);
* :mod:`.home`       ``shplb``: the home-aware S-HPLB heuristic (moves work off the slowest rank only
  while the objective falls);
* :mod:`.exact`      ``shplb_exact``: the compute MILP with ``scipy.optimize.milp`` (transfer-unaware).

An assignment is ``list[list[(head, share)]]``: for each GPU the heads it computes and the share of
each head's variable cost it takes (1.0 = whole head). :func:`assignment_to_layer` turns it into
:class:`~sglang_shplb.core.placement_types.LayerPlacement` pieces of query blocks, unless the solver cut
them itself (``SolverResult.placement``).
"""
from sglang_shplb.planning.solvers.common import Assignment, LayerProblem, LayerTimes, share_loads
from sglang_shplb.planning.solvers.exact import solve_exact
from sglang_shplb.planning.solvers.greedy import solve_contiguous, solve_lpt
from sglang_shplb.planning.solvers.home import solve_shplb
from sglang_shplb.planning.solvers.objective import assignment_to_layer, layer_times

SOLVERS = {
    "contiguous": solve_contiguous,
    "lpt": solve_lpt,
    "shplb": solve_shplb,
    "shplb_exact": solve_exact,
}

__all__ = ["Assignment", "LayerProblem", "LayerTimes", "share_loads", "SOLVERS", "assignment_to_layer",
           "layer_times", "solve_contiguous", "solve_lpt", "solve_shplb", "solve_exact"]
