"""Sparse paged decode: one new token per request against the paged KV cache, per-head budgets.

Pages are the 64-token blocks of a sequence (positions ``64p .. 64p+63`` read through ``req_to_token``).
With SGLang's ``--page-size 64`` a page is one 64-slot pool page, slots ``loc0 .. loc0+63`` with
``loc0 = req_to_token[req, 64p]``: the kernel then loads that one index per page and addresses K/V from it
(``pool_page_size=64``); with page size 1 it gathers the 64 slots of each page from ``req_to_token``.
Per head a mode picks the pages (all computed in the kernel from ``seq_lens`` except the selected list):

* 0 dense:      pages ``0 .. np-1``
* 1 streaming:  sink pages ``0 .. s-1`` (outside the window) and window pages ``np-w .. np-1``, ``w`` the
                budget's :attr:`~sglang_shplb.core.patterns.HeadBudget.decode_window_blocks` (its prefill
                window plus the query's page)
* 2 selected:   ``page_cnt`` pages of ``page_idx`` (chosen by :func:`select_pages`) plus the current page
                ``np-1`` always (a listed copy of it, or a listed page past the end, is skipped), so a
                selection can be reused for several steps while the sequence grows.

Page selection (LServe / Quest): per page and KV head the elementwise key min/max; a query's upper bound
on ``q·k`` over a page is ``sum_d max(q_d kmin_d, q_d kmax_d)``; take the top pages, page 0 forced.

GQA: one program serves the q heads of one KV head and loads each page once for all of them (the decode
step is bound by KV bytes). A KV head whose q heads are all dense, or all streaming with one budget, walks
a range of pages. Any other group walks the ascending union of its heads' pages, made each step by the
page-selection launch (:mod:`~.triton_select`) or a small page-union kernel, with a bit mask per page of
the heads that read it; the scores of the other heads are masked
out, so every head attends exactly its own pages.

Split-K (flash decoding): the page walk of a KV head is cut into ``NSPLIT`` slices; each program keeps an
online softmax per q head over its slice. A walk of one slice writes the output; otherwise each slice writes
``(acc / l, m + log2 l)`` and counts itself in an atomic counter of its (request, KV head), and the last slice
to finish merges the partials (one launch, no separate combine) and zeroes the counter for the next call.

The page walk has one loop per kind of walk (list or range), with no branch inside, and takes
``pages_per_step`` pages per step as one K / V tile (one chain of dependent loads, page index -> slot -> K,
per step).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple, Sequence

import torch

from sglang_shplb.core.patterns import BLOCK
from sglang_shplb.kernels.checks import check_qkv
from sglang_shplb.kernels.layer_heads import LayerHeads
from sglang_shplb.kernels.triton_prefill import LOG2E

MODE_DENSE, MODE_STREAMING, MODE_SELECTED = 0, 1, 2   # per q head
MODE_LIST = 2                                        # per KV head: the union of its heads' pages


@lru_cache(maxsize=None)
def _kernels():
    from sglang_shplb.kernels._triton_compat import import_triton
    triton, tl = import_triton()

    @triton.jit
    def _stream_span(sink, window, npg):
        # a streaming walk at npg pages: the last w = min(window, npg) pages and the first min(sink, npg - w)
        w_eff = tl.minimum(window, npg)
        return tl.minimum(sink, npg - w_eff), w_eff

    @triton.jit
    def _reads_page(md, n_s, w_eff, listed, p, npg):
        # whether a head of mode md reads page p < npg: dense every page; streaming p < n_s or p >= npg - w;
        # selected its listed pages and the current page npg - 1
        return (md == 0) | ((md == 1) & ((p < n_s) | (p >= npg - w_eff))) | ((md == 2) & (listed | (p == npg - 1)))

    # jit functions resolve callees through the module's globals (triton_select's kernel calls these too);
    # Triton wants triton.language among the globals of a jit function (its interpreter checks it when a kernel
    # of another module calls one of these before any kernel of this module ran)
    globals().update(_stream_span=_stream_span, _reads_page=_reads_page, tl=tl)

    @triton.jit
    def _page_union_kernel(PIDX, PCNT, s_pi_b, s_pi_h, s_pc_b, seq_lens, mode, sink, window, gmode,
                      MAP, s_map_b, ULIST, UBITS, UCNT, s_u_b, s_u_h, HKV, MAXP,
                      GROUP: tl.constexpr, M2: tl.constexpr, TP: tl.constexpr, PAGE: tl.constexpr):
        # the pages KV head hk of request b loads once for its GROUP q heads (list mode, gmode 2):
        #   ULIST = ascending union of the heads' pages, UBITS[j] = bit r set iff q head hk*GROUP + r reads it
        # per head: dense p < npg; streaming p < n_s or p >= npg - w; selected: listed p < npg-1, and npg-1.
        # Listed pages are scattered into the zeroed byte map MAP [Hq, MAXP] first (and zeroed again on read).
        b = tl.program_id(0)
        hk = tl.program_id(1)
        if tl.load(gmode + hk) == 2:
            n = tl.load(seq_lens + b).to(tl.int32)     # SGLang passes int64
            npg = (n + PAGE - 1) // PAGE
            jj = tl.arange(0, M2)
            for r in tl.static_range(GROUP):
                h = hk * GROUP + r
                cnt = tl.where(tl.load(mode + h) == 2, tl.load(PCNT + b * s_pc_b + h), 0)
                pid = tl.load(PIDX + b * s_pi_b + h * s_pi_h + jj, mask=jj < cnt, other=-1)
                ok = (jj < cnt) & (pid >= 0) & (pid < npg - 1)
                tl.store(MAP + b * s_map_b + h * MAXP + pid, tl.full([M2], 1, tl.int8), mask=ok)
            tl.debug_barrier()                  # the scattered bytes are visible to every thread below
            base = 0
            for t in range(0, npg, TP):
                p = t + tl.arange(0, TP)
                inr = p < npg
                bits = tl.zeros([TP], tl.int32)
                for r in tl.static_range(GROUP):
                    h = hk * GROUP + r
                    md = tl.load(mode + h)
                    n_s, w_eff = _stream_span(tl.load(sink + h), tl.load(window + h), npg)
                    mrow = MAP + b * s_map_b + h * MAXP + p
                    listed = tl.load(mrow, mask=inr & (md == 2), other=0) != 0
                    tl.store(mrow, tl.zeros([TP], tl.int8), mask=listed)
                    use = _reads_page(md, n_s, w_eff, listed, p, npg)
                    bits = bits | (use & inr).to(tl.int32) << r
                nz = bits != 0
                slot = base + tl.cumsum(nz.to(tl.int32), axis=0) - 1
                off = b * s_u_b + hk * s_u_h + slot
                tl.store(ULIST + off, p, mask=nz)
                tl.store(UBITS + off, bits, mask=nz)
                base += tl.sum(nz.to(tl.int32), axis=0)
            tl.store(UCNT + b * HKV + hk, base)

    @triton.jit
    def _decode_pages(m_i, l_i, acc, q, K, V, r2t, pg, pv, row_ok, n, hk, stride_kt, stride_kh, stride_vt, stride_vh,
                      qk_scale, ar, offs_d, PAGE: tl.constexpr, PB: tl.constexpr, CONTIG: tl.constexpr,
                      DOT_F32: tl.constexpr):
        # PB pages pg [PB] of the walk as one tile of PB*PAGE tokens (pv: pages inside the walk): positions
        # PAGE*pg + ar (those >= n masked), row r of the group reads page i iff row_ok[r, i]
        #   S = Q K^T * scale,  m' = max(m, rowmax S),  P = 2^(S - m'),  l' = 2^(m - m') l + rowsum P,
        #   acc' = 2^(m - m') acc + P V
        # slots: CONTIG (whole pool pages) r2t[PAGE*pg] + ar, one index load per page; else r2t[pos]
        pos2 = pg[:, None] * PAGE + ar[None, :]
        ok2 = pv[:, None] & (pos2 < n)
        ok = tl.reshape(ok2, [PB * PAGE])
        if CONTIG:
            base = tl.load(r2t + pg * PAGE, mask=pv, other=0).to(tl.int64)
            loc = tl.reshape(base[:, None] + ar[None, :], [PB * PAGE])
        else:
            loc = tl.load(r2t + tl.reshape(pos2, [PB * PAGE]), mask=ok, other=0).to(tl.int64)
        k = tl.load(K + loc[:, None] * stride_kt + hk * stride_kh + offs_d[None, :], mask=ok[:, None], other=0.0)
        if DOT_F32:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k)).to(tl.float32) * qk_scale
        use = tl.reshape(row_ok[:, :, None] & ok2[None, :, :], [row_ok.shape[0], PB * PAGE])
        s = tl.where(use, s, -1.0e30)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        p = tl.where(use, p, 0.0)
        v = tl.load(V + loc[:, None] * stride_vt + hk * stride_vh + offs_d[None, :], mask=ok[:, None], other=0.0)
        if DOT_F32:
            v = v.to(tl.float32)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
        return m_new, l_i, acc

    globals()["_decode_pages"] = _decode_pages   # jit functions resolve callees through the module's globals

    @triton.jit
    def _decode_group_kernel(
        Q, K, V, O, MidO, MidL, DONE,
        stride_qb, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ob, stride_oh,
        req_to_token, req_pool_idx, stride_r2t, seq_lens,
        gmode, gsink, gwindow, ULIST, UBITS, UCNT, s_u_b, s_u_h, qk_scale, HQ, HKV, SPLIT_PAGES, ROUTE,
        DENSE_SPLIT_PAGES,
        GROUP: tl.constexpr, GP: tl.constexpr, NSPLIT: tl.constexpr, PAGE: tl.constexpr, D: tl.constexpr,
        CONTIG: tl.constexpr, DOT_F32: tl.constexpr, PB: tl.constexpr, HAS_ROUTE: tl.constexpr,
        MINSP: tl.constexpr,
    ):
        # the GROUP q heads of KV head hk share each page load: S = Q_group · K^T on the tensor cores (rows
        # padded to GP), one online softmax per row. Pages: gmode 0 all, 1 one streaming budget (sink +
        # window), 2 the union list of _page_union_kernel with a row mask per page (UBITS). The walk of this
        # (request, KV head) is cut into gs = ceil(total / split) <= NSPLIT slices, so that long and short walks
        # take programs in proportion to their pages; programs past gs do nothing. split = SPLIT_PAGES, the host's
        # cut at the layer's most pages (decode_splits), shrunk to ceil(npg / NSPLIT) >= MINSP for a request of
        # npg pages: a server sized for 128K keeps all NSPLIT programs busy on a 32K request.
        # HAS_ROUTE: a device flag ROUTE read at run time (a captured CUDA graph serves every bucket) makes the
        # step dense (gmode 0 for every KV head, slices of DENSE_SPLIT_PAGES pages).
        # CONTIG: the pool holds each 64-token page in 64 consecutive slots (one index load per page).
        # gs == 1: the program writes O. Else each slice writes its partial (MidO, MidL) and counts itself
        # in DONE[b, hk]; the last of the gs to count merges the gs partials into O and zeroes DONE again.
        bhk = tl.program_id(0)
        sp = tl.program_id(1)
        b = bhk // HKV
        hk = bhk % HKV
        md = tl.load(gmode + hk)
        split_pages = SPLIT_PAGES
        if HAS_ROUTE:   # ROUTE != 0: this step runs the layer dense (every KV head walks all its pages)
            dense = tl.load(ROUTE) != 0
            md = tl.where(dense, 0, md)
            split_pages = tl.where(dense, DENSE_SPLIT_PAGES, SPLIT_PAGES)
        n = tl.load(seq_lens + b).to(tl.int32)     # SGLang passes int64
        npg = (n + PAGE - 1) // PAGE
        split_pages = tl.minimum(split_pages, tl.maximum(MINSP, (npg + NSPLIT - 1) // NSPLIT))
        n_s, w_eff = _stream_span(tl.load(gsink + hk), tl.load(gwindow + hk), npg)
        u = b * s_u_b + hk * s_u_h
        total = tl.where(md == 0, npg, tl.where(md == 1, n_s + w_eff, tl.load(UCNT + b * HKV + hk)))
        gs = tl.minimum(tl.maximum((total + split_pages - 1) // split_pages, 1), NSPLIT)
        per = (total + gs - 1) // gs
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
        # two loops, no branch inside, PB pages a step (one chain of dependent loads per PB pages)
        pb = tl.arange(0, PB)
        if md == 2:
            for j in range(j0, j1, PB):
                jj = j + pb
                pv = jj < j1
                pg = tl.load(ULIST + u + jj, mask=pv, other=0)
                row_ok = ((tl.load(UBITS + u + jj, mask=pv, other=0)[None, :] >> rows[:, None]) & 1) != 0
                m_i, l_i, acc = _decode_pages(m_i, l_i, acc, q, K, V, r2t, pg, pv, row_ok, n, hk, stride_kt,
                                              stride_kh, stride_vt, stride_vh, qk_scale, ar, offs_d, PAGE, PB, CONTIG,
                                              DOT_F32)
        else:
            for j in range(j0, j1, PB):
                jj = j + pb
                pv = jj < j1
                pg = tl.where(md == 0, jj, tl.where(jj < n_s, jj, npg - w_eff + jj - n_s))
                m_i, l_i, acc = _decode_pages(m_i, l_i, acc, q, K, V, r2t, pg, pv, rvalid[:, None] & pv[None, :], n,
                                              hk, stride_kt, stride_kh, stride_vt, stride_vh, qk_scale, ar, offs_d,
                                              PAGE, PB, CONTIG, DOT_F32)
        l_safe = tl.maximum(l_i, 1e-30)
        o_ptr = O + b * stride_ob + hrow[:, None] * stride_oh + offs_d[None, :]
        if gs == 1:
            if sp == 0:
                tl.store(o_ptr, (acc / l_safe[:, None]).to(O.dtype.element_ty), mask=rvalid[:, None])
        elif sp < gs:
            mid = (b * HQ + hrow) * NSPLIT
            tl.store(MidO + (mid + sp)[:, None] * D + offs_d[None, :], acc / l_safe[:, None],
                     mask=rvalid[:, None] & (l_i > 0)[:, None])
            tl.store(MidL + mid + sp, tl.where(l_i > 0, m_i + tl.math.log2(l_safe), -1.0e30), mask=rvalid)
            tl.debug_barrier()     # every thread's partial is written before the release below
            done = tl.atomic_add(DONE + bhk, 1, sem="acq_rel", scope="gpu")
            if done == gs - 1:     # the last slice: the acquire makes the other slices' partials visible
                # per row o = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M), the gs partials loaded at once (a
                # [NSPLIT, D] tile per row: no chain of dependent loads); slices that attended nothing for a row
                # wrote lse = -inf and no o. The same result whichever program is last.
                ts = tl.arange(0, NSPLIT)
                for r in tl.static_range(GROUP):
                    mrow = (b * HQ + hk * GROUP + r) * NSPLIT + ts
                    lse = tl.load(MidL + mrow, mask=ts < gs, other=-1.0e30, cache_modifier=".cg")
                    used = lse > -1.0e29
                    w = tl.where(used, tl.math.exp2(lse - tl.max(lse, 0)), 0.0)
                    o_t = tl.load(MidO + mrow[:, None] * D + offs_d[None, :], mask=used[:, None], other=0.0,
                                  cache_modifier=".cg")
                    o_r = tl.sum(o_t * w[:, None], 0) / tl.maximum(tl.sum(w, 0), 1e-30)
                    tl.store(O + b * stride_ob + (hk * GROUP + r) * stride_oh + offs_d, o_r.to(O.dtype.element_ty))
                tl.store(DONE + bhk, 0)   # the next launch (next layer, next step, graph replay) starts at 0

    return _page_union_kernel, _decode_group_kernel


class PageRules(NamedTuple):
    """Device constants of one layer's decode (:func:`page_rules`): which pages each head reads and how each
    KV head walks them; made once per layer."""
    mode: torch.Tensor       # int32 [Hq]: 0 dense, 1 streaming, 2 selected (top-k / vertical-slash)
    sink: torch.Tensor       # int32 [Hq]: streaming sink pages
    window: torch.Tensor     # int32 [Hq]: streaming window pages
    gmode: torch.Tensor      # int32 [Hkv]: 0 all dense, 1 one streaming budget, 2 the union list
    gsink: torch.Tensor      # int32 [Hkv]
    gwindow: torch.Tensor    # int32 [Hkv]
    lists: bool              # some KV head is in list mode (the page-union kernel runs)


def _host_page_rules(heads: LayerHeads, num_kv_heads: int) -> tuple[list[int], ...]:
    """Host lists of :class:`PageRules`: ``mode, sink, window`` per q head, ``gmode, gsink, gwindow`` per
    KV head."""
    mode, sink, win = [MODE_SELECTED] * heads.num_heads, [0] * heads.num_heads, [0] * heads.num_heads
    for h in heads.dense:
        mode[h] = MODE_DENSE
    for (s, _), hs in heads.streaming_rules.items():
        for h in hs:
            mode[h], sink[h], win[h] = MODE_STREAMING, s, heads.budgets[h].decode_window_blocks
    gm, gs, gw = [], [], []
    for hs in heads.kv_groups(num_kv_heads):
        if all(mode[h] == MODE_DENSE for h in hs):
            gm.append(MODE_DENSE); gs.append(0); gw.append(0)
        elif all(mode[h] == MODE_STREAMING for h in hs) and len({(sink[h], win[h]) for h in hs}) == 1:
            gm.append(MODE_STREAMING); gs.append(sink[hs[0]]); gw.append(win[hs[0]])
        else:
            gm.append(MODE_LIST); gs.append(0); gw.append(0)
    return mode, sink, win, gm, gs, gw


def page_rules(heads: LayerHeads, num_kv_heads: int, device=None) -> PageRules:
    """Per q head its page rule; per KV head how the group kernel walks its pages. A KV head whose q heads
    are all dense, or all streaming with one budget, walks a range; any other group walks the union of its
    heads' pages with a row mask per page, so that every page is loaded once for the group."""
    rules = _host_page_rules(heads, num_kv_heads)
    mk = lambda x: torch.tensor(x, dtype=torch.int32, device=device)  # noqa: E731
    return PageRules(*map(mk, rules), MODE_LIST in rules[3])


def max_selected_pages(heads: LayerHeads, max_pages: int) -> int:
    """``MAXSEL``: width of ``page_idx`` (the listed pages, the current one excluded), ≥ 1."""
    return max([1] + [heads.budgets[h].decode_pages(max_pages) - 1 for h in heads.selected])


# ---------------------------------------------------------------------------------------------------
# page summaries (torch ops, sync-free), indexed by KV-pool page
# ---------------------------------------------------------------------------------------------------
# The summaries of a layer are ``kmin, kmax [pool_pages + 1, Hkv, d]``: one row per 64-slot page of SGLang's
# token pool (``--page-size 64``: the tokens at positions ``64j .. 64j+63`` of a request live in the 64 slots
# of one pool page), so their size follows the pool, not the number of request slots. A request's page ``j``
# is pool page ``req_to_token[req, 64j] // 64``; a prefix page shared through the radix cache has one summary
# for every request that holds it. The last row is a scratch row that takes the writes of pages a request
# does not hold (past its length, CUDA-graph padding rows), so no write lands on another request's page.
def pool_pages(pool_tokens: int) -> int:
    """64-token pages of a token pool of ``pool_tokens`` slots (the K buffer's first dimension)."""
    return -(-int(pool_tokens) // BLOCK)


def page_summary_bytes_per_token(num_kv_heads: int, head_dim: int, dtype=torch.bfloat16) -> float:
    """Summary bytes one layer spends per pool token: ``2 · Hkv · d · elem / 64`` (1/64 of its K+V)."""
    return 2 * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size() / BLOCK


def alloc_page_summaries(pool_tokens: int, num_kv_heads: int, head_dim: int,
                         dtype=torch.bfloat16, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``kmin, kmax [pool_pages(pool_tokens) + 1, Hkv, d]``: one row per pool page, the last a scratch row."""
    shape = (pool_pages(pool_tokens) + 1, num_kv_heads, head_dim)
    return (torch.full(shape, float("inf"), dtype=dtype, device=device),
            torch.full(shape, float("-inf"), dtype=dtype, device=device))


def request_pool_pages(req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor,
                       num_pages: int, scratch_page: int, held: torch.Tensor | None = None,
                       first_page: torch.Tensor | None = None) -> torch.Tensor:
    """int64 ``[B, num_pages]``: the pool page of each request's pages ``f .. f + num_pages - 1``
    (``req_to_token[req, 64j] // 64``; ``f = first_page[b]``, default 0), ``scratch_page`` where ``held`` is
    False (default: pages past ``seq_lens``). Sync-free."""
    j = torch.arange(num_pages, device=req_to_token.device)[None, :]
    if first_page is not None:
        j = j + first_page.long()[:, None]
    first = (j * BLOCK).clamp(max=req_to_token.shape[1] - 1)
    pid = torch.gather(req_to_token[req_pool_indices.long()].long(), 1,
                       first.expand(req_pool_indices.shape[0], -1)) // BLOCK         # [B, P]
    if held is None:
        held = j * BLOCK < seq_lens.long()[:, None]
    return torch.where(held, pid, torch.full_like(pid, scratch_page))


@dataclass(frozen=True)
class SummaryRows:
    """Where a batch's request pages are in the pool (:func:`summary_rows`): the same for every layer of a
    forward, so built once per batch."""
    locs: torch.Tensor      # [B, P * 64] int64: pool slot of each position (0 past the request's length)
    valid: torch.Tensor     # [B, P * 64, 1, 1] bool: the position is in the request
    pages: torch.Tensor     # [B * P] int64: pool page of each request page (the scratch row past its length)


def summary_rows(req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor,
                 scratch_page: int, num_pages: int | None = None,
                 first_page: torch.Tensor | None = None) -> SummaryRows:
    """The listed requests' pages ``f .. f + num_pages - 1`` (``f = first_page[b]``, default 0; ``num_pages``
    default: all of ``req_to_token``'s width). An extend after a prefix of ``p`` tokens changes only the pages
    from ``p // 64`` on: the earlier ones were summarized when their tokens were written. Sync-free."""
    bsz = req_pool_indices.shape[0]
    width = -(-req_to_token.shape[1] // BLOCK)
    maxp = width if num_pages is None else min(num_pages, width)
    pos = torch.arange(maxp * BLOCK, device=req_to_token.device)[None, :]
    if first_page is not None:
        pos = pos + first_page.long()[:, None] * BLOCK
    valid = pos < seq_lens.long()[:, None]
    loc = torch.gather(req_to_token[req_pool_indices.long()].long(), 1,
                       pos.clamp(max=req_to_token.shape[1] - 1).expand(bsz, -1))
    pages = request_pool_pages(req_to_token, req_pool_indices, seq_lens, maxp, scratch_page, first_page=first_page)
    return SummaryRows(torch.where(valid, loc, torch.zeros_like(loc)), valid[:, :, None, None], pages.flatten())


def build_page_summaries(k_buffer: torch.Tensor, req_to_token: torch.Tensor, req_pool_indices: torch.Tensor,
                         seq_lens: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor,
                         num_pages: int | None = None, rows: SummaryRows | None = None) -> None:
    """(Re)compute the min/max of the pool pages that hold the listed requests' pages ``0 .. num_pages-1``
    (default: all of ``req_to_token``'s width; ``num_pages`` ≥ the longest request's page count), after a
    prefill. Pages a request does not hold write the scratch row. ``rows``: :func:`summary_rows` of these
    arguments (with the scratch row ``kmin.shape[0] - 1``), when the caller keeps them for every layer. In
    place, sync-free."""
    if rows is None:
        rows = summary_rows(req_to_token, req_pool_indices, seq_lens, kmin.shape[0] - 1, num_pages)
    bsz, npos = rows.locs.shape
    kk = k_buffer[rows.locs]                                                 # [B, P*64, Hkv, d]
    lo = torch.where(rows.valid, kk, torch.full((), float("inf"), dtype=kk.dtype, device=kk.device))
    hi = torch.where(rows.valid, kk, torch.full((), float("-inf"), dtype=kk.dtype, device=kk.device))
    shp = (bsz, npos // BLOCK, BLOCK) + tuple(kk.shape[2:])
    lo = lo.view(shp).amin(2)                                                # [B, P, Hkv, d]
    hi = hi.view(shp).amax(2)
    kmin[rows.pages] = lo.flatten(0, 1).to(kmin.dtype)   # a shared prefix page: the same values twice
    kmax[rows.pages] = hi.flatten(0, 1).to(kmax.dtype)


def update_page_summaries(k_buffer: torch.Tensor, req_to_token: torch.Tensor, req_pool_indices: torch.Tensor,
                          seq_lens: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> None:
    """Fold the token just appended (position ``seq_lens - 1``) into its pool page's min/max. In place;
    the first token of a page resets the page. Rows with ``seq_lens < 2`` (CUDA-graph padding: a decoded
    token is never at position 0, extend summarizes it) write the scratch row."""
    r = req_pool_indices.long()
    pos = seq_lens.long() - 1
    posc = pos.clamp(min=0)
    page = req_to_token[r, posc // BLOCK * BLOCK].long() // BLOCK
    page = torch.where(pos >= 1, page, torch.full_like(page, kmin.shape[0] - 1))
    knew = k_buffer[req_to_token[r, posc].long()].to(kmin.dtype)             # [B, Hkv, d]
    first = (pos % BLOCK == 0)[:, None, None]
    cur_lo = kmin[page]                                                     # [B, Hkv, d]
    cur_hi = kmax[page]
    kmin[page] = torch.where(first, knew, torch.minimum(cur_lo, knew))
    kmax[page] = torch.where(first, knew, torch.maximum(cur_hi, knew))


def select_pages(heads: LayerHeads, q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor,
                 req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor,
                 max_pages: int, out: tuple[torch.Tensor, torch.Tensor] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Query-aware page choice of the selected (top-k / vertical-slash) heads, from the pool-page summaries
    ``kmin/kmax [pool_pages + 1, Hkv, d]`` (:func:`alloc_page_summaries`) read through ``req_to_token``.

    ``page_idx [B, Hq, MAXSEL]`` int32, ``page_cnt [B, Hq]`` int32: the best pages by
    ``sum_d max(q_d kmin_d, q_d kmax_d)`` among ``0 .. np-2`` (page 0 forced), ``HeadBudget.decode_pages - 1``
    of them; the kernel adds the current page. Rows of other heads hold count 0. Sync-free."""
    bsz, hq, d = q.shape
    hkv = kmin.shape[1]
    group = hq // hkv
    dev = q.device
    maxsel = max_selected_pages(heads, max_pages)
    if out is None:
        out = (torch.zeros(bsz, hq, maxsel, dtype=torch.int32, device=dev),
               torch.zeros(bsz, hq, dtype=torch.int32, device=dev))
    page_idx, page_cnt = out
    page_cnt.zero_()
    consts = _selector_constants(heads, str(dev), max_pages)
    if consts is None:
        return page_idx, page_cnt
    sh, table = consts
    npg = (seq_lens.long() + BLOCK - 1) // BLOCK                             # [B]
    pj = torch.arange(max_pages, device=dev)[None, None, :]
    # the candidates 0 .. npg-2 through req_to_token (other pages read the scratch row, then are masked)
    pid = request_pool_pages(req_to_token, req_pool_indices, seq_lens, max_pages, kmin.shape[0] - 1,
                             held=pj[0] < (npg - 1)[:, None])
    lo = kmin[pid][:, :, sh // group].transpose(1, 2).float()                 # [B, S, P, d]
    hi = kmax[pid][:, :, sh // group].transpose(1, 2).float()
    qq = q[:, sh].float()[:, :, None, :]
    score = torch.maximum(qq * lo, qq * hi).sum(-1)                          # [B, S, P]
    score = score.masked_fill(pj == 0, float("inf")).masked_fill(pj >= (npg - 1)[:, None, None], float("-inf"))
    kt = min(maxsel, max_pages)
    top = score.topk(kt, dim=-1).indices.int()
    page_idx[:, sh, :kt] = top
    page_cnt[:, sh] = table[:, npg.clamp(max=max_pages)].t()                 # decode_count_table
    return page_idx, page_cnt


def decode_count_table(heads: LayerHeads, max_pages: int) -> torch.Tensor:
    """int32 ``[Hq, max_pages + 1]`` (host): pages a selected head lists at ``npg`` pages,
    ``clamp(decode_pages(npg) - 1, 0, MAXSEL)`` (the kernel adds the current page); 0 for other heads
    and at ``npg = 0``. The one count rule of :func:`select_pages` and the fused selector."""
    kt = min(max_selected_pages(heads, max_pages), max_pages)
    table = torch.zeros(heads.num_heads, max_pages + 1, dtype=torch.int32)
    for h in heads.selected:
        table[h, 1:] = torch.tensor([min(max(heads.budgets[h].decode_pages(n) - 1, 0), kt)
                                     for n in range(1, max_pages + 1)], dtype=torch.int32)
    return table


@lru_cache(maxsize=256)
def _selector_constants(heads: LayerHeads, device: str, max_pages: int):
    """Device constants of :func:`select_pages` (selected heads, their count table), made once per layer:
    a captured CUDA graph may not create tensors from host lists."""
    sel = list(heads.selected)
    if not sel:
        return None
    if device.startswith("cuda") and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("shplb: page-selection constants must be made before CUDA-graph capture "
                           "(run one eager decode step first)")
    return torch.tensor(sel, device=device), decode_count_table(heads, max_pages)[sel].to(device)


def decode_walks(heads: LayerHeads, num_kv_heads: int, max_pages: int) -> list[int]:
    """Per KV head, the most pages its group kernel walks at ``max_pages`` pages: the length of its range, or
    of its union list (at most the sum of its heads' pages)."""
    gmode = _host_page_rules(heads, num_kv_heads)[3]
    pages = [max_pages] * heads.num_heads                                   # dense: every page
    for (s, w), hs in heads.streaming_rules.items():
        for h in hs:
            pages[h] = s + w
    for h in heads.selected:
        pages[h] = heads.budgets[h].decode_pages(max_pages)
    return [min(max_pages, pages[hs[0]] if m != MODE_LIST else sum(pages[h] for h in hs))
            for hs, m in zip(heads.kv_groups(num_kv_heads), gmode)]


# Measured on an H200 with the combine in the group kernel (bench/decode.py --splits, 2026-12-02,
# bench/results/decode_fused): the best cut puts about 256 programs' worth of pages over the batch (8-32 pages a
# slice: 32 slices of a dense walk at batch 1, 8 at batch 4-16), never fewer than 8 slices of a long walk, and no
# more than 64. Re-checked with the combine as one tile (bench/decode_sweep.py, 2026-12-03): the rule's cut is the
# best of 16 / 32 / 64 / 128 slices or within 2 % of it at 16K / 64K, batch 1 / 4.
SPLIT_TARGET_PROGRAMS, SPLIT_MIN_PAGES, MIN_SPLITS, MAX_SPLITS = 256, 8, 8, 64


def _pow2(x: int) -> int:
    return 1 << max(0, math.ceil(x) - 1).bit_length()


def decode_splits(walks: Sequence[int], batch: int) -> tuple[int, int]:
    """``(nsplit, split_pages)`` of a layer at batch size ``batch``: the longest walk is cut into ``nsplit`` slices
    (a power of two in ``[min(MIN_SPLITS, its pages / SPLIT_MIN_PAGES), MAX_SPLITS]``) of ``split_pages`` pages,
    about ``max(SPLIT_MIN_PAGES, batch · sum(walks) / SPLIT_TARGET_PROGRAMS)``; shorter walks take slices of
    the same size, so programs follow pages. The group kernel shrinks the slices of a request shorter than the
    layer's most pages to ``max(SPLIT_MIN_PAGES, its pages / nsplit)`` (never larger than ``split_pages``)."""
    longest = max(walks)
    size = max(SPLIT_MIN_PAGES, math.ceil(batch * sum(walks) / SPLIT_TARGET_PROGRAMS))
    floor = min(MIN_SPLITS, _pow2(math.ceil(longest / SPLIT_MIN_PAGES)))
    nsplit = min(MAX_SPLITS, max(floor, _pow2(math.ceil(longest / size))))
    return nsplit, max(1, math.ceil(longest / nsplit))


def max_decode_splits(max_pages: int, batch: int) -> int:
    """An upper bound of :func:`decode_splits`' ``nsplit`` over every layer of ``max_pages`` pages (the slice size is
    at least ``batch · longest / SPLIT_TARGET_PROGRAMS``)."""
    return min(MAX_SPLITS, _pow2(math.ceil(max_pages / SPLIT_MIN_PAGES)),
               max(MIN_SPLITS, _pow2(math.ceil(SPLIT_TARGET_PROGRAMS / batch))))


class DecodeScratch:
    """Scratch of :func:`group_decode` for up to ``batch`` requests: split-K partials (``partial_rows`` rows of
    ``mid_o [., d]`` / ``mid_l``: ``batch · Hq · nsplit`` are used), the finished-slice counters ``done [B, Hkv]``
    (zero between calls: the last slice of a walk zeroes its counter) and the union lists of list-mode KV heads
    (``ulist/ubits [B, Hkv, max_pages]``, ``ucnt``, the byte map ``[B, Hq, max_pages]``, zero between calls).
    Allocate once (before CUDA-graph capture); every layer of one shape can share it (the launches of one
    stream run one after the other)."""

    def __init__(self, batch: int, num_q_heads: int, num_kv_heads: int, head_dim: int, max_pages: int,
                 partial_rows: int, device=None) -> None:
        self.batch, self.hq, self.hkv, self.max_pages = batch, num_q_heads, num_kv_heads, max_pages
        self.mid_o = torch.empty(partial_rows, head_dim, dtype=torch.float32, device=device)
        self.mid_l = torch.empty(partial_rows, dtype=torch.float32, device=device)
        self.ulist = torch.zeros(batch, num_kv_heads, max_pages, dtype=torch.int32, device=device)
        self.ubits = torch.zeros(batch, num_kv_heads, max_pages, dtype=torch.int32, device=device)
        self.ucnt = torch.zeros(batch, num_kv_heads, dtype=torch.int32, device=device)
        self.done = torch.zeros(batch, num_kv_heads, dtype=torch.int32, device=device)
        self.map = torch.zeros(batch, num_q_heads, max_pages, dtype=torch.int8, device=device)


#: Pages the group kernel loads per step of its walk (one [pages x 64, d] K / V tile, fewer chains of dependent loads
#: page index -> slot -> K). H200 sweep (``bench/decode_sweep.py``, 2026-12-03, Llama-3-8B layer, 16K / 64K, batch 1 / 4,
#: at the rule's split): 2 pages from 9 % faster to 4 % slower than 1 (faster in 6 of 8 cells), 4 pages 6-60 % slower.
DECODE_PAGES_PER_STEP = 2


def group_decode(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor, req_to_token: torch.Tensor,
                 req_pool_indices: torch.Tensor, seq_lens: torch.Tensor, rules: PageRules,
                 page_idx: torch.Tensor, page_cnt: torch.Tensor, scratch: DecodeScratch, nsplit: int,
                 split_pages: int, *,
                 sm_scale: float | None = None, out: torch.Tensor | None = None, pool_page_size: int = 1,
                 union_built: bool = False, pages_per_step: int = DECODE_PAGES_PER_STEP,
                 num_warps: int = 4, num_stages: int | None = None, route: torch.Tensor | None = None,
                 dense_split_pages: int | None = None) -> torch.Tensor:
    """The decode kernels (page union when some KV head walks a list, then the group kernel with its split-K
    combine): ``q [B, Hq, d]`` (token at position
    ``seq_lens - 1``, already written to the pool) → ``[B, Hq, d]``.
    ``rules``: :func:`page_rules`; ``page_idx/page_cnt``: :func:`select_pages` (or the fused selector);
    ``scratch``: a :class:`DecodeScratch` for at least ``B`` requests and ``B · Hq · nsplit`` partial rows;
    ``nsplit, split_pages`` (:func:`decode_splits`): each KV head's page walk is cut into slices of about
    ``split_pages`` pages, at most ``nsplit`` (a power of two) of them. Each KV head's
    pages are loaded once for its q heads. ``pool_page_size``: 1 reads each token's slot from
    ``req_to_token`` (any pool layout); 64 (SGLang's ``--page-size 64``) reads one slot per page, the page's
    64 tokens being the 64 consecutive slots from there (not checked: a pool of another layout gives wrong
    results). ``union_built``: the union lists are already in ``scratch`` (written by the selector launch,
    :func:`~.triton_select.update_and_select_pages` with ``union``), so the page-union launch is skipped.
    ``route``: an int32 device scalar read when the kernel runs; nonzero runs every head dense (all pages, slices
    of ``dense_split_pages`` pages; ``nsplit`` must cover both cuts), so one captured CUDA graph takes the sparse
    or the dense route per replay. Sync-free, no allocation with ``out``."""
    if q.dim() != 3:
        raise ValueError(f"decode q must be [batch, heads, head_dim], got {tuple(q.shape)}")
    check_qkv(q, k_buffer, v_buffer)
    bsz, hq, d = q.shape
    hkv = k_buffer.shape[1]
    if pool_page_size not in (1, BLOCK):
        raise ValueError(f"pool_page_size must be 1 (per-token slots) or {BLOCK} (contiguous pool pages), "
                         f"got {pool_page_size}")
    if pages_per_step < 1 or pages_per_step & (pages_per_step - 1):
        raise ValueError(f"pages_per_step must be a power of two, got {pages_per_step}")
    if nsplit < 1 or nsplit & (nsplit - 1) or split_pages < 1:
        raise ValueError(f"nsplit must be a power of two and split_pages >= 1, got {nsplit}, {split_pages}")
    if page_idx.shape[:2] != (bsz, hq) or page_cnt.shape != (bsz, hq):
        raise ValueError(f"page_idx {tuple(page_idx.shape)} / page_cnt {tuple(page_cnt.shape)} do not match ({bsz}, {hq})")
    if rules.mode.shape != (hq,) or rules.gmode.shape != (hkv,):
        raise ValueError(f"page rules are for {rules.mode.shape[0]} q / {rules.gmode.shape[0]} KV heads, "
                         f"got {hq} / {hkv}")
    if scratch.batch < bsz or scratch.hq != hq or scratch.hkv != hkv or scratch.mid_l.shape[0] < bsz * hq * nsplit:
        raise ValueError(f"scratch holds {scratch.batch} requests x {scratch.hq} / {scratch.hkv} heads and "
                         f"{scratch.mid_l.shape[0]} partial rows, got {bsz} x {hq} / {hkv} at {nsplit} splits")
    if page_idx.stride(2) != 1:
        raise ValueError("page_idx needs a unit last stride")
    if route is not None and (route.numel() != 1 or route.dtype != torch.int32 or not dense_split_pages):
        raise ValueError("route must be one int32 device element, with dense_split_pages >= 1")
    scale = (sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)) * LOG2E
    o = out if out is not None else torch.empty_like(q)
    union, grp = _kernels()
    if num_stages is None:
        num_stages = 3 if q.is_cuda else 1
    g = hq // hkv
    ul = scratch.ulist
    if rules.lists and not union_built:
        maxp = scratch.max_pages
        union[(bsz, hkv)](page_idx, page_cnt, page_idx.stride(0), page_idx.stride(1), page_cnt.stride(0), seq_lens,
                          rules.mode, rules.sink, rules.window, rules.gmode,
                          scratch.map, scratch.map.stride(0), ul, scratch.ubits, scratch.ucnt, ul.stride(0),
                          ul.stride(1), hkv, maxp, GROUP=g, M2=max(16, 1 << (page_idx.shape[2] - 1).bit_length()),
                          TP=min(1024, max(16, 1 << (maxp - 1).bit_length())), PAGE=BLOCK)
    grp[(bsz * hkv, nsplit)](
        q, k_buffer, v_buffer, o, scratch.mid_o, scratch.mid_l, scratch.done,
        q.stride(0), q.stride(1), k_buffer.stride(0), k_buffer.stride(1), v_buffer.stride(0), v_buffer.stride(1),
        o.stride(0), o.stride(1),
        req_to_token, req_pool_indices, req_to_token.stride(0), seq_lens,
        rules.gmode, rules.gsink, rules.gwindow, ul, scratch.ubits, scratch.ucnt, ul.stride(0), ul.stride(1),
        scale, hq, hkv, split_pages, route if route is not None else rules.gmode, dense_split_pages or 1,
        GROUP=g, GP=max(16, 1 << (g - 1).bit_length()), NSPLIT=nsplit, PAGE=BLOCK, D=d,
        CONTIG=pool_page_size == BLOCK, DOT_F32=(not q.is_cuda) and q.dtype == torch.bfloat16, PB=pages_per_step,
        HAS_ROUTE=route is not None, MINSP=SPLIT_MIN_PAGES, num_warps=num_warps, num_stages=num_stages)
    return o
