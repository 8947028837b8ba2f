"""Fused, sync-free Triton builder of the TOP-K heads' rows of a :class:`.block_index.BlockIndex`.

Same output as the top-k part of :func:`.index.build_block_index` (ties may resolve differently: this
builder keeps the lowest block ids among exactly tied scores), in two launches and no big intermediate:

1. ``_pool_kernel``, one program per (64-token block ``j``, sequence ``b``, KV head ``hk`` holding a top-k head)::

       kp[b, hk, j] = mean_{t in block j, t < n_kv}              K[b, t, hk]     (float32, [B, Hkv, NB, d])
       qp[b, s,  j] = mean_{t in block j, prefix <= t < n_kv}    Q[b, t, h_s]    (float32, [B, T, NB, d])

   for the top-k heads ``h_s`` of the KV head's group (slot ``s``); KV heads without a top-k head are not read
   (their ``kp`` rows are never selected from: the mixed plan's 4 top-k groups of 8 read half the keys); K is read
   through ``req_to_token``
   (paged) or ``cu_seqlens_k`` (contiguous); an empty block pools to 0 (mean over ``max(count, 1)``),
   exactly like ``index._pool``. Queries exist only for the last ``n_q`` positions (chunked prefill).

2. ``_select_kernel``, one program per (tile of ``BM`` query blocks, top-k head slot ``s``, sequence ``b``):

   * scores of the ``BM`` rows against all ``NBP`` (= next power of two >= NB) KV blocks at once,
     ``S = qp[rows] @ kp[hk]^T`` as a loop of ``tl.dot`` over 16-wide chunks of ``d`` (the ``1/sqrt(d)``
     of the reference is left out: a positive scale does not change the ranking); on the GPU the
     operands are rounded to the input dtype first, as ``build_block_index``'s bf16 matmul does;
   * an int32 sort key per score that orders like the float: ``key = bits ^ ((bits >> 31) & 0x7fffffff)``
     (negative floats: flip the magnitude bits); forced blocks rank first (diagonal ``INT32_MAX``, then
     block 0 ``INT32_MAX - 1``: with ``k(qi) = 1`` the diagonal wins, as in ``build_block_index``) and
     non-causal ``kj > qi`` last (``INT32_MIN``);
   * the k-th largest key ``v`` by a 32-step binary search on the key value, vectorised over the rows:
     keep ``lo <= v < hi`` with ``count(key >= lo) >= k > count(key >= hi)``;
   * selected: ``key > v`` plus the first ``k - count(key > v)`` blocks with ``key == v`` (ties: lowest id),
     written in ascending order at positions ``cumsum(selected) - 1`` (one packed scan); ``[k, MAXK)`` is zeroed and
     ``block_cnt = k``.

   ``k(qi)`` comes from ``block_index.topk_counts`` (per budget, a function of ``qi`` and ``NB`` only). Every
   row ``qi < NB`` is written, including rows with no queries (all scores 0: the lowest ids win), as
   ``build_block_index`` does; or, given ``max_q_len``, only the rows the prefill kernels read: a chunk of
   ``n_q`` queries after a prefix ``p`` reads rows ``p // tile`` to ``(p + n_q - 1) // tile``, so the last 8K
   chunk of a 128K prefill selects 65 of its 1,024 superblock rows instead of all of them.

``tile=128`` heads run the same two launches over 128-token superblocks (rows = query pairs ``p``) and the
selection writes each chosen superblock ``j`` as blocks ``2j, 2j + 1`` into 64-token rows ``2p`` and
``2p + 1`` (``EXPAND``; :func:`.index.expand_pair_rows` is the torch equivalent).

Registers: a program holds a few ``[BM, NBP]`` tiles (``BM = 16``, the smallest ``tl.dot`` tile), so
``num_warps`` grows with ``NBP`` (16 warps at NBP = 2048, 128K context).
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Sequence

import torch

from sglang_shplb.core.patterns import BLOCK, HeadBudget
from sglang_shplb.kernels.block_index import BlockIndex, empty_index, max_blocks_per_row, topk_counts_tensor
from sglang_shplb.kernels.layer_heads import LayerHeads
from sglang_shplb.kernels.triton_jit import length_free_jit

BM = 16   # query blocks per selection program (tl.dot needs M >= 16)
DC = 16   # head-dim chunk of the score dots


@lru_cache(maxsize=None)
def _kernels():
    from sglang_shplb.kernels._triton_compat import import_triton
    triton, tl = import_triton()

    @length_free_jit(triton)
    def _pool_kernel(Q, K, QP, KP, stride_qt, stride_qh, stride_kt, stride_kh,
                     cu_q, kv_lens, cu_k, req_to_token, req_pool_idx, stride_r2t, head_slot, kv_heads, NB, T,
                     HKV: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
                     PAGED: tl.constexpr):
        j = tl.program_id(0)
        b = tl.program_id(1)
        hk = tl.load(kv_heads + tl.program_id(2))     # a KV head with a top-k head of this tile
        n_kv = tl.load(kv_lens + b)
        q_start = tl.load(cu_q + b)
        prefix = n_kv - (tl.load(cu_q + b + 1) - q_start)
        pos = j * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D)
        kval = pos < n_kv
        if PAGED:
            r2t = req_to_token + tl.load(req_pool_idx + b).to(tl.int64) * stride_r2t
            loc = tl.load(r2t + pos, mask=kval, other=0).to(tl.int64)
        else:
            loc = (tl.load(cu_k + b) + pos).to(tl.int64)
        k = tl.load(K + loc[:, None] * stride_kt + hk * stride_kh + offs_d[None, :], mask=kval[:, None], other=0.0)
        nk = tl.maximum(tl.sum(kval.to(tl.float32), 0), 1.0)
        tl.store(KP + ((b * HKV + hk) * NB + j).to(tl.int64) * D + offs_d, tl.sum(k.to(tl.float32), 0) / nk)
        qval = kval & (pos >= prefix)
        nq = tl.maximum(tl.sum(qval.to(tl.float32), 0), 1.0)
        rows = (q_start + pos - prefix).to(tl.int64)
        for g in tl.static_range(GROUP):
            h = hk * GROUP + g
            s = tl.load(head_slot + h)          # top-k slot of query head h, -1 if not top-k
            if s >= 0:
                q = tl.load(Q + rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                            mask=qval[:, None], other=0.0)
                tl.store(QP + ((b * T + s) * NB + j).to(tl.int64) * D + offs_d, tl.sum(q.to(tl.float32), 0) / nq)

    @length_free_jit(triton)
    def _select_kernel(QP, KP, heads, counts, idx, cnt, s_ib, s_ih, s_iq, s_cb, s_ch, NB, T, MAXK, NB64,
                       cu_q, kv_lens, UNIT, HKV: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr,
                       BM: tl.constexpr, NBP: tl.constexpr, DC: tl.constexpr, CAST: tl.constexpr,
                       IEEE: tl.constexpr, EXPAND: tl.constexpr, QUERY_ROWS: tl.constexpr):
        tile = tl.program_id(0)
        s = tl.program_id(1)
        b = tl.program_id(2)
        h = tl.load(heads + s)
        hk = h // GROUP
        row0 = 0
        if QUERY_ROWS:   # rows from the one holding the sequence's first query (UNIT tokens a row)
            row0 = (tl.load(kv_lens + b) - (tl.load(cu_q + b + 1) - tl.load(cu_q + b))) // UNIT
        rows = row0 + tile * BM + tl.arange(0, BM)                   # query blocks qi
        row_ok = rows < NB
        cols = tl.arange(0, NBP)                                     # KV blocks kj
        col_ok = (cols < NB) & (cols < row0 + tile * BM + BM)        # causal for some row of the tile
        q_base = QP + ((b * T + s) * NB).to(tl.int64) * D
        k_base = KP + ((b * HKV + hk) * NB).to(tl.int64) * D
        # S[r, kj] = qp[r] . kp[kj], accumulated over DC-wide chunks of d
        acc = tl.zeros([BM, NBP], tl.float32)
        for c in range(0, D // DC):
            dd = c * DC + tl.arange(0, DC)
            qc = tl.load(q_base + rows[:, None] * D + dd[None, :], mask=row_ok[:, None], other=0.0)
            kc = tl.load(k_base + cols[None, :] * D + dd[:, None], mask=col_ok[None, :], other=0.0)   # [DC, NBP]
            # GPU: round the pooled vectors to the input dtype (1: bf16, 2: fp16), as build_block_index's matmul
            if CAST == 1:
                acc += tl.dot(qc.to(tl.bfloat16), kc.to(tl.bfloat16))
            elif CAST == 2:
                acc += tl.dot(qc.to(tl.float16), kc.to(tl.float16))
            elif IEEE:
                acc += tl.dot(qc, kc, input_precision="ieee")
            else:
                acc += tl.dot(qc, kc)
        # float -> int32 key of the same order; forced and non-causal blocks
        bits = acc.to(tl.int32, bitcast=True)
        key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
        kj = cols[None, :]
        qi = rows[:, None]
        key = tl.where(kj > qi, -2147483648, key)
        key = tl.where(kj == 0, 2147483646, key)
        key = tl.where(kj == qi, 2147483647, key)
        kr = tl.load(counts + s * NB + rows, mask=row_ok, other=1).to(tl.int32)   # k(qi) >= 1
        # binary search for v = the k-th largest key: count(key >= lo) >= k > count(key >= hi)
        lo = tl.full([BM], -2147483648, tl.int64)
        hi = tl.full([BM], 2147483648, tl.int64)
        for _ in range(32):
            mid = (lo + hi) >> 1
            c_ge = tl.sum((key >= mid.to(tl.int32)[:, None]).to(tl.int32), 1)
            ok = c_ge >= kr
            lo = tl.where(ok, mid, lo)
            hi = tl.where(ok, hi, mid)
        v = lo.to(tl.int32)[:, None]
        gt = key > v
        eq = key == v
        need = (kr - tl.sum(gt.to(tl.int32), 1))[:, None]           # tied blocks to take, lowest ids first
        # one scan for both running counts: low 16 bits #(key > v), high 16 bits #(key == v) (NBP < 2^16)
        run = tl.cumsum(gt.to(tl.int32) + (eq.to(tl.int32) << 16), 1)
        n_eq = run >> 16
        sel = gt | (eq & (n_eq <= need))
        pos = (run & 0xFFFF) + tl.minimum(n_eq, need) - 1           # ascending write positions
        if EXPAND:
            # rows are query pairs p and kj superblocks: 64-token rows 2p + x (x = 0, 1) list blocks 2kj and
            # 2kj + 1 at 2 pos and 2 pos + 1, 2 k - 1 + x of them (row 2p stops before block 2p + 1)
            for x in tl.static_range(2):
                r = 2 * rows + x
                r_ok = (r < NB64)[:, None]
                c = 2 * kr[:, None] - 1 + x
                row_ptr = idx + b.to(tl.int64) * s_ib + h * s_ih + r[:, None].to(tl.int64) * s_iq
                for y in tl.static_range(2):
                    tl.store(row_ptr + 2 * pos + y, 2 * kj + y + 0 * pos, mask=sel & r_ok & (2 * pos + y < c))
                    tl.store(row_ptr + 2 * kj + y, 0 * pos, mask=(2 * kj + y >= c) & (2 * kj + y < MAXK) & r_ok)
                tl.store(cnt + b.to(tl.int64) * s_cb + h * s_ch + r, 2 * kr - 1 + x, mask=r < NB64)
        else:
            row_ptr = idx + b.to(tl.int64) * s_ib + h * s_ih + rows[:, None].to(tl.int64) * s_iq
            tl.store(row_ptr + pos, kj + 0 * pos, mask=sel & row_ok[:, None])
            tl.store(row_ptr + kj, 0 * pos, mask=(kj >= kr[:, None]) & (kj < MAXK) & row_ok[:, None])
            tl.store(cnt + b.to(tl.int64) * s_cb + h * s_ch + rows, kr, mask=row_ok)

    return _pool_kernel, _select_kernel


@lru_cache(maxsize=64)
def _head_maps(heads: LayerHeads, tile: int, group: int,
               device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(top-k heads of this tile ``[T]``, slot of each query head ``[Hq]`` (-1 if not one of them), the KV heads
    holding them, ascending)."""
    topk = heads.topk_by_tile[tile]
    slot = tuple(topk.index(h) if h in topk else -1 for h in range(heads.num_heads))
    kv = sorted({h // group for h in topk})
    return tuple(torch.tensor(x, dtype=torch.int32, device=device) for x in (topk, slot, kv))


def column_warps(nbp: int, cuda: bool) -> int:
    """Warps of a program holding ``[BM, NBP]`` tiles (the top-k selection, the vertical-slash rows)."""
    if not cuda:
        return 1
    return 4 if nbp <= 256 else 8 if nbp <= 1024 else 16


def builder_frame(budgets: Sequence[HeadBudget], q: torch.Tensor, k: torch.Tensor, kv_lens: torch.Tensor,
                  max_kv_len: int, cu_seqlens_k, req_to_token, req_pool_indices,
                  out: BlockIndex | None) -> tuple[LayerHeads, bool, int, int, BlockIndex]:
    """What the Triton index builders share before their launches: the checks of ``q``, ``k``, the KV layout and
    ``out``, then ``(heads, paged, NB, MAXK, out)`` (``out`` allocated, zeroed, when None)."""
    hq, d = q.shape[1], q.shape[2]
    heads = LayerHeads.of(budgets, k.shape[1], num_q_heads=hq)
    if q.dim() != 3 or k.dim() != 3 or k.shape[-1] != d or d % DC or d & (d - 1):
        raise ValueError(f"q [tokens, Hq, d] and k [tokens, Hkv, d] with d a power of two >= {DC}; "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}")
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("q and k need a contiguous last dimension")
    paged = req_to_token is not None
    if paged == (cu_seqlens_k is not None) or (paged and req_pool_indices is None):
        raise ValueError("give exactly one KV layout: cu_seqlens_k, or req_to_token + req_pool_indices")
    bsz = kv_lens.shape[0]
    nb = max(1, math.ceil(max_kv_len / BLOCK))
    maxk = max_blocks_per_row(budgets, nb)
    if out is None:
        out = empty_index(heads, bsz, nb, maxk, q.device)
    elif (out.block_cnt.shape != (bsz, hq, nb) or out.block_idx.shape[:3] != (bsz, hq, nb)
          or out.block_idx.shape[3] < maxk or out.block_idx.stride(-1) != 1):
        raise ValueError(f"out has shapes {tuple(out.block_idx.shape)} / {tuple(out.block_cnt.shape)}, "
                         f"expected [{bsz}, {hq}, {nb}, >= {maxk}] (last dim contiguous) / [{bsz}, {hq}, {nb}]")
    return heads, paged, nb, maxk, out


def launched_rows(rows: int, max_q_len: int | None, unit: int) -> int:
    """How many of a sequence's ``rows`` selection rows (``unit`` tokens each) a builder launches: all of them, or,
    given ``max_q_len``, the ones the prefill kernels read, ``ceil(max_q_len / unit) + 1`` from the row holding
    the first query (+1: an unaligned prefix spans one more row; the kernels' grids count the same)."""
    return rows if max_q_len is None else min(rows, math.ceil(max_q_len / unit) + 1)


def build_topk_index(budgets: Sequence[HeadBudget], q: torch.Tensor, k: torch.Tensor,
                     cu_seqlens_q: torch.Tensor, kv_lens: torch.Tensor, max_kv_len: int, *,
                     cu_seqlens_k: torch.Tensor | None = None, req_to_token: torch.Tensor | None = None,
                     req_pool_indices: torch.Tensor | None = None, out: BlockIndex | None = None,
                     num_warps: int | None = None, max_q_len: int | None = None) -> BlockIndex:
    """Fill the top-k heads' rows of a :class:`BlockIndex` (two Triton launches, no host sync).

    Arguments as :func:`.index.build_block_index`. ``out``: a BlockIndex of shape ``[B, Hq, NB, >= MAXK]``
    to fill in place (its other heads' rows are left untouched); when None, a zeroed one is allocated
    (``head_dense`` set, rows of dense/streaming/vertical-slash heads left zero). Returns it.
    ``num_warps``: of the selection kernel (default: by ``NBP``, see :func:`column_warps`). ``max_q_len``: a host
    bound on the queries per sequence; given, only the rows the prefill kernels read are built (the query
    blocks of each sequence, from the one holding its first query), else every row ``qi < NB``."""
    heads, paged, nb, maxk, out = builder_frame(budgets, q, k, kv_lens, max_kv_len, cu_seqlens_k, req_to_token,
                                                req_pool_indices, out)
    hq, d = q.shape[1], q.shape[2]
    dev = q.device
    bsz = kv_lens.shape[0]
    hkv = k.shape[1]
    group = hq // hkv
    kv_lens = kv_lens.to(dev)
    dummy = cu_seqlens_q
    pool_k, select_k = _kernels()
    cuda = q.is_cuda
    cast = {torch.bfloat16: 1, torch.float16: 2}.get(q.dtype, 0) if cuda else 0   # CPU: float32 like the reference
    bi, bc = out.block_idx, out.block_cnt
    for tile, topk in heads.topk_by_tile.items():
        topk_t, slot, kv_heads = _head_maps(heads, tile, group, str(dev))
        t = len(topk)
        ns = nb if tile == BLOCK else math.ceil(nb * BLOCK / tile)     # selection rows (and KV units)
        counts = topk_counts_tensor(tuple(budgets[h] for h in topk), ns, str(dev))
        kp = torch.empty(bsz, hkv, ns, d, dtype=torch.float32, device=dev)
        qp = torch.empty(bsz, t, ns, d, dtype=torch.float32, device=dev)
        pool_k[(ns, bsz, kv_heads.shape[0])](
            q, k, qp, kp, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            cu_seqlens_q, kv_lens, cu_seqlens_k if not paged else dummy,
            req_to_token if paged else dummy, req_pool_indices if paged else dummy,
            req_to_token.stride(0) if paged else 0, slot, kv_heads, ns, t,
            HKV=hkv, GROUP=group, D=d, BLOCK_N=tile, PAGED=paged, num_warps=4 if cuda else 1)
        nbp = max(16, triton_next_pow2(ns))
        select_k[(math.ceil(launched_rows(ns, max_q_len, tile) / BM), t, bsz)](
            qp, kp, topk_t, counts, bi, bc, bi.stride(0), bi.stride(1), bi.stride(2), bc.stride(0), bc.stride(1),
            ns, t, maxk, nb, cu_seqlens_q, kv_lens, tile, HKV=hkv, GROUP=group, D=d, BM=BM, NBP=nbp, DC=DC,
            CAST=cast, IEEE=cuda, EXPAND=tile != BLOCK, QUERY_ROWS=max_q_len is not None,
            num_warps=num_warps or column_warps(nbp, cuda), num_stages=1)
    return out


def triton_next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
