"""Fused page-summary update + Quest page selection (+ the union lists) for sparse paged decode: one Triton
launch that does what :func:`~.triton_decode.update_page_summaries` followed by
:func:`~.triton_decode.select_pages` do (about 40 small torch kernels per layer), and optionally the page-union
launch of :func:`~.triton_decode.group_decode`; fixed-shape and sync-free for CUDA graphs.

Grid ``(B, Hkv, page tiles)``:

* program ``(b, hk, 0)`` folds the key at position ``seq_len - 1`` into its page's ``kmin/kmax`` (the first
  token of a page resets it). Every program then loads one tile of pages among ``0 .. npg-2`` of KV head
  ``hk`` once and scores it for each top-k / vertical-slash q head of the group
  (``score_p = sum_d max(q_d kmin_pd, q_d kmax_pd)`` in fp32, page 0 = +inf) into ``scratch``.
  The summaries are indexed by KV-pool page (:func:`~.triton_decode.alloc_page_summaries`): page ``j`` of a
  request is pool page ``req_to_token[req, 64j] // 64``. The update writes page ``npg-1``, which is never
  scored and which no other request holds (a partial page is not shared), so the two parts do not race.
  SGLang's CUDA-graph padding rows (``seq_len`` ≤ 1) write nothing and score nothing.
* each program then counts itself in an atomic counter of its (request, KV head) (as the split-K combine of
  the decode kernel does); the last tile program to finish selects for all the group's q heads at once: per
  head the ``cnt``-th largest score by a 32-step bisection on an order-preserving int32 key (rows = heads),
  the ``cnt`` chosen page ids written in ASCENDING order (ties at the threshold: lowest ids). Other heads
  write ``page_cnt = 0`` (so the caller need not zero ``page_cnt``); their ``page_idx`` rows and the
  entries past ``cnt`` are left untouched. With the union on, the same program writes the group's union
  list (pages and per-head bit masks) when the KV head walks a list, and zeroes the counter.
* with kept selections (:class:`KeptSelections`, LServe's reusable page selector), a (request, KV head) whose
  selection is not due (:func:`~sglang_shplb.core.patterns.reselect_due` on its request slot's stamp) skips the
  scoring, the bisection and the wait for the other tiles: its first tile program takes the pages the slot kept
  (a bit mask per selected head) and builds the same outputs from them; a fresh selection is kept with the
  context it was made at.
"""
from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import torch

from sglang_shplb.core.patterns import BLOCK, DECODE_RESELECT_EVERY
from sglang_shplb.kernels import triton_decode
from sglang_shplb.kernels.layer_heads import LayerHeads
from sglang_shplb.kernels.triton_decode import (DecodeScratch, PageRules, decode_count_table,
                                                max_selected_pages)


@lru_cache(maxsize=None)
def _kernels():
    from sglang_shplb.kernels._triton_compat import import_triton
    triton, tl = import_triton()
    triton_decode._kernels()   # defines the page rule the union lists follow (_stream_span, _reads_page)
    globals().update(_stream_span=triton_decode._stream_span, _reads_page=triton_decode._reads_page, tl=tl)

    @triton.jit
    def _reselect_due(n, n_sel, every, PAGE: tl.constexpr):
        # core.patterns.reselect_due: no kept selection, another request's, `every` steps old, or the page count moved
        return (every <= 1) | (n_sel <= 0) | (n < n_sel) | (n - n_sel >= every) | \
            ((n + PAGE - 1) // PAGE != (n_sel + PAGE - 1) // PAGE)

    @triton.jit
    def _select_group(SEQ, SEL, CNT, SCR, PIDX, PCNT, MODE, SINK, WIN, GMODE, ULIST, UBITS, UCNT, KBITS, KSTAMP,
                      s_sb, s_ss, s_pb, s_ph, s_cb, s_ch, s_ub, s_uh, s_kr, s_ks, s_kt, b, hk, r, fresh, HKV, MAXP,
                      GROUP: tl.constexpr, GP2: tl.constexpr, PAGE: tl.constexpr, P2: tl.constexpr,
                      UNION: tl.constexpr, KEEP: tl.constexpr, BW: tl.constexpr):
        # rows = the GROUP q heads of KV head hk (padded to GP2), columns = pages 0 .. P2-1. fresh: select anew
        # (else, KEEP, the rows take the pages request slot r kept, as bit masks of BW-page words)
        rows = tl.arange(0, GP2)
        rv = rows < GROUP
        h = hk * GROUP + rows
        n = tl.load(SEQ + b).to(tl.int32)
        npg = (n + PAGE - 1) // PAGE
        nv = tl.minimum(npg - 1, MAXP)                                          # candidates 0 .. npg-2
        # pages to list (decode budget - 1, decode_count_table; 0 for heads that do not select)
        cnt = tl.load(CNT + h * (MAXP + 1) + tl.minimum(tl.maximum(npg, 0), MAXP), mask=rv, other=0)
        p = tl.arange(0, P2)
        act = cnt > 0                                                          # selecting rows (SEL >= 0)
        srow = tl.load(SEL + h, mask=rv, other=0)
        valid = act[:, None] & (p < nv)[None, :]
        x = tl.load(SCR + b * s_sb + srow[:, None] * s_ss + p[None, :], mask=valid & fresh, other=0.0,
                    cache_modifier=".cg")
        # order-preserving int32 key: negative floats get their magnitude bits flipped
        bits = x.to(tl.int32, bitcast=True)
        key = tl.where(valid, bits ^ ((bits >> 31) & 0x7FFFFFFF), -2147483648)
        # per row a thr whose kept set {key > thr} + the lowest-id {key == thr} is the cnt largest: bisection on
        # [lo, hi] (int64) for the largest thr with #{key >= thr} >= cnt, at most 32 steps; a row stops early
        # once #{key >= mid} == cnt exactly (then {key >= mid} is that set; about log2(pages) + a few steps)
        lo_t = tl.full([GP2], -2147483648, tl.int64)
        hi_t = tl.where(act & fresh, tl.full([GP2], 2147483647, tl.int64), lo_t)   # rows that do not select: done
        while tl.max(hi_t - lo_t, axis=0) > 0:
            mid = (lo_t + hi_t + 1) >> 1
            c = tl.sum((key >= mid.to(tl.int32)[:, None]).to(tl.int32), axis=1)
            ok = c >= cnt
            lo_t = tl.where(ok, mid, lo_t)
            hi_t = tl.where(c == cnt, mid, tl.where(ok, hi_t, mid - 1))
        thr = lo_t.to(tl.int32)[:, None]
        # all keys > thr (fewer than cnt), then the lowest page ids among keys == thr up to cnt
        gt = key > thr
        eq = key == thr
        need = cnt - tl.sum(gt.to(tl.int32), axis=1)
        keep = (gt | (eq & (tl.cumsum(eq.to(tl.int32), axis=1) <= need[:, None]))) & act[:, None]
        if KEEP:
            kw = KBITS + r * s_kr + srow[:, None] * s_ks
            held = tl.load(kw + (p // BW)[None, :], mask=valid & (fresh == 0), other=0)
            keep = tl.where(fresh, keep, (((held >> (p % BW)[None, :]) & 1) != 0) & valid)
            if fresh & (n >= 2):   # keep this selection (CUDA-graph padding rows, seq_len < 2, keep nothing)
                kbits = tl.reshape(keep.to(tl.int32) << (p % BW)[None, :], [GP2, P2 // BW, BW])
                words = tl.sum(kbits, axis=2)                                      # distinct bits: sum = or
                tl.store(kw + tl.arange(0, P2 // BW)[None, :], words, mask=act[:, None])
                tl.store(KSTAMP + r * s_kt + hk, n)
        slot = tl.cumsum(keep.to(tl.int32), axis=1) - 1                      # ascending page ids
        tl.store(PIDX + b * s_pb + h[:, None] * s_ph + slot, p[None, :] + 0 * slot, mask=keep)
        tl.store(PCNT + b * s_cb + h * s_ch, cnt, mask=rv)
        if UNION:
            if tl.load(GMODE + hk) == 2:
                # the group's union list (as _page_union_kernel): page p, bit r set iff head hk*GROUP + r
                # reads it (triton_decode's page rule, the kept pages as the selected heads' list)
                md = tl.load(MODE + h, mask=rv, other=-1)[:, None]
                n_s, w_eff = _stream_span(tl.load(SINK + h, mask=rv, other=0), tl.load(WIN + h, mask=rv, other=0),
                                          npg)
                pp = p[None, :]
                use = _reads_page(md, n_s[:, None], w_eff[:, None], keep, pp, npg) & (pp < npg) & rv[:, None]
                ub = tl.sum(use.to(tl.int32) << rows[:, None], axis=0)           # distinct bits: sum = or
                nz = ub != 0
                us = tl.cumsum(nz.to(tl.int32), axis=0) - 1
                off = b * s_ub + hk * s_uh + us
                tl.store(ULIST + off, p, mask=nz)
                tl.store(UBITS + off, ub, mask=nz)
                tl.store(UCNT + b * HKV + hk, tl.sum(nz.to(tl.int32), axis=0))

    @triton.jit
    def _select_fit(SEQ, SEL, CNT, SCR, PIDX, PCNT, MODE, SINK, WIN, GMODE, ULIST, UBITS, UCNT, KBITS, KSTAMP,
                    s_sb, s_ss, s_pb, s_ph, s_cb, s_ch, s_ub, s_uh, s_kr, s_ks, s_kt, b, hk, r, fresh, HKV, MAXP,
                    GROUP: tl.constexpr, GP2: tl.constexpr, PAGE: tl.constexpr, P2: tl.constexpr,
                    P2A: tl.constexpr, P2B: tl.constexpr, UNION: tl.constexpr, KEEP: tl.constexpr,
                    BW: tl.constexpr):
        # the bisection, the kept bits and the union list cost in proportion to their columns: a request of npg
        # pages takes the narrowest of P2A <= P2B <= P2 (the layer's most pages, rounded up) that holds them, so
        # a server sized for 128K selects for a 32K request over 1024 columns, not 4096 (bench/decode.py
        # --server-ctx). The kept words keep their width BW: a narrower call writes the first P2A / BW of them,
        # and the width changes only with npg, which selects anew.
        npg = (tl.load(SEQ + b).to(tl.int32) + PAGE - 1) // PAGE
        if npg <= P2A:
            _select_group(SEQ, SEL, CNT, SCR, PIDX, PCNT, MODE, SINK, WIN, GMODE, ULIST, UBITS, UCNT, KBITS, KSTAMP,
                          s_sb, s_ss, s_pb, s_ph, s_cb, s_ch, s_ub, s_uh, s_kr, s_ks, s_kt, b, hk, r, fresh, HKV,
                          MAXP, GROUP, GP2, PAGE, P2A, UNION, KEEP, BW)
        elif npg <= P2B:
            _select_group(SEQ, SEL, CNT, SCR, PIDX, PCNT, MODE, SINK, WIN, GMODE, ULIST, UBITS, UCNT, KBITS, KSTAMP,
                          s_sb, s_ss, s_pb, s_ph, s_cb, s_ch, s_ub, s_uh, s_kr, s_ks, s_kt, b, hk, r, fresh, HKV,
                          MAXP, GROUP, GP2, PAGE, P2B, UNION, KEEP, BW)
        else:
            _select_group(SEQ, SEL, CNT, SCR, PIDX, PCNT, MODE, SINK, WIN, GMODE, ULIST, UBITS, UCNT, KBITS, KSTAMP,
                          s_sb, s_ss, s_pb, s_ph, s_cb, s_ch, s_ub, s_uh, s_kr, s_ks, s_kt, b, hk, r, fresh, HKV,
                          MAXP, GROUP, GP2, PAGE, P2, UNION, KEEP, BW)

    globals().update(_select_group=_select_group, _select_fit=_select_fit,   # jit callees resolve via globals
                     _reselect_due=_reselect_due)

    @triton.jit
    def _update_select_kernel(Q, K, KMIN, KMAX, R2T, RPI, SEQ, SEL, CNT, SCR, DONE, PIDX, PCNT,
                              MODE, SINK, WIN, GMODE, ULIST, UBITS, UCNT, KBITS, KSTAMP, ROUTE,
                              s_kt, s_kh, s_rt, s_qb, s_qh, s_mp, s_mh, s_md, s_sb, s_ss,
                              s_pb, s_ph, s_cb, s_ch, s_ub, s_uh, s_kr, s_ks, s_kst, HKV, MAXP, NT, EVERY,
                              GROUP: tl.constexpr, GP2: tl.constexpr, PAGE: tl.constexpr, D: tl.constexpr,
                              TP: tl.constexpr, P2: tl.constexpr, P2A: tl.constexpr, P2B: tl.constexpr,
                              UNION: tl.constexpr, KEEP: tl.constexpr, BW: tl.constexpr, HAS_ROUTE: tl.constexpr):
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
        n = tl.load(SEQ + b).to(tl.int32)
        nv = tl.minimum((n + PAGE - 1) // PAGE - 1, MAXP)                            # pages 0 .. npg-2
        fresh = n > -1
        if KEEP:   # a kept selection that is still due skips the scoring and the bisection
            fresh = _reselect_due(n, tl.load(KSTAMP + r * s_kst + hk), EVERY, PAGE)
        go = n > -1
        if HAS_ROUTE:   # the step runs the layer dense: the summary update above only
            go = tl.load(ROUTE) == 0
        fresh = fresh & go
        p = t * TP + tl.arange(0, TP)
        m = p < nv
        if (t * TP < nv) & fresh:
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
        if fresh:
            # the last of the NT tile programs of (b, hk) to finish selects for the group's heads (and builds
            # its union list); the release/acquire pair makes the other tiles' scores visible to it
            tl.debug_barrier()
            done = tl.atomic_add(DONE + b * HKV + hk, 1, sem="acq_rel", scope="gpu")
            if done == NT - 1:
                _select_fit(SEQ, SEL, CNT, SCR, PIDX, PCNT, MODE, SINK, WIN, GMODE, ULIST, UBITS, UCNT, KBITS,
                            KSTAMP, s_sb, s_ss, s_pb, s_ph, s_cb, s_ch, s_ub, s_uh, s_kr, s_ks, s_kst, b, hk, r,
                            fresh, HKV, MAXP, GROUP, GP2, PAGE, P2, P2A, P2B, UNION, KEEP, BW)
                tl.store(DONE + b * HKV + hk, 0)   # the next launch (next layer, next step, replay) starts at 0
        elif (t == 0) & go:   # a kept selection: no scores to wait for; the first tile builds the outputs from it
            _select_fit(SEQ, SEL, CNT, SCR, PIDX, PCNT, MODE, SINK, WIN, GMODE, ULIST, UBITS, UCNT, KBITS,
                        KSTAMP, s_sb, s_ss, s_pb, s_ph, s_cb, s_ch, s_ub, s_uh, s_kr, s_ks, s_kst, b, hk, r,
                        fresh, HKV, MAXP, GROUP, GP2, PAGE, P2, P2A, P2B, UNION, KEEP, BW)

    return _update_select_kernel


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


class SelectScratch(NamedTuple):
    """Scratch of :func:`update_and_select_pages` (:func:`select_scratch`)."""
    scores: torch.Tensor     # fp32 [batch, max(S, 1), max_pages]: page scores of the selected heads
    done: torch.Tensor       # int32 [batch, Hkv]: finished score tiles per (request, KV head), zero between calls

    @staticmethod
    def alloc(batch: int, num_selected: int, max_pages: int, num_kv_heads: int, device) -> "SelectScratch":
        """For up to ``batch`` requests, ``num_selected`` selected heads and ``max_pages`` pages (the counters
        start at zero; each call leaves them so)."""
        return SelectScratch(torch.empty(batch, max(num_selected, 1), max_pages, dtype=torch.float32, device=device),
                             torch.zeros(batch, num_kv_heads, dtype=torch.int32, device=device))


def select_scratch(batch: int, consts: SelectConsts, num_kv_heads: int, device=None) -> SelectScratch:
    """Scratch of :func:`update_and_select_pages` for up to ``batch`` requests (allocate it once, before CUDA-graph
    capture, for the largest graph batch; larger buffers work)."""
    return SelectScratch.alloc(batch, consts.num_sel, consts.max_pages, num_kv_heads,
                               device if device is not None else consts.sel.device)


def _pow2_pages(max_pages: int) -> int:
    return 1 << max(0, (max_pages - 1).bit_length())


# the narrowest selection width _select_fit calls (columns; a multiple of every _word_pages)
MIN_SELECT_WIDTH = 256


def _narrower(p2: int, factor: int) -> int:
    """A narrower width of :func:`_select_fit` for ``p2`` pages: ``p2 / factor``, at least
    ``min(MIN_SELECT_WIDTH, p2)``."""
    return max(p2 // factor, min(MIN_SELECT_WIDTH, p2))


def _word_pages(p2: int) -> int:
    """``BW``: pages per int32 word of :class:`KeptSelections` at ``p2`` pages (a power of two)."""
    return min(32, p2)


class KeptSelections(NamedTuple):
    """The page selections one layer keeps between decode steps, per request slot (a row of ``req_to_token``):
    what :func:`update_and_select_pages` reuses while :func:`~sglang_shplb.core.patterns.reselect_due` allows.
    ``bits [slots, S, words]``: bit ``p % BW`` of word ``p // BW`` set iff selected head row ``s`` kept page ``p``
    (``BW = min(32, P2)``, ``P2`` the page count rounded up to a power of two); ``stamp [slots, Hkv]``: the context
    at which the slot's KV head chose them (0: none). :meth:`forget` the slots an extend (re)fills."""
    bits: torch.Tensor       # int32 [slots, max(S, 1), P2 / BW]
    stamp: torch.Tensor      # int32 [slots, Hkv]
    every: int               # steps a selection is kept (> 1)

    @staticmethod
    def alloc(slots: int, num_selected: int, max_pages: int, num_kv_heads: int,
              every: int = DECODE_RESELECT_EVERY, device=None) -> "KeptSelections":
        if every < 2:
            raise ValueError(f"kept selections need every >= 2 (1 selects at every step), got {every}")
        p2 = _pow2_pages(max_pages)
        return KeptSelections(torch.zeros(slots, max(num_selected, 1), p2 // _word_pages(p2), dtype=torch.int32,
                                          device=device),
                              torch.zeros(slots, num_kv_heads, dtype=torch.int32, device=device), int(every))

    def forget(self, slots: torch.Tensor) -> None:
        """Drop the selections of these request slots (device indices, sync-free)."""
        self.stamp.index_fill_(0, slots.long(), 0)

    @property
    def nbytes(self) -> int:
        return self.bits.numel() * 4 + self.stamp.numel() * 4


def select_warps(p2: int, batch: int) -> int:
    """Warps of the selector launch at ``p2`` pages (the page count rounded up to a power of two) and ``batch``
    requests: the last tile program of each (request, KV head) bisects ``[group, p2]`` keys alone. Measured on an
    H200 (2026-12-03, Llama-3-8B layer, 16K / 64K, ``max_pages`` 257-2048): 8 warps 4-24 % faster than 4 at
    batch 1 from 512 pages, 4 better at batch 4 (more programs share the SMs); 16 slower everywhere."""
    return 8 if p2 >= 512 and batch <= 2 else 4


def update_and_select_pages(q: torch.Tensor, k_buffer: torch.Tensor, req_to_token: torch.Tensor,
                            req_pool_indices: torch.Tensor, seq_lens: torch.Tensor, kmin: torch.Tensor,
                            kmax: torch.Tensor, consts: SelectConsts, max_pages: int, page_idx: torch.Tensor,
                            page_cnt: torch.Tensor, scratch: SelectScratch | None = None,
                            union: tuple[PageRules, DecodeScratch] | None = None, num_warps: int | None = None,
                            kept: KeptSelections | None = None, route: torch.Tensor | None = None):
    """``update_page_summaries(k_buffer, req_to_token, req_pool_indices, seq_lens, kmin, kmax)`` then
    ``select_pages(heads, q, kmin, kmax, req_to_token, req_pool_indices, seq_lens, max_pages,
    out=(page_idx, page_cnt))`` in one launch; with ``union = (rules, decode_scratch)`` also the union lists
    of the layer's list-mode KV heads that :func:`~.triton_decode.group_decode` reads (what its page-union
    launch makes; then call it with ``union_built=True``).
    ``q [B, Hq, d]``, ``k_buffer [T, Hkv, d]``, ``kmin/kmax [pool pages + 1, Hkv, d]``,
    ``page_idx [B, Hq, >=min(MAXSEL, max_pages)]``, ``page_cnt [B, Hq]`` (int32), ``consts`` from
    :func:`selector_consts` (same ``max_pages``), ``scratch`` from :func:`select_scratch` (allocated here when
    None). Same ``kmin/kmax`` and ``page_cnt`` as the torch pair; ``page_idx[b, h, :cnt]`` holds the same page
    set in ascending order (exact ties: lowest page ids), entries past ``cnt`` and rows of non-selected heads
    are not written. Every ``page_cnt`` entry is written (0 for non-selected heads). ``kept``: a
    :class:`KeptSelections` of this layer (same heads and ``max_pages``): a (request, KV head) whose kept selection is
    not due reuses it instead of selecting (every output as if selected then); None selects at every call.
    ``route``: an int32 device scalar read when the kernel runs (:func:`~.triton_decode.group_decode`'s); nonzero
    folds the new key into the summaries and selects nothing (the outputs are not written). Assumes
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
        scratch = select_scratch(bsz, consts, hkv, q.device)
    sc = scratch.scores
    if sc.shape[0] < bsz or sc.shape[1] < max(consts.num_sel, 1) or sc.shape[2] < max_pages \
            or sc.dtype != torch.float32 or sc.stride(2) != 1 or scratch.done.shape[0] < bsz \
            or scratch.done.shape[1] != hkv or not scratch.done.is_contiguous():
        raise ValueError(f"scratch {tuple(sc.shape)} {sc.dtype} / done {tuple(scratch.done.shape)} is smaller "
                         "than select_scratch's")
    if union is not None:
        rules, ds = union
        if rules.mode.shape != (hq,) or rules.gmode.shape != (hkv,) or ds.batch < bsz or ds.hkv != hkv \
                or ds.max_pages < max_pages:
            raise ValueError(f"union: page rules for {rules.mode.shape[0]} / {rules.gmode.shape[0]} heads or a "
                             f"decode scratch for {ds.batch} x {ds.hkv} x {ds.max_pages} pages do not fit "
                             f"{bsz} x {hq} / {hkv} x {max_pages}")
        umode, usink, uwin, ugm = rules.mode, rules.sink, rules.window, rules.gmode
        ulist, ubits, ucnt = ds.ulist, ds.ubits, ds.ucnt
    else:      # unused (UNION=False): any int32 tensors
        umode = usink = uwin = ugm = ulist = ubits = ucnt = consts.sel
    p2 = _pow2_pages(max_pages)
    if kept is not None:
        kb = kept.bits
        if kb.shape[0] != req_to_token.shape[0] or kb.shape[1] < max(consts.num_sel, 1) \
                or kb.shape[2] != p2 // _word_pages(p2) or kept.stamp.shape != (kb.shape[0], hkv) \
                or not kb.is_contiguous() or not kept.stamp.is_contiguous():
            raise ValueError(f"kept selections {tuple(kb.shape)} / stamp {tuple(kept.stamp.shape)} do not fit "
                             f"{req_to_token.shape[0]} request slots x {consts.num_sel} heads x {p2} pages, "
                             f"{hkv} KV heads")
        kstamp, every = kept.stamp, kept.every
    else:      # unused (KEEP=False)
        kb = kstamp = consts.sel
        every = 1
    kern = _kernels()
    group = hq // hkv
    tp = min(p2, max(16, 4096 // d))                       # [TP, d] fp32 tiles of kmin and kmax, one per program
    nt = -(-max_pages // tp)
    kern[(bsz, hkv, nt)](
        q, k_buffer, kmin, kmax, req_to_token, req_pool_indices, seq_lens, consts.sel, consts.cnt_table, sc,
        scratch.done, page_idx, page_cnt, umode, usink, uwin, ugm, ulist, ubits, ucnt, kb, kstamp,
        route if route is not None else consts.sel,
        k_buffer.stride(0), k_buffer.stride(1), req_to_token.stride(0), q.stride(0), q.stride(1),
        kmin.stride(0), kmin.stride(1), kmin.stride(2), sc.stride(0), sc.stride(1),
        page_idx.stride(0), page_idx.stride(1), page_cnt.stride(0), page_cnt.stride(1),
        ulist.stride(0) if union is not None else 0, ulist.stride(1) if union is not None else 0,
        kb.stride(0) if kept is not None else 0, kb.stride(1) if kept is not None else 0,
        kstamp.stride(0) if kept is not None else 0,
        hkv, max_pages, nt, every, GROUP=group, GP2=max(2, 1 << (group - 1).bit_length()), PAGE=BLOCK, D=d, TP=tp,
        P2=p2, P2A=_narrower(p2, 4), P2B=_narrower(p2, 2), UNION=union is not None, KEEP=kept is not None,
        BW=_word_pages(p2), HAS_ROUTE=route is not None,
        num_warps=num_warps or select_warps(p2, bsz))
    return page_idx, page_cnt
