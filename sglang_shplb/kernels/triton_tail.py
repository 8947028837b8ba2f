"""The dense tail on the GPU (:func:`sglang_shplb.kernels.dense_tail.dense_tail`'s CUDA route): each request's
last ``t <= DENSE_TAIL`` query rows, in the heads asked for, dense and causal over the request's keys, read in
place from the paged pool through ``req_to_token`` (no gather of the prefix), and split over the keys.

Why split: ``t`` rows are one 64-row query tile per head, so a tail has as many tiles as heads (4-32 on the
benchmark shapes) for a GPU of 132 SMs, each streaming every key: cuDNN's SDPA on that shape is latency-bound
(~0.9 ms at 64K keys whatever the head count on an H100, ``bench/results/head_parallel.md`` round 12). Here the
keys of a (request, head) are cut into ``NS`` slices (flash decoding with a 64-row tile):

* launch 1, grid (request, head, slice): the slice's keys ``[s S, min((s+1) S, L))``, online softmax in base 2,
  unnormalised ``acc`` and ``(m, l)`` per row into a scratch buffer;
* launch 2, grid (request, head): ``m* = max_s m_s``, ``o = sum_s 2^(m_s - m*) acc_s / sum_s 2^(m_s - m*) l_s``,
  written into ``out`` at the request's tail rows, that head.

Row ``r`` of request ``b`` (``L`` keys, ``t`` tail rows) is position ``L - t + r``: it reads keys ``0 ..
L - t + r``. Its reference is :func:`sglang_shplb.kernels.dense_tail.gathered_tail` (per request, SDPA / cuDNN
pieces over the gathered keys)."""
from __future__ import annotations

from functools import lru_cache
from itertools import accumulate
from typing import Sequence

import torch

from sglang_shplb.core.patterns import DENSE_TAIL, tail_rows
from sglang_shplb.kernels.block_index import int_tensor, to_device
from sglang_shplb.kernels.triton_prefill import LOG2E
from sglang_shplb.kernels.triton_jit import length_free_jit

BLOCK_N = 64          # keys per step
PROGRAMS_PER_SM = 2   # slices are chosen so that the first launch has about this many programs per SM


@lru_cache(maxsize=None)
def _kernels():
    from sglang_shplb.kernels._triton_compat import import_triton
    triton, tl = import_triton()

    @length_free_jit(triton)
    def _tail_slice_kernel(Q, K, V, R2T, RPI, QEND, TLEN, KVLEN, HEADS, ACC, ML, scale_log2, slice_len,
                           stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_r2t,
                           NS, GROUP: tl.constexpr, D: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                           DOT_F32: tl.constexpr):
        # program (b, j, s): request b, head HEADS[j], key slice s; ACC [B, H, NS, BLOCK_M, BLOCK_D] and
        # ML [B, H, NS, 2, BLOCK_M] (m, l) in float32, base 2
        b = tl.program_id(0)
        j = tl.program_id(1)
        s = tl.program_id(2)
        L = tl.load(KVLEN + b)
        start = s * slice_len
        if start < L:
            h = tl.load(HEADS + j)
            hk = h // GROUP
            t = tl.load(TLEN + b)
            qend = tl.load(QEND + b)
            r = tl.arange(0, BLOCK_M)
            dd = tl.arange(0, BLOCK_D)
            row_ok = r < t
            d_ok = dd < D
            qpos = L - t + r                                                   # each row's position
            q = tl.load(Q + (qend - t + r)[:, None] * stride_qt + h * stride_qh + dd[None, :],
                        mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            if DOT_F32:  # the CPU interpreter's bf16 dot is wrong (as in triton_prefill): float32 there
                q = q.to(tl.float32)
            rpi = tl.load(RPI + b).to(tl.int64)
            m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_M], tl.float32)
            acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
            end = tl.minimum(start + slice_len, L)
            for n0 in range(start, end, BLOCK_N):
                pos = n0 + tl.arange(0, BLOCK_N)
                p_ok = pos < end
                loc = tl.load(R2T + rpi * stride_r2t + pos, mask=p_ok, other=0).to(tl.int64)
                k = tl.load(K + loc[:, None] * stride_kt + hk * stride_kh + dd[None, :],
                            mask=p_ok[:, None] & d_ok[None, :], other=0.0)
                if DOT_F32:
                    k = k.to(tl.float32)
                qk = tl.dot(q, tl.trans(k)) * scale_log2                        # log2-scaled scores
                ok = p_ok[None, :] & (pos[None, :] <= qpos[:, None])            # causal
                qk = tl.where(ok, qk, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(qk, 1))
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)           # a row with no key here yet
                p = tl.exp2(qk - m_use[:, None])
                alpha = tl.exp2(m_i - m_use)
                l_i = l_i * alpha + tl.sum(p, 1)
                v = tl.load(V + loc[:, None] * stride_vt + hk * stride_vh + dd[None, :],
                            mask=p_ok[:, None] & d_ok[None, :], other=0.0)
                if DOT_F32:
                    v = v.to(tl.float32)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
                m_i = m_new
            base = (b * tl.num_programs(1) + j) * NS + s
            tl.store(ACC + (base * BLOCK_M + r)[:, None] * BLOCK_D + dd[None, :], acc)
            tl.store(ML + base * 2 * BLOCK_M + r, m_i)
            tl.store(ML + base * 2 * BLOCK_M + BLOCK_M + r, l_i)

    @length_free_jit(triton)
    def _tail_merge_kernel(ACC, ML, OUT, QEND, TLEN, KVLEN, HEADS, slice_len, stride_ot, stride_oh, NS,
                           D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        # program (b, j): merge the slices of request b, head HEADS[j] that hold keys (cdiv(L, slice_len));
        # running m*, rescaled sums (one pass)
        b = tl.program_id(0)
        j = tl.program_id(1)
        L = tl.load(KVLEN + b)
        t = tl.load(TLEN + b)
        qend = tl.load(QEND + b)
        h = tl.load(HEADS + j)
        r = tl.arange(0, BLOCK_M)
        dd = tl.arange(0, BLOCK_D)
        m_run = tl.full([BLOCK_M], float("-inf"), tl.float32)
        den = tl.zeros([BLOCK_M], tl.float32)
        num = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        n_slices = (L + slice_len - 1) // slice_len
        for s in range(0, n_slices):
            base = (b * tl.num_programs(1) + j) * NS + s
            m_s = tl.load(ML + base * 2 * BLOCK_M + r)
            l_s = tl.load(ML + base * 2 * BLOCK_M + BLOCK_M + r)
            a_s = tl.load(ACC + (base * BLOCK_M + r)[:, None] * BLOCK_D + dd[None, :])
            m_new = tl.maximum(m_run, m_s)
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            w_old = tl.exp2(m_run - m_use)
            w_s = tl.exp2(m_s - m_use)
            den = den * w_old + l_s * w_s
            num = num * w_old[:, None] + a_s * w_s[:, None]
            m_run = m_new
        o = num / tl.where(den > 0, den, 1.0)[:, None]
        ok = (r < t)[:, None] & (dd < D)[None, :]
        tl.store(OUT + (qend - t + r)[:, None] * stride_ot + h * stride_oh + dd[None, :],
                 o.to(OUT.dtype.element_ty), mask=ok)

    return _tail_slice_kernel, _tail_merge_kernel


@lru_cache(maxsize=8)
def _sm_count(device: str) -> int:
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_properties(dev).multi_processor_count
    return 16         # the interpreter on the CPU: a few slices, so the tests cross slice edges


def tail_slices(num_tiles: int, max_kv: int, sms: int) -> tuple[int, int]:
    """``(slice_len, NS)``: slices of ``BLOCK_N``-multiples so that ``num_tiles`` (requests x heads) times the
    slices of the longest request is about ``PROGRAMS_PER_SM`` per SM, never a slice under one ``BLOCK_N``."""
    want = max(1, -(-PROGRAMS_PER_SM * sms // max(num_tiles, 1)))
    blocks = -(-max(max_kv, 1) // BLOCK_N)
    per_slice = -(-blocks // min(want, blocks))
    slice_len = per_slice * BLOCK_N
    return slice_len, -(-max(max_kv, 1) // slice_len)


def tail_keys(q_lens: Sequence[int], kv_lens: Sequence[int],
              ends: Sequence[bool] | None) -> tuple[list[int], list[int]]:
    """Per request its tail rows (:func:`~sglang_shplb.core.patterns.tail_rows`; ``ends`` none: every request ends
    its prompt) and the keys its tail reads: none for a request without a tail, so its programs do nothing."""
    ends = [True] * len(q_lens) if ends is None else ends
    tails = [tail_rows(n, e) for n, e in zip(q_lens, ends)]
    return tails, [L if t else 0 for t, L in zip(tails, kv_lens)]


@lru_cache(maxsize=8)
def _batch_lens(q_lens: tuple[int, ...], kv_lens: tuple[int, ...], ends: tuple[bool, ...] | None,
                device: str) -> tuple[torch.Tensor, int]:
    """``[3, B]`` int32 on ``device``: each request's last q row + 1, tail rows, keys its tail reads
    (:func:`tail_keys`); and the most keys a tail reads. Built once per batch (every layer of a forward passes the
    same lengths), copied without a sync."""
    tails, keys = tail_keys(q_lens, kv_lens, ends)
    return to_device(torch.tensor([list(accumulate(q_lens)), tails, keys], dtype=torch.int32), device), max(keys)


def tail_attention(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor, req_to_token: torch.Tensor,
                   req_pool_indices: torch.Tensor, q_lens: Sequence[int], kv_lens: Sequence[int],
                   heads: Sequence[int], scale: float, out: torch.Tensor, ends: Sequence[bool] | None = None) -> None:
    """Overwrite ``out [T, H, d]`` at request ``i``'s last ``tail_rows(q_lens[i], ends[i])`` rows (``ends`` none:
    every request ends its prompt), columns ``heads``, with dense causal attention of ``q [T, H, d]`` over its
    ``kv_lens[i]`` keys at ``k_buffer/v_buffer[req_to_token[req_pool_indices[i], :kv_lens[i]]]`` (``[pool, Hkv,
    d]``). Host lengths; two launches, no device sync."""
    heads = tuple(int(h) for h in heads)
    ends = None if ends is None else tuple(bool(e) for e in ends)
    if not heads or not q_lens or (ends is not None and not any(ends)):
        return
    if any(x.stride(-1) != 1 for x in (q, k_buffer, v_buffer, out)):
        raise ValueError("tail_attention: q, k_buffer, v_buffer and out need a contiguous head dimension")
    slice_kernel, merge_kernel = _kernels()
    dev = q.device
    d = q.shape[-1]
    group = q.shape[1] // k_buffer.shape[1]
    lens, max_keys = _batch_lens(tuple(q_lens), tuple(kv_lens), ends, str(dev))
    b, nh = len(q_lens), len(heads)
    slice_len, ns = tail_slices(b * nh, max_keys, _sm_count(str(dev)))
    block_d = max(16, 1 << (d - 1).bit_length())
    acc = torch.empty(b, nh, ns, DENSE_TAIL, block_d, dtype=torch.float32, device=dev)
    ml = torch.empty(b, nh, ns, 2, DENSE_TAIL, dtype=torch.float32, device=dev)
    hs = int_tensor(heads, str(dev))
    slice_kernel[(b, nh, ns)](
        q, k_buffer, v_buffer, req_to_token, req_pool_indices, lens[0], lens[1], lens[2], hs, acc, ml,
        scale * LOG2E, slice_len, q.stride(0), q.stride(1), k_buffer.stride(0), k_buffer.stride(1),
        v_buffer.stride(0), v_buffer.stride(1), req_to_token.stride(0), ns,
        GROUP=group, D=d, BLOCK_M=DENSE_TAIL, BLOCK_N=BLOCK_N, BLOCK_D=block_d,
        DOT_F32=(not q.is_cuda) and q.dtype == torch.bfloat16)
    merge_kernel[(b, nh)](acc, ml, out, lens[0], lens[1], lens[2], hs, slice_len, out.stride(0), out.stride(1), ns,
                          D=d, BLOCK_M=DENSE_TAIL, BLOCK_D=block_d)
