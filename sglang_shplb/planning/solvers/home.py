"""``shplb``: the home-aware S-HPLB heuristic.

The runtime computes every head whole on its home rank (SGLang's contiguous slicing,
:mod:`sglang_shplb.core.head_map`) unless the placement moves work: each piece off that path is a unit
that costs executor time, and a moved one link bytes (:mod:`.objective`). So the search starts from home
and moves work off the slowest rank only while that lowers it and no rank it touches ends at or above
its old time (the sorted rank times fall lexicographically: the objective never rises). A step
considers, for the slowest rank ``a``:

* moving one of its pieces whole to one of the two least loaded ranks, or back to the piece's home, or a
  whole GQA group it holds (every head whole) to one of those ranks (what a replica cap of 0 allows);
* with ``allow_split_heads``, moving a head range ``[lo, k)`` or a tail ``[k, hi)`` (whichever the
  estimate below prefers) of the query blocks of one of its two heaviest cuttable pieces (not of
  ``whole_heads``) to the least loaded
  rank. The size: shed ``a`` down to the level (the mean rank time, with the units the move adds) when
  the receiver has room below it, else level the two; solved on the head's cost profile from a compute
  estimate, then once more from the exact prices of that cut (and the mean they give);
* with ``equal_heads``, only swaps of one of its whole heads with a cheaper whole head of one of the two
  least loaded ranks (they keep the head counts).

Candidates are ranked by an estimate (compute, a unit's compute at the calibrated piece efficiency, unit
overhead, a split's outputs over the link; gathers are left to the exact prices); the ``e``
best whole-piece moves and the ``e`` best splits within the replica cap are priced exactly (per-rank sums
kept incrementally with the rules of :mod:`.objective` and :mod:`sglang_shplb.core.exchange`), and the
one leaving the least time above the level on the ranks it touches, then the lowest of them, then fewer
units, then fewer moved rows, is applied (least excess rather than lowest maximum: a move that sheds
much but lifts its receiver far above the level leaves a new bottleneck).

:func:`solve_shplb` runs the search with splits and without (the latter is what ``allow_split_heads=
False`` returns; it guards the former, whose greedy path can end worse), prices home and the best state
each search passed through with :func:`.objective.layer_times`, and returns the best (objective, then
fewer units, then fewer bytes): never worse than home, nor than the no-split result, nor than any state
it considered. It does so for each ``e`` of :data:`EXACT_PER_KIND` (2 and 4: a step that prices more
moves is not always better in the end, being greedy), so it is never worse than the ``e = 2`` search alone.
When home breaks the replica cap (TP above the KV heads), the searches start from ``lpt``.
"""
from __future__ import annotations

import bisect
import copy

from sglang_shplb.core.exchange import exchange_elems
from sglang_shplb.core.placement_types import LayerPlacement, Piece
from sglang_shplb.planning.solvers.common import LayerProblem, SolverResult, feasible
from sglang_shplb.planning.solvers.greedy import solve_contiguous, solve_lpt
from sglang_shplb.planning.solvers.objective import layer_times, rank_time

#: query-block grid of a head without a cost profile (uniform cost along its queries)
GRID = 4096
#: moves of each kind (whole pieces, splits) priced exactly per step (the best by the estimate within the
#: replica cap), one search per value, the best kept: the wider step is better on 7 of the head-parallel
#: benchmark's 72 layer problems, up to 17 % lower (``bench/results/solver.md``, "Search widths"), but being
#: greedy it can also end worse (one layer of the solver benchmark's model in a trial, by 1.3 %)
EXACT_PER_KIND = (2, 4)

Seg = tuple[float, float, int]  # query-block range [start, end) of a head (Piece fractions) on a rank
# per-rank sums: compute, home compute, units, q rows sent as home, K/V sent, q rows received, K/V received,
# compute of the units it computes, K/V it gathers from its pool (bundles shipped and local)
_C, _HC, _N, _HR, _HKV, _TR, _TKV, _UC, _ST = range(9)


class _Heads:
    """What the search needs per head, built once per problem: costs, home, KV head, and on demand the
    query-block grid and cumulative cost shares (the cost profile's; uniform on :data:`GRID` blocks
    without one) and the rows a moved range computes."""

    def __init__(self, p: LayerProblem):
        self.p = p
        self.home, self.kv = p.home, [p.kv(h) for h in range(p.num_heads)]
        self.c, self.fixed, self.var = p.costs.tolist(), p.fixed.tolist(), p.var.tolist()
        self._grid: dict[int, tuple[int, list[float] | None]] = {}
        self._rows: dict[tuple[float, float], tuple[int, int]] = {}

    def grid(self, h: int) -> tuple[int, list[float] | None]:
        g = self._grid.get(h)
        if g is None:
            prof = self.p.profile(h)
            g = self._grid[h] = (GRID, None) if prof is None else (prof.nb, prof.cum.tolist())
        return g

    def share(self, h: int, x: float, y: float) -> float:
        """Share of ``h``'s variable cost in ``[x, y)`` (as :meth:`CostProfile.share`)."""
        nb, cum = self.grid(h)
        return y - x if cum is None else cum[round(y * nb)] - cum[round(x * nb)]

    def cost(self, h: int, x: float, y: float) -> float:
        return self.c[h] if x == 0.0 and y == 1.0 else self.fixed[h] + self.var[h] * self.share(h, x, y)

    def rows(self, x: float, y: float) -> tuple[int, int]:
        r = self._rows.get((x, y))
        if r is None:
            r = self._rows[(x, y)] = self.p.transfer.rows(x, y)
        return r

    def cut(self, h: int, x: float, y: float, share: float, head: bool) -> float:
        """The block boundary nearest to leaving ``share`` of the head's cost in ``[x, k)`` (head range) or
        ``[k, y)`` (tail); None when that is ``x`` or ``y`` (no cut: the whole piece or nothing)."""
        nb, cum = self.grid(h)
        lo, hi = round(x * nb), round(y * nb)
        if cum is None:
            k = round(lo + share * nb) if head else round(hi - share * nb)
        else:
            want = cum[lo] + share if head else cum[hi] - share
            k = bisect.bisect_left(cum, want, lo, hi + 1)
            if k > lo and (k > hi or want - cum[k - 1] <= cum[k] - want):
                k -= 1
        return k / nb if lo < k < hi else None


class _Search:
    """Local search from ``segs`` (per head, its pieces in query order); see the module docstring."""

    def __init__(self, p: LayerProblem, heads: _Heads, segs: list[list[Seg]]):
        self.p, self.hd, self.t, self.split, self.exact = p, heads, p.transfer, False, EXACT_PER_KIND[0]
        self.cut_heads = False  # whether a split move was applied
        self.u = 0.0 if p.transfer is None else p.transfer.unit_overhead_s
        self.k = 1.0 if p.transfer is None else 1.0 / p.transfer.piece_efficiency  # a unit's compute factor
        H, G = p.num_heads, p.tp
        self.segs = [list(s) for s in segs]
        self.peers: dict[tuple[int, int], list[int]] = {}
        for h in range(H):
            self.peers.setdefault((heads.home[h], heads.kv[h]), []).append(h)
        self.acc = [[0.0, 0.0, 0, 0, 0, 0, 0, 0.0, 0] for _ in range(G)]
        self.terms = [self._terms(h, self.segs[h]) for h in range(H)]
        self.kvcnt: list[dict[int, int]] = [{} for _ in range(G)]
        for h in range(H):
            self._add_terms(self.acc, h, self.terms[h], 1)
            for _, _, r in self.segs[h]:
                self.kvcnt[r][heads.kv[h]] = self.kvcnt[r].get(heads.kv[h], 0) + 1
        self.copies = sum(len(d) for d in self.kvcnt)
        self.bundles = {key: self._bundle(key, {}) for key in self.peers}
        for (c, _), lens in self.bundles.items():
            for g, n in lens.items():
                self.acc[c][_ST] += n
                if g != c:
                    self.acc[c][_HKV] += n
                    self.acc[g][_TKV] += n
        self.T = [self._time(self.acc[r]) for r in range(G)]

    def fork(self, split: bool, exact: int) -> "_Search":
        """An independent copy of this state that moves with or without splits, pricing ``exact`` moves of
        each kind per step."""
        s = copy.copy(self)
        s.split, s.cut_heads, s.exact = split, False, exact
        s.segs, s.terms, s.T, s.bundles = list(self.segs), list(self.terms), list(self.T), dict(self.bundles)
        s.acc, s.kvcnt = [list(a) for a in self.acc], [dict(d) for d in self.kvcnt]
        return s

    # ---- pricing --------------------------------------------------------------------------------------
    def _terms(self, h: int, segs: list[Seg]) -> list[tuple]:
        """Per piece of ``h``: (rank, cost, at home, is a unit, q rows moved, K/V tokens it reads; the last
        two 0 for a whole head at home, the rows 0 for a unit at home)."""
        hd, home, out = self.hd, self.hd.home[h], []
        for x, y, r in segs:
            unit = not (x == 0.0 and y == 1.0 and r == home)
            rows = end = 0
            if unit and self.t is not None:
                a, b = hd.rows(x, y)
                rows, end = (b - a if r != home else 0), (b if b > a else 0)
            out.append((r, hd.cost(h, x, y), r == home, unit, rows, end))
        return out

    def _add_terms(self, acc, h: int, terms, sign: int) -> None:
        home = self.hd.home[h]
        for r, cost, at_home, unit, rows, _ in terms:
            acc[r][_C] += sign * cost
            if at_home:
                acc[r][_HC] += sign * cost
            acc[r][_N] += sign * unit
            if unit:
                acc[r][_UC] += sign * cost
            if rows:
                acc[home][_HR] += sign * rows
                acc[r][_TR] += sign * rows

    def _bundle(self, key: tuple[int, int], new_terms: dict) -> dict[int, int]:
        """K/V tokens the home of ``key`` stages per target (itself for its local units) for that KV head
        (the largest row end)."""
        lens: dict[int, int] = {}
        for h in self.peers[key]:
            for r, _, _, unit, _, end in new_terms.get(h, self.terms[h]):
                if unit and end:
                    lens[r] = max(lens.get(r, 0), end)
        return lens

    def _time(self, a) -> float:
        return rank_time(self.t, a[_C], a[_HC], a[_N], a[_HR], a[_HKV], a[_TR], a[_TKV], a[_UC], a[_ST])

    @staticmethod
    def _sent(a) -> int:
        """q rows + K/V tokens a rank sends as a home: the moved elements are twice that times head_dim."""
        return a[_HR] + a[_HKV]

    def evaluate(self, changes: dict[int, list[Seg]], split: bool = False):
        """Price new pieces for some heads: (new time per touched rank, added units, added sent rows, state
        to apply, ``split``), or None when the move adds a KV copy beyond the replica cap."""
        delta: dict[int, list] = {}

        def d(r: int) -> list:
            if r not in delta:
                delta[r] = list(self.acc[r])
            return delta[r]

        home, kvh = self.hd.home, self.hd.kv
        kv_delta: dict[tuple[int, int], int] = {}
        for h, segs in changes.items():
            for _, _, r in self.segs[h]:
                kv_delta[r, kvh[h]] = kv_delta.get((r, kvh[h]), 0) - 1
            for _, _, r in segs:
                kv_delta[r, kvh[h]] = kv_delta.get((r, kvh[h]), 0) + 1
        copies = self.copies
        for (r, k), dc in kv_delta.items():
            before = self.kvcnt[r].get(k, 0)
            copies += (before + dc > 0) - (before > 0)
        cap = self.p.max_replicated_kv
        if cap is not None and copies - self.p.num_kv > cap and copies > self.copies:
            return None
        new_terms = {h: self._terms(h, s) for h, s in changes.items()}
        for h, nt in new_terms.items():
            for term in self.terms[h] + nt:
                d(term[0])
            d(home[h])
            self._add_terms(delta, h, self.terms[h], -1)
            self._add_terms(delta, h, nt, 1)
        new_bundles = {}
        for key in {(home[h], kvh[h]) for h in changes}:
            new, old = self._bundle(key, new_terms), self.bundles[key]
            for g in old.keys() | new.keys():
                dl = new.get(g, 0) - old.get(g, 0)
                if dl:
                    d(key[0])[_ST] += dl
                    if g != key[0]:
                        d(key[0])[_HKV] += dl
                        d(g)[_TKV] += dl
            new_bundles[key] = new
        times = {r: self._time(a) for r, a in delta.items()}
        units = sum(a[_N] - self.acc[r][_N] for r, a in delta.items())
        sent = sum(self._sent(a) - self._sent(self.acc[r]) for r, a in delta.items())
        return times, units, sent, (changes, new_terms, new_bundles, delta, kv_delta, copies), split

    def apply(self, state) -> None:
        changes, new_terms, new_bundles, delta, kv_delta, copies = state
        for h, segs in changes.items():
            self.segs[h] = segs
            self.terms[h] = new_terms[h]
        self.bundles.update(new_bundles)
        for r, a in delta.items():
            self.acc[r] = a
            self.T[r] = self._time(a)
        for (r, k), dc in kv_delta.items():
            n = self.kvcnt[r].get(k, 0) + dc
            if n:
                self.kvcnt[r][k] = n
            else:
                self.kvcnt[r].pop(k, None)
        self.copies = copies

    # ---- moves ----------------------------------------------------------------------------------------
    def _replace(self, h: int, seg: Seg, parts: list[Seg]) -> list[Seg]:
        """``h``'s pieces with ``seg`` replaced by ``parts``, adjacent pieces on one rank merged."""
        out: list[Seg] = []
        for s in sorted([s for s in self.segs[h] if s != seg] + parts):
            if out and out[-1][2] == s[2] and out[-1][1] == s[0]:
                out[-1] = (out[-1][0], s[1], s[2])
            else:
                out.append(s)
        return out

    def _out_s(self, x: float, y: float) -> float:
        """Seconds the outputs of a moved range ``[x, y)`` take back home: after compute, so never hidden."""
        if self.t is None:
            return 0.0
        a, b = self.hd.rows(x, y)
        return self.t.seconds(exchange_elems(b - a, 0, self.t.head_dim)[1])

    def _size(self, h: int, seg: Seg, head: bool, alpha: float, beta: float, level: float):
        """Where to cut ``seg`` to move its head range ``[x, k)`` or tail ``[k, y)`` away, when the two ranks'
        times are ``alpha - v m`` and ``beta + v m`` for ``m`` of the head's cost share moved: shed to the
        level when the receiver has room below it, else level the two. ``(k, m)``; None when that is no cut."""
        v, (x, y, _) = self.hd.var[h], seg
        m = min(alpha - level, level - beta) / v if beta < level < alpha else (alpha - beta) / (2 * v)
        k = self.hd.cut(h, x, y, min(max(m, 0.0), self.hd.share(h, x, y)), head)
        if k is None:
            return None
        return k, self.hd.share(h, x, k) if head else self.hd.share(h, k, y)

    def _split(self, h: int, seg: Seg, b: int, head: bool, k: float) -> list[Seg]:
        x, y, a = seg
        return self._replace(h, seg, [(x, k, b), (k, y, a)] if head else [(x, k, a), (k, y, b)])

    def step(self) -> bool:
        """One move off the slowest rank; False when none lowers it."""
        G, T, hd = self.p.tp, self.T, self.hd
        a = max(range(G), key=lambda r: (T[r], -r))
        Ta = T[a]
        eps = 1e-9 * Ta
        order = sorted((r for r in range(G) if r != a), key=lambda r: (T[r], r))[:2]
        if not order:
            return False
        level = sum(T) / G
        mine = [(h, s, t) for h in range(self.p.num_heads) for s, t in zip(self.segs[h], self.terms[h])
                if s[2] == a]
        if Ta - T[order[0]] <= self.u + eps and all(not t[3] for _, _, t in mine):
            return False  # any move puts a unit (u) on a rank at least that far below
        est: list[tuple[float, int, tuple]] = []
        if not self.p.equal_heads:
            for h, seg, term in mine:
                receivers = order if hd.home[h] in order or hd.home[h] == a else order + [hd.home[h]]
                for b in receivers:
                    e = max(Ta - term[1] * (self.k if term[3] else 1.0), T[b] + term[1] * self.k + self.u)
                    if e < Ta - eps:
                        est.append((e, len(est), ("move", ((h, seg, b),))))
            groups: dict[int, list[int]] = {}
            for h, seg, _ in mine:
                groups.setdefault(hd.kv[h], []).append(h)
            for k, hs in groups.items():
                if len(hs) == self.p.group_size and all(self.segs[h] == [(0.0, 1.0, a)] for h in hs):
                    gc = sum(hd.c[h] for h in hs)
                    for b in order:
                        e = max(Ta - gc, T[b] + gc * self.k + len(hs) * self.u)
                        if e < Ta - eps:
                            est.append((e, len(est), ("move", tuple((h, (0.0, 1.0, a), b) for h in hs))))
        else:  # equal_heads: swaps only
            for b in order:
                theirs = [(h2, s2, t2[1]) for h2 in range(self.p.num_heads)
                          for s2, t2 in zip(self.segs[h2], self.terms[h2]) if s2 == (0.0, 1.0, b)]
                for h, seg, term in mine:
                    if seg == (0.0, 1.0, a):
                        for h2, seg2, cost2 in theirs:
                            e = max(Ta - term[1] + cost2, T[b] + term[1] - cost2)
                            if cost2 < term[1] and e < Ta - eps:
                                est.append((e, len(est), ("move", ((h, seg, b), (h2, seg2, a)))))
        if self.split:
            for h, seg, term in sorted([m for m in mine if self.p.may_cut(m[0])], key=lambda x: (-x[2][1], x[0]))[:2]:
                if hd.var[h] <= 0:
                    continue
                b, new = order[0], 1 if term[3] else 2  # a whole head at home becomes two units
                alpha, beta = Ta + (new - 1) * self.u, T[b] + hd.fixed[h] + self.u
                shapes = []  # the head range or the tail, whichever the estimate prefers, per piece
                for head in (True, False):
                    cut = self._size(h, seg, head, alpha, beta, level + new * self.u / G)
                    if cut is not None:
                        moved = (seg[0], cut[0]) if head else (cut[0], seg[1])
                        e = max(alpha - hd.var[h] * cut[1], beta + hd.var[h] * cut[1]) + self._out_s(*moved)
                        if e < Ta - eps:
                            shapes.append((e, len(est) + len(shapes), ("split", h, seg, b, head) + cut))
                est += sorted(shapes)[:1]
        best, priced = None, {"move": 0, "split": 0}
        for _, _, move in sorted(est):
            if priced[move[0]] == self.exact:
                continue
            counted = False
            for res in self._price(move, a):
                if res is None:
                    continue
                priced[move[0]] += not counted
                counted = True
                worst = max(res[0].values())
                if worst >= Ta - eps:
                    continue
                key = (sum(max(t - level, 0.0) for t in res[0].values()), worst, res[1], res[2])
                if best is None or key < best[0]:
                    best = (key, res)
        if best is None:
            return False
        self.apply(best[1][3])
        self.cut_heads |= best[1][4]
        return True

    def _price(self, move: tuple, a: int):
        """Exact prices of a move: whole pieces ``(head, piece, to rank)``; a split, then the split re-sized
        once with the exact times."""
        if move[0] == "move":
            yield self.evaluate({h: self._replace(h, seg, [(seg[0], seg[1], b)]) for h, seg, b in move[1]})
            return
        h, seg, b, head, k, m = move[1:]
        res = self.evaluate({h: self._split(h, seg, b, head, k)}, True)
        yield res
        if res is not None:
            v, times = self.hd.var[h], res[0]
            after = (sum(self.T) + sum(t - self.T[r] for r, t in times.items())) / len(self.T)  # the new mean
            cut = self._size(h, seg, head, times[a] + v * m, times[b] - v * m, after)
            if cut is not None and cut[0] != k:
                yield self.evaluate({h: self._split(h, seg, b, head, cut[0])}, True)

    def run(self, max_steps: int) -> list[list[Seg]]:
        """The best state seen: lowest objective, then fewest units, then fewest sent rows."""
        def key():
            return max(self.T), sum(a[_N] for a in self.acc), sum(self._sent(a) for a in self.acc)

        best, best_key = list(self.segs), key()
        for _ in range(max_steps):
            if not self.step():
                break
            k = key()
            if k[0] < best_key[0] * (1 - 1e-12) or (k[0] <= best_key[0] * (1 + 1e-12) and k[1:] < best_key[1:]):
                best, best_key = list(self.segs), k
        return best


def _placement(segs: list[list[Seg]], tp: int) -> LayerPlacement:
    gpus: list[list[Piece]] = [[] for _ in range(tp)]
    for h, ss in enumerate(segs):
        for x, y, r in ss:
            gpus[r].append(Piece(h, x, y))
    for g in gpus:
        g.sort(key=lambda x: (x.head, x.start))
    return LayerPlacement(gpus)


def solve_shplb(p: LayerProblem) -> SolverResult:
    """The best of home and the searches from it (the module docstring); ``info['candidate']`` names it."""
    name, start = "home", solve_contiguous(p).assignment
    if not feasible(p, start):
        name, start = "lpt", solve_lpt(p).assignment
        if not feasible(p, start):
            raise ValueError(f"no placement of {p.num_heads} heads on TP {p.tp} meets max_replicated_kv="
                             f"{p.max_replicated_kv} with equal_heads={p.equal_heads}")
    segs: list[list[Seg]] = [[] for _ in range(p.num_heads)]
    for r, gpu in enumerate(start):
        for h, _ in gpu:
            segs[h] = [(0.0, 1.0, r)]
    heads, steps = _Heads(p), 4 * (p.tp + p.num_heads)
    search = _Search(p, heads, segs)
    # the whole-head search (what allow_split_heads=False returns) guards the split one: a greedy path can
    # end worse. When the split search cut no head it took that very path, so it is not run again.
    modes = (["split"] if p.allow_split_heads and not p.equal_heads else []) + ["whole"]
    cands = [(name, segs)]
    for exact in EXACT_PER_KIND:
        for mode in modes:
            run = search.fork(mode == "split", exact)
            found = run.run(steps)
            if all(found != s for _, s in cands):
                cands.append((f"{name}+{mode}" + ("" if exact == EXACT_PER_KIND[0] else f"@{exact}"), found))
            if mode == "split" and not run.cut_heads:
                break
    priced = []
    for i, (n, s) in enumerate(cands):
        lp = _placement(s, p.tp)
        times = layer_times(lp, p)
        priced.append((times.key(), i, n, lp, times))
    key, _, n, lp, times = min(priced)
    shares = [[(x.head, 1.0 if x.whole else heads.share(x.head, x.start, x.end)) for x in g] for g in lp.gpus]
    return SolverResult(shares, placement=lp, times=times, info={"candidate": n})
