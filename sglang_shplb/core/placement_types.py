"""What a placement is: for every layer, which GPU computes which (query head, query-block range).

A :class:`Piece` owns query blocks ``[round(start * nb), round(end * nb))`` of one query head, where
``nb`` is the number of query blocks of the actual sequence; the fractions are cut at the bucket's
representative length so that each piece carries a fair share of the head's (causal) cost. Pieces of
one head tile ``[0, 1)``, so any ``nb`` is partitioned exactly once. A GPU holding any piece of a head
needs that head's KV head: a KV head on more than one GPU is a replica that costs memory.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from sglang_shplb.core.patterns import HeadBudget


@dataclass(frozen=True)
class Piece:
    head: int
    start: float = 0.0
    end: float = 1.0

    def blocks(self, nb: int) -> range:
        return range(round(self.start * nb), round(self.end * nb))

    @property
    def whole(self) -> bool:
        return self.start == 0.0 and self.end == 1.0


@dataclass
class LayerPlacement:
    gpus: list[list[Piece]]  # gpus[r] = pieces computed on rank r

    def heads_on(self, rank: int) -> list[int]:
        return sorted({p.head for p in self.gpus[rank]})

    def kv_heads_on(self, rank: int, group_size: int) -> list[int]:
        return sorted({p.head // group_size for p in self.gpus[rank]})

    def cut_not_splittable(self, budgets: Sequence["HeadBudget"]) -> list[int]:
        """The heads this layer cuts over pieces although their budget may not be cut
        (:attr:`~sglang_shplb.core.patterns.HeadBudget.splittable`), ascending: what no served placement may hold."""
        return sorted({p.head for g in self.gpus for p in g if not p.whole and not budgets[p.head].splittable})

    def replicated_kv(self, group_size: int) -> int:
        """KV heads held beyond one copy each (0 when every KV head lives on one GPU)."""
        copies = sum(len(self.kv_heads_on(r, group_size)) for r in range(len(self.gpus)))
        distinct = len({p.head // group_size for g in self.gpus for p in g})
        return copies - distinct


@dataclass
class Placement:
    tp: int
    bucket: int
    solver: str
    layers: list[LayerPlacement]
    predicted: dict = field(default_factory=dict)  # slowest/mean GPU time (s), bubble, replicas …

    def to_rows(self) -> list[tuple[int, int, int, float, float]]:
        """(layer, rank, head, start, end) rows, the storage form."""
        return [(li, r, p.head, p.start, p.end)
                for li, lp in enumerate(self.layers) for r, g in enumerate(lp.gpus) for p in g]

    @staticmethod
    def from_rows(tp: int, bucket: int, solver: str, num_layers: int, rows, predicted: dict) -> "Placement":
        layers = [LayerPlacement([[] for _ in range(tp)]) for _ in range(num_layers)]
        for li, r, h, s, e in rows:
            layers[int(li)].gpus[int(r)].append(Piece(int(h), float(s), float(e)))
        return Placement(tp, bucket, solver, layers, predicted)


class PlacementCoverageError(ValueError):
    pass


def check_coverage(p: Placement, num_heads: int) -> None:
    """Every query head of every layer is covered by pieces tiling [0, 1) exactly once."""
    for li, lp in enumerate(p.layers):
        if len(lp.gpus) != p.tp:
            raise PlacementCoverageError(f"layer {li}: {len(lp.gpus)} GPU lists for TP {p.tp}")
        by_head: dict[int, list[Piece]] = {}
        for g in lp.gpus:
            for piece in g:
                if not 0 <= piece.head < num_heads:
                    raise PlacementCoverageError(f"layer {li}: head {piece.head} out of range")
                by_head.setdefault(piece.head, []).append(piece)
        missing = set(range(num_heads)) - set(by_head)
        if missing:
            raise PlacementCoverageError(f"TP {p.tp} bucket {p.bucket} layer {li}: heads {sorted(missing)} not placed")
        for h, pieces in by_head.items():
            pieces = sorted(pieces, key=lambda x: x.start)
            pos = 0.0
            for piece in pieces:
                if abs(piece.start - pos) > 1e-9 or piece.end <= piece.start:
                    raise PlacementCoverageError(
                        f"TP {p.tp} bucket {p.bucket} layer {li} head {h}: pieces do not tile [0, 1) once "
                        f"(gap or overlap at {pos:.4f})")
                pos = piece.end
            if abs(pos - 1.0) > 1e-9:
                raise PlacementCoverageError(f"TP {p.tp} bucket {p.bucket} layer {li} head {h}: covered up to {pos:.4f} only")
