"""What a layer placement costs: THE objective every solver's result is judged by, and the cut of
share-space assignments into query-block pieces.

Per rank ``r`` (seconds)::

    T_r = C_r + (1 / eff - 1) U_r + u N_r + S_r / gbw + max(0, I_r / bw - H_r) + O_r / bw

* ``C_r``: compute of the pieces ``r`` holds (:func:`piece_load`); ``H_r`` the part of it from ``r``'s
  home heads, which the executor computes while the inputs travel (so it hides that much input transfer);
* ``N_r``: units ``r`` computes (:func:`~sglang_shplb.core.head_map.layer_work`: every piece but a whole
  head on its home rank), ``u = Transfer.unit_overhead_s`` each;
* ``I_r`` / ``O_r``: bytes of the input / output exchange at ``r``, the larger of what it sends and what it
  receives (:mod:`sglang_shplb.core.exchange`), over ``bw = Transfer.link_bytes_per_s`` per direction;
* ``U_r``: the compute of the units ``r`` computes (part of ``C_r``), which runs at ``eff =
  Transfer.piece_efficiency`` of the cost model's speed (a piece over a staged prefix in the executor);
* ``S_r``: bytes ``r`` gathers before the exchange: the K/V prefixes of the units it is home of (the ones
  it ships and its local ones, one bundle per (target, KV head): :func:`~sglang_shplb.core.exchange.
  kv_bundle_lens`) and the q rows it ships, at ``gbw = Transfer.gather_bytes_per_s`` (not priced when None).

So a unit costs ``u + its gathers + piece / eff`` (plus its exposed link time); with the documented
defaults (no move calibration: ``eff = 1``, gathers free) ``T_r = C_r + u N_r + max(0, I_r / bw - H_r) +
O_r / bw``.

The layer's time is ``max_r T_r``. Without a :class:`~sglang_shplb.planning.cost_model.Transfer` (a
problem with no length), ``T_r = C_r``.
"""
from __future__ import annotations

import numpy as np

from sglang_shplb.core.exchange import exchange_elems, kv_bundle_lens
from sglang_shplb.core.head_map import layer_work
from sglang_shplb.core.placement_types import LayerPlacement, Piece
from sglang_shplb.planning.cost_model import Transfer
from sglang_shplb.planning.solvers.common import Assignment, LayerProblem, LayerTimes, Profiles, profile_of


def piece_load(p: Piece, costs, piece_overhead: float = 0.0, profiles: Profiles = None) -> float:
    """Seconds of one piece: a whole head costs ``costs[h]``, a piece of a split head
    ``fixed + share * (costs[h] - fixed)``, its share from the head's cost profile (uniform if None)."""
    c = float(costs[p.head])
    if p.whole:
        return c
    prof = profile_of(profiles, p.head)
    share = prof.share(p.start, p.end) if prof is not None else p.end - p.start
    fixed = min(piece_overhead, c)
    return fixed + share * (c - fixed)


def assignment_to_layer(assign: Assignment, profiles: Profiles = None) -> LayerPlacement:
    """Cut share-space assignments into query-block pieces. Pieces of a head are laid out in GPU order;
    a boundary is the query-block fraction whose cumulative cost is nearest the cumulative share; pieces
    that round to nothing are dropped (their share goes to the neighbour)."""
    gpus: list[list[Piece]] = [[] for _ in assign]
    split: dict[int, list[tuple[int, float]]] = {}
    for g, gpu in enumerate(assign):
        for h, s in gpu:
            if s >= 1.0 - 1e-12:
                gpus[g].append(Piece(h))
            else:
                split.setdefault(h, []).append((g, s))
    for h in sorted(split):
        parts = split[h]
        prof = profile_of(profiles, h)
        total = sum(s for _, s in parts)
        cum, bounds = 0.0, [0.0]
        for _, s in parts[:-1]:
            cum += s / total
            bounds.append(prof.query_fraction(cum) if prof is not None else cum)
        bounds.append(1.0)
        kept = [(g, a, b) for (g, _), a, b in zip(parts, bounds, bounds[1:]) if b > a]
        # re-tile: dropped pieces leave gaps; give each kept piece the range up to the next kept start
        for i, (g, a, _) in enumerate(kept):
            start = 0.0 if i == 0 else a
            end = kept[i + 1][1] if i + 1 < len(kept) else 1.0
            gpus[g].append(Piece(h) if (start == 0.0 and end == 1.0) else Piece(h, start, end))
    for g in gpus:
        g.sort(key=lambda p: (p.head, p.start))
    return LayerPlacement(gpus)


def rank_time(t: Transfer | None, compute: float, home_compute: float, units: int, home_rows: int,
              home_kv: int, target_rows: int, target_kv: int, unit_compute: float = 0.0,
              staged_kv: int | None = None) -> float:
    """``T_r`` of the module docstring. ``home_rows`` / ``home_kv``: q rows and staged K/V tokens of the
    units ``r`` sends away (as their home); ``target_*``: of the units it computes for other ranks;
    ``unit_compute``: the compute (in ``compute``) of the units ``r`` computes; ``staged_kv``: K/V tokens
    ``r`` gathers from its pool for its units, shipped or local (default ``home_kv``)."""
    if t is None:
        return compute
    sent_in, back_in = exchange_elems(home_rows, home_kv, t.head_dim)
    got_in, sent_out = exchange_elems(target_rows, target_kv, t.head_dim)
    staged = home_kv if staged_kv is None else staged_kv
    gathered = exchange_elems(home_rows, staged, t.head_dim)[0]
    return (compute + t.unit_compute_extra(unit_compute) + units * t.unit_overhead_s + t.gather_seconds(gathered)
            + max(0.0, t.seconds(max(sent_in, got_in)) - home_compute) + t.seconds(max(back_in, sent_out)))


def layer_times(lp: LayerPlacement, p: LayerProblem) -> LayerTimes:
    """Per-rank times of a layer placement (the module docstring) at ``p``'s costs, profiles and transfer."""
    G, t = p.tp, p.transfer
    compute, home_c, unit_c = np.zeros(G), np.zeros(G), np.zeros(G)
    for r, pieces in enumerate(lp.gpus):
        for pc in pieces:
            c = piece_load(pc, p.costs, p.piece_overhead, p.profiles)
            compute[r] += c
            if p.home[pc.head] == r:
                home_c[r] += c
            if not (pc.whole and p.home[pc.head] == r):
                unit_c[r] += c
    work = layer_work(lp, p.num_heads, p.num_kv, G)
    units = np.bincount([u.target for u in work.units], minlength=G)
    moved = work.moved_units()
    rows = np.zeros((2, G), dtype=np.int64)  # q rows [as home, as target]
    kv = np.zeros((2, G), dtype=np.int64)  # staged K/V tokens [as home, as target]
    staged = np.zeros(G, dtype=np.int64)  # K/V tokens gathered from the pool, shipped or local
    if t is not None:
        unit_rows = [((u.home, u.target, u.kv_head), (t.rows(u.start, u.end),)) for u in work.units]
        for (s, g, _), ((a, b),) in unit_rows:
            if s != g:
                rows[0, s] += b - a
                rows[1, g] += b - a
        for (s, g, _), (n,) in kv_bundle_lens(unit_rows, (0,)).items():
            staged[s] += n
            if s != g:
                kv[0, s] += n
                kv[1, g] += n
    total = np.array([rank_time(t, compute[r], home_c[r], int(units[r]), int(rows[0, r]), int(kv[0, r]),
                                int(rows[1, r]), int(kv[1, r]), float(unit_c[r]), int(staged[r]))
                      for r in range(G)])
    moved_bytes = 0 if t is None else t.dtype_bytes * sum(
        sum(exchange_elems(int(rows[0, r]), int(kv[0, r]), t.head_dim)) for r in range(G))
    busy = compute if t is None else np.array([compute[r] + t.unit_compute_extra(float(unit_c[r]))
                                               + units[r] * t.unit_overhead_s for r in range(G)])
    return LayerTimes(compute, total, units, len(moved), moved_bytes, 0.0 if t is None else t.unit_overhead_s,
                      busy)
