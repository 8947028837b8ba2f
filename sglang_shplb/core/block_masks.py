"""Block masks of the patterns in :mod:`sglang_shplb.core.patterns`, in plain PyTorch.

The one reference for which (query block, KV block) pairs a head computes. The profiler scores
patterns with it, the kernels' index builders are tested against it, and the masked dense
attention in :mod:`sglang_shplb.kernels.reference` turns it into outputs.

Shapes: ``q [Hq, n, d]``, ``k [Hkv, n, d]`` (one sequence, RoPE applied); masks ``[Hq, nb, nb]`` bool,
``nb = ceil(n / BLOCK)``, always lower-triangular and always holding the diagonal.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from sglang_shplb.core.patterns import BLOCK, HeadBudget, Pattern


def causal_block_mask(nb: int, device=None) -> torch.Tensor:
    return torch.ones(nb, nb, dtype=torch.bool, device=device).tril()


def pooled_block_scores(q: torch.Tensor, k: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """Estimator scores ``[Hq, nb, nb]``: mean-pooled q block · mean-pooled k block, scaled by 1/sqrt(d).

    ``q [Hq, n, d]``, ``k [Hkv, n, d]``; query head h reads KV head ``h // (Hq // Hkv)``; blocks of
    ``block`` tokens (128: the superblocks of ``tile=128`` top-k heads).
    """
    hq, n, d = q.shape
    group = hq // k.shape[0]
    nb = math.ceil(n / block)
    qp = _block_mean(q, nb, block)
    kp = _block_mean(k, nb, block).repeat_interleave(group, dim=0)
    return qp @ kp.transpose(1, 2) / math.sqrt(d)


def _block_mean(x: torch.Tensor, nb: int, block: int) -> torch.Tensor:
    h, n, d = x.shape
    pad = nb * block - n
    xs = torch.nn.functional.pad(x.float(), (0, 0, 0, pad)).view(h, nb, block, d).sum(2)
    counts = torch.full((nb,), float(block), device=x.device)
    counts[-1] = block - pad
    return xs / counts[None, :, None]


def streaming_mask(budget: HeadBudget, nb: int, device=None) -> torch.Tensor:
    qi = torch.arange(nb, device=device)[:, None]
    kj = torch.arange(nb, device=device)[None, :]
    return (kj <= qi) & ((kj < budget.sink_blocks) | (qi - kj < budget.window_blocks))


def topk_mask(budget: HeadBudget, scores: torch.Tensor, nb: int | None = None) -> torch.Tensor:
    """``scores [ns, ns]`` (estimate or oracle block mass, over blocks of ``budget.tile`` tokens) → mask
    ``[nb, nb]`` over 64-token blocks; block 0 and the diagonal forced. ``tile=128``: query pair ``p``'s
    superblocks expand to blocks ``2j, 2j+1`` of rows ``2p, 2p+1`` (causal); ``nb`` defaults to ``2 ns``."""
    ns = scores.shape[-1]
    causal = causal_block_mask(ns, scores.device)
    forced = torch.zeros_like(causal)
    forced[:, 0] = True
    forced |= torch.eye(ns, dtype=torch.bool, device=scores.device)
    s = scores.float().masked_fill(~causal, float("-inf")).masked_fill(forced, float("inf"))
    if budget.tile == BLOCK:
        k = [budget.blocks_for_query_block(i, ns) for i in range(ns)]
    else:
        k = [budget.superblocks_for_pair(p) for p in range(ns)]
    order = s.argsort(dim=-1, descending=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(ns, device=scores.device).expand(ns, ns).contiguous())
    m = (rank < torch.tensor(k, device=scores.device)[:, None]) & causal
    if budget.tile == BLOCK:
        return m
    nb = 2 * ns if nb is None else nb
    r = budget.tile // BLOCK
    return m.repeat_interleave(r, 0).repeat_interleave(r, 1)[:nb, :nb] & causal_block_mask(nb, scores.device)


def vslash_mask(budget: HeadBudget, last_block_mass: torch.Tensor) -> torch.Tensor:
    """``last_block_mass [nb]``: attention mass of the last query block on each KV block, the signal
    MInference uses. Verticals: top blocks by that mass; slashes: top offsets ``nb - 1 - kj`` by it."""
    nb = last_block_mass.shape[-1]
    dev = last_block_mass.device
    n = min(nb, budget.vslash_count(nb))
    m = last_block_mass.float().clone()
    vertical = torch.zeros(nb, dtype=torch.bool, device=dev)
    vertical[m.topk(n).indices] = True
    vertical[0] = True
    # offset o = (nb - 1) - kj as seen from the last query block
    by_offset = m.flip(0)
    slash = torch.zeros(nb, dtype=torch.bool, device=dev)
    slash[by_offset.topk(n).indices] = True
    slash[0] = True
    qi = torch.arange(nb, device=dev)[:, None]
    kj = torch.arange(nb, device=dev)[None, :]
    off = (qi - kj).clamp(min=0)
    return (kj <= qi) & (vertical[None, :] | slash[off])


def head_block_mask(budget: HeadBudget, nb: int, scores: torch.Tensor | None,
                    last_block_mass: torch.Tensor | None) -> torch.Tensor:
    """Mask ``[nb, nb]`` of one head. ``scores`` (over blocks of ``budget.tile`` tokens) feeds top-k,
    ``last_block_mass`` vertical-slash."""
    if budget.pattern is Pattern.DENSE:
        return causal_block_mask(nb, None if scores is None else scores.device)
    if budget.pattern is Pattern.STREAMING:
        return streaming_mask(budget, nb, None if scores is None else scores.device)
    if budget.pattern is Pattern.TOPK:
        if scores is None:
            raise ValueError("top-k needs block scores")
        return topk_mask(budget, scores, nb)
    if last_block_mass is None:
        raise ValueError("vertical-slash needs the last query block's block mass")
    return vslash_mask(budget, last_block_mass)


def last_block_mass(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``[Hq, nb]``: mean attention probability mass of the last query block's queries per KV block."""
    hq, n, d = q.shape
    group = hq // k.shape[0]
    nb = math.ceil(n / BLOCK)
    start = (nb - 1) * BLOCK
    kk = k.float().repeat_interleave(group, dim=0)
    s = q[:, start:].float() @ kk.transpose(1, 2) / math.sqrt(d)  # [Hq, nq, n]
    pos_q = torch.arange(start, n, device=q.device)[:, None]
    s = s.masked_fill(torch.arange(n, device=q.device)[None, :] > pos_q, float("-inf"))
    p = s.softmax(-1).mean(1)
    return torch.nn.functional.pad(p, (0, nb * BLOCK - n)).view(hq, nb, BLOCK).sum(-1)


def build_block_masks(budgets: Sequence[HeadBudget], q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Masks ``[Hq, nb, nb]`` of every query head of one layer for one sequence, with the estimator
    a kernel uses (pooled scores for top-k, last-block mass for vertical-slash)."""
    hq, n, _ = q.shape
    if len(budgets) != hq:
        raise ValueError(f"{len(budgets)} budgets for {hq} query heads")
    nb = math.ceil(n / BLOCK)
    tiles = {b.tile for b in budgets if b.pattern is Pattern.TOPK}
    scores = {t: pooled_block_scores(q, k, t) for t in tiles}
    last = last_block_mass(q, k) if any(b.pattern is Pattern.VSLASH for b in budgets) else None
    return torch.stack([
        head_block_mask(b, nb, scores[b.tile][h] if b.tile in scores else None,
                        None if last is None else last[h]).to(q.device) for h, b in enumerate(budgets)])
