"""Sparse paged decode: one new token per request against the paged KV cache, per-head budgets.

Pages are the 64-token blocks of a sequence (positions ``64p .. 64p+63`` read through ``req_to_token``).
Per head a mode picks the pages (all computed in the kernel from ``seq_lens`` except the selected list):

* 0 dense:      pages ``0 .. np-1``
* 1 streaming:  sink pages ``0 .. s-1`` (outside the window) and window pages ``np-w .. np-1``
* 2 selected:   ``page_cnt`` pages of ``page_idx`` (chosen by :func:`select_pages`) plus the current page
                ``np-1`` always (a listed copy of it, or a listed page past the end, is skipped), so a
                selection can be reused for several steps while the sequence grows.

Page selection (LServe / Quest): per page and KV head the elementwise key min/max; a query's upper bound
on ``q·k`` over a page is ``sum_d max(q_d kmin_d, q_d kmax_d)``; take the top pages, page 0 forced.

Split-K (flash decoding): the page list of a head is cut into ``NSPLIT`` slices; each program keeps an
online softmax over its slice and writes ``(acc / l, m + log2 l)``; :func:`_combine` merges the slices.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Sequence

import torch

from ..patterns import BLOCK, HeadBudget, Pattern
from .triton_prefill import LOG2E

MODE_DENSE, MODE_STREAMING, MODE_SELECTED = 0, 1, 2


@lru_cache(maxsize=None)
def _kernels():
    from ._triton_compat import import_triton
    triton, tl = import_triton()

    @triton.jit
    def _decode_kernel(
        Q, K, V, MidO, MidL,
        stride_qb, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
        req_to_token, req_pool_idx, stride_r2t, seq_lens,
        mode, sink, window, page_idx, page_cnt, s_pi_b, s_pi_h, s_pc_b,
        qk_scale, HQ,
        GROUP: tl.constexpr, NSPLIT: tl.constexpr, PAGE: tl.constexpr, D: tl.constexpr,
    ):
        bh = tl.program_id(0)
        sp = tl.program_id(1)
        b = bh // HQ
        h = bh % HQ
        hk = h // GROUP
        n = tl.load(seq_lens + b)
        npg = (n + PAGE - 1) // PAGE
        md = tl.load(mode + h)
        is_dense = (md == 0).to(tl.int32)
        is_stream = (md == 1).to(tl.int32)
        is_sel = (md == 2).to(tl.int32)
        w_eff = tl.minimum(tl.load(window + h), npg)
        n_s = tl.minimum(tl.load(sink + h), npg - w_eff)
        cnt = tl.load(page_cnt + b * s_pc_b + h)
        total = is_dense * npg + is_stream * (n_s + w_eff) + is_sel * (cnt + 1)
        per = (total + NSPLIT - 1) // NSPLIT
        j0 = sp * per
        j1 = tl.minimum(j0 + per, total)
        offs_d = tl.arange(0, D)
        ar = tl.arange(0, PAGE)
        q = tl.load(Q + b * stride_qb + h * stride_qh + offs_d).to(tl.float32) * qk_scale
        r2t = req_to_token + tl.load(req_pool_idx + b).to(tl.int64) * stride_r2t
        prow = page_idx + b * s_pi_b + h * s_pi_h
        m_i = tl.full([1], -1.0e30, tl.float32)
        l_i = tl.zeros([1], tl.float32)
        acc = tl.zeros([D], tl.float32)
        for j in range(j0, j1):
            p_stream = tl.where(j < n_s, j, npg - w_eff + j - n_s)
            listed = (is_sel == 1) & (j < cnt)
            p_list = tl.load(prow + j, mask=listed, other=0)
            p_sel = listed.to(tl.int32) * p_list + (1 - listed.to(tl.int32)) * (npg - 1)
            pg = is_dense * j + is_stream * p_stream + is_sel * p_sel
            skip = listed & ((p_list >= npg - 1) | (p_list < 0))
            pos = pg * PAGE + ar
            ok = (pos < n) & (skip == 0)
            loc = tl.load(r2t + pos, mask=ok, other=0).to(tl.int64)
            k = tl.load(K + loc[:, None] * stride_kt + hk * stride_kh + offs_d[None, :], mask=ok[:, None], other=0.0)
            s = tl.sum(k.to(tl.float32) * q[None, :], 1)
            s = tl.where(ok, s, -1.0e30)
            m_new = tl.maximum(m_i, tl.max(s, 0))
            alpha = tl.math.exp2(m_i - m_new)
            p = tl.math.exp2(s - m_new)
            p = tl.where(ok, p, 0.0)
            v = tl.load(V + loc[:, None] * stride_vt + hk * stride_vh + offs_d[None, :], mask=ok[:, None], other=0.0)
            l_i = l_i * alpha + tl.sum(p, 0)
            acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), 0)
            m_i = m_new
        out = bh * NSPLIT + sp
        l_safe = tl.maximum(l_i, 1e-30)
        lse = tl.where(l_i > 0, m_i + tl.math.log2(l_safe), -1.0e30)
        if md != 3:  # mode 3: the group kernel writes this head
            tl.store(MidO + out * D + offs_d, acc / l_safe)
            tl.store(MidL + out + tl.arange(0, 1), lse)

    @triton.jit
    def _decode_group_kernel(
        Q, K, V, MidO, MidL,
        stride_qb, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
        req_to_token, req_pool_idx, stride_r2t, seq_lens,
        gmode, gsink, gwindow, qk_scale, HQ, HKV,
        GROUP: tl.constexpr, GP: tl.constexpr, NSPLIT: tl.constexpr, PAGE: tl.constexpr, D: tl.constexpr,
        DOT_F32: tl.constexpr,
    ):
        # all GROUP q heads of KV head hk read the same pages (dense or one streaming budget): each page
        # is loaded once for the group, S = Q_group · K^T on the tensor cores (rows padded to GP)
        bhk = tl.program_id(0)
        sp = tl.program_id(1)
        b = bhk // HKV
        hk = bhk % HKV
        md = tl.load(gmode + hk)
        if md >= 0:
            n = tl.load(seq_lens + b)
            npg = (n + PAGE - 1) // PAGE
            is_stream = (md == 1).to(tl.int32)
            w_eff = tl.minimum(tl.load(gwindow + hk), npg)
            n_s = tl.minimum(tl.load(gsink + hk), npg - w_eff)
            total = (1 - is_stream) * npg + is_stream * (n_s + w_eff)
            per = (total + NSPLIT - 1) // NSPLIT
            j0 = sp * per
            j1 = tl.minimum(j0 + per, total)
            offs_d = tl.arange(0, D)
            ar = tl.arange(0, PAGE)
            rows = tl.arange(0, GP)
            rvalid = rows < GROUP
            hrow = hk * GROUP + rows
            q = tl.load(Q + b * stride_qb + hrow[:, None] * stride_qh + offs_d[None, :], mask=rvalid[:, None], other=0.0)
            if DOT_F32:  # the CPU interpreter's bf16 dot is wrong
                q = q.to(tl.float32)
            r2t = req_to_token + tl.load(req_pool_idx + b).to(tl.int64) * stride_r2t
            m_i = tl.full([GP], -1.0e30, tl.float32)
            l_i = tl.zeros([GP], tl.float32)
            acc = tl.zeros([GP, D], tl.float32)
            for j in range(j0, j1):
                pg = (1 - is_stream) * j + is_stream * tl.where(j < n_s, j, npg - w_eff + j - n_s)
                pos = pg * PAGE + ar
                ok = pos < n
                loc = tl.load(r2t + pos, mask=ok, other=0).to(tl.int64)
                k = tl.load(K + loc[:, None] * stride_kt + hk * stride_kh + offs_d[None, :], mask=ok[:, None], other=0.0)
                if DOT_F32:
                    k = k.to(tl.float32)
                s = tl.dot(q, tl.trans(k)).to(tl.float32) * qk_scale
                s = tl.where(ok[None, :], s, -1.0e30)
                m_new = tl.maximum(m_i, tl.max(s, 1))
                alpha = tl.math.exp2(m_i - m_new)
                p = tl.math.exp2(s - m_new[:, None])
                p = tl.where(ok[None, :], p, 0.0)
                v = tl.load(V + loc[:, None] * stride_vt + hk * stride_vh + offs_d[None, :], mask=ok[:, None], other=0.0)
                if DOT_F32:
                    v = v.to(tl.float32)
                l_i = l_i * alpha + tl.sum(p, 1)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
                m_i = m_new
            out = (b * HQ + hrow) * NSPLIT + sp
            l_safe = tl.maximum(l_i, 1e-30)
            tl.store(MidO + out[:, None] * D + offs_d[None, :], acc / l_safe[:, None], mask=rvalid[:, None])
            lse = tl.where(l_i > 0, m_i + tl.math.log2(l_safe), -1.0e30)
            tl.store(MidL + out, lse, mask=rvalid)

    @triton.jit
    def _combine_kernel(MidO, MidL, O, stride_ob, stride_oh, HQ, NSPLIT: tl.constexpr, D: tl.constexpr):
        # o = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M)
        bh = tl.program_id(0)
        b = bh // HQ
        h = bh % HQ
        offs_s = tl.arange(0, NSPLIT)
        offs_d = tl.arange(0, D)
        lse = tl.load(MidL + bh * NSPLIT + offs_s)
        mx = tl.max(lse, 0)
        w = tl.math.exp2(lse - mx)
        w = tl.where(lse > -1.0e29, w, 0.0)
        o = tl.load(MidO + (bh * NSPLIT + offs_s)[:, None] * D + offs_d[None, :])
        res = tl.sum(o * w[:, None], 0) / tl.sum(w, 0)
        tl.store(O + b * stride_ob + h * stride_oh + offs_d, res.to(O.dtype.element_ty))

    return _decode_kernel, _combine_kernel, _decode_group_kernel


def head_modes(budgets: Sequence[HeadBudget], device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``mode, sink_pages, window_pages`` int32 ``[Hq]``. Top-k and vertical-slash heads use the selector."""
    mode, sink, win = [], [], []
    for b in budgets:
        if b.pattern is Pattern.DENSE:
            mode.append(MODE_DENSE); sink.append(0); win.append(0)
        elif b.pattern is Pattern.STREAMING:
            mode.append(MODE_STREAMING); sink.append(b.sink_blocks); win.append(b.window_blocks)
        else:
            mode.append(MODE_SELECTED); sink.append(0); win.append(0)
    mk = lambda x: torch.tensor(x, dtype=torch.int32, device=device)
    return mk(mode), mk(sink), mk(win)


def group_modes(budgets: Sequence[HeadBudget], num_kv_heads: int, device=None):
    """KV heads whose q heads all read the same pages (all dense, or one streaming budget) go to the group
    kernel: ``gmode [Hkv]`` (0 dense, 1 streaming, -1 not grouped), ``gsink``, ``gwindow``, and the per-head
    ``mode`` with those heads set to 3 (skipped by the per-head kernel)."""
    mode, sink, win = head_modes(budgets, device)
    g = len(budgets) // num_kv_heads
    gm, gs, gw = [], [], []
    mode = mode.clone()
    for hk in range(num_kv_heads):
        hs = budgets[hk * g:(hk + 1) * g]
        if all(b.pattern is Pattern.DENSE for b in hs):
            gm.append(0); gs.append(0); gw.append(0)
        elif all(b.pattern is Pattern.STREAMING for b in hs) and len({(b.sink_blocks, b.window_blocks) for b in hs}) == 1:
            gm.append(1); gs.append(hs[0].sink_blocks); gw.append(hs[0].window_blocks)
        else:
            gm.append(-1); gs.append(0); gw.append(0)
            continue
        mode[hk * g:(hk + 1) * g] = 3
    mk = lambda x: torch.tensor(x, dtype=torch.int32, device=device)
    return mode, mk(gm), mk(gs), mk(gw)


def decode_page_budget(budget: HeadBudget, npages: int) -> int:
    """Pages one decode query of a selected head reads in all (the current page included)."""
    if budget.pattern is Pattern.VSLASH:
        return min(npages, 2 * budget.vslash_count(npages))
    return budget.decode_blocks(npages * BLOCK)


def max_selected_pages(budgets: Sequence[HeadBudget], max_pages: int) -> int:
    """``MAXSEL``: width of ``page_idx`` (the listed pages, the current one excluded), ≥ 1."""
    m = 1
    for b in budgets:
        if b.pattern in (Pattern.TOPK, Pattern.VSLASH):
            m = max(m, decode_page_budget(b, max_pages) - 1)
    return m


# ---------------------------------------------------------------------------------------------------
# page summaries (torch ops, sync-free)
# ---------------------------------------------------------------------------------------------------
def alloc_page_summaries(num_req_slots: int, num_kv_heads: int, max_pages: int, head_dim: int,
                         dtype=torch.bfloat16, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``kmin, kmax [R, Hkv, max_pages, d]``, indexed by ``req_pool_indices`` like ``req_to_token``."""
    shape = (num_req_slots, num_kv_heads, max_pages, head_dim)
    return (torch.full(shape, float("inf"), dtype=dtype, device=device),
            torch.full(shape, float("-inf"), dtype=dtype, device=device))


def build_page_summaries(k_buffer: torch.Tensor, req_to_token: torch.Tensor, req_pool_indices: torch.Tensor,
                         seq_lens: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor,
                         num_pages: int | None = None) -> None:
    """(Re)compute the min/max of pages ``0 .. num_pages-1`` (default: all) of the listed requests (after a
    prefill; ``num_pages`` ≥ the longest request's page count). In place."""
    bsz = req_pool_indices.shape[0]
    maxp = kmin.shape[2] if num_pages is None else min(num_pages, kmin.shape[2])
    pos = torch.arange(maxp * BLOCK, device=k_buffer.device)[None, :]
    valid = pos < seq_lens.long()[:, None]
    loc = torch.gather(req_to_token[req_pool_indices.long()].long(), 1,
                       pos.clamp(max=req_to_token.shape[1] - 1).expand(bsz, -1))
    kk = k_buffer[torch.where(valid, loc, torch.zeros_like(loc))]            # [B, P*64, Hkv, d]
    v = valid[:, :, None, None]
    lo = torch.where(v, kk, torch.full((), float("inf"), dtype=kk.dtype, device=kk.device))
    hi = torch.where(v, kk, torch.full((), float("-inf"), dtype=kk.dtype, device=kk.device))
    shp = (bsz, maxp, BLOCK) + tuple(kk.shape[2:])
    lo = lo.view(shp).amin(2).transpose(1, 2)
    hi = hi.view(shp).amax(2).transpose(1, 2)
    r = req_pool_indices.long()
    kmin[r, :, :maxp] = lo.to(kmin.dtype)
    kmax[r, :, :maxp] = hi.to(kmax.dtype)


def update_page_summaries(k_buffer: torch.Tensor, req_to_token: torch.Tensor, req_pool_indices: torch.Tensor,
                          seq_lens: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> None:
    """Fold the token just appended (position ``seq_lens - 1``) into its page's min/max. In place;
    the first token of a page resets the page."""
    r = req_pool_indices.long()
    pos = seq_lens.long() - 1
    page = pos // BLOCK
    knew = k_buffer[req_to_token[r, pos].long()].to(kmin.dtype)             # [B, Hkv, d]
    first = (pos % BLOCK == 0)[:, None, None]
    cur_lo = kmin[r, :, page]                                               # [B, Hkv, d]
    cur_hi = kmax[r, :, page]
    kmin[r, :, page] = torch.where(first, knew, torch.minimum(cur_lo, knew))
    kmax[r, :, page] = torch.where(first, knew, torch.maximum(cur_hi, knew))


def select_pages(budgets: Sequence[HeadBudget], q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor,
                 req_pool_indices: torch.Tensor, seq_lens: torch.Tensor, max_pages: int,
                 out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Query-aware page choice of the selected (top-k / vertical-slash) heads.

    ``page_idx [B, Hq, MAXSEL]`` int32, ``page_cnt [B, Hq]`` int32: the best pages by
    ``sum_d max(q_d kmin_d, q_d kmax_d)`` among ``0 .. np-2`` (page 0 forced), ``decode_page_budget - 1``
    of them; the kernel adds the current page. Rows of other heads hold count 0. Sync-free."""
    bsz, hq, d = q.shape
    hkv = kmin.shape[1]
    group = hq // hkv
    dev = q.device
    maxsel = max_selected_pages(budgets, max_pages)
    if out is None:
        out = (torch.zeros(bsz, hq, maxsel, dtype=torch.int32, device=dev),
               torch.zeros(bsz, hq, dtype=torch.int32, device=dev))
    page_idx, page_cnt = out
    page_cnt.zero_()
    consts = _selector_constants(tuple(budgets), str(dev), max_pages)
    if consts is None:
        return page_idx, page_cnt
    sh, table = consts
    r = req_pool_indices.long()
    lo = kmin[r][:, sh // group, :max_pages].float()                         # [B, S, P, d]
    hi = kmax[r][:, sh // group, :max_pages].float()
    qq = q[:, sh].float()[:, :, None, :]
    score = torch.maximum(qq * lo, qq * hi).sum(-1)                          # [B, S, P]
    npg = (seq_lens.long() + BLOCK - 1) // BLOCK                             # [B]
    pj = torch.arange(max_pages, device=dev)[None, None, :]
    score = score.masked_fill(pj == 0, float("inf")).masked_fill(pj >= (npg - 1)[:, None, None], float("-inf"))
    kt = min(maxsel, max_pages)
    top = score.topk(kt, dim=-1).indices.int()
    page_idx[:, sh, :kt] = top
    page_cnt[:, sh] = table[:, npg.clamp(max=max_pages)].t()                 # decode_count_table
    return page_idx, page_cnt


def decode_count_table(budgets: Sequence[HeadBudget], max_pages: int) -> torch.Tensor:
    """int32 ``[Hq, max_pages + 1]`` (host): pages a selected head lists at ``npg`` pages,
    ``clamp(decode_page_budget(npg) - 1, 0, MAXSEL)`` (the kernel adds the current page); 0 for other heads
    and at ``npg = 0``. The one count rule of :func:`select_pages` and the fused selector."""
    kt = min(max_selected_pages(budgets, max_pages), max_pages)
    table = torch.zeros(len(budgets), max_pages + 1, dtype=torch.int32)
    for h, b in enumerate(budgets):
        if b.pattern in (Pattern.TOPK, Pattern.VSLASH):
            table[h, 1:] = torch.tensor([min(max(decode_page_budget(b, n) - 1, 0), kt)
                                         for n in range(1, max_pages + 1)], dtype=torch.int32)
    return table


@lru_cache(maxsize=256)
def _selector_constants(budgets: tuple[HeadBudget, ...], device: str, max_pages: int):
    """Device constants of :func:`select_pages` (selected heads, their count table), made once per budget
    set: a captured CUDA graph may not create tensors from host lists."""
    sel = [h for h, b in enumerate(budgets) if b.pattern in (Pattern.TOPK, Pattern.VSLASH)]
    if not sel:
        return None
    if device.startswith("cuda") and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("shplb: page-selection constants must be made before CUDA-graph capture "
                           "(run one eager decode step first)")
    return torch.tensor(sel, device=device), decode_count_table(budgets, max_pages)[sel].to(device)


def decode_splits(max_pages: int, batch: int, num_heads: int, target_programs: int = 1056) -> int:
    """Power-of-two split count so that about ``target_programs`` programs run (fixed per plan)."""
    want = max(1, min(max_pages, math.ceil(target_programs / max(1, batch * num_heads))))
    return 1 << (want - 1).bit_length() if want > 1 else 1


def sparse_decode(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor, req_to_token: torch.Tensor,
                  req_pool_indices: torch.Tensor, seq_lens: torch.Tensor, mode: torch.Tensor, sink: torch.Tensor,
                  window: torch.Tensor, page_idx: torch.Tensor, page_cnt: torch.Tensor, *, nsplit: int = 8,
                  sm_scale: float | None = None, out: torch.Tensor | None = None,
                  workspace: tuple[torch.Tensor, torch.Tensor] | None = None,
                  groups: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                  num_warps: int = 4, num_stages: int | None = None) -> torch.Tensor:
    """``q [B, Hq, d]`` (token at position ``seq_lens - 1``, already written to the pool) → ``[B, Hq, d]``.
    ``mode/sink/window``: :func:`head_modes`; ``page_idx/page_cnt``: :func:`select_pages`. Sync-free.
    ``groups = (gmode, gsink, gwindow)`` with ``mode`` from :func:`group_modes`: KV heads whose q heads share
    their pages are read once per group by a second kernel."""
    from .index import check_qkv
    if q.dim() != 3:
        raise ValueError(f"decode q must be [batch, heads, head_dim], got {tuple(q.shape)}")
    check_qkv(q, k_buffer, v_buffer)
    bsz, hq, d = q.shape
    if nsplit < 1 or nsplit & (nsplit - 1):
        raise ValueError(f"nsplit must be a power of two, got {nsplit}")
    if page_idx.shape[:2] != (bsz, hq) or page_cnt.shape != (bsz, hq):
        raise ValueError(f"page_idx {tuple(page_idx.shape)} / page_cnt {tuple(page_cnt.shape)} do not match ({bsz}, {hq})")
    if mode.shape != (hq,) or sink.shape != (hq,) or window.shape != (hq,):
        raise ValueError("mode, sink and window must have one entry per query head")
    scale = (sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)) * LOG2E
    o = out if out is not None else torch.empty_like(q)
    if workspace is None:
        mid_o = torch.empty(bsz * hq * nsplit, d, dtype=torch.float32, device=q.device)
        mid_l = torch.empty(bsz * hq * nsplit, dtype=torch.float32, device=q.device)
    else:
        mid_o, mid_l = workspace
    dec, comb, grp = _kernels()
    if num_stages is None:
        num_stages = 3 if q.is_cuda else 1
    dec[(bsz * hq, nsplit)](
        q, k_buffer, v_buffer, mid_o, mid_l,
        q.stride(0), q.stride(1), k_buffer.stride(0), k_buffer.stride(1), v_buffer.stride(0), v_buffer.stride(1),
        req_to_token, req_pool_indices, req_to_token.stride(0), seq_lens,
        mode, sink, window, page_idx, page_cnt, page_idx.stride(0), page_idx.stride(1), page_cnt.stride(0),
        scale, hq, GROUP=hq // k_buffer.shape[1], NSPLIT=nsplit, PAGE=BLOCK, D=d,
        num_warps=num_warps, num_stages=num_stages)
    if groups is not None:
        hkv = k_buffer.shape[1]
        g = hq // hkv
        grp[(bsz * hkv, nsplit)](
            q, k_buffer, v_buffer, mid_o, mid_l,
            q.stride(0), q.stride(1), k_buffer.stride(0), k_buffer.stride(1), v_buffer.stride(0), v_buffer.stride(1),
            req_to_token, req_pool_indices, req_to_token.stride(0), seq_lens,
            groups[0], groups[1], groups[2], scale, hq, hkv,
            GROUP=g, GP=max(16, 1 << (g - 1).bit_length()), NSPLIT=nsplit, PAGE=BLOCK, D=d,
            DOT_F32=(not q.is_cuda) and q.dtype == torch.bfloat16,
            num_warps=num_warps, num_stages=num_stages)
    comb[(bsz * hq,)](mid_o, mid_l, o, o.stride(0), o.stride(1), hq, NSPLIT=nsplit, D=d)
    return o
