"""Fused, sync-free Triton builder of the VERTICAL-SLASH heads' rows of a :class:`.block_index.BlockIndex`.

Same output as the vertical-slash part of :func:`.index.build_block_index` (MInference's rule, reference:
:func:`sglang_shplb.core.block_masks.vslash_mask`); where two blocks have exactly equal mass this builder keeps
the lower id. The signal is the attention of the sequence's last query block (its queries ``i``, at most 64)
on every key ``t``::

    s[i, t] = scale q_i · k_t                    (t <= pos_i, t < n_kv)
    p[i, t] = exp(s[i, t] - M_i) / L_i           M_i = max_t s[i, t],  L_i = Σ_t exp(s[i, t] - M_i)
    mass[j] = mean_i Σ_{t in block j} p[i, t]

Four launches per layer instead of ~40 torch ops (whose host time, ~1-3 ms a layer on an H100, the GPU sat
idle through: ``bench/results/home_calls/round15_h100.log``):

1. ``_mass_kernel(STATS=True)``, one program per (chunk of ``CB`` KV blocks, head, sequence): each query row's
   running max ``m_c`` and sum ``l_c = Σ 2^(s log2e - m_c)`` over the chunk (base 2, as the prefill kernels);
2. ``_mass_kernel(STATS=False)``, same grid: ``M = max_c m_c``, ``L = Σ_c l_c 2^(m_c - M)``, the chunk's scores
   again (two passes over K: 4 GFLOP a head at 128K, nothing next to the attention), ``mass[j]``;
3. ``_pick_kernel``, one program per (head, sequence): ``n = min(nb_b, vslash_count(nb_b))`` (a table made once
   per layer); verticals = the top ``n`` blocks by mass, and block 0; slashes = the top ``n`` offsets ``o`` by
   ``mass[last - o]``, and offset 0; each top ``n`` by a 32-step binary search on order-preserving int32 keys
   (as :mod:`.triton_index`'s selection);
4. ``_rows_kernel``, one program per (tile of ``BM`` query blocks, head, sequence): row ``qi`` lists the
   ``kj <= qi`` with ``vertical[kj]`` or ``slash[qi - kj]``, ascending (a cumsum gives each its place),
   truncated to the row width, the rest zeroed; given ``max_q_len``, only the rows the prefill kernels read.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Sequence

import torch

from sglang_shplb.core.patterns import BLOCK, HeadBudget
from sglang_shplb.kernels.block_index import BlockIndex, int_tensor
from sglang_shplb.kernels.triton_index import builder_frame, column_warps, launched_rows, triton_next_pow2
from sglang_shplb.kernels.triton_jit import length_free_jit

CB = 16            # KV blocks per program of the two mass passes (1,024 keys)
BM = 16            # query blocks per program of the row writer
LOG2E = 1.4426950408889634


@lru_cache(maxsize=None)
def _kernels():
    from sglang_shplb.kernels._triton_compat import import_triton
    triton, tl = import_triton()

    @triton.jit
    def _last_block(Q, cu_q, kv_lens, b, h, stride_qt, stride_qh, D: tl.constexpr, F32: tl.constexpr):
        """The last query block of sequence b in head h: (q [64, D], its positions, valid rows, n_kv)."""
        n_kv = tl.load(kv_lens + b)
        q_start = tl.load(cu_q + b)
        prefix = n_kv - (tl.load(cu_q + b + 1) - q_start)
        qpos = ((n_kv + 63) // 64 - 1) * 64 + tl.arange(0, 64)
        qval = (qpos >= prefix) & (qpos < n_kv)
        offs_d = tl.arange(0, D)
        q = tl.load(Q + (q_start + qpos - prefix).to(tl.int64)[:, None] * stride_qt + h * stride_qh
                    + offs_d[None, :], mask=qval[:, None], other=0.0)
        if F32:   # the CPU interpreter's bf16 dot is wrong
            q = q.to(tl.float32)
        return q, qpos, qval, n_kv

    @triton.jit
    def _scores(q, qpos, K, j, n_kv, hk, b, cu_k, r2t_row, stride_kt, stride_kh, qk_scale,
                D: tl.constexpr, PAGED: tl.constexpr, F32: tl.constexpr):
        """Base-2 scores of the last block's queries on KV block j, -inf where not visible."""
        kpos = j * 64 + tl.arange(0, 64)
        kval = kpos < n_kv
        if PAGED:
            loc = tl.load(r2t_row + kpos, mask=kval, other=0).to(tl.int64)
        else:
            loc = (tl.load(cu_k + b) + kpos).to(tl.int64)
        k = tl.load(K + loc[:, None] * stride_kt + hk * stride_kh + tl.arange(0, D)[None, :],
                    mask=kval[:, None], other=0.0)
        if F32:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        return tl.where(kval[None, :] & (kpos[None, :] <= qpos[:, None]), s, float("-inf"))

    @length_free_jit(triton)
    def _mass_kernel(Q, K, heads, M, L, MASS, stride_qt, stride_qh, stride_kt, stride_kh, cu_q, kv_lens, cu_k,
                     req_to_token, req_pool_idx, stride_r2t, qk_scale, V, NCH, NB, GROUP: tl.constexpr,
                     D: tl.constexpr, CB: tl.constexpr, NCHP: tl.constexpr, PAGED: tl.constexpr,
                     F32: tl.constexpr, STATS: tl.constexpr):
        """STATS: pass 1, the chunk's per-row max and sum into M, L; else pass 2, its blocks' mass."""
        c = tl.program_id(0)
        v = tl.program_id(1)
        b = tl.program_id(2)
        h = tl.load(heads + v)
        q, qpos, qval, n_kv = _last_block(Q, cu_q, kv_lens, b, h, stride_qt, stride_qh, D, F32)
        r2t_row = req_to_token
        if PAGED:
            r2t_row = req_to_token + tl.load(req_pool_idx + b).to(tl.int64) * stride_r2t
        if STATS:
            m_i = tl.full([64], float("-inf"), tl.float32)
            l_i = tl.zeros([64], tl.float32)
            for jj in range(CB):
                s = _scores(q, qpos, K, c * CB + jj, n_kv, h // GROUP, b, cu_k, r2t_row, stride_kt, stride_kh,
                            qk_scale, D, PAGED, F32)
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)     # a row with nothing visible yet
                l_i = l_i * tl.math.exp2(m_i - m_safe) + tl.sum(tl.math.exp2(s - m_safe[:, None]), 1)
                m_i = m_new
            base = ((b * V + v) * NCH + c).to(tl.int64) * 64 + tl.arange(0, 64)
            tl.store(M + base, m_i)
            tl.store(L + base, l_i)
        else:
            # the whole row's max and sum from every chunk's partials
            cs = tl.arange(0, NCHP)
            part = ((b * V + v) * NCH + cs).to(tl.int64)[:, None] * 64 + tl.arange(0, 64)[None, :]
            m_c = tl.load(M + part, mask=(cs < NCH)[:, None], other=float("-inf"))
            l_c = tl.load(L + part, mask=(cs < NCH)[:, None], other=0.0)
            m_row = tl.max(m_c, 0)
            m_safe = tl.where(m_row == float("-inf"), 0.0, m_row)
            l_row = tl.sum(l_c * tl.math.exp2(m_c - m_safe[None, :]), 0)
            # p / L, averaged over the valid queries
            w = tl.where(qval & (l_row > 0), 1.0 / tl.where(l_row > 0, l_row, 1.0), 0.0)
            w = w / tl.maximum(tl.sum(qval.to(tl.float32), 0), 1.0)
            for jj in range(CB):
                j = c * CB + jj
                s = _scores(q, qpos, K, j, n_kv, h // GROUP, b, cu_k, r2t_row, stride_kt, stride_kh, qk_scale,
                            D, PAGED, F32)
                p = tl.math.exp2(s - m_safe[:, None]) * w[:, None]
                tl.store(MASS + (b * V + v).to(tl.int64) * NB + j, tl.sum(tl.sum(p, 1), 0), mask=j < NB)

    @triton.jit
    def _top_n(x, n, NBP: tl.constexpr):
        """Bool [NBP]: the n largest of x (ties: the lowest ids), by a binary search on int32 keys that order
        like the floats: count(key >= lo) >= n > count(key >= hi)."""
        bits = x.to(tl.int32, bitcast=True)
        key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
        lo = tl.full([1], -2147483648, tl.int64)
        hi = tl.full([1], 2147483648, tl.int64)
        for _ in range(32):
            mid = (lo + hi) >> 1
            ok = tl.sum((key[None, :] >= mid.to(tl.int32)[:, None]).to(tl.int32), 1) >= n
            lo = tl.where(ok, mid, lo)
            hi = tl.where(ok, hi, mid)
        t = lo.to(tl.int32)
        gt = key[None, :] > t[:, None]
        eq = key[None, :] == t[:, None]
        need = n - tl.sum(gt.to(tl.int32), 1)
        take = gt | (eq & (tl.cumsum(eq.to(tl.int32), 1) <= need[:, None]))
        return tl.reshape(take, [NBP])

    @length_free_jit(triton)
    def _pick_kernel(MASS, ntab, VERT, SLASH, kv_lens, V, NB, NTAB_W, NBP: tl.constexpr):
        v = tl.program_id(0)
        b = tl.program_id(1)
        nb_b = (tl.load(kv_lens + b) + 63) // 64
        n = tl.load(ntab + v * NTAB_W + nb_b)
        j = tl.arange(0, NBP)
        row = (b * V + v).to(tl.int64) * NB
        mass = tl.load(MASS + row + j, mask=j < nb_b, other=float("-inf"))
        by_offset = tl.load(MASS + row + (nb_b - 1 - j), mask=j < nb_b, other=float("-inf"))   # offset o = j
        out = (b * V + v).to(tl.int64) * NBP + j
        tl.store(VERT + out, (_top_n(mass, n, NBP) | (j == 0)).to(tl.int8))
        tl.store(SLASH + out, (_top_n(by_offset, n, NBP) | (j == 0)).to(tl.int8))

    @length_free_jit(triton)
    def _rows_kernel(VERT, SLASH, heads, idx, cnt, s_ib, s_ih, s_iq, s_cb, s_ch, cu_q, kv_lens, V, NB, MAXW,
                     BM: tl.constexpr, NBP: tl.constexpr, QUERY_ROWS: tl.constexpr):
        tile = tl.program_id(0)
        v = tl.program_id(1)
        b = tl.program_id(2)
        h = tl.load(heads + v)
        row0 = 0
        if QUERY_ROWS:   # from the block holding the sequence's first query
            row0 = (tl.load(kv_lens + b) - (tl.load(cu_q + b + 1) - tl.load(cu_q + b))) // 64
        rows = row0 + tile * BM + tl.arange(0, BM)
        qi = rows[:, None]
        kj = tl.arange(0, NBP)[None, :]
        base = (b * V + v).to(tl.int64) * NBP
        causal = (kj <= qi) & (qi < NB)
        vert = tl.load(VERT + base + kj, mask=kj < NB, other=0)
        slash = tl.load(SLASH + base + (qi - kj), mask=causal, other=0)
        sel = causal & ((vert != 0) | (slash != 0))
        pos = tl.cumsum(sel.to(tl.int32), 1) - 1
        c = tl.minimum(tl.sum(sel.to(tl.int32), 1), MAXW)
        row_ptr = idx + b.to(tl.int64) * s_ib + h * s_ih + qi.to(tl.int64) * s_iq
        tl.store(row_ptr + pos, kj + 0 * pos, mask=sel & (pos < MAXW))
        tl.store(row_ptr + kj, 0 * pos, mask=(kj >= c[:, None]) & (kj < MAXW) & (qi < NB))
        tl.store(cnt + b.to(tl.int64) * s_cb + h * s_ch + rows, c, mask=rows < NB)

    # jit functions find their callees in the module's globals
    globals().update(_last_block=_last_block, _scores=_scores, _top_n=_top_n)
    return _mass_kernel, _pick_kernel, _rows_kernel


@lru_cache(maxsize=64)
def _layer_consts(budgets: tuple[HeadBudget, ...], heads: tuple[int, ...], nb: int,
                  device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(the vertical-slash heads ``[V]``, ``n`` per head and block count ``[V, nb + 1]``: ``min(nb_b,
    vslash_count(nb_b))``, the reference's rule, made on the host once per layer and length)."""
    tab = [[min(m, b.vslash_count(m)) for m in range(nb + 1)] for b in budgets]
    return int_tensor(heads, device), torch.tensor(tab, dtype=torch.int32, device=device)


def build_vslash_index(budgets: Sequence[HeadBudget], q: torch.Tensor, k: torch.Tensor,
                       cu_seqlens_q: torch.Tensor, kv_lens: torch.Tensor, max_kv_len: int, *,
                       cu_seqlens_k: torch.Tensor | None = None, req_to_token: torch.Tensor | None = None,
                       req_pool_indices: torch.Tensor | None = None, out: BlockIndex | None = None,
                       max_q_len: int | None = None, scale: float | None = None) -> BlockIndex:
    """Fill the vertical-slash heads' rows of a :class:`BlockIndex` (four Triton launches, no host sync).

    Arguments as :func:`.triton_index.build_topk_index` (``out`` filled in place, other heads' rows untouched;
    ``max_q_len``: only the query blocks' rows). ``scale``: of the scores (default ``1/sqrt(d)``, the
    reference's)."""
    heads, paged, nb, maxk, out = builder_frame(budgets, q, k, kv_lens, max_kv_len, cu_seqlens_k, req_to_token,
                                                req_pool_indices, out)
    hq, d = q.shape[1], q.shape[2]
    dev = q.device
    bsz = kv_lens.shape[0]
    if not heads.vslash:
        return out
    vs = tuple(heads.vslash)
    vh, ntab = _layer_consts(tuple(budgets[h] for h in vs), vs, nb, str(dev))
    nv, group = len(vs), hq // k.shape[1]
    nch = math.ceil(nb / CB)
    nbp = max(16, triton_next_pow2(nb))
    kv_lens = kv_lens.to(dev)
    f32 = not q.is_cuda
    stats = torch.empty(2, bsz, nv, nch, 64, dtype=torch.float32, device=dev)
    mass = torch.empty(bsz, nv, nb, dtype=torch.float32, device=dev)
    picks = torch.empty(2, bsz, nv, nbp, dtype=torch.int8, device=dev)
    dummy = cu_seqlens_q
    kv_args = (cu_seqlens_q, kv_lens, cu_seqlens_k if not paged else dummy, req_to_token if paged else dummy,
               req_pool_indices if paged else dummy, req_to_token.stride(0) if paged else 0)
    qk = (scale if scale is not None else d ** -0.5) * LOG2E
    mass_k, pick_k, rows_k = _kernels()
    warps = 4 if q.is_cuda else 1
    args = (q, k, vh, stats[0], stats[1], mass, q.stride(0), q.stride(1), k.stride(0), k.stride(1), *kv_args, qk,
            nv, nch, nb)
    for first in (True, False):
        mass_k[(nch, nv, bsz)](*args, GROUP=group, D=d, CB=CB, NCHP=max(2, triton_next_pow2(nch)), PAGED=paged,
                               F32=f32, STATS=first, num_warps=warps)
    pick_k[(nv, bsz)](mass, ntab, picks[0], picks[1], kv_lens, nv, nb, nb + 1, NBP=nbp,
                      num_warps=(4 if nbp <= 1024 else 8) if q.is_cuda else 1)
    bi, bc = out.block_idx, out.block_cnt
    rows_k[(math.ceil(launched_rows(nb, max_q_len, BLOCK) / BM), nv, bsz)](
        picks[0], picks[1], vh, bi, bc, bi.stride(0), bi.stride(1), bi.stride(2), bc.stride(0), bc.stride(1),
        cu_seqlens_q, kv_lens, nv, nb, min(maxk, nb), BM=BM, NBP=nbp, QUERY_ROWS=max_q_len is not None,
        num_warps=column_warps(nbp, q.is_cuda))
    return out
