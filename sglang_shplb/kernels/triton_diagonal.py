"""The causal diagonal block of a block-sparse prefill, merged with a partial result over the other listed blocks.

cuDNN's block-sparse attention (:mod:`.cudnn_blocks`) is not causal: it attends every key of each block it is
given. Each query block's diagonal block is therefore left out of its list, computed here under the causal mask,
and merged with cuDNN's partial output ``o_p`` by the two log-sum-exps (natural log, as cuDNN writes it):

    s    = scale q · k  over the diagonal block's keys at or before the row     (base 2 below: s log2 e)
    o_d  = softmax(s) v,   lse_d = log sum e^s
    m    = max(lse_p, lse_d),   w_p = e^(lse_p - m),   w_d = e^(lse_d - m)
    o    = (w_p o_p + w_d o_d) / (w_p + w_d)          (lse_p = -inf where nothing else was listed: o = o_d)

One program per (query block, head): rows ``64 j .. 64 j + 63`` of the chunk ``q [n_q, Hq, d]``, at positions
``off + 64 j + r`` of the sequence (``off = n_kv - n_q``, a multiple of 64), reading keys at the same positions
of ``k, v [n_kv, Hkv, d]``, or of a paged pool through a position -> row table (SGLang's ``req_to_token`` row).
Its reference is :func:`diagonal_merge_reference`. No SGLang.
"""
from __future__ import annotations

from functools import lru_cache

import torch

from sglang_shplb.core.patterns import BLOCK
from sglang_shplb.kernels.triton_prefill import LOG2E


@lru_cache(maxsize=None)
def _kernel():
    from sglang_shplb.kernels._triton_compat import import_triton
    triton, tl = import_triton()

    @triton.jit(do_not_specialize=["n_q", "off"])
    def _diagonal_merge_kernel(Q, K, V, OP, LSEP, OUT, HEADS, ROWS, n_q, off, scale_log2, log2e,
                               stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                               stride_pt, stride_ph, stride_lh, stride_ot, stride_oh,
                               GROUP: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                               BLOCK_D: tl.constexpr, PAGED: tl.constexpr):
        j = tl.program_id(0)
        h = tl.load(HEADS + tl.program_id(1))
        hk = h // GROUP
        r = tl.arange(0, BLOCK_M)
        rows = j * BLOCK_M + r                                   # chunk rows of this query block
        qrow = rows.to(tl.int64)
        dd = tl.arange(0, BLOCK_D)
        ok = rows < n_q
        m2 = ok[:, None] & (dd < D)[None, :]
        q = tl.load(Q + qrow[:, None] * stride_qt + h * stride_qh + dd[None, :], mask=m2, other=0.0)
        pos = (off + rows).to(tl.int64)                          # the diagonal block's keys: the same positions
        if PAGED:
            pos = tl.load(ROWS + pos, mask=ok, other=0).to(tl.int64)   # their rows in the pool
        k = tl.load(K + pos[:, None] * stride_kt + hk * stride_kh + dd[None, :], mask=m2, other=0.0)
        v = tl.load(V + pos[:, None] * stride_vt + hk * stride_vh + dd[None, :], mask=m2, other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale_log2                  # base 2
        s = tl.where((r[None, :] <= r[:, None]) & ok[None, :], s, float("-inf"))
        mx = tl.max(s, 1)
        mx = tl.where(ok, mx, 0.0)                               # rows past n_q: no key, keep them finite
        p = tl.exp2(s - mx[:, None])
        ls = tl.sum(p, 1)
        ls = tl.where(ok, ls, 1.0)
        o_d = tl.dot(p.to(v.dtype), v) / ls[:, None]
        lse_d = mx + tl.log2(ls)                                 # base 2
        lse_p = tl.load(LSEP + h * stride_lh + rows, mask=ok, other=float("-inf")) * log2e
        top = tl.maximum(lse_p, lse_d)
        w_p = tl.exp2(lse_p - top)
        w_d = tl.exp2(lse_d - top)
        o_p = tl.load(OP + qrow[:, None] * stride_pt + h * stride_ph + dd[None, :], mask=m2, other=0.0)
        o = (o_p.to(tl.float32) * w_p[:, None] + o_d * w_d[:, None]) / (w_p + w_d)[:, None]
        tl.store(OUT + qrow[:, None] * stride_ot + h * stride_oh + dd[None, :], o.to(OUT.dtype.element_ty), mask=m2)

    return _diagonal_merge_kernel


def _check(q: torch.Tensor, n_kv: int, o_p: torch.Tensor, lse_p: torch.Tensor, out: torch.Tensor) -> int:
    """``off = n_kv - n_q`` after checking the shapes of :func:`diagonal_merge`'s arguments."""
    n_q, hq, d = q.shape
    off = n_kv - n_q
    if off < 0 or off % BLOCK:
        raise ValueError(f"the chunk's {n_q} rows must end the {n_kv} keys at a multiple of {BLOCK} "
                         f"(prefix {off})")
    if o_p.shape[-3:] != (n_q, hq, d) or out.shape != q.shape:
        raise ValueError(f"o_p {tuple(o_p.shape)} / out {tuple(out.shape)} disagree with q {tuple(q.shape)}")
    if lse_p.shape[-2:] != (hq, n_q):
        raise ValueError(f"lse_p {tuple(lse_p.shape)} is not [.., {hq}, {n_q}]")
    return off


def diagonal_merge(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o_p: torch.Tensor, lse_p: torch.Tensor,
                   heads: torch.Tensor, out: torch.Tensor, scale: float,
                   kv_rows: torch.Tensor | None = None, n_kv: int | None = None) -> torch.Tensor:
    """Write ``out[:, h]`` for each head ``h`` of ``heads`` (int32, on ``q``'s device): the diagonal blocks of the
    chunk ``q [n_q, Hq, d]`` merged with ``o_p [(1,) n_q, Hq, d]`` and ``lse_p [(1,) Hq, n_q]`` (float32, natural
    log, -inf for rows with nothing else listed). Keys: position ``p`` of the sequence is row ``p`` of
    ``k, v [n_kv, Hkv, d]``, or with ``kv_rows`` (int32, position -> row, e.g. a ``req_to_token`` row) and
    ``n_kv`` row ``kv_rows[p]`` of a pool. Other heads of ``out`` are left as they are."""
    n_kv = k.shape[0] if kv_rows is None else n_kv
    off = _check(q, n_kv, o_p, lse_p, out)
    n_q, hq, d = q.shape
    o2, l2 = o_p.reshape(n_q, hq, d), lse_p.reshape(hq, n_q)
    if heads.numel() == 0 or n_q == 0:
        return out
    block_d = max(16, 1 << (d - 1).bit_length())
    grid = ((n_q + BLOCK - 1) // BLOCK, heads.numel())
    _kernel()[grid](q, k, v, o2, l2, out, heads, heads if kv_rows is None else kv_rows, n_q, off, scale * LOG2E,
                    LOG2E, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                    o2.stride(0), o2.stride(1), l2.stride(0), out.stride(0), out.stride(1),
                    GROUP=hq // k.shape[1], D=d, BLOCK_M=BLOCK, BLOCK_D=block_d, PAGED=kv_rows is not None,
                    num_warps=4)
    return out


def diagonal_merge_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o_p: torch.Tensor,
                             lse_p: torch.Tensor, heads: torch.Tensor, out: torch.Tensor, scale: float,
                             kv_rows: torch.Tensor | None = None, n_kv: int | None = None) -> torch.Tensor:
    """:func:`diagonal_merge` in float32 torch ops (the same arguments and effect)."""
    n_kv = k.shape[0] if kv_rows is None else n_kv
    off = _check(q, n_kv, o_p, lse_p, out)
    if kv_rows is not None:
        rows = kv_rows[:n_kv].long()
        k, v = k[rows], v[rows]
    n_q, hq, d = q.shape
    group = hq // k.shape[1]
    o2, l2 = o_p.reshape(n_q, hq, d).float(), lse_p.reshape(hq, n_q).float()
    pos = torch.arange(n_q, device=q.device) + off
    same_block = (pos[:, None] // BLOCK == pos[None, :] // BLOCK) & (pos[None, :] <= pos[:, None])
    for h in heads.tolist():
        s = (q[:, h].float() @ k[off:, h // group].float().T) * scale            # [n_q, n_q]: the chunk's keys
        s = s.masked_fill(~same_block, float("-inf"))
        lse_d = torch.logsumexp(s, -1)
        o_d = torch.softmax(s, -1) @ v[off:, h // group].float()
        top = torch.maximum(l2[h], lse_d)
        w_p, w_d = torch.exp(l2[h] - top), torch.exp(lse_d - top)
        out[:, h] = ((o2[:, h] * w_p[:, None] + o_d * w_d[:, None]) / (w_p + w_d)[:, None]).to(out.dtype)
    return out
