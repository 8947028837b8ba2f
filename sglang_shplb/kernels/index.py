"""Block indices for the sparse kernels (:mod:`.block_index`), built on the device with torch ops only.

The builders reproduce :func:`sglang_shplb.core.block_masks.build_block_masks` (pooled q·k top-k,
last-block-mass vertical-slash) for every sequence of a varlen batch, sync-free and at fixed shapes; on CUDA
the top-k and vertical-slash rows come from the fused Triton builders (:func:`.triton_index.build_topk_index`,
:func:`.triton_vslash.build_vslash_index`), and the torch ops here are their reference and the CPU route.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Sequence

import torch

from sglang_shplb.core.patterns import BLOCK, HeadBudget
from sglang_shplb.kernels.block_index import (BlockIndex, empty_index, int_tensor, max_blocks_per_row, topk_counts,
                                              topk_counts_tensor)
from sglang_shplb.kernels.layer_heads import LayerHeads
from sglang_shplb.kernels.triton_index import build_topk_index
from sglang_shplb.kernels.triton_vslash import build_vslash_index


def streaming_index(sink_blocks: int, window_blocks: int, nb: int, maxk: int,
                    device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``[nb, maxk]`` indices, ``[nb]`` counts: sinks ``kj < s`` outside the window, then window ``qi-w+1..qi``."""
    qi = torch.arange(nb, device=device)[:, None]
    j = torch.arange(maxk, device=device)[None, :]
    ws = (qi - window_blocks + 1).clamp(min=0)
    n_s = torch.minimum(ws, torch.full_like(ws, sink_blocks))
    cnt = n_s + (qi - ws + 1)
    idx = torch.where(j < n_s, j, ws + j - n_s)
    idx = torch.where(j < cnt, idx, torch.zeros_like(idx))
    return idx.int(), cnt[:, 0].int()


@lru_cache(maxsize=256)
def _cached_streaming_index(sink_blocks: int, window_blocks: int, nb: int, maxk: int, device: str):
    return streaming_index(sink_blocks, window_blocks, nb, maxk, device)


# ---------------------------------------------------------------------------------------------------
# gathers (no host sync)
# ---------------------------------------------------------------------------------------------------
def _kv_locations(b_kv_lens, nb: int, cu_seqlens_k=None, req_to_token=None, req_pool_indices=None):
    """Token rows ``[B, nb*BLOCK]`` of every position (clamped where invalid) and the valid mask."""
    pos = torch.arange(nb * BLOCK, device=b_kv_lens.device)[None, :]
    valid = pos < b_kv_lens[:, None]
    if req_to_token is not None:
        p = pos.clamp(max=req_to_token.shape[1] - 1).expand(b_kv_lens.shape[0], -1)
        loc = torch.gather(req_to_token[req_pool_indices.long()].long(), 1, p)
    else:
        loc = cu_seqlens_k[:-1].long()[:, None] + pos
    loc = torch.where(valid, loc, torch.zeros_like(loc))
    return loc, valid


def _pool(x: torch.Tensor, valid: torch.Tensor, nb: int, block: int = BLOCK) -> torch.Tensor:
    """``x [B, nb*block, H, d]`` → block means ``[B, H, nb, d]`` in float32 (invalid rows excluded).
    Masks in x's dtype and accumulates in float32 (no float32 copy of x)."""
    bsz, _, h, d = x.shape
    xs = (x * valid[:, :, None, None].to(x.dtype)).view(bsz, nb, block, h, d).sum(2, dtype=torch.float32)
    cnt = valid.view(bsz, nb, block).sum(-1).clamp(min=1).float()
    return (xs / cnt[:, :, None, None]).permute(0, 2, 1, 3)


def expand_pair_rows(top: torch.Tensor, counts: torch.Tensor, nb: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``tile=128`` top-k: ascending superblocks ``top [..., NS, K2]`` (``counts [..., NS]`` valid, the
    diagonal superblock last) → rows of the 64-token :class:`BlockIndex`: query blocks ``2p`` and ``2p + 1``
    both list blocks ``2j, 2j + 1`` of every superblock ``j``, except that ``2p`` stops before ``2p + 1``
    (causal). Returns ``idx [..., nb, 2 K2]`` (zero past the count) and ``cnt [..., nb]``."""
    e = torch.stack([2 * top, 2 * top + 1], -1).flatten(-2)               # [..., NS, 2 K2]
    c = torch.stack([2 * counts - 1, 2 * counts], -1)                     # [..., NS, 2]: rows 2p, 2p + 1
    j = torch.arange(e.shape[-1], device=e.device)
    idx = torch.where(j < c[..., None], e[..., None, :], torch.zeros_like(e[..., None, :]))   # [..., NS, 2, 2 K2]
    return idx.flatten(-3, -2)[..., :nb, :], c.flatten(-2)[..., :nb]


def build_block_index(budgets: Sequence[HeadBudget], q: torch.Tensor, k: torch.Tensor,
                      cu_seqlens_q: torch.Tensor, kv_lens: torch.Tensor, max_kv_len: int, *,
                      cu_seqlens_k: torch.Tensor | None = None, req_to_token: torch.Tensor | None = None,
                      req_pool_indices: torch.Tensor | None = None, builder: str | None = None,
                      max_q_len: int | None = None) -> BlockIndex:
    """Block index of a varlen (optionally chunked, optionally paged) batch, on ``q``'s device, sync-free.

    ``q [total_q, Hq, d]``: the last ``n_q(b)`` positions of each sequence; ``k`` contiguous
    ``[total_kv, Hkv, d]`` (``cu_seqlens_k``) or the token pool (``req_to_token``, ``req_pool_indices``).
    ``max_kv_len`` (a host int, e.g. the planned maximum) fixes ``NB`` and ``MAXK``.
    Top-k scores use the mean of the available queries of a block (all of them unless chunked).
    ``builder``: ``"triton"`` (the fused top-k and vertical-slash builders, default on CUDA) or ``"torch"`` (the
    torch ops below, default elsewhere) for the top-k and vertical-slash heads' rows. ``max_q_len`` (a host
    bound on the queries per sequence): the Triton builders then build only the rows the prefill kernels read
    (the query blocks); rows of blocks without queries are then unspecified."""
    hq, d = q.shape[1], q.shape[2]
    heads = LayerHeads.of(budgets, k.shape[1], num_q_heads=hq)
    dev = q.device
    bsz = kv_lens.shape[0]
    nb = max(1, math.ceil(max_kv_len / BLOCK))
    maxk = max_blocks_per_row(budgets, nb)
    kv_lens = kv_lens.to(dev).long()
    q_lens = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).to(dev).long()
    prefix = kv_lens - q_lens
    nb_b = (kv_lens + BLOCK - 1) // BLOCK                                   # [B]
    out = empty_index(heads, bsz, nb, maxk, dev)
    idx, cnt = out.block_idx, out.block_cnt
    qi_ar = torch.arange(nb, device=dev)
    # static heads: one indexed write per kind and streaming rule (a per-head loop costs ~10 launches a head)
    if heads.dense:
        cnt[:, int_tensor(heads.dense, str(dev), torch.long)] = (qi_ar + 1).int()
    for (sink, window), hs in heads.streaming_rules.items():
        ht = int_tensor(hs, str(dev), torch.long)
        si, sc = _cached_streaming_index(sink, window, nb, maxk, str(dev))
        idx[:, ht] = si
        cnt[:, ht] = sc
    if not heads.selected:
        return out

    if builder is None:
        builder = "triton" if q.is_cuda else "torch"
    if builder not in ("triton", "torch"):
        raise ValueError(f"builder must be 'triton' or 'torch', got {builder!r}")
    if builder == "triton":
        kv = dict(cu_seqlens_k=cu_seqlens_k, req_to_token=req_to_token, req_pool_indices=req_pool_indices, out=out,
                  max_q_len=max_q_len)
        if heads.topk:
            build_topk_index(budgets, q, k, cu_seqlens_q, kv_lens, max_kv_len, **kv)
        if heads.vslash:
            build_vslash_index(budgets, q, k, cu_seqlens_q, kv_lens, max_kv_len, **kv)
        return out
    topk_by_tile = heads.topk_by_tile                                       # the top-k rows built below
    group = hq // k.shape[1]
    # positions of whole superblocks when a tile-128 head is listed (the extra block is invalid)
    nbx = nb + (nb % 2 if any(tile != BLOCK for tile in topk_by_tile) else 0)
    loc, kvalid = _kv_locations(kv_lens, nbx, cu_seqlens_k, req_to_token, req_pool_indices)
    kg = k[loc.view(-1)].view(bsz, nbx * BLOCK, k.shape[1], d)              # [B, nbx*BLOCK, Hkv, d]
    pos = torch.arange(nbx * BLOCK, device=dev)[None, :]
    qvalid = (pos >= prefix[:, None]) & (pos < kv_lens[:, None])
    qrow = cu_seqlens_q[:-1].to(dev).long()[:, None] + pos - prefix[:, None]
    qrow = torch.where(qvalid, qrow, torch.zeros_like(qrow))
    causal = torch.ones(nb, nb, dtype=torch.bool, device=dev).tril()

    for tile, heads_t in topk_by_tile.items():
        # scores S[r, kj] = mean(q in row r) · mean(k in kj) / sqrt(d) over blocks of `tile` tokens;
        # forced: kj = 0 and kj = r
        ns = nb if tile == BLOCK else nbx * BLOCK // tile
        npos = ns * tile
        th = int_tensor(heads_t, str(dev), torch.long)
        qg = q if len(heads_t) == hq else q.index_select(1, th)
        qp = _pool(qg[qrow[:, :npos].reshape(-1)].view(bsz, npos, len(heads_t), d), qvalid[:, :npos], ns, tile)
        kp = _pool(kg[:, :npos], kvalid[:, :npos], ns, tile)              # [B, Hkv, ns, d]
        kp = kp if (group == 1 and len(heads_t) == hq) else kp[:, th // group]   # [B, T, ns, d]
        # pooled scores: tensor cores in the input dtype (bf16 on the GPU), float32 result
        sdt = q.dtype if q.is_cuda else torch.float32
        s = torch.matmul(qp.to(sdt), kp.to(sdt).transpose(-1, -2)).float().mul_(1.0 / math.sqrt(d))
        # forced blocks rank first: the diagonal (+inf), then block 0 (max float); with k(r) = 1 the
        # diagonal wins (block_masks' tie of two +inf leaves that choice to argsort)
        s.masked_fill_(~torch.ones(ns, ns, dtype=torch.bool, device=dev).tril(), float("-inf"))
        s[..., 0] = torch.finfo(torch.float32).max
        s.diagonal(dim1=-2, dim2=-1).fill_(float("inf"))
        key = tuple(budgets[h] for h in heads_t)
        counts = topk_counts_tensor(key, ns, str(dev))                     # [T, ns]
        kt = int(max(max(topk_counts(b, ns)) for b in set(key)))
        top = s.topk(kt, dim=-1).indices                                   # [B, T, ns, kt], by score
        keep = torch.arange(kt, device=dev) < counts[None, :, :, None]
        top = torch.where(keep, top, torch.full_like(top, ns)).sort(-1).values
        top = torch.where(keep, top, torch.zeros_like(top))               # counts are prefixes after sort
        if tile == BLOCK:
            idx[:, th, :, :kt] = top.int()
            cnt[:, th] = counts[None].int().expand(bsz, -1, -1)
        else:
            ei, ec = expand_pair_rows(top, counts[None].expand(bsz, -1, -1), nb)
            idx[:, th, :, :ei.shape[-1]] = ei.int()
            cnt[:, th] = ec.int()

    if heads.vslash:
        vs_heads = heads.vslash
        vh, frac, minb = _vslash_consts(tuple(budgets[h] for h in vs_heads), tuple(vs_heads), str(dev))
        last = nb_b - 1                                                     # last query block per sequence
        lpos = last[:, None] * BLOCK + torch.arange(BLOCK, device=dev)[None, :]   # [B, BLOCK]
        lvalid = (lpos < kv_lens[:, None]) & (lpos >= prefix[:, None])
        lrow = torch.gather(qrow, 1, lpos.clamp(max=nb * BLOCK - 1))
        ql = q[:, vh][lrow.view(-1)].view(bsz, BLOCK, len(vs_heads), d).float().transpose(1, 2)   # [B, V, BLOCK, d]
        kl = kg[:, :nb * BLOCK, vh // group].float().permute(0, 2, 3, 1)   # [B, V, d, nb*BLOCK]
        sc = (ql @ kl) / math.sqrt(d)                                      # [B, V, BLOCK, nb*BLOCK]
        kv_ok, kv_pos = kvalid[:, :nb * BLOCK], pos[:, :nb * BLOCK]
        allowed = kv_ok[:, None, None, :] & (kv_pos[:, None, None, :] <= lpos[:, None, :, None])
        sc = sc.masked_fill(~allowed, float("-inf"))
        p = torch.softmax(sc, -1).nan_to_num(0.0) * lvalid[:, None, :, None]
        p = p.sum(2) / lvalid.sum(-1).clamp(min=1)[:, None, None]          # mean over the block's queries
        mass = p.view(bsz, len(vs_heads), nb, BLOCK).sum(-1)               # [B, V, nb]
        jv = torch.arange(nb, device=dev)
        bvalid = jv[None, :] < nb_b[:, None]                                # [B, nb]
        mass = mass.masked_fill(~bvalid[:, None, :], float("-inf"))
        n = torch.maximum(minb[None, :], torch.ceil(frac[None, :] * nb_b[:, None].double() / 2))
        n = torch.minimum(n, nb_b[:, None].double()).long()                # [B, V]
        nmax = min(nb, max(budgets[h].vslash_count(nb) for h in vs_heads))
        keep = torch.arange(nmax, device=dev)[None, None, :] < n[:, :, None]
        vert = torch.zeros(bsz, len(vs_heads), nb, dtype=torch.bool, device=dev)
        vert.scatter_(-1, mass.topk(nmax, -1).indices, keep)
        vert[..., 0] = True
        src = (last[:, None] - jv[None, :]).clamp(min=0)                    # offset o reads block last - o
        om = torch.gather(mass, 2, src[:, None, :].expand(-1, len(vs_heads), -1))
        om = om.masked_fill(~bvalid[:, None, :], float("-inf"))
        slash = torch.zeros_like(vert)
        slash.scatter_(-1, om.topk(nmax, -1).indices, keep)
        slash[..., 0] = True
        off = (qi_ar[:, None] - jv[None, :]).clamp(min=0)                   # [nb, nb]
        m = causal & (vert[:, :, None, :] | slash[:, :, off])              # [B, V, nb, nb]
        vi, vc = mask_to_index(m, min(maxk, nb))
        idx[:, vh, :, :vi.shape[-1]] = vi
        cnt[:, vh] = vc
    return out


@lru_cache(maxsize=256)
def _vslash_consts(budgets: tuple[HeadBudget, ...], heads: tuple[int, ...], device: str):
    """The vertical-slash heads' ids, fractions and block floors on ``device``, made once per layer (a tensor made
    from a host list on CUDA waits for the stream)."""
    return (torch.tensor(heads, device=device),
            torch.tensor([b.fraction for b in budgets], dtype=torch.float64, device=device),
            torch.tensor([b.min_blocks for b in budgets], dtype=torch.float64, device=device))


def mask_to_index(mask: torch.Tensor, maxk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool ``[..., nb, nb]`` → ascending indices ``[..., nb, maxk]`` int32 and counts ``[..., nb]`` int32
    (sync-free; rows longer than ``maxk`` are truncated, which drops the diagonal: pass an upper bound)."""
    nb = mask.shape[-1]
    key = torch.where(mask, torch.arange(nb, device=mask.device), torch.full((), nb, device=mask.device))
    vals = key.topk(min(maxk, nb), dim=-1, largest=False, sorted=True).values
    cnt = mask.sum(-1).clamp(max=vals.shape[-1])
    vals = torch.where(vals < nb, vals, torch.zeros_like(vals))
    return vals.int(), cnt.int()


def block_index_from_masks(masks: Sequence[torch.Tensor], device=None) -> BlockIndex:
    """Explicit masks, one ``[Hq, nb_b, nb_b]`` per sequence → :class:`BlockIndex` (host-side checks:
    lower triangular, diagonal present, no empty row). Every head is treated as listed (not dense)."""
    if not masks:
        raise ValueError("no masks")
    hq = masks[0].shape[0]
    nb = max(m.shape[-1] for m in masks)
    padded = []
    for b, m in enumerate(masks):
        if m.dim() != 3 or m.shape[0] != hq or m.shape[1] != m.shape[2]:
            raise ValueError(f"mask {b} has shape {tuple(m.shape)}, expected [{hq}, nb, nb]")
        m = m.bool().cpu()
        nbb = m.shape[-1]
        if (m.sum(-1) == 0).any():
            h, r = (m.sum(-1) == 0).nonzero()[0].tolist()
            raise ValueError(f"mask {b}: head {h}, query block {r} attends no KV block (empty row)")
        if (m & ~torch.ones(nbb, nbb, dtype=torch.bool).tril()).any():
            raise ValueError(f"mask {b} is not lower-triangular (a query block attends a future block)")
        if not m.diagonal(dim1=1, dim2=2).all():
            raise ValueError(f"mask {b} misses a diagonal block (the kernels always compute it)")
        p = torch.zeros(hq, nb, nb, dtype=torch.bool)
        p[:, :nbb, :nbb] = m
        p[:, nbb:, :] = torch.eye(nb, dtype=torch.bool)[nbb:]   # padding rows: diagonal only
        padded.append(p)
    mm = torch.stack(padded)
    maxk = int(mm.sum(-1).max())
    idx, cnt = mask_to_index(mm, maxk)
    dev = device if device is not None else masks[0].device
    return BlockIndex(idx.to(dev), cnt.to(dev), torch.zeros(hq, dtype=torch.int32, device=dev))
