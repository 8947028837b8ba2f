"""Fast solvers: SGLang's contiguous slicing, LPT over whole GQA groups, and the S-HPLB heuristic.

``shplb`` builds several candidates and keeps, among the feasible ones within ``SELECT_REL_TOL``
(0.1 %) of the smallest makespan, the one with the fewest replicated KV heads, then fewest pieces:

1. ``contiguous`` itself, so S-HPLB is never worse than SGLang's default when that default respects the
   options (replica cap, equal head counts);
2. LPT over whole GQA groups (no replicas), then LPT over single heads (placing a head where its KV head
   already is on ties, within the replica cap), each improved by a move/swap local search;
3. McNaughton's wrap-around over heads in KV-group order with the target makespan raised until every
   piece fits: with free splitting it is optimal (``sum(c) / G``, at most ``G - 1`` splits); here each
   extra piece pays ``piece_overhead`` and pieces below 0.1 % of the target are not cut. The replica cap
   is honoured while filling (once spent, a group stays on one GPU). A merge pass then folds a split
   head's smaller piece into another of its pieces when that does not raise the makespan;
4. the same wrap-around without head splits (only group splits), improved by the local search.
"""
from __future__ import annotations

import numpy as np

from sglang_shplb.planning.solvers.common import Assignment, LayerProblem, SolverResult, feasible, num_pieces, replicas, share_loads

_TOL = 1e-12
#: ``shplb`` keeps, among candidates within this relative makespan of the best, the one with the fewest
#: replicated KV heads, then the fewest pieces (memory and launches matter more than 0.1 % of time).
SELECT_REL_TOL = 1e-3


def contiguous_heads(num_heads: int, tp: int) -> list[list[int]]:
    """SGLang's head slices: rank ``r`` gets query heads ``[r H/G, (r+1) H/G)`` when ``G`` divides ``H``.
    Otherwise (SGLang refuses such a TP size) the near-even contiguous split of ``numpy.array_split``:
    the first ``H % G`` ranks get one head more. Ranks beyond ``H`` get none."""
    base, extra = divmod(num_heads, tp)
    out, h = [], 0
    for r in range(tp):
        n = base + (1 if r < extra else 0)
        out.append(list(range(h, h + n)))
        h += n
    return out


def sglang_kv_heads(num_kv_heads: int, tp: int) -> list[list[int]]:
    """The KV heads SGLang's ``QKVParallelLinear`` gives each rank: ``Hkv / G`` consecutive ones when
    ``G <= Hkv``; when ``G > Hkv`` each KV head is replicated ``G / Hkv`` times and rank ``r`` holds KV
    head ``r // (G / Hkv) = r * Hkv // G`` (``shard_id = tp_rank // num_kv_head_replicas``)."""
    if tp <= num_kv_heads:
        per = num_kv_heads // tp
        return [list(range(r * per, (r + 1) * per)) for r in range(tp)]
    return [[r * num_kv_heads // tp] for r in range(tp)]


def solve_contiguous(p: LayerProblem) -> SolverResult:
    return SolverResult([[(h, 1.0) for h in heads] for heads in contiguous_heads(p.num_heads, p.tp)])


# ---- LPT ------------------------------------------------------------------------------------------------

def _lpt_groups(p: LayerProblem, capacity: int | None = None) -> Assignment:
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


def _lpt_heads(p: LayerProblem, capacity: int | None = None) -> Assignment:
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
            return SolverResult(_lpt_groups(p, per // p.group_size))
        return SolverResult(_lpt_heads(p, per))
    return SolverResult(_lpt_groups(p))


# ---- local search over whole heads --------------------------------------------------------------------

def _improve_whole(p: LayerProblem, assign: Assignment, max_iter: int = 100, target: float = 0.0) -> Assignment:
    """Moves (not with equal_heads) and swaps of whole heads off the most loaded GPU while that lowers the
    pair's maximum and keeps the replica cap; stops early once the makespan is at most ``target``.
    Pieces of split heads are left where they are."""
    G, cap, c = p.tp, p.max_replicated_kv, p.costs
    heads = [[h for h, s in g if s >= 1.0 - _TOL] for g in assign]
    fixed_load = [sum(p.piece_cost(h, s) for h, s in g if s < 1.0 - _TOL) for g in assign]
    kvcnt = [dict() for _ in range(G)]
    for g, gpu in enumerate(assign):
        for h, _ in gpu:
            kvcnt[g][p.kv(h)] = kvcnt[g].get(p.kv(h), 0) + 1
    copies = sum(len(d) for d in kvcnt)
    distinct = len({k for d in kvcnt for k in d})
    loads = [fixed_load[g] + sum(float(c[h]) for h in heads[g]) for g in range(G)]
    eps = 1e-12 * max(sum(loads), 1e-300)

    def delta_copies(a: int, b: int, ka: int, kb: int | None) -> int:
        # copies change when moving one head of KV ka from a to b (and one of kb from b to a for a swap)
        if ka == kb:
            return 0
        d = 0
        d -= kvcnt[a].get(ka, 0) == 1
        d += kvcnt[b].get(ka, 0) == 0
        if kb is not None:
            d -= kvcnt[b].get(kb, 0) == 1
            d += kvcnt[a].get(kb, 0) == 0
        return d

    def apply(a: int, b: int, h: int, h2: int | None) -> None:
        nonlocal copies
        for src, dst, x in ((a, b, h), (b, a, h2)):
            if x is None:
                continue
            k = p.kv(x)
            heads[src].remove(x)
            heads[dst].append(x)
            kvcnt[src][k] -= 1
            if kvcnt[src][k] == 0:
                del kvcnt[src][k]
                copies -= 1
            if kvcnt[dst].get(k, 0) == 0:
                copies += 1
            kvcnt[dst][k] = kvcnt[dst].get(k, 0) + 1
            loads[src] -= float(c[x])
            loads[dst] += float(c[x])

    cf = [float(x) for x in c]
    moves = not p.equal_heads
    for _ in range(max_iter):
        a = max(range(G), key=lambda g: (loads[g], -g))
        La = loads[a]
        if La <= target:
            break
        best = None  # (new pair max, b, h, h2)
        best_m = La - eps
        for b in range(G):
            Lb = loads[b]
            gap = La - Lb  # moving cost d from a to b lowers the pair max iff 0 < d < gap
            if b == a or gap <= 2 * eps:
                continue
            half = 0.5 * gap
            hb = heads[b]
            for h in heads[a]:
                ch = cf[h]
                if moves and ch < gap - eps:
                    m = Lb + ch if ch >= half else La - ch
                    if m < best_m and (cap is None or copies + delta_copies(a, b, p.kv(h), None) - distinct <= cap):
                        best, best_m = (m, b, h, None), m - eps
                for h2 in hb:
                    d = ch - cf[h2]
                    if eps < d < gap - eps:
                        m = Lb + d if d >= half else La - d
                        if m < best_m and (cap is None or
                                           copies + delta_copies(a, b, p.kv(h), p.kv(h2)) - distinct <= cap):
                            best, best_m = (m, b, h, h2), m - eps
        if best is None:
            break
        apply(a, best[1], best[2], best[3])
    out: Assignment = []
    for g in range(G):
        out.append([(h, s) for h, s in assign[g] if s < 1.0 - _TOL] + [(h, 1.0) for h in sorted(heads[g])])
    return out


# ---- wrap-around (McNaughton) with overhead and the replica cap -----------------------------------------

def _wrap_fill(p: LayerProblem, T: float, split: bool) -> Assignment:
    G, cap = p.tp, p.max_replicated_kv
    min_piece = 1e-3 * T
    out: Assignment = [[] for _ in range(G)]
    g, load, reps = 0, 0.0, 0
    for h in range(p.num_heads):  # heads of a KV group are consecutive
        k = p.kv(h)
        rem = 1.0
        while rem > _TOL:
            cost = p.piece_cost(h, rem)
            if g == G - 1 or load + cost <= T * (1 + 1e-12):
                out[g].append((h, rem))
                load += cost
                break
            k_on_g = bool(out[g]) and p.kv(out[g][-1][0]) == k
            room = T - load
            can_split = split and p.var[h] > 0 and room - p.fixed[h] >= min_piece
            if (k_on_g or can_split) and cap is not None and reps >= cap:
                if k_on_g:  # no replica left: the rest of this group stays here
                    out[g].append((h, rem))
                    load += cost
                    break
                can_split = False
            if not can_split and load == 0.0:  # an empty GPU takes the head even if it overflows
                out[g].append((h, rem))
                load += cost
                break
            if can_split:
                s = min(rem, (room - float(p.fixed[h])) / float(p.var[h]))
                out[g].append((h, s))
                rem -= s
            if k_on_g or can_split:
                reps += 1
            g, load = g + 1, 0.0
    return out


def _wrap(p: LayerProblem, split: bool, max_iter: int = 40) -> Assignment:
    total = float(p.costs.sum())
    T = total / p.tp
    if not split:
        T = max(T, float(p.costs.max()))
    best, best_m = None, np.inf
    for _ in range(max_iter):
        a = _wrap_fill(p, T, split)
        m = float(share_loads(p, a).max())
        if m < best_m - 1e-12 * total:
            best, best_m = a, m
        over = m - T
        if over <= 1e-12 * total:
            break
        T += max(over / p.tp, 1e-9 * total)
    return best


def _merge_splits(p: LayerProblem, assign: Assignment) -> Assignment:
    """Fold a split head's smallest piece into another of its pieces when the makespan does not rise."""
    assign = [list(g) for g in assign]
    loads = share_loads(p, assign)
    changed = True
    while changed:
        changed = False
        m = float(loads.max())
        where: dict[int, list[tuple[int, int]]] = {}
        for g, gpu in enumerate(assign):
            for i, (h, s) in enumerate(gpu):
                if s < 1.0 - _TOL:
                    where.setdefault(h, []).append((g, i))
        for h in sorted(where):
            locs = sorted(where[h], key=lambda gi: (assign[gi[0]][gi[1]][1], gi[0]))
            a, ia = locs[0]
            sa = assign[a][ia][1]
            for b, ib in locs[1:]:
                sb = assign[b][ib][1]
                new_b = loads[b] - p.piece_cost(h, sb) + p.piece_cost(h, min(1.0, sa + sb))
                new_a = loads[a] - p.piece_cost(h, sa)
                if max(new_a, new_b) <= m * (1 + 1e-12):
                    assign[b][ib] = (h, 1.0 if len(locs) == 2 else sa + sb)
                    del assign[a][ia]
                    loads[a], loads[b] = new_a, new_b
                    changed = True
                    break
            if changed:
                break
    return assign


def _lpt_split(p: LayerProblem) -> Assignment:
    """LPT over units where each head heavier than the mean GPU load is cut into ``ceil(c / mean)`` equal
    pieces (each on a different GPU), then whole-head local search, then the split heads' shares
    water-filled so the GPUs holding their pieces end level."""
    G = p.tp
    T0 = float(p.costs.sum()) / G
    units = []  # (cost, head, share, n)
    for h in range(p.num_heads):
        c = float(p.costs[h])
        n = min(G, int(np.ceil(c / T0 - 1e-9))) if c > T0 and p.var[h] > 0 else 1
        for _ in range(n):
            units.append((p.piece_cost(h, 1.0 / n) if n > 1 else c, h, 1.0 / n if n > 1 else 1.0))
    units.sort(key=lambda u: (-u[0], u[1]))
    loads = [0.0] * G
    out: Assignment = [[] for _ in range(G)]
    kv_on = [set() for _ in range(G)]
    for cost, h, s in units:
        k = p.kv(h)
        best = None
        for g in range(G):
            if s < 1.0 and any(x == h for x, _ in out[g]):
                continue
            key = (loads[g], 0 if k in kv_on[g] else 1, g)
            if best is None or key < best:
                best = key
        g = best[2]
        out[g].append((h, s))
        kv_on[g].add(k)
        loads[g] += cost
    out = _improve_whole(p, out, target=T0 * (1 + 1e-4))
    return _waterfill(p, out)


def _waterfill(p: LayerProblem, assign: Assignment) -> Assignment:
    """Re-share each split head over the GPUs holding its pieces so those GPUs end as level as possible."""
    assign = [list(g) for g in assign]
    split = sorted({h for g in assign for h, s in g if s < 1.0 - _TOL})
    for h in split:
        gs = [g for g in range(len(assign)) if any(x == h for x, _ in assign[g])]
        base = {g: sum(p.piece_cost(x, s) for x, s in assign[g] if x != h) + float(p.fixed[h]) for g in gs}
        v = float(p.var[h])
        active = sorted(gs, key=lambda g: (base[g], g))
        while True:
            level = (v + sum(base[g] for g in active)) / len(active)
            if base[active[-1]] <= level or len(active) == 1:
                break
            active.pop()
        shares = {g: (level - base[g]) / v if g in active else 0.0 for g in gs}
        for g in gs:
            assign[g] = [(x, s) for x, s in assign[g] if x != h]
            if shares[g] > 1e-9:
                assign[g].append((h, shares[g]))
        tot = sum(s for g in gs for x, s in assign[g] if x == h)
        kept = [g for g in gs if any(x == h for x, _ in assign[g])]
        for g in kept:
            assign[g] = [(x, (1.0 if len(kept) == 1 else s / tot) if x == h else s) for x, s in assign[g]]
    return assign


def solve_shplb(p: LayerProblem) -> SolverResult:
    per = p.num_heads // p.tp
    total = float(p.costs.sum())
    lb_whole = max(total / p.tp, float(p.costs.max()))
    target = lb_whole * (1 + 1e-4)  # local search stops within 0.01 % of the whole-head lower bound
    cands: list[tuple[str, Assignment]] = [("contiguous", solve_contiguous(p).assignment)]
    if p.equal_heads:
        if per % p.group_size == 0:
            cands.append(("lpt_groups", _improve_whole(p, _lpt_groups(p, per // p.group_size), target=target)))
        cands.append(("lpt_heads", _improve_whole(p, _lpt_heads(p, per), target=target)))
    else:
        split_best = np.inf
        if p.allow_split_heads:
            for name, a in (("wrap", _merge_splits(p, _wrap(p, True))), ("lpt_split", _lpt_split(p))):
                cands.append((name, a))
                if feasible(p, a):
                    split_best = min(split_best, float(share_loads(p, a).max()))
        # whole-head candidates cannot beat a split one whose makespan is at the whole-head lower bound
        ls = split_best > lb_whole * (1 + 1e-9)
        for name, fn in (("lpt_heads", _lpt_heads), ("lpt_groups", _lpt_groups)):
            a = fn(p)
            cands.append((name, _improve_whole(p, a, target=target) if ls else a))
        if not p.allow_split_heads:
            cands.append(("wrap_whole", _improve_whole(p, _wrap(p, False), target=target)))
    ok = [(float(share_loads(p, a).max()), replicas(p, a), num_pieces(a), i, name, a)
          for i, (name, a) in enumerate(cands) if feasible(p, a)]
    if not ok:
        raise ValueError(f"no placement of {p.num_heads} heads on TP {p.tp} meets max_replicated_kv="
                         f"{p.max_replicated_kv} with equal_heads={p.equal_heads}")
    best_m = min(t[0] for t in ok)
    near = [t for t in ok if t[0] <= best_m * (1 + SELECT_REL_TOL)]
    m, reps, pieces, _, name, a = min(near, key=lambda t: (t[1], t[2], t[0], t[3]))
    return SolverResult(a, info={"candidate": name})
