"""The dense tail (:data:`~sglang_shplb.core.patterns.DENSE_TAIL`): the last query rows of every request of an
extend batch recomputed with dense attention over all the request's keys, in the heads asked for, on top of
what the sparse kernels wrote (their cost: ``tail`` rows x ``kv_len`` keys per head, 1.6 % of a dense head at
8K, 0.05 % at 128K; torch SDPA / cuDNN through :func:`.head_parallel.dense_heads`). No SGLang import."""
from __future__ import annotations

from typing import Sequence

import torch

from sglang_shplb.core.patterns import tail_rows
from sglang_shplb.kernels.block_index import to_device
from sglang_shplb.kernels.head_parallel import KVRows, dense_heads, head_index


def tail_positions(q_lens: Sequence[int]) -> tuple[list[int], list[int]]:
    """Rows of a packed ``[sum(q_lens), ...]`` batch in the tail, and each request's tail length."""
    rows, tails, c = [], [], 0
    for n in q_lens:
        t = tail_rows(n)
        rows.extend(range(c + n - t, c + n))
        tails.append(t)
        c += n
    return rows, tails


def dense_tail(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor, kv: KVRows,
               q_lens: Sequence[int], kv_lens: Sequence[int], heads: Sequence[int], scale: float,
               out: torch.Tensor) -> None:
    """Overwrite ``out [T, H, d]`` at the tail rows of every request, columns ``heads``: dense causal attention
    of those queries (``q [T, H, d]``, request ``i``'s last ``q_lens[i]`` of ``kv_lens[i]`` positions) over
    the request's keys (``kv``: where they are in ``k_buffer/v_buffer``). Host lengths: no device sync."""
    heads = list(heads)
    if not heads or q.shape[0] == 0:
        return
    rows, tails = tail_positions(q_lens)
    idx = to_device(torch.tensor(rows, dtype=torch.long), q.device)
    tail_out = out.index_select(0, idx)
    dense_heads(q.index_select(0, idx), k_buffer, v_buffer, kv, tails, kv_lens, heads, scale, tail_out)
    out.index_copy_(0, idx, tail_out)
