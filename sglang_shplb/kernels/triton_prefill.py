"""Triton prefill / extend kernel: causal attention where each (sequence, query head, query block) reads
its own list of 64-token KV blocks (:mod:`.index`).

One program = one 64-row query block of one head. Flash attention with an online softmax in base 2:

    s_j = (q · k_j) * scale * log2(e)
    m'  = max(m, max_j s_j);   alpha = 2^(m - m');   p_j = 2^(s_j - m')
    l   = alpha * l + sum_j p_j;   acc = alpha * acc + p · V;   m = m'
    o   = acc / l

Listed blocks are ascending, so the diagonal block is the last one: all earlier blocks lie fully inside
``[0, n_kv)`` and before every query row, and only the diagonal needs the causal/bounds mask. Dense heads
walk ``0..qi-1`` without index loads. Dense and streaming heads have a 128-row kernel of their own
(:func:`rule_prefill`, no index), and top-k heads of 128-token superblocks one of 128 x 128 tiles
(:func:`tile_prefill`). Triton is imported on first use (tests set ``TRITON_INTERPRET=1``).
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch

from sglang_shplb.core.patterns import BLOCK
from sglang_shplb.kernels.checks import check_qkv
from sglang_shplb.kernels.tuned import KERNEL_KEYS, tuned_config
from sglang_shplb.kernels.triton_jit import length_free_jit

LOG2E = 1.4426950408889634


@lru_cache(maxsize=None)
def _shared_jit() -> None:
    """jit helpers of the three prefill kernels, put in the module's globals (where jit functions resolve
    their callees): a sequence's bounds, its query tile, its KV row table, the output store."""
    from sglang_shplb.kernels._triton_compat import import_triton
    triton, tl = import_triton()

    @triton.jit
    def _seq_bounds(cu_q, kv_lens, b):
        """(first row of sequence b in Q, its KV length, the cached prefix before its queries)."""
        q_start = tl.load(cu_q + b)
        n_kv = tl.load(kv_lens + b)
        return q_start, n_kv, n_kv - (tl.load(cu_q + b + 1) - q_start)

    @triton.jit
    def _q_tile(Q, q_start, offs_m, prefix, n_kv, h, stride_qt, stride_qh, offs_d, DOT_F32: tl.constexpr):
        """The queries at absolute positions offs_m (zero outside [prefix, n_kv)), their rows in Q, the row mask."""
        m_valid = (offs_m >= prefix) & (offs_m < n_kv)
        q_rows = q_start + offs_m - prefix
        q = tl.load(Q + q_rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                    mask=m_valid[:, None], other=0.0)
        if DOT_F32:  # the CPU interpreter's bf16 dot is wrong: compute in float32 there
            q = q.to(tl.float32)
        return q, q_rows, m_valid

    @triton.jit
    def _kv_rows(req_to_token, req_pool_idx, stride_r2t, cu_k, b, PAGED: tl.constexpr):
        """(row table, row offset) of sequence b's K/V: its req_to_token row (paged), or the table as given
        and the sequence's first KV row (contiguous)."""
        r2t = req_to_token
        kv_base = 0
        if PAGED:
            r2t = req_to_token + tl.load(req_pool_idx + b).to(tl.int64) * stride_r2t
        else:
            kv_base = tl.load(cu_k + b)
        return r2t, kv_base

    @triton.jit
    def _store_o(O, o, q_rows, m_valid, h, stride_ot, stride_oh, offs_d):
        tl.store(O + q_rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
                 o.to(O.dtype.element_ty), mask=m_valid[:, None])

    globals().update(_seq_bounds=_seq_bounds, _q_tile=_q_tile, _kv_rows=_kv_rows, _store_o=_store_o)


@lru_cache(maxsize=None)
def _kernel(autotune: bool):
    """The block-index kernel: one listed 64-token KV block per step (the 128-wide tile of two listed blocks
    lost its benchmark, ``bench/results/kernels_round3.md``)."""
    from sglang_shplb.kernels._triton_compat import import_triton
    triton, tl = import_triton()
    _shared_jit()

    @triton.jit
    def _listed(idx_row, j, dense):
        # KV block of list entry j (dense heads: j itself, no index load)
        return dense * j + (1 - dense) * tl.load(idx_row + j, mask=dense == 0, other=0)

    @triton.jit
    def _tile(acc, m_i, l_i, q, k_ptr, v_ptr, r2t, kv_base, offs_n, offs_m, n_kv, stride_kt, stride_vt,
              qk_scale, MASK: tl.constexpr, PAGED: tl.constexpr, DOT_F32: tl.constexpr):
        # one online-softmax step over the KV positions offs_n: a whole listed block before every row (no
        # mask), or MASK: the diagonal block (token-causal, < n_kv)
        if MASK:
            n_valid = offs_n < n_kv
            if PAGED:
                loc = tl.load(r2t + offs_n, mask=n_valid, other=0).to(tl.int64)
            else:
                loc = (kv_base + offs_n).to(tl.int64)
            k = tl.load(k_ptr + loc[:, None] * stride_kt, mask=n_valid[:, None], other=0.0)
        else:
            if PAGED:
                loc = tl.load(r2t + offs_n).to(tl.int64)
            else:
                loc = (kv_base + offs_n).to(tl.int64)
            k = tl.load(k_ptr + loc[:, None] * stride_kt)
        if DOT_F32:  # the CPU interpreter's bf16 dot is wrong: compute in float32 there
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        if MASK:   # every row keeps >= 1 column (the diagonal's first): m_new is finite
            ok = n_valid[None, :] & (offs_n[None, :] <= offs_m[:, None])
            s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASK:
            v = tl.load(v_ptr + loc[:, None] * stride_vt, mask=n_valid[:, None], other=0.0)
        else:
            v = tl.load(v_ptr + loc[:, None] * stride_vt)
        if DOT_F32:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        return acc, m_new, l_i

    globals()["_index_listed"] = _listed   # jit functions resolve callees through the module's globals
    globals()["_index_tile"] = _tile

    def _index_prefill_kernel(
        Q, K, V, O,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
        cu_q, kv_lens, cu_k, req_to_token, req_pool_idx, stride_r2t,
        block_idx, block_cnt, head_dense,
        s_bi_b, s_bi_h, s_bi_q, s_bc_b, s_bc_h,
        qk_scale, HQ, heads, NH, Q_BUCKET,   # Q_BUCKET: an autotune key only
        GROUP: tl.constexpr, BLOCK_M: tl.constexpr, D: tl.constexpr,
        PAGED: tl.constexpr, DOT_F32: tl.constexpr, HEAD_MAP: tl.constexpr,
    ):
        jq = tl.num_programs(0) - 1 - tl.program_id(0)   # query block rel. to the chunk's first; longest rows first
        bh = tl.program_id(1)
        b = bh // NH
        h = bh % NH
        if HEAD_MAP:
            h = tl.load(heads + h)
        hk = h // GROUP
        q_start, n_kv, prefix = _seq_bounds(cu_q, kv_lens, b)
        qi = prefix // BLOCK_M + jq               # absolute query block
        if qi * BLOCK_M < n_kv:
            offs_d = tl.arange(0, D)
            ar = tl.arange(0, BLOCK_M)
            offs_m = qi * BLOCK_M + ar            # absolute positions of the rows
            q, q_rows, m_valid = _q_tile(Q, q_start, offs_m, prefix, n_kv, h, stride_qt, stride_qh, offs_d, DOT_F32)
            r2t, kv_base = _kv_rows(req_to_token, req_pool_idx, stride_r2t, cu_k, b, PAGED)
            dense = (tl.load(head_dense + h) != 0).to(tl.int32)
            cnt = tl.load(block_cnt + b * s_bc_b + h * s_bc_h + qi)
            n_off = dense * qi + (1 - dense) * (cnt - 1)     # off-diagonal blocks (the diagonal is listed last)
            idx_row = block_idx + b * s_bi_b + h * s_bi_h + qi * s_bi_q
            k_ptr = K + hk * stride_kh + offs_d[None, :]
            v_ptr = V + hk * stride_vh + offs_d[None, :]

            m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_M], tl.float32)
            acc = tl.zeros([BLOCK_M, D], tl.float32)
            for it in range(0, n_off):
                kb = _index_listed(idx_row, it, dense)
                acc, m_i, l_i = _index_tile(acc, m_i, l_i, q, k_ptr, v_ptr, r2t, kv_base, kb * BLOCK_M + ar,
                                            offs_m, n_kv, stride_kt, stride_vt, qk_scale, False, PAGED, DOT_F32)
            # diagonal block qi, token-causal and bounded by n_kv
            acc, m_i, l_i = _index_tile(acc, m_i, l_i, q, k_ptr, v_ptr, r2t, kv_base, qi * BLOCK_M + ar,
                                        offs_m, n_kv, stride_kt, stride_vt, qk_scale, True, PAGED, DOT_F32)
            o = acc / l_i[:, None]
            _store_o(O, o, q_rows, m_valid, h, stride_ot, stride_oh, offs_d)

    kern = length_free_jit(triton)(_index_prefill_kernel)
    if autotune:
        kern = triton.autotune(_index_configs(triton), key=list(KERNEL_KEYS["index"]))(kern)
    return kern


def _launch(kernel: str, key: tuple, q: torch.Tensor, given: dict[str, int | None],
            default: dict[str, int]) -> tuple[bool, dict[str, int]]:
    """``(autotune, launch kwargs)`` of a prefill kernel: the caller's ``given`` values when any is set (the others
    from ``default``); else the shipped config of autotune key ``key`` on q's GPU (:mod:`.tuned`); else Triton's
    autotuner on CUDA, but not while a CUDA graph is captured (the tuner times runs); else ``default``."""
    if any(v is not None for v in given.values()):
        return False, {name: given[name] or value for name, value in default.items()}
    shipped = tuned_config(kernel, key, q)
    if shipped is not None:
        return False, shipped.launch_kwargs()
    if q.is_cuda and not torch.cuda.is_current_stream_capturing():
        return True, {}
    return False, default


def _paged_layout(cu_seqlens_k, req_to_token, req_pool_indices) -> bool:
    """True for the paged layout (``req_to_token`` + ``req_pool_indices``), False for contiguous KV
    (``cu_seqlens_k``); a clear error for neither, both, or a pool without ``req_pool_indices``."""
    paged = req_to_token is not None
    if paged == (cu_seqlens_k is not None):
        raise ValueError("give exactly one KV layout: cu_seqlens_k (contiguous) or req_to_token + req_pool_indices (paged)")
    if paged and req_pool_indices is None:
        raise ValueError("paged KV needs req_pool_indices")
    return paged


def _check_index_shapes(block_idx: torch.Tensor, block_cnt: torch.Tensor, bsz: int, hq: int) -> None:
    if block_cnt.dim() != 3 or block_cnt.shape[:2] != (bsz, hq) or block_idx.shape[:3] != block_cnt.shape:
        raise ValueError(f"block index shapes {tuple(block_idx.shape)} / {tuple(block_cnt.shape)} do not match "
                         f"{bsz} sequences x {hq} heads")


INDEX_CONFIGS = ((4, 2), (4, 3), (8, 2), (8, 3))   # (num_warps, num_stages) tried by the autotuner on CUDA


def _index_configs(triton):
    return [triton.Config({}, num_warps=w, num_stages=st) for w, st in INDEX_CONFIGS]


def sparse_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_idx: torch.Tensor,
                   block_cnt: torch.Tensor, head_dense: torch.Tensor, cu_seqlens_q: torch.Tensor,
                   kv_lens: torch.Tensor, max_q_len: int, *, cu_seqlens_k: torch.Tensor | None = None,
                   req_to_token: torch.Tensor | None = None, req_pool_indices: torch.Tensor | None = None,
                   sm_scale: float | None = None, out: torch.Tensor | None = None,
                   num_warps: int | None = None, num_stages: int | None = None,
                   heads: torch.Tensor | None = None) -> torch.Tensor:
    """Sparse causal attention of a varlen, optionally chunked batch.

    ``q [total_q, Hq, d]``; ``k, v``: contiguous ``[total_kv, Hkv, d]`` with ``cu_seqlens_k``, or the token
    pool with ``req_to_token [R, max_ctx]`` and ``req_pool_indices [B]``. ``kv_lens [B]``: tokens per
    sequence including the prefix; ``max_q_len``: a host bound on ``n_q`` (fixes the grid).
    ``block_idx/block_cnt/head_dense``: :class:`.block_index.BlockIndex`. Returns ``[total_q, Hq, d]`` in
    q's dtype. ``heads``: optional int32 tensor of the query heads to compute (others of ``out`` are left
    untouched). On CUDA the launch config is autotuned (:data:`INDEX_CONFIGS`, per head_dim, layout and
    power-of-2 bucket of ``max_q_len``) unless ``num_warps``/``num_stages`` are given.
    """
    check_qkv(q, k, v)
    paged = _paged_layout(cu_seqlens_k, req_to_token, req_pool_indices)
    bsz = kv_lens.shape[0]
    hq, d = q.shape[1], q.shape[2]
    if cu_seqlens_q.shape[0] != bsz + 1:
        raise ValueError(f"cu_seqlens_q has {cu_seqlens_q.shape[0]} entries for {bsz} sequences")
    _check_index_shapes(block_idx, block_cnt, bsz, hq)
    if head_dense.shape != (hq,):
        raise ValueError(f"head_dense has shape {tuple(head_dense.shape)}, expected ({hq},)")
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)
    o = out if out is not None else torch.empty_like(q)
    block_idx = block_idx if block_idx.stride(-1) == 1 else block_idx.contiguous()
    dummy = cu_seqlens_q
    nh = hq if heads is None else int(heads.shape[0])
    if nh == 0:
        return o
    grid = (max(1, math.ceil(max_q_len / BLOCK) + 1), bsz * nh)   # +1: an unaligned prefix spans one more block
    # autotuned per query length bucket (a tiny first call does not pick the config of long prompts); not
    # while a CUDA graph is captured (the tuner times runs). Fixed: H100, d=128, 64-wide: 4 warps (one
    # warpgroup, 64-row wgmma) beat 8 by 1.9x (kernels_h100.log)
    q_bucket = min(256, 1 << (grid[0] - 2).bit_length())     # query blocks, next power of 2, up to 16K rows
    tune, kw = _launch("index", (d, paged, q_bucket), q, dict(num_warps=num_warps, num_stages=num_stages),
                       dict(num_warps=4, num_stages=2 if q.is_cuda else 1))
    _kernel(tune)[grid](
        q, k, v, o,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), o.stride(0), o.stride(1),
        cu_seqlens_q, kv_lens, cu_seqlens_k if not paged else dummy,
        req_to_token if paged else dummy, req_pool_indices if paged else dummy,
        req_to_token.stride(0) if paged else 0,
        block_idx, block_cnt, head_dense,
        block_idx.stride(0), block_idx.stride(1), block_idx.stride(2), block_cnt.stride(0), block_cnt.stride(1),
        scale * LOG2E, hq, heads if heads is not None else dummy, nh, q_bucket,
        GROUP=hq // k.shape[1], BLOCK_M=BLOCK, D=d, PAGED=paged,
        DOT_F32=(not q.is_cuda) and q.dtype == torch.bfloat16, HEAD_MAP=heads is not None, **kw,
    )
    return o


# ---------------------------------------------------------------------------------------------------
# rule-based heads (dense, streaming): 128-row query tiles
# ---------------------------------------------------------------------------------------------------
RULE_DENSE_WINDOW = 1 << 30   # window_blocks of a dense head: every causal block is in the window


@lru_cache(maxsize=None)
def _rule_kernel(autotune: bool):
    """One program = two consecutive 64-row query blocks (A = 2p, B = 2p + 1) of one head whose KV blocks
    follow a rule: block ``kb`` is attended by query block ``qb`` iff ``kb <= qb`` and (``kb > qb - w`` or
    ``kb < s``) (dense: ``s = 0``, ``w = inf``). The union of A's and B's lists is

        sinks ``[0, min(s, wsA))`` (both) | ``wsA`` (A; B only if ``wsA >= wsB`` or a sink) |
        ``(wsA, A)`` (both) | diagonal ``A``, ``B`` (causal),    ``wsX = max(0, X - w + 1)``

    so a 128×64 tile is fully attended by all 128 rows except at ``wsA`` and the two diagonal blocks, which
    carry a per-row mask. Same base-2 online softmax as :func:`_kernel`; masked tiles use a finite row
    maximum so rows that have seen nothing yet stay NaN-free."""
    from sglang_shplb.kernels._triton_compat import import_triton
    triton, tl = import_triton()
    _shared_jit()

    @triton.jit
    def _tile(acc, m_i, l_i, q, k_ptr, v_ptr, r2t, kv_base, kb, offs_m, row_ok, n_kv, stride_kt,
              stride_vt, qk_scale,
              BLOCK_N: tl.constexpr, PAGED: tl.constexpr, MASK: tl.constexpr, DOT_F32: tl.constexpr):
        arn = tl.arange(0, BLOCK_N)
        offs_n = kb * BLOCK_N + arn
        if MASK:
            n_valid = offs_n < n_kv
            if PAGED:
                loc = tl.load(r2t + offs_n, mask=n_valid, other=0).to(tl.int64)
            else:
                loc = (kv_base + offs_n).to(tl.int64)
            k = tl.load(k_ptr + loc[:, None] * stride_kt, mask=n_valid[:, None], other=0.0)
        else:
            if PAGED:
                loc = tl.load(r2t + offs_n).to(tl.int64)
            else:
                loc = (kv_base + offs_n).to(tl.int64)
            k = tl.load(k_ptr + loc[:, None] * stride_kt)
        if DOT_F32:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        if MASK:
            ok = row_ok[:, None] & n_valid[None, :] & (offs_n[None, :] <= offs_m[:, None])
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = m_new
        alpha = tl.math.exp2(m_i - m_use)
        p = tl.math.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASK:
            v = tl.load(v_ptr + loc[:, None] * stride_vt, mask=n_valid[:, None], other=0.0)
        else:
            v = tl.load(v_ptr + loc[:, None] * stride_vt)
        if DOT_F32:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        return acc, m_new, l_i

    globals()["_rule_tile"] = _tile   # jit functions resolve callees through the module's globals

    def _rule_prefill_kernel(
        Q, K, V, O,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
        cu_q, kv_lens, cu_k, req_to_token, req_pool_idx, stride_r2t,
        heads, sink_blocks, window_blocks, qk_scale, NH,
        GROUP: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, PAGED: tl.constexpr,
        DOT_F32: tl.constexpr,
    ):
        BLOCK_M: tl.constexpr = 2 * BLOCK_N
        jp = tl.num_programs(0) - 1 - tl.program_id(0)   # longest rows first
        bh = tl.program_id(1)
        b = bh // NH
        hs = bh % NH
        h = tl.load(heads + hs)
        s_blk = tl.load(sink_blocks + hs)
        w_blk = tl.load(window_blocks + hs)
        hk = h // GROUP
        q_start, n_kv, prefix = _seq_bounds(cu_q, kv_lens, b)
        qp = prefix // BLOCK_M + jp                       # absolute query pair
        if qp * BLOCK_M < n_kv:
            offs_d = tl.arange(0, D)
            ar = tl.arange(0, BLOCK_M)
            offs_m = qp * BLOCK_M + ar
            qb = offs_m // BLOCK_N                        # query block of every row
            q, q_rows, m_valid = _q_tile(Q, q_start, offs_m, prefix, n_kv, h, stride_qt, stride_qh, offs_d, DOT_F32)
            r2t, kv_base = _kv_rows(req_to_token, req_pool_idx, stride_r2t, cu_k, b, PAGED)
            k_ptr = K + hk * stride_kh + offs_d[None, :]
            v_ptr = V + hk * stride_vh + offs_d[None, :]
            blk_a = 2 * qp
            ws_a = tl.maximum(blk_a - w_blk + 1, 0)
            n_sink = tl.minimum(s_blk, ws_a)

            m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_M], tl.float32)
            acc = tl.zeros([BLOCK_M, D], tl.float32)
            for kb in range(0, n_sink):                  # sinks outside A's window: all rows
                acc, m_i, l_i = _rule_tile(acc, m_i, l_i, q, k_ptr, v_ptr, r2t, kv_base, kb, offs_m, m_valid,
                                           n_kv, stride_kt, stride_vt, qk_scale, BLOCK_N, PAGED, False, DOT_F32)
            ok_w = (ws_a <= qb) & ((ws_a > qb - w_blk) | (ws_a < s_blk))
            ok_a = (blk_a <= qb) & ((blk_a > qb - w_blk) | (blk_a < s_blk))
            ok_b = (blk_a + 1 <= qb) & ((blk_a + 1 > qb - w_blk) | (blk_a + 1 < s_blk))
            if ws_a < blk_a:                              # first window block: B may not see it
                acc, m_i, l_i = _rule_tile(acc, m_i, l_i, q, k_ptr, v_ptr, r2t, kv_base, ws_a, offs_m, ok_w,
                                           n_kv, stride_kt, stride_vt, qk_scale, BLOCK_N, PAGED, True, DOT_F32)
            for kb in range(ws_a + 1, blk_a):             # rest of the window: all rows
                acc, m_i, l_i = _rule_tile(acc, m_i, l_i, q, k_ptr, v_ptr, r2t, kv_base, kb, offs_m, m_valid,
                                           n_kv, stride_kt, stride_vt, qk_scale, BLOCK_N, PAGED, False, DOT_F32)
            acc, m_i, l_i = _rule_tile(acc, m_i, l_i, q, k_ptr, v_ptr, r2t, kv_base, blk_a, offs_m, ok_a,
                                       n_kv, stride_kt, stride_vt, qk_scale, BLOCK_N, PAGED, True, DOT_F32)
            if (blk_a + 1) * BLOCK_N < n_kv:
                acc, m_i, l_i = _rule_tile(acc, m_i, l_i, q, k_ptr, v_ptr, r2t, kv_base, blk_a + 1, offs_m, ok_b,
                                           n_kv, stride_kt, stride_vt, qk_scale, BLOCK_N, PAGED, True, DOT_F32)
            o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]     # l = 0 only on rows not stored
            _store_o(O, o, q_rows, m_valid, h, stride_ot, stride_oh, offs_d)

    kern = triton.jit(_rule_prefill_kernel)
    if autotune:
        kern = triton.autotune(_pair_configs(triton), key=list(KERNEL_KEYS["rule"]))(kern)
    return kern


RULE_CONFIGS = ((8, 2), (8, 3), (4, 2), (8, 4))   # (num_warps, num_stages) tried by the autotuner on CUDA


def _pair_configs(triton):
    return [triton.Config({}, num_warps=w, num_stages=st) for w, st in RULE_CONFIGS]


def rule_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: torch.Tensor,
                 sink_blocks: torch.Tensor, window_blocks: torch.Tensor, cu_seqlens_q: torch.Tensor,
                 kv_lens: torch.Tensor, max_q_len: int, *, cu_seqlens_k: torch.Tensor | None = None,
                 req_to_token: torch.Tensor | None = None, req_pool_indices: torch.Tensor | None = None,
                 sm_scale: float | None = None, out: torch.Tensor | None = None,
                 num_warps: int | None = None, num_stages: int | None = None) -> torch.Tensor:
    """Dense / streaming heads with 128-row query tiles (no block index): query head ``heads[i]`` attends
    KV block ``kb`` from query block ``qb`` iff ``kb <= qb`` and (``kb > qb - window_blocks[i]`` or
    ``kb < sink_blocks[i]``); a dense head has ``sink 0, window RULE_DENSE_WINDOW``. Layouts as
    :func:`sparse_prefill`; writes only ``out[:, heads]``. On CUDA the launch config is autotuned unless
    ``num_warps``/``num_stages`` are given."""
    check_qkv(q, k, v)
    paged = _paged_layout(cu_seqlens_k, req_to_token, req_pool_indices)
    if not (heads.shape == sink_blocks.shape == window_blocks.shape) or heads.dim() != 1:
        raise ValueError("heads, sink_blocks and window_blocks must be 1-D of one length")
    bsz = kv_lens.shape[0]
    hq, d = q.shape[1], q.shape[2]
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)
    o = out if out is not None else torch.empty_like(q)
    nh = int(heads.shape[0])
    if nh == 0:
        return o
    dummy = cu_seqlens_q
    grid = (max(1, math.ceil(max_q_len / (2 * BLOCK)) + 1), bsz * nh)
    tune, kw = _launch("rule", (d, hq // k.shape[1], paged), q, dict(num_warps=num_warps, num_stages=num_stages),
                       dict(num_warps=8 if q.is_cuda else 4, num_stages=2 if q.is_cuda else 1))
    _rule_kernel(tune)[grid](
        q, k, v, o,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), o.stride(0), o.stride(1),
        cu_seqlens_q, kv_lens, cu_seqlens_k if not paged else dummy,
        req_to_token if paged else dummy, req_pool_indices if paged else dummy,
        req_to_token.stride(0) if paged else 0,
        heads, sink_blocks, window_blocks, scale * LOG2E, nh,
        GROUP=hq // k.shape[1], BLOCK_N=BLOCK, D=d, PAGED=paged,
        DOT_F32=(not q.is_cuda) and q.dtype == torch.bfloat16, **kw,
    )
    return o


# ---------------------------------------------------------------------------------------------------
# tile-128 top-k heads (and dense heads): 128 x 128 tiles over superblock lists, TMA loads
# ---------------------------------------------------------------------------------------------------
TILE = 2 * BLOCK


@lru_cache(maxsize=None)
def _tile_kernel(autotune: bool):
    """One program = query pair ``p`` (rows ``128p .. 128p + 127``) of one head. A ``tile=128`` top-k head's
    64-token rows ``2p`` and ``2p + 1`` list the same superblocks (:func:`.index.expand_pair_rows`): entries
    ``2j, 2j + 1`` per superblock ``j``, then the diagonal. So the program reads every other entry of row
    ``2p + 1`` (row ``2p`` when the sequence ends inside it) and runs, per superblock, the 128-row step

        S = Q K_j^T * scale * log2(e);  m' = max(m, rowmax S);  P = 2^(S - m')
        l = 2^(m - m') l + rowsum P;     acc = 2^(m - m') acc + P V_j

    over ``128 / BLOCK_N`` KV steps, unmasked: superblocks before the diagonal lie before every row and
    inside ``[0, n_kv)``. The diagonal superblock ``p`` comes last, masked causally and by ``n_kv``.
    Dense heads walk superblocks ``0 .. p - 1`` without index loads. Contiguous KV on sm90+ is read with TMA
    (``desc_k``/``desc_v``: 2-D descriptors over ``[tokens, Hkv * d]``), otherwise with pointer loads."""
    from sglang_shplb.kernels._triton_compat import import_triton
    triton, tl = import_triton()
    _shared_jit()

    @triton.jit
    def _step(acc, m_i, l_i, q, k, v, qk_scale, ok, MASK: tl.constexpr):
        # one online-softmax step; MASK: the diagonal (every row keeps >= 1 finite column overall).
        # The scale folds into the max and one FMA (s * scale - m'), and P V accumulates into the rescaled
        # acc inside the MMA (tl.dot's accumulator operand), as the Triton tutorial's fused attention does.
        s = tl.dot(q, tl.trans(k))
        if MASK:
            s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s * qk_scale - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        return acc, m_new, l_i

    globals()["_tile_step"] = _step   # jit functions resolve callees through the module's globals

    def _tile_prefill_kernel(
        Q, K, V, O, desc_k, desc_v,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
        cu_q, kv_lens, cu_k, req_to_token, req_pool_idx, stride_r2t,
        block_idx, block_cnt, head_dense, heads,
        s_bi_b, s_bi_h, s_bi_q, s_bc_b, s_bc_h,
        qk_scale, NH, Q_BUCKET,   # Q_BUCKET: an autotune key only
        GROUP: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, PAGED: tl.constexpr,
        TMA: tl.constexpr, DOT_F32: tl.constexpr,
    ):
        TILE: tl.constexpr = 128
        SUB: tl.constexpr = TILE // BLOCK_N            # KV steps per superblock
        jp = tl.num_programs(0) - 1 - tl.program_id(0)   # query pair rel. to the chunk's first; longest rows first
        bh = tl.program_id(1)
        b = bh // NH
        h = tl.load(heads + bh % NH)
        hk = h // GROUP
        q_start, n_kv, prefix = _seq_bounds(cu_q, kv_lens, b)
        p = prefix // TILE + jp                        # absolute query pair
        if p * TILE < n_kv:
            offs_d = tl.arange(0, D)
            ar = tl.arange(0, TILE)
            arn = tl.arange(0, BLOCK_N)
            offs_m = p * TILE + ar
            q, q_rows, m_valid = _q_tile(Q, q_start, offs_m, prefix, n_kv, h, stride_qt, stride_qh, offs_d, DOT_F32)
            r2t, kv_base = _kv_rows(req_to_token, req_pool_idx, stride_r2t, cu_k, b, PAGED)
            k_ptr = K + hk * stride_kh + offs_d[None, :]
            v_ptr = V + hk * stride_vh + offs_d[None, :]
            dense = (tl.load(head_dense + h) != 0).to(tl.int32)
            has_b = ((2 * p + 1) * (TILE // 2) < n_kv).to(tl.int32)     # row 2p + 1 exists
            row = 2 * p + has_b
            cnt = tl.load(block_cnt + b * s_bc_b + h * s_bc_h + row)
            n_off = dense * p + (1 - dense) * ((cnt - 1 - has_b) // 2)  # superblocks before the diagonal
            idx_row = block_idx + b * s_bi_b + h * s_bi_h + row * s_bi_q

            m_i = tl.full([TILE], float("-inf"), tl.float32)
            l_i = tl.zeros([TILE], tl.float32)
            acc = tl.zeros([TILE, D], tl.float32)
            for it in range(0, n_off * SUB):
                j = it // SUB
                sb = dense * j + (1 - dense) * (tl.load(idx_row + 2 * j, mask=dense == 0, other=0) // 2)
                start = sb * TILE + (it % SUB) * BLOCK_N
                if TMA:
                    k = desc_k.load([kv_base + start, hk * D])
                    v = desc_v.load([kv_base + start, hk * D])
                else:
                    if PAGED:
                        loc = tl.load(r2t + start + arn).to(tl.int64)
                    else:
                        loc = (kv_base + start + arn).to(tl.int64)
                    k = tl.load(k_ptr + loc[:, None] * stride_kt)
                    v = tl.load(v_ptr + loc[:, None] * stride_vt)
                if DOT_F32:
                    k = k.to(tl.float32)
                    v = v.to(tl.float32)
                acc, m_i, l_i = _tile_step(acc, m_i, l_i, q, k, v, qk_scale, 0, False)
            # diagonal superblock p: token-causal and bounded by n_kv
            for sub in tl.static_range(SUB):
                offs_n = p * TILE + sub * BLOCK_N + arn
                n_ok = offs_n < n_kv
                if PAGED:
                    loc = tl.load(r2t + offs_n, mask=n_ok, other=0).to(tl.int64)
                else:
                    loc = (kv_base + offs_n).to(tl.int64)
                k = tl.load(k_ptr + loc[:, None] * stride_kt, mask=n_ok[:, None], other=0.0)
                v = tl.load(v_ptr + loc[:, None] * stride_vt, mask=n_ok[:, None], other=0.0)
                if DOT_F32:
                    k = k.to(tl.float32)
                    v = v.to(tl.float32)
                ok = n_ok[None, :] & (offs_n[None, :] <= offs_m[:, None])
                acc, m_i, l_i = _tile_step(acc, m_i, l_i, q, k, v, qk_scale, ok, True)
            o = acc / l_i[:, None]
            _store_o(O, o, q_rows, m_valid, h, stride_ot, stride_oh, offs_d)

    kern = length_free_jit(triton)(_tile_prefill_kernel)
    if autotune:
        kern = triton.autotune(_tile_configs(triton), key=list(KERNEL_KEYS["tile"]))(kern)
    return kern


TILE_CONFIGS = ((128, 8, 2), (128, 8, 3), (64, 8, 2), (64, 8, 3), (64, 4, 3))   # (BLOCK_N, warps, stages)


def _tile_configs(triton):
    def set_block(nargs):   # TMA descriptors load [BLOCK_N, d] boxes
        for name in ("desc_k", "desc_v"):
            if hasattr(nargs[name], "block_shape"):
                nargs[name].block_shape = [nargs["BLOCK_N"], nargs["D"]]
    return [triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=st, pre_hook=set_block)
            for n, w, st in TILE_CONFIGS]


def _tma_layout_ok(k: torch.Tensor) -> bool:
    # head rows of d elements back to back, 16-byte aligned token rows
    return k.stride(1) == k.shape[2] and (k.stride(0) * k.element_size()) % 16 == 0 and k.data_ptr() % 16 == 0


def tma_supported(k: torch.Tensor) -> bool:
    """TMA loads of contiguous KV: sm90+ with Triton's host tensor descriptors, and a layout they can
    address (``k.stride(1) == d``, 16-byte aligned rows)."""
    if not k.is_cuda or torch.cuda.get_device_capability(k.device)[0] < 9:
        return False
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except ImportError:  # pragma: no cover - old Triton
        return False
    return _tma_layout_ok(k)


def tile_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_idx: torch.Tensor,
                 block_cnt: torch.Tensor, head_dense: torch.Tensor, heads: torch.Tensor,
                 cu_seqlens_q: torch.Tensor, kv_lens: torch.Tensor, max_q_len: int, *,
                 cu_seqlens_k: torch.Tensor | None = None, req_to_token: torch.Tensor | None = None,
                 req_pool_indices: torch.Tensor | None = None, sm_scale: float | None = None,
                 out: torch.Tensor | None = None, tma: bool | None = None, block_n: int | None = None,
                 num_warps: int | None = None, num_stages: int | None = None) -> torch.Tensor:
    """Heads ``heads`` (int32) with 128 x 128 tiles: ``tile=128`` top-k heads of a
    :class:`.block_index.BlockIndex` built by :func:`.index.build_block_index` (their rows list whole
    superblocks), and dense heads (``head_dense``). Layouts and arguments as :func:`sparse_prefill`; writes
    only ``out[:, heads]``. ``tma``: TMA loads of contiguous KV (default: when :func:`tma_supported`). On CUDA
    the launch config (KV step ``BLOCK_N`` 64/128, warps, stages: :data:`TILE_CONFIGS`) is autotuned unless
    ``block_n``, ``num_warps`` and ``num_stages`` are given."""
    check_qkv(q, k, v)
    paged = _paged_layout(cu_seqlens_k, req_to_token, req_pool_indices)
    bsz = kv_lens.shape[0]
    hq, d = q.shape[1], q.shape[2]
    _check_index_shapes(block_idx, block_cnt, bsz, hq)
    if block_n not in (None, BLOCK, TILE):
        raise ValueError(f"block_n must be {BLOCK} or {TILE}, got {block_n}")
    if tma is None:
        tma = not paged and tma_supported(k) and tma_supported(v)
    elif tma and (paged or not (_tma_layout_ok(k) and _tma_layout_ok(v))):   # (the interpreter emulates TMA)
        raise ValueError("TMA needs contiguous KV with k.stride(1) == head_dim and 16-byte aligned rows")
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)
    o = out if out is not None else torch.empty_like(q)
    nh = int(heads.shape[0])
    if nh == 0:
        return o
    block_idx = block_idx if block_idx.stride(-1) == 1 else block_idx.contiguous()
    dummy = cu_seqlens_q
    grid = (max(1, math.ceil(max_q_len / TILE) + 1), bsz * nh)   # +1: an unaligned prefix spans one more pair
    q_bucket = min(128, 1 << (grid[0] - 2).bit_length())
    tune, kw = _launch("tile", (d, hq // k.shape[1], paged, tma, q_bucket), q,
                       dict(BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages),
                       dict(BLOCK_N=TILE if q.is_cuda else BLOCK, num_warps=8, num_stages=2 if q.is_cuda else 1))
    if tma:
        from triton.tools.tensor_descriptor import TensorDescriptor
        hkv = k.shape[1]
        box = [kw.get("BLOCK_N", TILE), d]   # autotuned: the config's pre_hook resets the box
        desc_k = TensorDescriptor(k, [k.shape[0], hkv * d], [k.stride(0), 1], box)
        desc_v = TensorDescriptor(v, [v.shape[0], hkv * d], [v.stride(0), 1], box)
    else:
        desc_k = desc_v = dummy
    _tile_kernel(tune)[grid](
        q, k, v, o, desc_k, desc_v,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), o.stride(0), o.stride(1),
        cu_seqlens_q, kv_lens, cu_seqlens_k if not paged else dummy,
        req_to_token if paged else dummy, req_pool_indices if paged else dummy,
        req_to_token.stride(0) if paged else 0,
        block_idx, block_cnt, head_dense, heads,
        block_idx.stride(0), block_idx.stride(1), block_idx.stride(2), block_cnt.stride(0), block_cnt.stride(1),
        scale * LOG2E, nh, q_bucket,
        GROUP=hq // k.shape[1], D=d, PAGED=paged, TMA=tma,
        DOT_F32=(not q.is_cuda) and q.dtype == torch.bfloat16, **kw,
    )
    return o
