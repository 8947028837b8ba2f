"""Fused page-summary update + Quest page selection for sparse paged decode: two Triton launches that do
what :func:`~.triton_decode.update_page_summaries` followed by :func:`~.triton_decode.select_pages` do
(about 40 small torch kernels per layer), fixed-shape and sync-free for CUDA graphs.

* kernel A, grid ``(B, Hkv, page tiles)``: program ``(b, hk, 0)`` folds the key at position ``seq_len - 1``
  into its page's ``kmin/kmax`` (the first token of a page resets it). Every program then loads one tile of
  pages among ``0 .. npg-2`` of KV head ``hk`` once and scores it for each top-k / vertical-slash q head of
  the group (``score_p = sum_d max(q_d kmin_pd, q_d kmax_pd)`` in fp32, page 0 = +inf) into ``scratch``.
  The summaries are indexed by KV-pool page (:func:`~.triton_decode.alloc_page_summaries`): page ``j`` of a
  request is pool page ``req_to_token[req, 64j] // 64``. The update writes page ``npg-1``, which is never
  scored and which no other request holds (a partial page is not shared), so the two parts do not race.
  SGLang's CUDA-graph padding rows (``seq_len`` ≤ 1) write nothing and score nothing.
* kernel B, grid ``(B, Hq)``: find the ``cnt``-th largest score by a 32-step bisection on an
  order-preserving int32 key, and write the ``cnt`` chosen page ids in ASCENDING order (ties at the
  threshold: lowest ids).
  Other heads write ``page_cnt = 0`` (so the caller need not zero ``page_cnt``); their ``page_idx`` rows
  and the entries past ``cnt`` are left untouched.
"""
from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import torch

from sglang_shplb.core.patterns import BLOCK
from sglang_shplb.kernels.layer_heads import LayerHeads
from sglang_shplb.kernels.triton_decode import decode_count_table, max_selected_pages


@lru_cache(maxsize=None)
def _kernels():
    from sglang_shplb.kernels._triton_compat import import_triton
    triton, tl = import_triton()

    @triton.jit
    def _candidates(SEQ, CNT, b, h, MAXP, PAGE: tl.constexpr):
        """(candidate pages nv = pages 0 .. npg-2, cnt = decode budget - 1 from the host-made table
        decode_count_table; 0 for heads that do not select)."""
        npg = (tl.load(SEQ + b).to(tl.int32) + PAGE - 1) // PAGE
        cnt = tl.load(CNT + h * (MAXP + 1) + tl.minimum(tl.maximum(npg, 0), MAXP))
        return tl.minimum(npg - 1, MAXP), cnt

    globals()["_candidates"] = _candidates   # jit functions resolve callees through the module's globals

    @triton.jit
    def _update_score_kernel(Q, K, KMIN, KMAX, R2T, RPI, SEQ, SEL, SCR,
                             s_kt, s_kh, s_rt, s_qb, s_qh, s_mp, s_mh, s_md, s_sb, s_ss, MAXP,
                             GROUP: tl.constexpr, PAGE: tl.constexpr, D: tl.constexpr, TP: tl.constexpr):
        # KMIN/KMAX [pool pages + 1, Hkv, D]: a request's page j is pool page R2T[r, j*PAGE] // PAGE
        b = tl.program_id(0)
        hk = tl.program_id(1)
        t = tl.program_id(2)
        r = tl.load(RPI + b).to(tl.int64)
        offs_d = tl.arange(0, D)
        if t == 0:   # fold the new key into page npg-1 (rounded to the summary dtype, compared in fp32)
            pos = tl.load(SEQ + b).to(tl.int64) - 1
            if pos >= 1:   # seq_len < 2: a CUDA-graph padding row (a decoded token is never at position 0)
                loc = tl.load(R2T + r * s_rt + pos).to(tl.int64)
                k = tl.load(K + loc * s_kt + hk * s_kh + offs_d).to(KMIN.dtype.element_ty).to(tl.float32)
                pg = tl.load(R2T + r * s_rt + (pos // PAGE) * PAGE).to(tl.int64) // PAGE
                off = pg * s_mp + hk * s_mh + offs_d * s_md
                first = (pos % PAGE) == 0
                lo = tl.load(KMIN + off).to(tl.float32)
                hi = tl.load(KMAX + off).to(tl.float32)
                tl.store(KMIN + off, tl.where(first, k, tl.minimum(lo, k)).to(KMIN.dtype.element_ty))
                tl.store(KMAX + off, tl.where(first, k, tl.maximum(hi, k)).to(KMAX.dtype.element_ty))
        nv = tl.minimum((tl.load(SEQ + b).to(tl.int32) + PAGE - 1) // PAGE - 1, MAXP)   # pages 0 .. npg-2
        p = t * TP + tl.arange(0, TP)
        m = p < nv
        if t * TP < nv:
            # one tile of the KV head's summaries (pool pages through req_to_token), read once for the GROUP q heads
            pg = tl.load(R2T + r * s_rt + p.to(tl.int64) * PAGE, mask=m, other=0).to(tl.int64) // PAGE
            off = pg[:, None] * s_mp + hk * s_mh + offs_d[None, :] * s_md
            lo = tl.load(KMIN + off, mask=m[:, None], other=0.0).to(tl.float32)
            hi = tl.load(KMAX + off, mask=m[:, None], other=0.0).to(tl.float32)
            for g in tl.static_range(GROUP):
                h = hk * GROUP + g
                s = tl.load(SEL + h)                                # row of this head in scratch, -1: none
                if s >= 0:
                    q = tl.load(Q + b * s_qb + h * s_qh + offs_d).to(tl.float32)
                    sc = tl.sum(tl.maximum(q[None, :] * lo, q[None, :] * hi), axis=1)
                    tl.store(SCR + b * s_sb + s * s_ss + p, tl.where(p == 0, float("inf"), sc), mask=m)

    @triton.jit
    def _select_kernel(RPI, SEQ, SEL, CNT, SCR, PIDX, PCNT,
                       s_sb, s_ss, s_pb, s_ph, s_cb, s_ch, MAXP, PAGE: tl.constexpr, P2: tl.constexpr):
        # the cnt best scores of one (request, selected head), written as ascending page ids
        b = tl.program_id(0)
        h = tl.program_id(1)
        nv, cnt = _candidates(SEQ, CNT, b, h, MAXP, PAGE)
        if cnt > 0:
            scr = SCR + b * s_sb + tl.load(SEL + h) * s_ss
            p = tl.arange(0, P2)
            x = tl.load(scr + p, mask=p < nv, other=0.0)
            # order-preserving int32 key: negative floats get their magnitude bits flipped
            bits = x.to(tl.int32, bitcast=True)
            key = tl.where(p < nv, bits ^ ((bits >> 31) & 0x7FFFFFFF), -2147483648)
            # largest thr with #{key >= thr} >= cnt: bisection on [lo, hi] (int64, 2^32 values, 32 steps)
            lo_t = tl.full([], -2147483648, tl.int64)
            hi_t = tl.full([], 2147483647, tl.int64)
            for _ in range(32):
                mid = (lo_t + hi_t + 1) >> 1
                ok = tl.sum((key >= mid.to(tl.int32)).to(tl.int32), axis=0) >= cnt
                lo_t = tl.where(ok, mid, lo_t)
                hi_t = tl.where(ok, hi_t, mid - 1)
            thr = lo_t.to(tl.int32)
            # all keys > thr (fewer than cnt), then the lowest page ids among keys == thr up to cnt
            gt = key > thr
            eq = key == thr
            need = cnt - tl.sum(gt.to(tl.int32), axis=0)
            keep = gt | (eq & (tl.cumsum(eq.to(tl.int32), axis=0) <= need))
            slot = tl.cumsum(keep.to(tl.int32), axis=0) - 1        # ascending page ids
            tl.store(PIDX + b * s_pb + h * s_ph + slot, p, mask=keep)
        tl.store(PCNT + b * s_cb + h * s_ch, cnt)

    return _update_score_kernel, _select_kernel


class SelectConsts(NamedTuple):
    """Device constants of :func:`update_and_select_pages` for one layer (see :func:`selector_consts`)."""
    sel: torch.Tensor        # int32 [Hq]: row of a selected head in scratch (0 .. S-1), -1 for the others
    cnt_table: torch.Tensor  # int32 [Hq, max_pages + 1]: pages to list at npg pages (0 for other heads)
    num_heads: int           # Hq
    num_sel: int             # S, selected (top-k / vertical-slash) heads
    maxsel: int              # MAXSEL = max_selected_pages(heads, max_pages), width of page_idx
    max_pages: int


@lru_cache(maxsize=256)
def _consts(heads: LayerHeads, device: str, max_pages: int) -> SelectConsts:
    if device.startswith("cuda") and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("shplb: page-selection constants must be made before CUDA-graph capture "
                           "(call selector_consts(...) or run one eager decode step first)")
    row = [-1] * heads.num_heads
    for i, h in enumerate(heads.selected):
        row[h] = i
    return SelectConsts(torch.tensor(row, dtype=torch.int32, device=device),
                        decode_count_table(heads, max_pages).to(device), heads.num_heads, len(heads.selected),
                        max_selected_pages(heads, max_pages), max_pages)


def selector_consts(heads: LayerHeads, device, max_pages: int) -> SelectConsts:
    """Cached per ``(heads, device, max_pages)``; build it before CUDA-graph capture (raises inside)."""
    return _consts(heads, str(torch.device(device)), int(max_pages))


def select_scratch(batch: int, consts: SelectConsts, device=None) -> torch.Tensor:
    """Score scratch of :func:`update_and_select_pages`: fp32 ``[batch, max(S, 1), max_pages]`` (any buffer
    with at least these sizes and a unit last stride works; allocate it once for the largest graph batch)."""
    return torch.empty(batch, max(consts.num_sel, 1), consts.max_pages, dtype=torch.float32,
                       device=device if device is not None else consts.sel.device)


def update_and_select_pages(q: torch.Tensor, k_buffer: torch.Tensor, req_to_token: torch.Tensor,
                            req_pool_indices: torch.Tensor, seq_lens: torch.Tensor, kmin: torch.Tensor,
                            kmax: torch.Tensor, consts: SelectConsts, max_pages: int, page_idx: torch.Tensor,
                            page_cnt: torch.Tensor, scratch: torch.Tensor | None = None):
    """``update_page_summaries(k_buffer, req_to_token, req_pool_indices, seq_lens, kmin, kmax)`` then
    ``select_pages(heads, q, kmin, kmax, req_to_token, req_pool_indices, seq_lens, max_pages,
    out=(page_idx, page_cnt))``
    in two launches. ``q [B, Hq, d]``, ``k_buffer [T, Hkv, d]``, ``kmin/kmax [pool pages + 1, Hkv, d]``,
    ``page_idx [B, Hq, >=min(MAXSEL, max_pages)]``, ``page_cnt [B, Hq]`` (int32), ``consts`` from
    :func:`selector_consts` (same ``max_pages``), ``scratch`` from :func:`select_scratch` (allocated here when
    None). Same ``kmin/kmax`` and ``page_cnt`` as the torch pair; ``page_idx[b, h, :cnt]`` holds the same page
    set in ascending order (exact ties: lowest page ids), entries past ``cnt`` and rows of non-selected heads
    are not written. Every ``page_cnt`` entry is written (0 for non-selected heads). Assumes
    ``1 <= seq_lens <= max_pages * 64``. No allocation (with ``scratch``), no host sync."""
    bsz, hq, d = q.shape
    hkv = k_buffer.shape[1]
    if hq != consts.num_heads or hq % hkv or consts.max_pages != max_pages:
        raise ValueError(f"consts are for {consts.num_heads} heads / {consts.max_pages} pages, "
                         f"got q {tuple(q.shape)}, {hkv} KV heads, max_pages {max_pages}")
    if kmin.dim() != 3 or kmin.shape != kmax.shape or kmin.stride() != kmax.stride() or kmin.shape[1:] != (hkv, d):
        raise ValueError(f"kmin {tuple(kmin.shape)} / kmax {tuple(kmax.shape)} are not pool-page summaries "
                         f"[pool pages + 1, {hkv}, {d}]")
    if page_idx.shape[:2] != (bsz, hq) or page_cnt.shape != (bsz, hq) or \
            page_idx.shape[2] < min(consts.maxsel, max_pages):
        raise ValueError(f"page_idx {tuple(page_idx.shape)} / page_cnt {tuple(page_cnt.shape)} do not fit "
                         f"({bsz}, {hq}, {min(consts.maxsel, max_pages)})")
    if k_buffer.stride(2) != 1 or q.stride(2) != 1 or req_to_token.stride(1) != 1 or page_idx.stride(2) != 1:
        raise ValueError("k_buffer, q, req_to_token and page_idx need a unit last stride")
    if d & (d - 1):
        raise ValueError(f"head_dim must be a power of two, got {d}")
    if scratch is None:
        scratch = select_scratch(bsz, consts, q.device)
    elif scratch.shape[0] < bsz or scratch.shape[1] < max(consts.num_sel, 1) or scratch.shape[2] < max_pages \
            or scratch.dtype != torch.float32 or scratch.stride(2) != 1:
        raise ValueError(f"scratch {tuple(scratch.shape)} {scratch.dtype} is smaller than select_scratch's")
    upd_score, sel = _kernels()
    p2 = 1 << max(0, (max_pages - 1).bit_length())
    tp = min(p2, max(16, 4096 // d))                       # [TP, d] fp32 tiles of kmin and kmax, one per program
    upd_score[(bsz, hkv, -(-max_pages // tp))](
        q, k_buffer, kmin, kmax, req_to_token, req_pool_indices, seq_lens, consts.sel, scratch,
        k_buffer.stride(0), k_buffer.stride(1), req_to_token.stride(0), q.stride(0), q.stride(1),
        kmin.stride(0), kmin.stride(1), kmin.stride(2), scratch.stride(0), scratch.stride(1),
        max_pages, GROUP=hq // hkv, PAGE=BLOCK, D=d, TP=tp)
    sel[(bsz, hq)](req_pool_indices, seq_lens, consts.sel, consts.cnt_table, scratch, page_idx, page_cnt,
                   scratch.stride(0), scratch.stride(1), page_idx.stride(0), page_idx.stride(1),
                   page_cnt.stride(0), page_cnt.stride(1), max_pages, PAGE=BLOCK, P2=p2)
    return page_idx, page_cnt
