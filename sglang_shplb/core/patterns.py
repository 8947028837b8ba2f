"""Per-head sparse attention patterns and their budgets, at the granularity of 64-token blocks.

Every consumer (profiler, cost model, kernels, SGLang backend) reads one definition from here.

Geometry: a sequence of ``n`` tokens is cut into ``nb = ceil(n / BLOCK)`` blocks. Query block ``qi``
may attend KV blocks ``kj <= qi`` (the diagonal block is causal inside). A pattern picks, for every
query block, a subset of those KV blocks:

* ``dense``      all ``kj <= qi``.
* ``streaming``  (Λ-shape, StreamingLLM) ``kj < sink_blocks`` or ``qi - kj < window_blocks``.
* ``topk``       block 0 and the diagonal block always, plus the best-scoring other blocks, in all
                 ``k(qi) = min(qi + 1, max(min_blocks, 2, ceil(fraction * (qi + 1))))`` blocks.
                 Scores: mean-pooled q · mean-pooled k per block (what a kernel can afford,
                 MInference/LServe) or, for profiling, the true attention mass (oracle).
                 ``tile=128``: the same rule over 128-token superblocks (query pairs ``2p, 2p+1`` pick
                 one list of KV pairs ``2j, 2j+1``; ``min_blocks`` counts 64-token blocks), which a
                 kernel computes with 128 x 128 tiles: coarser choice, higher per-block speed.
* ``vslash``     (MInference vertical-slash at block level) from the last query block's attention:
                 the ``nv`` KV blocks with most mass (verticals) and the ``ns`` diagonal offsets
                 ``qi - kj`` with most mass (slashes); ``nv = ns = max(min_blocks, ceil(fraction * nb / 2))``.
                 Block 0 and offset 0 always.

A budget is a function of the context length: streaming keeps a fixed number of tokens; top-k and
vertical-slash keep a fraction of the blocks with a floor of ``min_blocks``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Sequence

import numpy as np

BLOCK = 64
TOPK_TILES = (BLOCK, 2 * BLOCK)   # top-k selection granularity: 64-token blocks or 128-token superblocks
#: Fewest pages a top-k / vertical-slash head reads at a decode step: 1024 tokens, a fixed token budget in the
#: range Quest runs with (Tang et al. 2024, 256-4096 tokens). Quest picks ``pages - 2`` of them (page 0 and the current
#: page are forced): the prefill count of a small fraction, e.g. 4 pages at 2K, left 2 picks, and SmolLM2's
#: plan at density 0.30 lost 13.7 pass-key points with sparse decode against 3.9 with stock decode
#: (``bench/results/eval_h200_round4``). Above 16K tokens at a 0.1 fraction the floor does not bind.
DECODE_MIN_PAGES = 16
#: Decode steps a top-k / vertical-slash head keeps the pages it chose (LServe's reusable page selector, Yang et al.
#: 2025, which reuses a selection across 4 consecutive queries): selecting costs a launch that bisects every page's
#: score, which at batch 1 weighs as much as the pages read (``bench/decode.py --profile``). A step selects anew
#: when :func:`reselect_due`; 1 selects at every step.
DECODE_RESELECT_EVERY = 4
#: The last query rows of every prompt attend to every earlier key in every head, whatever its pattern: the
#: question and the answer prefix at the end of a prompt, whose last row gives the first answer token. A pooled
#: top-k estimate of the last query block averages the question with the text before it, and a streaming head's
#: last rows see the sinks and the window only; with them sparse, the SmolLM2 plan at density 0.30
#: (``refined8_d30``) answered the eval's fact-list question at 2K 5.9 % right against dense's 38.2 % (H200, bf16),
#: and with these rows dense (CPU, float32) it answered like dense. 64 rows over ``n`` keys cost one query block's
#: row of ``nb`` block pairs (:meth:`HeadBudget.row_pairs`): 1.6 % of a dense head at 8K. A chunked prefill's
#: earlier chunks end mid-prompt and have none (:func:`tail_rows`).
DENSE_TAIL = 64


def tail_rows(q_len: int, ends_prompt: bool = True) -> int:
    """How many of an extend's ``q_len`` query rows (its last ones) attend densely: :data:`DENSE_TAIL` where the
    extend ends its request's prompt, none where it is an earlier chunk of a chunked prefill (``ends_prompt``
    false: its last rows are mid-prompt text, and the tail there cost 0.75 ms per layer at 128K keys on an H100,
    ``bench/results/tail``)."""
    return min(q_len, DENSE_TAIL) if ends_prompt else 0


def reselect_due(n: int, n_sel: int, every: int) -> bool:
    """Whether a decode step at context ``n`` (the new token at ``n - 1``) selects its pages anew, the kept selection
    having been made at context ``n_sel`` (0: none). Anew at every step when ``every <= 1``; otherwise when there
    is no selection, the request is not the one that made it (``n < n_sel``), it is ``every`` steps old, or the
    page count changed since (the current page moved, so the candidates, the streaming windows and the forced
    current page did too). The one rule of the fused selector (which mirrors it in Triton), the CPU reference and
    the refine gate."""
    return (every <= 1 or n_sel <= 0 or n < n_sel or n - n_sel >= every
            or -(-n // BLOCK) != -(-n_sel // BLOCK))


class Pattern(str, Enum):
    DENSE = "dense"
    STREAMING = "streaming"
    TOPK = "topk"
    VSLASH = "vslash"


@dataclass(frozen=True)
class HeadBudget:
    """The budget of one query head. Fields that a pattern does not use stay at their defaults."""

    pattern: Pattern = Pattern.DENSE
    sink_blocks: int = 1
    window_blocks: int = 0
    fraction: float = 1.0
    min_blocks: int = 4
    tile: int = BLOCK   # top-k only: selection granularity in tokens (TOPK_TILES)

    def __post_init__(self) -> None:
        object.__setattr__(self, "pattern", Pattern(self.pattern))
        if self.tile not in TOPK_TILES or (self.tile != BLOCK and self.pattern is not Pattern.TOPK):
            raise ValueError(f"tile must be one of {TOPK_TILES} (and {2 * BLOCK} only for top-k), got {self}")
        if self.pattern is Pattern.STREAMING and (self.window_blocks < 1 or self.sink_blocks < 0):
            raise ValueError(f"streaming needs window_blocks >= 1 and sink_blocks >= 0, got {self}")
        if self.pattern in (Pattern.TOPK, Pattern.VSLASH):
            if not 0.0 < self.fraction <= 1.0:
                raise ValueError(f"{self.pattern.value} needs 0 < fraction <= 1, got {self.fraction}")
            if self.min_blocks < 1:
                raise ValueError(f"{self.pattern.value} needs min_blocks >= 1, got {self.min_blocks}")

    # ---- constructors -------------------------------------------------------------------------
    @staticmethod
    def dense() -> "HeadBudget":
        return HeadBudget(Pattern.DENSE)

    @staticmethod
    def streaming(sink_tokens: int, window_tokens: int) -> "HeadBudget":
        return HeadBudget(Pattern.STREAMING, sink_blocks=math.ceil(sink_tokens / BLOCK),
                          window_blocks=max(1, math.ceil(window_tokens / BLOCK)))

    @staticmethod
    def topk(fraction: float, min_blocks: int = 4, tile: int = BLOCK) -> "HeadBudget":
        return HeadBudget(Pattern.TOPK, fraction=fraction, min_blocks=min_blocks, tile=tile)

    @staticmethod
    def vslash(fraction: float, min_blocks: int = 4) -> "HeadBudget":
        return HeadBudget(Pattern.VSLASH, fraction=fraction, min_blocks=min_blocks)

    # ---- sizes ---------------------------------------------------------------------------------
    def blocks_for_query_blocks(self, qi, nb: int) -> np.ndarray:
        """The per-block rule, vectorised: KV blocks each query block of ``qi`` (an int or int array)
        attends, of its ``qi + 1`` causal ones, ``nb`` blocks in all. Exact for dense, streaming (the window
        plus the sinks outside it) and top-k; for vertical-slash an upper bound (n verticals + block 0,
        n slashes + the diagonal)."""
        qi = np.asarray(qi, dtype=np.int64)
        causal = qi + 1
        if self.pattern is Pattern.DENSE:
            return causal
        if self.pattern is Pattern.STREAMING:
            return np.minimum(causal, self.sink_blocks + self.window_blocks)
        if self.pattern is Pattern.TOPK:
            if self.tile != BLOCK:   # superblocks of pair qi // 2; the even row lacks the diagonal's 2nd half
                return np.minimum(causal, 2 * self.superblocks_for_pairs(qi // 2) - 1 + qi % 2)
            # at least 2: block 0 and the diagonal are always kept
            return np.minimum(causal, np.maximum(max(self.min_blocks, 2), _ceil(self.fraction * causal)))
        return np.minimum(causal, 2 * self.vslash_count(nb) + 2)

    def blocks_for_query_block(self, qi: int, nb: int) -> int:
        """:meth:`blocks_for_query_blocks` of the one query block ``qi``."""
        return int(self.blocks_for_query_blocks(qi, nb))

    def superblocks_for_pairs(self, p) -> np.ndarray:
        """``tile=128`` top-k: 128-token superblocks that each query pair of ``p`` (an int or int array)
        attends (of ``p + 1``), at least superblock 0 and the diagonal one."""
        causal = np.asarray(p, dtype=np.int64) + 1
        return np.minimum(causal, np.maximum(max(-(-self.min_blocks // 2), 2), _ceil(self.fraction * causal)))

    def superblocks_for_pair(self, p: int) -> int:
        """:meth:`superblocks_for_pairs` of the one query pair ``p``."""
        return int(self.superblocks_for_pairs(p))

    def vslash_count(self, nb: int) -> int:
        return max(self.min_blocks, math.ceil(self.fraction * nb / 2))

    def row_pairs(self, nb: int) -> np.ndarray:
        """KV blocks computed per query block of a prefill of ``nb`` blocks: :meth:`blocks_for_query_blocks`,
        but the last query block counts all ``nb`` (the :data:`DENSE_TAIL` rows over every key)."""
        rows = self.blocks_for_query_blocks(np.arange(nb), nb)
        if nb:
            rows[-1] = nb
        return rows

    def block_pairs(self, seq_len: int) -> int:
        """(query block, KV block) pairs computed for a prefill of ``seq_len`` tokens: the work unit
        of the cost model: the sum of :meth:`row_pairs` (exact but for vertical-slash)."""
        nb = math.ceil(seq_len / BLOCK)
        if self.pattern is Pattern.DENSE:
            return nb * (nb + 1) // 2
        return int(self.row_pairs(nb).sum())

    def density(self, seq_len: int) -> float:
        """Fraction of the causal block pairs this head computes at ``seq_len``."""
        nb = math.ceil(seq_len / BLOCK)
        return self.block_pairs(seq_len) / (nb * (nb + 1) // 2)

    @property
    def decode_window_blocks(self) -> int:
        """Window of a streaming head at decode: the query's block and the ``window_blocks`` before it.
        The block-aligned window of prefill (``qi - kj < window_blocks``) would leave a decode token at the
        start of a block with itself and the sinks: every answer's first decode step after a prompt of a
        multiple of 64 tokens. Measured (SmolLM2, eval passkey/multikey at 2K, the needle-weighted plan at
        density 0.3): 0 of 4 answers right with the prefill window at decode, 4 of 4 (as dense) with this."""
        return self.window_blocks + 1

    def decode_pages(self, npages: int) -> int:
        """Pages (64-token blocks) one decode query reads at ``npages`` pages, the current one included: dense
        all, streaming its sinks and :attr:`decode_window_blocks`, top-k its prefill count of the last query
        block, vertical-slash ``2 * vslash_count``; top-k and vertical-slash at least
        :data:`DECODE_MIN_PAGES` (a Quest-style token budget). The one rule of the decode kernels, the CPU
        reference, the refine gate and the stock decision."""
        if npages <= 0:
            return 0
        if self.pattern is Pattern.DENSE:
            return npages
        if self.pattern is Pattern.STREAMING:
            return min(npages, self.sink_blocks + self.decode_window_blocks)
        if self.pattern is Pattern.VSLASH:
            sparse = 2 * self.vslash_count(npages)
        else:
            sparse = self.blocks_for_query_block(npages - 1, npages)
        return min(npages, max(sparse, DECODE_MIN_PAGES))

    @property
    def splittable(self) -> bool:
        """May a placement cut this head's query blocks over ranks (each piece an extend chunk over a staged
        prefix)? Not a vertical-slash head: its verticals and slashes come from the attention of the sequence's
        last query block, and a piece ending earlier would choose its own (H100, round 22: a piece of such a
        head, emulated, differed from the single-device layer by 1.2 in bf16). Every other pattern selects per
        query block (top-k) or by position (streaming, dense), the same in any piece."""
        return self.pattern is not Pattern.VSLASH

    def to_dict(self) -> dict:
        d = asdict(self)
        d["pattern"] = self.pattern.value
        if self.tile == BLOCK:   # the default stays implicit: plans written before ``tile`` read the same
            del d["tile"]
        return d

    @staticmethod
    def from_dict(d: dict) -> "HeadBudget":
        return HeadBudget(**d)

    def describe(self) -> str:
        if self.pattern is Pattern.DENSE:
            return "dense"
        if self.pattern is Pattern.STREAMING:
            return f"stream(sink={self.sink_blocks * BLOCK},win={self.window_blocks * BLOCK})"
        tile = "" if self.tile == BLOCK else f",tile={self.tile}"
        return f"{self.pattern.value}({self.fraction:.3g},min={self.min_blocks}{tile})"



def _ceil(x: np.ndarray) -> np.ndarray:
    return np.ceil(x).astype(np.int64)


#: What a streaming head whose sinks and decode window hold fewer than :data:`DECODE_MIN_PAGES` pages decodes
#: with (:func:`decode_budget`): a top-k head at the decode floor, Quest's pages (page 0 and the current page
#: forced, the rest by the key-summary bound); its fraction is below one page per 1024, so the floor decides.
STREAMING_AT_DECODE = HeadBudget.topk(1 / 1024, min_blocks=2)


def decode_budget(b: HeadBudget) -> HeadBudget:
    """The budget head ``b`` decodes with: its own, but a streaming head whose sinks and
    :attr:`~HeadBudget.decode_window_blocks` hold fewer than :data:`DECODE_MIN_PAGES` pages decodes as
    :data:`STREAMING_AT_DECODE`, the token budget every selected head has at decode. A short window holds no
    needle when an answer is written. Round 5's plan at density 0.30 (218 of 270 heads streaming, 137 of them
    below the floor), pass key at 2K, CPU float32, 20 prompts: with sinks + window at decode it lost 20 points
    against dense where stock decode lost 10; with this rule 15, in-process and through the real CPU servers
    (``bench/results/eval_cpu/README.md``, ``decode_floor/``). Prefill keeps the streaming rule."""
    if b.pattern is Pattern.STREAMING and b.sink_blocks + b.decode_window_blocks < DECODE_MIN_PAGES:
        return STREAMING_AT_DECODE
    return b


def decode_budgets(layer: Sequence[HeadBudget]) -> list[HeadBudget]:
    """:func:`decode_budget` of every head of a layer: the budgets the server's decode follows."""
    return [decode_budget(b) for b in layer]
