"""The block index the sparse prefill kernels read, and its static parts (functions of the budgets and the
block count alone), shared by the torch builders (:mod:`.index`) and the Triton top-k builder
(:mod:`.triton_index`).

Layout (padded, fixed shapes): for sequence ``b``, query head ``h`` and *absolute* query block ``qi``
(``0 <= qi < NB``, ``NB = ceil(max_kv_len / BLOCK)``):

* ``block_idx [B, Hq, NB, MAXK] int32``: the KV blocks it attends, ascending, so the diagonal ``qi`` is
  always the last of the ``block_cnt`` valid entries (the kernel masks causally only there);
* ``block_cnt [B, Hq, NB] int32``;
* ``head_dense [Hq] int32``: 1 for dense heads, whose rows are not listed (the kernel walks ``0..qi``).

``MAXK`` is a function of the budgets and ``NB`` alone (no host sync, no data-dependent shape), so the
builders can run inside a captured CUDA graph.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import torch

from sglang_shplb.core.patterns import BLOCK, HeadBudget, Pattern
from sglang_shplb.kernels.layer_heads import LayerHeads


@dataclass
class BlockIndex:
    block_idx: torch.Tensor   # [B, Hq, NB, MAXK] int32
    block_cnt: torch.Tensor   # [B, Hq, NB] int32
    head_dense: torch.Tensor  # [Hq] int32

    @property
    def num_blocks(self) -> int:
        return self.block_cnt.shape[-1]

    def masks(self, b: int, nb: int) -> torch.Tensor:
        """Block mask ``[Hq, nb, nb]`` of sequence ``b`` (host-side, for tests and inspection)."""
        hq = self.block_cnt.shape[1]
        m = torch.zeros(hq, nb, nb, dtype=torch.bool)
        idx = self.block_idx[b].cpu().long()
        cnt = self.block_cnt[b].cpu()
        causal = torch.ones(nb, nb, dtype=torch.bool).tril()
        for h in range(hq):
            if int(self.head_dense[h]):
                m[h] = causal
                continue
            for qi in range(nb):
                m[h, qi, idx[h, qi, :int(cnt[h, qi])]] = True
        return m


def empty_index(heads: LayerHeads, bsz: int, nb: int, maxk: int, device) -> BlockIndex:
    """A :class:`BlockIndex` of ``bsz`` sequences with every row empty (count 0) and ``head_dense`` set."""
    dense = int_tensor(tuple(int(h in heads.dense) for h in range(heads.num_heads)), str(device))
    return BlockIndex(torch.zeros(bsz, heads.num_heads, nb, maxk, dtype=torch.int32, device=device),
                      torch.zeros(bsz, heads.num_heads, nb, dtype=torch.int32, device=device), dense)


def max_blocks_per_row(budgets: Sequence[HeadBudget], nb: int) -> int:
    """``MAXK``: the longest KV-block list of any non-dense head at ``nb`` blocks (≥ 1)."""
    return _max_blocks_per_row(tuple(budgets), nb)


@lru_cache(maxsize=1024)   # every layer of every batch asks (host time of the prefill path)
def _max_blocks_per_row(budgets: tuple[HeadBudget, ...], nb: int) -> int:
    m = 1
    for b in budgets:
        if b.pattern is Pattern.VSLASH:
            # top-n verticals plus forced block 0, top-n slashes plus forced offset 0: up to 2n + 2
            # (HeadBudget.blocks_for_query_block's 2n is not a bound when the forced ones are not in the top n)
            m = max(m, min(nb, 2 * b.vslash_count(nb) + 2))
        elif b.pattern is Pattern.TOPK and b.tile != BLOCK:
            # the builders write whole superblock pairs: room for 2 x superblocks of the last pair
            m = max(m, 2 * b.superblocks_for_pair((nb - 1) // 2))
        elif b.pattern is not Pattern.DENSE:
            m = max(m, b.blocks_for_query_block(nb - 1, nb))
    return m


@lru_cache(maxsize=256)
def topk_counts(budget: HeadBudget, nb: int) -> tuple[int, ...]:
    """Selected blocks per selection row: 64-token query blocks (``tile=64``, ``nb`` of them), or, for
    ``tile=128``, 128-token superblocks per query pair (``nb`` = number of pairs)."""
    if budget.tile != BLOCK:
        return tuple(budget.superblocks_for_pair(p) for p in range(nb))
    return tuple(budget.blocks_for_query_block(qi, nb) for qi in range(nb))


@lru_cache(maxsize=64)
def topk_counts_tensor(budgets: tuple[HeadBudget, ...], nb: int, device: str) -> torch.Tensor:
    """``[T, nb]`` per-row block counts of top-k heads, cached on the device (built once per shape)."""
    return torch.tensor([topk_counts(b, nb) for b in budgets], device=device)


def to_device(x: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on ``device`` without waiting for the stream: pinned staging on CUDA (a copy from pageable
    memory first waits for all the stream's work, which drains the queue and exposes the launches after it)."""
    if torch.device(device).type != "cuda":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


@lru_cache(maxsize=256)
def int_tensor(vals: tuple[int, ...], device: str, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """Tensor of ``vals`` on ``device`` (int32, or ``dtype``: int64 for an index), cached (head lists and flags
    of the builders)."""
    return torch.tensor(vals, dtype=dtype, device=device)


def pool_rows(req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, i: int, n: int) -> torch.Tensor:
    """Pool indices of request ``i``'s first ``n`` tokens, ``req_to_token[req_pool_indices[i], :n]`` (int64),
    indexed on the device (``int(req_pool_indices[i])`` would synchronise)."""
    return req_to_token[req_pool_indices[i:i + 1].long(), :n][0].long()
