"""Baseline solvers: SGLang's contiguous slicing (the home placement) and LPT over whole GQA groups.

``lpt`` places whole GQA groups (or, with ``equal_heads`` and a head count per GPU that is not a whole
number of groups, single heads) largest first on the least loaded GPU, then renumbers the GPUs so that
the most work stays on its home rank (:func:`~.common.relabel_to_home`: compute is the same on any
numbering, the moved work is not). The S-HPLB heuristic is :mod:`.home`.
"""
from __future__ import annotations

from sglang_shplb.core.head_map import home_heads
from sglang_shplb.planning.solvers.common import Assignment, LayerProblem, SolverResult, relabel_to_home


def sglang_kv_heads(num_kv_heads: int, tp: int) -> list[list[int]]:
    """The KV heads SGLang's ``QKVParallelLinear`` gives each rank: ``Hkv / G`` consecutive ones when
    ``G <= Hkv``; when ``G > Hkv`` each KV head is replicated ``G / Hkv`` times and rank ``r`` holds KV
    head ``r // (G / Hkv) = r * Hkv // G`` (``shard_id = tp_rank // num_kv_head_replicas``)."""
    if tp <= num_kv_heads:
        per = num_kv_heads // tp
        return [list(range(r * per, (r + 1) * per)) for r in range(tp)]
    return [[r * num_kv_heads // tp] for r in range(tp)]


def solve_contiguous(p: LayerProblem) -> SolverResult:
    """SGLang's slicing: every head whole on its home rank (:func:`~sglang_shplb.core.head_map.home_heads`)."""
    return SolverResult([[(h, 1.0) for h in heads] for heads in home_heads(p.num_heads, p.tp)])


# ---- LPT ------------------------------------------------------------------------------------------------

def lpt_groups(p: LayerProblem, capacity: int | None = None) -> Assignment:
    """Classic LPT over whole GQA groups (units sorted by cost, each to the least-loaded GPU)."""
    gs, G = p.group_size, p.tp
    gc = p.costs.reshape(p.num_kv, gs).sum(axis=1)
    loads, cnt = [0.0] * G, [0] * G
    out: Assignment = [[] for _ in range(G)]
    for k in sorted(range(p.num_kv), key=lambda k: (-gc[k], k)):
        g = min((g for g in range(G) if capacity is None or cnt[g] < capacity), key=lambda g: (loads[g], g))
        out[g].extend((h, 1.0) for h in range(k * gs, (k + 1) * gs))
        loads[g] += float(gc[k])
        cnt[g] += 1
    return out


def lpt_heads(p: LayerProblem, capacity: int | None = None) -> Assignment:
    """LPT over single heads; ties go to a GPU already holding the head's KV head; the replica cap is kept
    while it can be (a head whose KV head is nowhere yet needs no replica)."""
    G, cap = p.tp, p.max_replicated_kv
    loads, cnt = [0.0] * G, [0] * G
    kv_on = [set() for _ in range(G)]
    copies = [0] * p.num_kv
    reps = 0
    out: Assignment = [[] for _ in range(G)]
    for h in sorted(range(p.num_heads), key=lambda h: (-p.costs[h], h)):
        k = p.kv(h)
        best = None
        for relax in (False, True):
            for g in range(G):
                if capacity is not None and cnt[g] >= capacity:
                    continue
                new_rep = k not in kv_on[g] and copies[k] > 0
                if new_rep and cap is not None and reps >= cap and not relax:
                    continue
                key = (loads[g], 0 if k in kv_on[g] else 1, g)
                if best is None or key < best:
                    best = key
            if best is not None:
                break
        g = best[2]
        if k not in kv_on[g]:
            reps += copies[k] > 0
            copies[k] += 1
            kv_on[g].add(k)
        out[g].append((h, 1.0))
        loads[g] += float(p.costs[h])
        cnt[g] += 1
    return out


def solve_lpt(p: LayerProblem) -> SolverResult:
    """Baseline: LPT over whole GQA groups (no replicated KV). With ``equal_heads`` the groups are placed
    with a per-GPU group count; when a GPU's head count is not a whole number of groups, over single heads."""
    if p.equal_heads:
        per = p.num_heads // p.tp
        if per % p.group_size == 0:
            return SolverResult(relabel_to_home(p, lpt_groups(p, per // p.group_size)))
        return SolverResult(relabel_to_home(p, lpt_heads(p, per)))
    return SolverResult(relabel_to_home(p, lpt_groups(p)))
