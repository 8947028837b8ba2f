"""What head-parallel extend exchanges: the rows a unit computes and the elements that cross a link. THE
rule, shared by the per-batch schedule (:mod:`sglang_shplb.scheduler.head_schedule`) and the planner's
transfer term (:mod:`sglang_shplb.planning.solvers.objective`), so both count the same bytes.

* Rows: a request with ``p`` cached and ``e`` new tokens has ``s = p + e`` tokens and ``nb = ceil(s / 64)``
  query blocks; a piece ``[start, end)`` owns blocks ``Piece.blocks(nb) = [b0, b1)``, positions
  ``[64 b0, 64 b1)``, of which the new tokens ``[max(64 b0, p), min(64 b1, s)) - p`` are computed now
  (:func:`piece_rows`). Its rows read keys ``[0, p + row_end)``.
* K/V bundles: ``home`` stages on ``target``, once per KV head, the prefix up to the largest
  ``p + row_end`` of the units of that KV head it sends there (:func:`kv_bundle_lens`).
* Elements, per (home, target): inputs K then V of the bundles and the units' q rows, outputs the units'
  output rows (:func:`exchange_elems`).
"""
from __future__ import annotations

import math
from typing import Hashable, Iterable, Sequence

from sglang_shplb.core.patterns import BLOCK
from sglang_shplb.core.placement_types import Piece


def piece_rows(start: float, end: float, prefix_len: int, seq_len: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of a request's new tokens (0 = its first new token) that the query-block range
    ``[start, end)`` of a head owns; ``(0, 0)`` when it owns none."""
    blocks = Piece(0, start, end).blocks(math.ceil(seq_len / BLOCK))
    lo, hi = max(blocks.start * BLOCK, prefix_len), min(blocks.stop * BLOCK, seq_len)
    return (lo - prefix_len, hi - prefix_len) if hi > lo else (0, 0)


def kv_bundle_lens(unit_rows: Iterable[tuple[Hashable, Sequence[tuple[int, int]]]],
                   prefix_lens: Sequence[int]) -> dict[Hashable, tuple[int, ...]]:
    """Per bundle key (e.g. ``(home, target, kv_head)``), the K/V tokens of each request it stages: the
    largest ``prefix + row_end`` of the units under that key with rows in the request (0 if none).
    ``unit_rows``: ``(key, rows per request)`` of every unit."""
    lens: dict[Hashable, list[int]] = {}
    for key, rows in unit_rows:
        cur = lens.setdefault(key, [0] * len(prefix_lens))
        for i, (a, b) in enumerate(rows):
            if b > a:
                cur[i] = max(cur[i], prefix_lens[i] + b)
    return {k: tuple(v) for k, v in lens.items()}


def exchange_elems(q_rows: int, kv_tokens: int, head_dim: int) -> tuple[int, int]:
    """``(inputs home → target, outputs target → home)`` elements of units with ``q_rows`` rows in all,
    whose K/V bundles stage ``kv_tokens`` tokens in all (K and V each)."""
    return (2 * kv_tokens + q_rows) * head_dim, q_rows * head_dim
