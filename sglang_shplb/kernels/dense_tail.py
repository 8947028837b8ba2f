"""The dense tail (:data:`~sglang_shplb.core.patterns.DENSE_TAIL`): the last query rows of every request of an
extend batch whose extend ends its prompt (:func:`~sglang_shplb.core.patterns.tail_rows`: not the earlier chunks
of a chunked prefill) recomputed with dense attention over all the request's keys, in the heads asked for, on top
of what the sparse kernels wrote: ``tail`` rows x ``kv_len`` keys per head (1.6 % of a dense head's FLOPs at 8K,
0.1 % at 128K). On CUDA two Triton launches for the whole batch read the keys in place and split them
(:func:`.triton_tail.tail_attention`); elsewhere, and as its reference, two attention calls per request for the KV
groups that hold a tail head over their gathered keys (:func:`.dense_pieces.piece_after_prefix`). No SGLang
import."""
from __future__ import annotations

from typing import Sequence

import torch

from sglang_shplb.core.patterns import tail_rows
from sglang_shplb.kernels.dense_pieces import dense_piece, gather_rows
from sglang_shplb.kernels.head_parallel import KVRows, head_index
from sglang_shplb.kernels.triton_tail import tail_attention


def _request_tail(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """``q [t, Hq, d]``, the last ``t`` of ``L`` positions; ``k/v [L, Hkv, d]`` → float32 ``[t, Hq, d]``, every head
    dense (one grouped :func:`.dense_pieces.dense_piece`)."""
    t, hq, d = q.shape
    hkv = k.shape[1]
    qg = q.transpose(0, 1).reshape(hkv, hq // hkv, t, d)
    o = dense_piece(qg, k.transpose(0, 1), v.transpose(0, 1), scale)
    return o.reshape(hq, t, d).transpose(0, 1)


def dense_tail(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor, kv: KVRows,
               q_lens: Sequence[int], kv_lens: Sequence[int], heads: Sequence[int], scale: float,
               out: torch.Tensor, ends: Sequence[bool] | None = None) -> None:
    """Overwrite ``out [T, H, d]`` at the tail rows of every request, columns ``heads``: dense causal attention
    of those queries (``q [T, H, d]``, request ``i``'s last ``q_lens[i]`` of ``kv_lens[i]`` positions) over
    the request's keys (``kv``: where they are in ``k_buffer/v_buffer``). ``ends[i]``: whether request ``i``'s
    extend ends its prompt (none: every one does); the others have no tail. Host lengths: no device sync. CUDA:
    :func:`.triton_tail.tail_attention`; elsewhere :func:`gathered_tail`."""
    heads = list(heads)
    if not heads or q.shape[0] == 0 or (ends is not None and not any(ends)):
        return
    if q.is_cuda:
        tail_attention(q, k_buffer, v_buffer, *kv.paged(kv_lens, q.device), q_lens, kv_lens, heads, scale, out,
                       ends)
    else:
        gathered_tail(q, k_buffer, v_buffer, kv, q_lens, kv_lens, heads, scale, out, ends)


def gathered_tail(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor, kv: KVRows,
                  q_lens: Sequence[int], kv_lens: Sequence[int], heads: Sequence[int], scale: float,
                  out: torch.Tensor, ends: Sequence[bool] | None = None) -> None:
    """:func:`dense_tail` per request over the gathered keys of the KV groups that hold a tail head, in two
    attention calls (prefix, diagonal; cuDNN on CUDA): the CPU route and the Triton route's reference."""
    heads = list(heads)
    group = q.shape[1] // k_buffer.shape[1]
    groups = sorted({h // group for h in heads})      # only the KV groups that hold a tail head are computed
    q_cols = [g * group + j for g in groups for j in range(group)]
    dev = q.device
    hs, qs, gs = head_index(heads, dev), head_index(q_cols, dev), head_index(groups, dev)
    picked = head_index([q_cols.index(h) for h in heads], dev)   # the tail heads among ``q_cols``
    c = 0
    for i, (n, L) in enumerate(zip(q_lens, kv_lens)):
        t = tail_rows(n, ends is None or ends[i])
        if t == 0:
            c += n
            continue
        rows = kv.rows(i, L)
        o = _request_tail(q[c + n - t:c + n, qs], gather_rows(k_buffer, rows, gs), gather_rows(v_buffer, rows, gs),
                          scale)
        out[c + n - t:c + n, hs] = o[:, picked].to(out.dtype)
        c += n
