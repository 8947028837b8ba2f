"""Sparse heads of one attention layer over SGLang's paged KV pool (no SGLang import: testable alone).

Layout (SGLang's): ``q [T, H, d]`` packed by sequence; the queries of sequence ``b`` are the last
``q_lens[b]`` of its ``seq_lens[b]`` tokens (prefill: all; chunked prefill / radix hit: after a cached
prefix; decode: one). K/V live in the token pool ``k_buffer [pool, Hkv, d]`` and are read through
``req_to_token[req_pool_indices[b], pos]``. ``budgets``: the rank-local heads' budgets, in local order.

Which blocks a head computes is decided by :func:`sglang_shplb.kernels.index.build_block_index` (the
kernels' index builder, which reproduces :func:`sglang_shplb.core.block_masks.build_block_masks` for a batch,
chunked or not). The outputs come from the Triton kernel on CUDA and elsewhere from attention over each
query block's gathered KV blocks (:func:`gathered_block_attention`, equal to the masked dense reference
:func:`sglang_shplb.kernels.reference.masked_attention`). Streaming heads in decode take a
fixed-shape gather path that is safe inside a captured CUDA graph; top-k / vertical-slash heads in decode
select pages by the CUDA kernel path's Quest rule (:func:`selected_decode`).
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Sequence

import torch

from sglang_shplb.core.patterns import BLOCK, HeadBudget, Pattern
from sglang_shplb.kernels.layer_heads import LayerHeads
from sglang_shplb.kernels.reference import SelectionMemory, reference_decode_pages, reference_sparse_decode

#: A head whose output a sparse call does not keep (a dense head, which the stock backend computes; a head
#: of another rank's call) runs inside the sparse index/kernel at the cheapest pattern, one diagonal block.
CHEAP = HeadBudget(Pattern.STREAMING, sink_blocks=0, window_blocks=1)


def sparse_heads(budgets: Sequence[HeadBudget]) -> list[int]:
    """The heads this path computes: every head but the dense ones (the stock backend's)."""
    return list(LayerHeads.of(budgets).sparse)


def sparse_attention(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor,
                     req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor,
                     q_lens: torch.Tensor, budgets: Sequence[HeadBudget], scale: float, out: torch.Tensor,
                     *, max_kv_len: int | None = None, use_kernel: bool | None = None) -> torch.Tensor:
    """Write the sparse heads' outputs into ``out [T, H, d]`` (dense heads' columns are left alone)."""
    layer = LayerHeads.of(budgets)
    heads = list(layer.sparse)
    if not heads or q.shape[0] == 0:
        return out
    from sglang_shplb.kernels.index import build_block_index

    dev = q.device
    seq_lens = seq_lens.to(dev)
    q_lens = q_lens.to(dev)
    cu_q = torch.zeros(q_lens.shape[0] + 1, dtype=torch.int32, device=dev)
    cu_q[1:] = torch.cumsum(q_lens, 0)
    if max_kv_len is None:
        max_kv_len = int(seq_lens.max())
    ib = [CHEAP if h in layer.dense else b for h, b in enumerate(budgets)]
    bi = build_block_index(ib, q, k_buffer, cu_q, seq_lens, max_kv_len, req_to_token=req_to_token,
                           req_pool_indices=req_pool_indices)
    if use_kernel is None:
        use_kernel = q.is_cuda
    if use_kernel:
        from sglang_shplb.kernels.triton_prefill import sparse_prefill
        max_q = int(q_lens.max()) if not torch.cuda.is_current_stream_capturing() else 1
        o = sparse_prefill(q, k_buffer, v_buffer, bi.block_idx, bi.block_cnt, bi.head_dense, cu_q, seq_lens,
                           max_q, req_to_token=req_to_token, req_pool_indices=req_pool_indices, sm_scale=scale)
        out[:, heads] = o[:, heads].to(out.dtype)
        return out
    group = q.shape[1] // k_buffer.shape[1]
    cq, lens = cu_q.tolist(), seq_lens.tolist()
    for b, n in enumerate(lens):
        if cq[b + 1] == cq[b]:
            continue
        loc = req_to_token[int(req_pool_indices[b]), :n].long()
        kb, vb = k_buffer[loc], v_buffer[loc]                               # [n, Hkv, d], once per request
        nb = math.ceil(n / BLOCK)
        for h in heads:
            out[cq[b]:cq[b + 1], h] = gathered_block_attention(
                q[cq[b]:cq[b + 1], h], kb[:, h // group], vb[:, h // group],
                bi.block_idx[b, h, :nb], bi.block_cnt[b, h, :nb], scale).to(out.dtype)
    return out


def gathered_block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_idx: torch.Tensor,
                             block_cnt: torch.Tensor, scale: float) -> torch.Tensor:
    """One head of one sequence, only its listed KV blocks (the CPU path; the same result as
    :func:`~sglang_shplb.kernels.reference.masked_attention` under the index's block mask, at a cost that
    follows the blocks listed instead of ``n²``).

    ``q [n_q, d]``: the last ``n_q`` of ``n`` positions; ``k, v [n, d]``; ``block_idx [nb, MAXK]``,
    ``block_cnt [nb]``: query block ``i`` reads blocks ``block_idx[i, :block_cnt[i]]`` (a repeat counts
    once, blocks after ``i`` none), token-causal. Per query block: gather its blocks' keys ``K_i [m·64, d]``,
    ``o = softmax(scale q K_iᵀ + mask) V_i``. Float32 ``[n_q, d]``."""
    n_q, d = q.shape
    n = k.shape[0]
    nb = block_idx.shape[0]
    first = (n - n_q) // BLOCK                                          # the first query block
    idx, cnt = block_idx[first:].long(), block_cnt[first:].long()       # [R, MAXK], [R]
    m = max(1, int(cnt.max()))
    idx = idx[:, :m]
    dev = q.device
    slot = torch.arange(m, device=dev)
    rows = first + torch.arange(nb - first, device=dev)                 # query block of each row
    repeat = ((idx[:, :, None] == idx[:, None, :]) & (slot[None, :] < slot[:, None])[None]).any(-1)
    use = (slot[None] < cnt[:, None]) & ~repeat & (idx <= rows[:, None])   # [R, m]
    pad = torch.zeros(nb * BLOCK - n, d, dtype=torch.float32, device=dev)
    kb = torch.cat([k.float(), pad]).view(nb, BLOCK, d)
    vb = torch.cat([v.float(), pad]).view(nb, BLOCK, d)
    safe = torch.where(use, idx, torch.zeros_like(idx))
    ks, vs = kb[safe].flatten(1, 2), vb[safe].flatten(1, 2)            # [R, m·64, d]
    kpos = (safe[:, :, None] * BLOCK + torch.arange(BLOCK, device=dev)).flatten(1)   # [R, m·64]
    qpos = rows[:, None] * BLOCK + torch.arange(BLOCK, device=dev)       # [R, 64]
    start = n - n_q - first * BLOCK                                     # q's first row inside the first block
    qq = torch.zeros((nb - first) * BLOCK, d, dtype=torch.float32, device=dev)
    qq[start:start + n_q] = q.float()
    allowed = use.repeat_interleave(BLOCK, 1)[:, None, :] & (kpos[:, None, :] <= qpos[:, :, None]) \
        & (kpos < n)[:, None, :]                                        # [R, 64, m·64]
    s = (qq.view(-1, BLOCK, d) @ ks.transpose(1, 2)) * scale
    o = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1) @ vs   # [R, 64, d]
    return o.flatten(0, 1)[start:start + n_q]


# ---------------------------------------------------------------------------------------------------
# decode, graph-safe paths
# ---------------------------------------------------------------------------------------------------
@lru_cache(maxsize=64)
def _stream_offsets(sink_blocks: int, window_blocks: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.arange(sink_blocks * BLOCK, device=device),
            torch.arange(window_blocks * BLOCK, device=device))


def streaming_decode(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor, req_to_token: torch.Tensor,
                     req_pool_indices: torch.Tensor, seq_lens: torch.Tensor, heads: LayerHeads, scale: float,
                     out: torch.Tensor) -> torch.Tensor:
    """One decode query per sequence (``q [B, H, d]``, at position ``seq_lens - 1``) for the streaming heads:
    fixed shapes, no host sync, so it can run inside a captured CUDA graph. Sink blocks ``< sink_blocks``
    plus the query's block and the ``window_blocks`` before it (:attr:`HeadBudget.decode_window_blocks`)."""
    dev = q.device
    group = q.shape[1] // k_buffer.shape[1]
    n = seq_lens.to(dev).long()
    last_blk = (n - 1) // BLOCK
    max_ctx = req_to_token.shape[1]
    rows = req_to_token[req_pool_indices.long()]                              # [B, max_ctx]
    for (s, w), hs in heads.streaming_rules.items():
        wd = heads.budgets[hs[0]].decode_window_blocks
        so, wo = _stream_offsets(s, wd, str(dev))
        wstart = (last_blk - wd + 1) * BLOCK                                  # [B]
        pw = wstart[:, None] + wo[None, :]                                    # [B, W*BLOCK]
        ps = so[None, :].expand(n.shape[0], -1)
        pos = torch.cat([ps, pw], 1)                                          # [B, P]
        valid = (pos >= 0) & (pos < n[:, None])
        valid[:, ps.shape[1]:] &= pw >= s * BLOCK                             # no double count of sinks
        loc = torch.gather(rows, 1, pos.clamp(0, max_ctx - 1)).long()         # [B, P]
        hs_t = _const_heads(hs, str(dev))
        kvh = hs_t // group
        kk = k_buffer[loc][:, :, kvh].float()                                 # [B, P, S, d]
        vv = v_buffer[loc][:, :, kvh].float()
        qq = q[:, hs_t].float()                                               # [B, S, d]
        sc = torch.einsum("bsd,bpsd->bsp", qq, kk) * scale
        sc = sc.masked_fill(~valid[:, None, :], float("-inf"))
        p = torch.softmax(sc, -1)
        out[:, hs_t] = torch.einsum("bsp,bpsd->bsd", p, vv).to(out.dtype)
    return out


@lru_cache(maxsize=1024)
def _const_heads(hs: tuple[int, ...], device: str) -> torch.Tensor:
    if device.startswith("cuda") and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("shplb: decode constants must be prepared before CUDA-graph capture "
                           "(prepare_decode_constants)")
    return torch.tensor(hs, device=device)


def prepare_decode_constants(budgets: Sequence[HeadBudget], device) -> None:
    """Build, outside any CUDA-graph capture, the small constant tensors the graph-safe decode path of
    these budgets reads (head lists, sink/window offsets); they are cached and reused by replays."""
    dev = str(torch.device(device))
    heads = LayerHeads.of(budgets)
    for (s, w), hs in heads.streaming_rules.items():
        _const_heads(hs, dev)
        _stream_offsets(s, heads.budgets[hs[0]].decode_window_blocks, dev)


def sparse_decode(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor, req_to_token: torch.Tensor,
                  req_pool_indices: torch.Tensor, seq_lens: torch.Tensor, budgets: Sequence[HeadBudget],
                  scale: float, out: torch.Tensor, memory: SelectionMemory | None = None,
                  layer: int = 0) -> torch.Tensor:
    """Decode step (``q [B, H, d]``): streaming heads by :func:`streaming_decode`; top-k / vertical-slash
    heads by :func:`selected_decode` (not graph-safe), keeping selections in ``memory`` (key ``layer``)."""
    heads = LayerHeads.of(budgets)
    if heads.streaming:
        streaming_decode(q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens, heads, scale, out)
    if heads.selected:
        if q.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("shplb: the reference decode path of top-k / vertical-slash heads cannot run inside "
                               "a captured CUDA graph (it reads the context length on the host); on CUDA "
                               "the backend's kernel path (sglang_shplb.kernels.paged_layer) decodes them")
        selected_decode(q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens, budgets, heads.selected,
                        scale, out, memory, layer)
    return out


def selected_decode(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor, req_to_token: torch.Tensor,
                    req_pool_indices: torch.Tensor, seq_lens: torch.Tensor, budgets: Sequence[HeadBudget],
                    selected: Sequence[int], scale: float, out: torch.Tensor, memory: SelectionMemory | None = None,
                    layer: int = 0) -> torch.Tensor:
    """Top-k / vertical-slash heads at a decode step by the CUDA kernel path's rule (Quest: the pages with the
    best ``sum_d max(q_d kmin_d, q_d kmax_d)``, page 0 forced, ``HeadBudget.decode_pages - 1`` of them, plus the
    current page; :func:`~sglang_shplb.kernels.reference.reference_decode_pages`; with ``memory``, a selection
    kept for the steps :func:`~sglang_shplb.core.patterns.reselect_due` allows), so the CPU server, the
    quality check and the refine stage decode as the GPU server does. Softmax over the chosen pages' keys
    (:func:`~sglang_shplb.kernels.reference.reference_sparse_decode`). Without ``memory`` every step selects."""
    if memory is None:
        pages = [reference_decode_pages(budgets, q[b], k_buffer, req_to_token, int(req_pool_indices[b]),
                                        int(seq_lens[b]))[0] for b in range(q.shape[0])]
    else:
        pages = [memory.pages(layer, budgets, q[b], k_buffer, req_to_token, int(req_pool_indices[b]),
                              int(seq_lens[b])) for b in range(q.shape[0])]
    heads = list(selected)
    ref = reference_sparse_decode(q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens, pages, scale,
                                  heads=heads)
    out[:, heads] = ref[:, heads].to(out.dtype)
    return out
