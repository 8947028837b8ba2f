"""One classification of a layer's heads by their budgets, made once per layer and handed to every kernel
front end (prefill routes, index builders, decode page rules, page selectors, the CPU layer path).

What decides the KV blocks (prefill) or pages (decode) a head reads:

* **dense**: every causal block;
* **streaming**: positions only, the rule ``(sink_blocks s, window_blocks w)``: ``kj < s`` or ``qi - kj < w``;
* **top-k** and **vertical-slash** (together: the *selected* heads): the data. Prefill lists their blocks
  in a block index; decode chooses their pages by the Quest bound. Top-k heads select 64-token blocks or,
  ``tile=128``, 128-token superblocks (the *tiled* heads).

Query head ``h`` reads KV head ``h // (Hq / Hkv)`` (GQA): :meth:`LayerHeads.kv_groups`.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Sequence

from sglang_shplb.core.patterns import BLOCK, HeadBudget, Pattern
from sglang_shplb.kernels.checks import check_head_dim

Heads = tuple[int, ...]


@dataclass(frozen=True)
class LayerHeads:
    """A layer's heads (rank-local, in local order) by kind. Build it with :meth:`of`."""
    budgets: tuple[HeadBudget, ...]
    dense: Heads
    streaming: Heads
    topk: Heads
    vslash: Heads

    @staticmethod
    def of(budgets: Sequence[HeadBudget], num_kv_heads: int | None = None, head_dim: int | None = None, *,
           num_q_heads: int | None = None) -> "LayerHeads":
        """Classify ``budgets`` (cached: the same budgets give the same object), after checking them and, when
        given, the layer's shape: ``num_q_heads`` budgets, a multiple of ``num_kv_heads``, a supported
        ``head_dim``."""
        for h, b in enumerate(budgets):
            if not isinstance(b, HeadBudget):
                raise ValueError(f"budget of head {h} is {type(b).__name__}, not a HeadBudget")
        hq = len(budgets)
        if num_q_heads is not None and hq != num_q_heads:
            raise ValueError(f"{hq} budgets for {num_q_heads} query heads")
        if num_kv_heads is not None and (num_kv_heads < 1 or hq % num_kv_heads):
            raise ValueError(f"{hq} query heads are not a multiple of {num_kv_heads} KV heads")
        if head_dim is not None:
            check_head_dim(head_dim)
        return _classify(tuple(budgets))

    @property
    def num_heads(self) -> int:
        return len(self.budgets)

    @cached_property
    def selected(self) -> Heads:
        """Top-k and vertical-slash heads, ascending."""
        return tuple(sorted(self.topk + self.vslash))

    @cached_property
    def sparse(self) -> Heads:
        """Every head but the dense ones, ascending."""
        return tuple(sorted(self.streaming + self.selected))

    @cached_property
    def tiled(self) -> Heads:
        """Top-k heads selecting 128-token superblocks."""
        return tuple(h for h in self.topk if self.budgets[h].tile != BLOCK)

    @cached_property
    def topk_by_tile(self) -> dict[int, Heads]:
        """Top-k heads by selection tile (64 or 128 tokens), tiles ascending."""
        tiles = sorted({self.budgets[h].tile for h in self.topk})
        return {t: tuple(h for h in self.topk if self.budgets[h].tile == t) for t in tiles}

    @cached_property
    def streaming_rules(self) -> dict[tuple[int, int], Heads]:
        """Streaming heads by their rule ``(sink_blocks, window_blocks)``."""
        out: dict[tuple[int, int], list[int]] = {}
        for h in self.streaming:
            out.setdefault((self.budgets[h].sink_blocks, self.budgets[h].window_blocks), []).append(h)
        return {r: tuple(hs) for r, hs in out.items()}

    def kv_groups(self, num_kv_heads: int) -> tuple[range, ...]:
        """The query heads of each KV head."""
        g = self.num_heads // num_kv_heads
        return tuple(range(hk * g, (hk + 1) * g) for hk in range(num_kv_heads))


@lru_cache(maxsize=256)
def _classify(budgets: tuple[HeadBudget, ...]) -> LayerHeads:
    def of(p: Pattern) -> Heads:
        return tuple(h for h, b in enumerate(budgets) if b.pattern is p)
    return LayerHeads(budgets, of(Pattern.DENSE), of(Pattern.STREAMING), of(Pattern.TOPK), of(Pattern.VSLASH))
