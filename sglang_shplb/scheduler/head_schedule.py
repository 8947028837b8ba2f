"""Per-batch head-parallel schedule: from one layer's work (:class:`~sglang_shplb.core.head_map.LayerWork`,
fixed by the plan's placement for the batch's bucket) and the batch's host-side lengths, the rows each
unit computes and the exact elements every rank sends to every other rank.

Every rank's scheduler holds the same batch (SGLang broadcasts requests and schedules deterministically),
so every rank derives the same schedule with no handshake; :func:`layer_schedule` is cached per
(work, batch shape).

Rows of a unit. A request with ``p`` cached tokens and ``e`` new ones has ``s = p + e`` tokens and
``nb = ceil(s / 64)`` query blocks; a unit ``[start, end)`` of a head owns blocks
``Piece.blocks(nb) = [b0, b1)``, i.e. absolute positions ``[64 b0, 64 b1)``. Of those, the new tokens are
computed now: rows ``[max(64 b0, p), min(64 b1, s)) - p`` of the request's extend. Pieces of a head tile
``[0, 1)``, so every new row of every head is computed exactly once, in prefill and in every chunk of a
chunked prefill. A unit's rows read keys ``[0, p + row_end)``: the unit is an extend chunk over that prefix.

Exchange layout (elements of the activation dtype), per (home ``s``, target ``t != s``):
inputs ``s → t``: for each KV bundle (KV head ``g``, prefix ``L_i = max`` row end of its units), K then V
rows ``[Σ L_i, d]``; then each unit's q rows ``[n_u, d]`` (unit order of the layer work);
outputs ``t → s``: each unit's output rows ``[n_u, d]`` in the same order.

The row, bundle and element rules are :mod:`sglang_shplb.core.exchange`'s, which the planner's transfer
term counts with too.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache

from sglang_shplb.core.exchange import exchange_elems, kv_bundle_lens, piece_rows
from sglang_shplb.core.head_map import LayerWork, Unit


@dataclass(frozen=True)
class ExtendShape:
    """An extend batch's host-side lengths: cached prefix and new tokens per request."""
    prefix_lens: tuple[int, ...]
    extend_lens: tuple[int, ...]

    @staticmethod
    def of(extend_lens, seq_lens) -> "ExtendShape":
        e = tuple(int(x) for x in extend_lens)
        s = tuple(int(x) for x in seq_lens)
        if len(e) != len(s) or any(a < 0 or a > b for a, b in zip(e, s)):
            raise ValueError(f"extend lengths {e} do not fit sequence lengths {s}")
        return ExtendShape(tuple(b - a for a, b in zip(e, s)), e)

    @cached_property
    def offsets(self) -> tuple[int, ...]:
        """First token of each request on the batch's token axis."""
        out, c = [], 0
        for e in self.extend_lens:
            out.append(c)
            c += e
        return tuple(out)


@dataclass(frozen=True)
class UnitRows:
    """A unit's rows in this batch: per request ``(row_begin, row_end)`` of its new tokens (equal: none)."""
    unit: Unit
    rows: tuple[tuple[int, int], ...]

    @property
    def n_rows(self) -> int:
        return sum(b - a for a, b in self.rows)

    def requests(self) -> list[int]:
        return [i for i, (a, b) in enumerate(self.rows) if b > a]

    def token_ranges(self, shape: ExtendShape) -> list[tuple[int, int]]:
        """The unit's rows on the batch's token axis: one ``[start, stop)`` per request with rows."""
        return [(shape.offsets[i] + a, shape.offsets[i] + b) for i, (a, b) in enumerate(self.rows) if b > a]

    def kv_lens(self, shape: ExtendShape) -> list[int]:
        return [shape.prefix_lens[i] + self.rows[i][1] for i in self.requests()]

    def q_lens(self) -> list[int]:
        return [b - a for a, b in self.rows if b > a]


@dataclass(frozen=True)
class KVBundle:
    """The K/V prefix of one KV head that ``home`` stages on ``target``: ``lens[i]`` tokens of request ``i``."""
    home: int
    target: int
    kv_head: int
    lens: tuple[int, ...]

    @property
    def tokens(self) -> int:
        return sum(self.lens)


def unit_rows(unit: Unit, shape: ExtendShape) -> UnitRows:
    return UnitRows(unit, tuple(piece_rows(unit.start, unit.end, p, p + e)
                                for p, e in zip(shape.prefix_lens, shape.extend_lens)))


@dataclass(frozen=True)
class LayerSchedule:
    work: LayerWork
    shape: ExtendShape
    rows: tuple[UnitRows, ...]      # one per unit of ``work``, same order
    bundles: tuple[KVBundle, ...]   # one per (home, target, KV head) with units, moved or not

    def unit_rows_between(self, home: int, target: int) -> list[UnitRows]:
        return [r for r in self.rows if r.unit.home == home and r.unit.target == target]

    def bundles_between(self, home: int, target: int) -> list[KVBundle]:
        return [b for b in self.bundles if b.home == home and b.target == target]

    def input_elems(self, home: int, target: int, head_dim: int) -> int:
        """Elements ``home`` sends ``target`` before compute (0 when home == target)."""
        if home == target:
            return 0
        return self._elems(home, target, head_dim)[0]

    def output_elems(self, home: int, target: int, head_dim: int) -> int:
        """Elements ``target`` returns to ``home`` after compute."""
        if home == target:
            return 0
        return self._elems(home, target, head_dim)[1]

    def _elems(self, home: int, target: int, head_dim: int) -> tuple[int, int]:
        return exchange_elems(sum(r.n_rows for r in self.unit_rows_between(home, target)),
                              sum(b.tokens for b in self.bundles_between(home, target)), head_dim)

    @property
    def exchanges(self) -> bool:
        """Whether any rank sends anything (then every rank joins the collectives)."""
        return any(r.unit.moved and r.n_rows for r in self.rows)

    def moved_elems(self, head_dim: int, tp: int) -> int:
        """Elements crossing links in this layer, inputs and outputs, all ranks."""
        return sum(self.input_elems(s, t, head_dim) + self.output_elems(s, t, head_dim)
                   for s in range(tp) for t in range(tp))


@lru_cache(maxsize=4096)
def layer_schedule(work: LayerWork, shape: ExtendShape) -> LayerSchedule:
    rows = tuple(unit_rows(u, shape) for u in work.units)
    lens = kv_bundle_lens((((r.unit.home, r.unit.target, r.unit.kv_head), r.rows) for r in rows), shape.prefix_lens)
    bundles = tuple(KVBundle(h, t, g, v) for (h, t, g), v in sorted(lens.items()))
    return LayerSchedule(work, shape, rows, bundles)
