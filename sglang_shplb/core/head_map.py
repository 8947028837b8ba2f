"""Which query heads a tensor-parallel rank holds (its *home*) and which work the plan moves away from
home: THE one place that maps plan heads to ranks.

**Home** is SGLang's slicing, left as SGLang makes it (weights, KV pool, radix cache): rank ``r`` holds
query heads ``[r Hq / tp, (r + 1) Hq / tp)`` and the KV heads they read; ``o_proj`` and the all-reduce
after it expect each rank's output in that home order.

**Work** comes from the plan's placement for (TP, bucket): a :class:`~.placement_types.Piece` of head
``h`` on rank ``t``. A piece that is the whole head on its home rank is computed there as always; any
other piece is a :class:`Unit`: a query-block range of ``h`` computed on ``target`` (which may be the
home itself, for the home's share of a split head). A layer whose placement has no unit runs exactly the
single-rank code path (:attr:`LayerWork.at_home`).
"""
from __future__ import annotations

from dataclasses import dataclass

from sglang_shplb.core.placement_types import LayerPlacement, Placement


class HeadMapError(ValueError):
    """The model's heads cannot be mapped to TP ranks as the plan needs (the message says why)."""


def check_tp(num_q_heads: int, num_kv_heads: int, tp_size: int) -> None:
    """SGLang slices heads contiguously only when TP divides the query heads, and KV heads either divide
    by TP or are replicated (TP a multiple of them). Otherwise SGLang pads heads with zero heads (CPU) or
    refuses; a plan's head ids would then not be the model's: refuse with the cause."""
    if num_q_heads % tp_size:
        raise HeadMapError(f"TP {tp_size} does not divide the model's {num_q_heads} query heads: SGLang would pad "
                           f"them with zero heads, which a plan cannot place; use a TP size dividing {num_q_heads}")
    if num_kv_heads % tp_size and tp_size % num_kv_heads:
        raise HeadMapError(f"TP {tp_size} neither divides nor is a multiple of the model's {num_kv_heads} KV heads "
                           f"(SGLang would pad them); use a TP size dividing {num_kv_heads} or a multiple of it")


def rank_heads(num_q_heads: int, tp_size: int, tp_rank: int) -> list[int]:
    """Global query-head ids at home on ``tp_rank``, in the rank's local order."""
    if num_q_heads % tp_size:
        raise HeadMapError(f"{num_q_heads} query heads do not split over TP {tp_size}")
    per = num_q_heads // tp_size
    return list(range(tp_rank * per, (tp_rank + 1) * per))


def home_heads(num_q_heads: int, tp_size: int) -> list[list[int]]:
    """Query heads at home on every rank: :func:`rank_heads` of each rank when TP divides the heads (the
    only case the runtime serves, :func:`check_tp`); otherwise, for planning, the near-even contiguous
    split of ``numpy.array_split`` (the first ``Hq % tp`` ranks one head more; ranks beyond ``Hq`` none)."""
    base, extra = divmod(num_q_heads, tp_size)
    out, h = [], 0
    for r in range(tp_size):
        n = base + (r < extra)
        out.append(list(range(h, h + n)))
        h += n
    return out


def home_rank(head: int, num_q_heads: int, tp_size: int) -> int:
    """The rank whose :func:`home_heads` hold ``head``."""
    base, extra = divmod(num_q_heads, tp_size)
    big = extra * (base + 1)
    return head // (base + 1) if head < big else extra + (head - big) // base


@dataclass(frozen=True)
class Unit:
    """A query-block range ``[start, end)`` of query head ``head`` (global id; ``kv_head`` its global KV
    head) computed on ``target``; ``home`` holds the head's q rows, KV cache and output columns."""
    head: int
    kv_head: int
    start: float
    end: float
    home: int
    target: int

    @property
    def moved(self) -> bool:
        return self.home != self.target


@dataclass(frozen=True)
class LayerWork:
    """One layer's work under a placement, seen from every rank: ``units`` in one canonical order (the
    order every rank packs and unpacks buffers in) and, per rank, the home heads it computes whole
    (``whole[r]``, global ids)."""
    units: tuple[Unit, ...]
    whole: tuple[tuple[int, ...], ...]

    @property
    def at_home(self) -> bool:
        return not self.units

    def moved_units(self) -> list[Unit]:
        return [u for u in self.units if u.moved]

    def units_between(self, home: int, target: int) -> list[Unit]:
        return [u for u in self.units if u.home == home and u.target == target]


def layer_work(lp: LayerPlacement, num_q_heads: int, num_kv_heads: int, tp_size: int) -> LayerWork:
    """Split a layer placement into whole-at-home heads and :class:`Unit` s (see the module docstring)."""
    group = num_q_heads // num_kv_heads
    whole: list[list[int]] = [[] for _ in range(tp_size)]
    units: list[Unit] = []
    for r, pieces in enumerate(lp.gpus):
        for p in pieces:
            home = home_rank(p.head, num_q_heads, tp_size)
            if p.whole and home == r:
                whole[r].append(p.head)
            else:
                units.append(Unit(p.head, p.head // group, p.start, p.end, home, r))
    units.sort(key=lambda u: (u.home, u.target, u.kv_head, u.head, u.start))
    return LayerWork(tuple(units), tuple(tuple(sorted(w)) for w in whole))


def placement_work(placement: Placement, num_q_heads: int, num_kv_heads: int) -> tuple[LayerWork, ...]:
    """:func:`layer_work` of every layer of a placement."""
    check_tp(num_q_heads, num_kv_heads, placement.tp)
    return tuple(layer_work(lp, num_q_heads, num_kv_heads, placement.tp) for lp in placement.layers)
