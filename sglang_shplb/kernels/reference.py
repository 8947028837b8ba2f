"""PyTorch references for the sparse kernels: masked dense attention, in float32 (or float64).

Layouts (SGLang's, token-major):

* queries ``q [total_q, Hq, d]``, packed by ``cu_seqlens_q [B + 1]``; the queries of sequence ``b`` are the
  *last* ``n_q(b)`` tokens of its ``n_kv(b)`` tokens (chunked prefill: ``prefix = n_kv - n_q`` tokens are
  already in the cache). Block geometry uses absolute positions: token ``p`` is in block ``p // BLOCK``.
* keys/values either contiguous ``k [total_kv, Hkv, d]`` packed by ``cu_seqlens_k`` or a paged token pool
  ``k_buffer [pool, Hkv, d]`` read through ``req_to_token[req_pool_indices[b], pos]``.
* block masks ``[Hq, nb, nb]`` per sequence (:mod:`sglang_shplb.core.block_masks`), ``nb = ceil(n_kv / BLOCK)``.

Query head ``h`` reads KV head ``h // (Hq // Hkv)`` (GQA).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from sglang_shplb.core.patterns import BLOCK, DECODE_RESELECT_EVERY, HeadBudget, Pattern, reselect_due, tail_rows


def _expand_block_mask(mask: torch.Tensor, n_kv: int, n_q: int, block: int = BLOCK) -> torch.Tensor:
    """``[H, nb, nb]`` block mask → ``[H, n_q, n_kv]`` token mask of the last ``n_q`` positions, token-causal."""
    kpos = torch.arange(n_kv, device=mask.device)
    qpos = kpos[n_kv - n_q:]
    return mask[:, qpos // block][:, :, kpos // block] & (kpos[None, :] <= qpos[:, None])


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: torch.Tensor,
                     sm_scale: float | None = None, block: int = BLOCK,
                     compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One sequence. ``q [n_q, Hq, d]`` (the last ``n_q`` positions), ``k, v [n_kv, Hkv, d]``,
    ``block_mask [Hq, nb, nb]``. Returns ``[n_q, Hq, d]`` in ``compute_dtype``.

    ``o_i = sum_j softmax_j(s_ij) v_j`` with ``s_ij = scale * q_i·k_j`` over the allowed j (block in the
    mask and ``j <= i``)."""
    n_q, hq, d = q.shape
    n_kv, hkv, _ = k.shape
    group = hq // hkv
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)
    qq = q.to(compute_dtype).transpose(0, 1)                                  # [Hq, n_q, d]
    kk = k.to(compute_dtype).transpose(0, 1).repeat_interleave(group, 0)      # [Hq, n_kv, d]
    vv = v.to(compute_dtype).transpose(0, 1).repeat_interleave(group, 0)
    allowed = _expand_block_mask(block_mask.to(q.device), n_kv, n_q, block)   # [Hq, n_q, n_kv]
    s = (qq @ kk.transpose(1, 2)) * scale
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, dim=-1)
    return (p @ vv).transpose(0, 1)


def dense_tail_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float | None = None) -> torch.Tensor:
    """The dense tail of one sequence (:data:`~sglang_shplb.core.patterns.DENSE_TAIL`; the reference of
    :func:`sglang_shplb.kernels.dense_tail.dense_tail`): ``q [n, Hq, d]``, ``k, v [n, Hkv, d]`` → float32
    ``[t, Hq, d]``, its last ``t = tail_rows(n)`` queries over every key up to their own, differentiable."""
    n = q.shape[0]
    t = tail_rows(n)
    nb = math.ceil(n / BLOCK)
    causal = torch.ones(nb, nb, dtype=torch.bool, device=q.device).tril().expand(q.shape[1], nb, nb)
    return masked_attention(q[n - t:], k, v, causal, sm_scale)


def reference_sparse_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             masks: Sequence[torch.Tensor], cu_seqlens_q: torch.Tensor,
                             kv_lens: torch.Tensor, *, cu_seqlens_k: torch.Tensor | None = None,
                             req_to_token: torch.Tensor | None = None,
                             req_pool_indices: torch.Tensor | None = None,
                             sm_scale: float | None = None) -> torch.Tensor:
    """Varlen batch: ``masks[b] [Hq, nb_b, nb_b]``. KV contiguous (``cu_seqlens_k``) or paged
    (``req_to_token`` + ``req_pool_indices``, ``k``/``v`` being the token pool). Returns float32 ``[total_q, Hq, d]``."""
    cq = cu_seqlens_q.tolist()
    lens = kv_lens.tolist()
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for b in range(len(lens)):
        kb, vb = gather_kv(k, v, b, lens[b], cu_seqlens_k, req_to_token, req_pool_indices)
        out[cq[b]:cq[b + 1]] = masked_attention(q[cq[b]:cq[b + 1]], kb, vb, masks[b], sm_scale)
    return out


def gather_kv(k, v, b: int, n_kv: int, cu_seqlens_k=None, req_to_token=None, req_pool_indices=None):
    """Keys/values ``[n_kv, Hkv, d]`` of sequence ``b`` from either layout."""
    if req_to_token is not None:
        loc = req_to_token[int(req_pool_indices[b]), :n_kv].long()
        return k[loc], v[loc]
    s = int(cu_seqlens_k[b])
    return k[s:s + n_kv], v[s:s + n_kv]


# ---------------------------------------------------------------------------------------------------
# decode
# ---------------------------------------------------------------------------------------------------
def reference_page_summaries(k_buffer: torch.Tensor, req_to_token: torch.Tensor, req_pool_index: int,
                             n: int, page: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-page elementwise min / max of the keys of one request: ``[Hkv, n_pages, d]`` each."""
    kk = k_buffer[req_to_token[req_pool_index, :n].long()].float()           # [n, Hkv, d]
    npg = math.ceil(n / page)
    pad = npg * page - n                                                     # the last page's empty slots
    lo = torch.cat([kk, kk.new_full((pad,) + kk.shape[1:], float("inf"))]).view(npg, page, *kk.shape[1:])
    hi = torch.cat([kk, kk.new_full((pad,) + kk.shape[1:], float("-inf"))]).view(npg, page, *kk.shape[1:])
    return lo.amin(1).transpose(0, 1), hi.amax(1).transpose(0, 1)


def quest_scores(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """Upper bound of ``q·k`` over a page: ``sum_d max(q_d kmin_d, q_d kmax_d)``.
    ``q [Hq, d]``, ``kmin/kmax [Hkv, P, d]`` → ``[Hq, P]``."""
    group = q.shape[0] // kmin.shape[0]
    lo = kmin.float().repeat_interleave(group, 0)
    hi = kmax.float().repeat_interleave(group, 0)
    qq = q.float()[:, None, :]
    return torch.maximum(qq * lo, qq * hi).sum(-1)


def reference_decode_pages(budgets: Sequence[HeadBudget], q_b: torch.Tensor, k_buffer: torch.Tensor,
                           req_to_token: torch.Tensor, req_pool_index: int, n: int,
                           chosen: dict[int, list[int]] | None = None,
                           summaries: tuple[torch.Tensor, torch.Tensor] | None = None
                           ) -> tuple[list[list[int]], dict[int, list[int]]]:
    """Pages each head of one request reads at a decode step (the token at ``n - 1``), per budget:
    dense all, streaming sink + window, top-k / vertical-slash the best ``HeadBudget.decode_pages - 1`` pages by
    :func:`quest_scores` (page 0 forced) plus the current page. ``chosen[h]``: a reused earlier selection.
    ``summaries``: :func:`reference_page_summaries` of this request at any length ≥ ``n`` (only the pages
    complete at ``n`` are scored, and those do not change as the request grows). Returns the page lists and
    the selections made (for reuse)."""
    npg = math.ceil(n / BLOCK)
    lo, hi = summaries or reference_page_summaries(k_buffer, req_to_token, req_pool_index, n)
    lo, hi = lo[:, :npg], hi[:, :npg]
    sc = quest_scores(q_b, lo, hi)
    rows, picks = [], {}
    for h, bu in enumerate(budgets):
        if bu.pattern is Pattern.DENSE:
            rows.append(list(range(npg)))
        elif bu.pattern is Pattern.STREAMING:
            rows.append(sorted(set(range(min(bu.sink_blocks, npg))) | set(range(max(0, npg - bu.decode_window_blocks), npg))))
        else:
            if chosen is None:
                s = sc[h, :npg - 1].clone()
                if npg > 1:
                    s[0] = float("inf")
                picks[h] = s.argsort(descending=True)[:bu.decode_pages(npg) - 1].tolist()
            else:
                picks[h] = chosen[h]
            rows.append(sorted({p for p in picks[h] if p < npg - 1} | {npg - 1}))
    return rows, picks


class SelectionMemory:
    """The page selections decode steps keep (:func:`~sglang_shplb.core.patterns.reselect_due`), per (layer, request
    slot): what the fused selector keeps per pool slot on the GPU, for the reference decode path. ``every``: steps a
    selection is kept (1: select at every step). :meth:`forget` the slots an extend (re)fills."""

    def __init__(self, every: int = DECODE_RESELECT_EVERY) -> None:
        self.every = int(every)
        self.kept: dict[tuple[int, int], tuple[int, dict[int, list[int]]]] = {}   # (layer, slot) -> (n_sel, picks)

    def forget(self, slots: Sequence[int] | None = None) -> None:
        """Drop the selections of these request slots (all when None)."""
        if slots is None:
            self.kept.clear()
            return
        gone = {int(s) for s in slots}
        self.kept = {key: val for key, val in self.kept.items() if key[1] not in gone}

    def pages(self, layer: int, budgets: Sequence[HeadBudget], q_b: torch.Tensor, k_buffer: torch.Tensor,
              req_to_token: torch.Tensor, slot: int, n: int,
              summaries: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[list[int]]:
        """:func:`reference_decode_pages` of request slot ``slot`` at context ``n``, with the selection kept from an
        earlier step where the rule allows."""
        prev = self.kept.get((layer, slot))
        reuse = prev is not None and not reselect_due(n, prev[0], self.every)
        rows, picks = reference_decode_pages(budgets, q_b, k_buffer, req_to_token, slot, n,
                                             chosen=prev[1] if reuse else None, summaries=summaries)
        if not reuse:
            self.kept[(layer, slot)] = (n, picks)
        return rows


def reference_sparse_decode(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor,
                            req_to_token: torch.Tensor, req_pool_indices: torch.Tensor,
                            seq_lens: torch.Tensor, page_sets: Sequence[Sequence[Sequence[int]]],
                            sm_scale: float | None = None, page: int = BLOCK,
                            heads: Sequence[int] | None = None) -> torch.Tensor:
    """``q [B, Hq, d]`` (the token at position ``seq_lens[b] - 1``, already in the pool);
    ``page_sets[b][h]``: the pages (64-token blocks of the sequence) head ``h`` reads. Float32 ``[B, Hq, d]``:
    the rows of ``heads`` (default all), zeros elsewhere."""
    bsz, hq, d = q.shape
    hkv = k_buffer.shape[1]
    group = hq // hkv
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)
    out = torch.zeros(bsz, hq, d, dtype=torch.float32, device=q.device)
    for b in range(bsz):
        n = int(seq_lens[b])
        loc = req_to_token[int(req_pool_indices[b]), :n].long()
        kk, vv = k_buffer[loc].float(), v_buffer[loc].float()                # [n, Hkv, d]
        for h in (range(hq) if heads is None else heads):
            pos = torch.cat([torch.arange(p * page, min((p + 1) * page, n)) for p in sorted(set(page_sets[b][h]))])
            s = (kk[pos, h // group] @ q[b, h].float()) * scale
            out[b, h] = torch.softmax(s, 0) @ vv[pos, h // group]
    return out


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``‖out − ref‖ / ‖ref‖`` in float64; NaN anywhere → inf."""
    o, r = out.double(), ref.double()
    if not torch.isfinite(o).all():
        return float("inf")
    return float((o - r).norm() / r.norm().clamp_min(1e-30))
