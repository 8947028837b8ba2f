"""FlashInfer-like plan()/run() objects over the Triton kernels."""
from __future__ import annotations

import math
from typing import Sequence

import torch

from ..patterns import BLOCK, HeadBudget, Pattern
from .index import BlockIndex, build_block_index, check_budgets, check_qkv
from .triton_decode import (alloc_page_summaries, build_page_summaries, decode_splits, group_modes, head_modes,
                            max_selected_pages, select_pages, sparse_decode, update_page_summaries)
from .triton_prefill import sparse_prefill


class SparsePrefill:
    """Sparse causal prefill / extend with per-head budgets.

    >>> sp = SparsePrefill(budgets, num_kv_heads=8, head_dim=128)
    >>> sp.plan(cu_seqlens_q, kv_lens, max_q_len, max_kv_len, cu_seqlens_k=cu_k)   # or req_to_token=..., req_pool_indices=...
    >>> o = sp.run(q, k, v)        # builds the block index on the device (no host sync), then the kernel

    ``run(..., index=BlockIndex)`` skips the index builders (explicit masks: :func:`block_index_from_masks`).
    When every head is dense, the batch has one sequence, KV is contiguous and there is no prefix, ``run``
    calls torch SDPA (flash / cuDNN), the fastest dense kernel on the machine.
    """

    def __init__(self, budgets: Sequence[HeadBudget], num_kv_heads: int, head_dim: int,
                 sm_scale: float | None = None) -> None:
        check_budgets(budgets, len(budgets), num_kv_heads)
        if head_dim not in (64, 128):
            raise ValueError(f"head_dim {head_dim} is not supported (only 64 and 128)")
        self.budgets = list(budgets)
        self.num_q_heads = len(budgets)
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.sm_scale = sm_scale
        self.all_dense = all(b.pattern is Pattern.DENSE for b in budgets)
        self.last_index: BlockIndex | None = None
        self._planned = False

    def plan(self, cu_seqlens_q: torch.Tensor, kv_lens: torch.Tensor, max_q_len: int, max_kv_len: int, *,
             cu_seqlens_k: torch.Tensor | None = None, req_to_token: torch.Tensor | None = None,
             req_pool_indices: torch.Tensor | None = None) -> "SparsePrefill":
        if (cu_seqlens_k is None) == (req_to_token is None):
            raise ValueError("plan needs exactly one KV layout: cu_seqlens_k or req_to_token + req_pool_indices")
        if req_to_token is not None and req_pool_indices is None:
            raise ValueError("paged KV needs req_pool_indices")
        if cu_seqlens_q.dim() != 1 or kv_lens.dim() != 1 or cu_seqlens_q.shape[0] != kv_lens.shape[0] + 1:
            raise ValueError(f"cu_seqlens_q {tuple(cu_seqlens_q.shape)} and kv_lens {tuple(kv_lens.shape)} disagree")
        if max_q_len < 1 or max_kv_len < max_q_len:
            raise ValueError(f"need 1 <= max_q_len <= max_kv_len, got {max_q_len}, {max_kv_len}")
        self.cu_seqlens_q = cu_seqlens_q.int()
        self.kv_lens = kv_lens.int()
        self.max_q_len, self.max_kv_len = int(max_q_len), int(max_kv_len)
        self.cu_seqlens_k = None if cu_seqlens_k is None else cu_seqlens_k.int()
        self.req_to_token = None if req_to_token is None else req_to_token.int()
        self.req_pool_indices = None if req_pool_indices is None else req_pool_indices.int()
        self._sdpa_ok = (self.all_dense and kv_lens.shape[0] == 1 and self.cu_seqlens_k is not None
                         and self.max_q_len == self.max_kv_len)
        self._planned = True
        return self

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, index: BlockIndex | None = None,
            out: torch.Tensor | None = None, use_sdpa: bool = True) -> torch.Tensor:
        if not self._planned:
            raise ValueError("call plan() before run()")
        check_qkv(q, k, v)
        if q.shape[1] != self.num_q_heads or k.shape[1] != self.num_kv_heads or q.shape[2] != self.head_dim:
            raise ValueError(f"q {tuple(q.shape)} / k {tuple(k.shape)} disagree with the plan "
                             f"({self.num_q_heads} q heads, {self.num_kv_heads} KV heads, d={self.head_dim})")
        if use_sdpa and self._sdpa_ok and index is None and q.is_cuda:
            g = self.num_q_heads // self.num_kv_heads
            qq = q.transpose(0, 1)[None]
            kk = k.transpose(0, 1)[None]
            vv = v.transpose(0, 1)[None]
            o = torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, is_causal=True, scale=self.sm_scale,
                                                                 enable_gqa=g > 1)
            o = o[0].transpose(0, 1)
            if out is not None:
                out.copy_(o)
                return out
            return o
        if index is None:
            index = build_block_index(self.budgets, q, k, self.cu_seqlens_q, self.kv_lens, self.max_kv_len,
                                      cu_seqlens_k=self.cu_seqlens_k, req_to_token=self.req_to_token,
                                      req_pool_indices=self.req_pool_indices)
        self.last_index = index
        return sparse_prefill(q, k, v, index.block_idx, index.block_cnt, index.head_dense, self.cu_seqlens_q,
                              self.kv_lens, self.max_q_len, cu_seqlens_k=self.cu_seqlens_k,
                              req_to_token=self.req_to_token, req_pool_indices=self.req_pool_indices,
                              sm_scale=self.sm_scale, out=out)


class SparseDecode:
    """Sparse paged decode with per-head budgets and a reusable query-aware page selection.

    >>> sd = SparseDecode(budgets, num_kv_heads=8, head_dim=128, max_ctx=131072, num_req_slots=R, dtype=torch.bfloat16, device="cuda")
    >>> sd.build_summaries(k_buffer, req_to_token, req_pool_indices, seq_lens)        # after prefill
    >>> sd.plan(batch_size)                                                          # fixed shapes: graph-capturable
    >>> o = sd.run(q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens, reselect=True)
    >>> # next step: append the token, then sd.update_summaries(...) and run(..., reselect=False) to reuse pages

    ``run(..., reselect=None)`` reselects every ``reselect_every`` steps (1 = every step)."""

    def __init__(self, budgets: Sequence[HeadBudget], num_kv_heads: int, head_dim: int, max_ctx: int,
                 num_req_slots: int, dtype=torch.bfloat16, device=None, sm_scale: float | None = None,
                 reselect_every: int = 1) -> None:
        check_budgets(budgets, len(budgets), num_kv_heads)
        if head_dim not in (64, 128):
            raise ValueError(f"head_dim {head_dim} is not supported (only 64 and 128)")
        if reselect_every < 1:
            raise ValueError(f"reselect_every must be >= 1, got {reselect_every}")
        self.budgets = list(budgets)
        self.num_q_heads = len(budgets)
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.max_pages = math.ceil(max_ctx / BLOCK)
        self.sm_scale = sm_scale
        self.reselect_every = reselect_every
        _, self.sink, self.window = head_modes(budgets, device)
        self.mode, gmode, gsink, gwin = group_modes(budgets, num_kv_heads, device)
        self.groups = (gmode, gsink, gwin)
        self.kmin, self.kmax = alloc_page_summaries(num_req_slots, num_kv_heads, self.max_pages, head_dim,
                                                    dtype=dtype, device=device)
        self.maxsel = max_selected_pages(budgets, self.max_pages)
        self._step = 0
        self.page_idx = self.page_cnt = None

    def build_summaries(self, k_buffer, req_to_token, req_pool_indices, seq_lens) -> None:
        build_page_summaries(k_buffer, req_to_token, req_pool_indices, seq_lens, self.kmin, self.kmax)

    def update_summaries(self, k_buffer, req_to_token, req_pool_indices, seq_lens) -> None:
        update_page_summaries(k_buffer, req_to_token, req_pool_indices, seq_lens, self.kmin, self.kmax)

    def plan(self, batch_size: int, device=None, nsplit: int | None = None) -> "SparseDecode":
        dev = device if device is not None else self.kmin.device
        hq, d = self.num_q_heads, self.head_dim
        self.nsplit = nsplit if nsplit is not None else decode_splits(self.max_pages, batch_size, hq)
        self.page_idx = torch.zeros(batch_size, hq, self.maxsel, dtype=torch.int32, device=dev)
        self.page_cnt = torch.zeros(batch_size, hq, dtype=torch.int32, device=dev)
        self.workspace = (torch.empty(batch_size * hq * self.nsplit, d, dtype=torch.float32, device=dev),
                          torch.empty(batch_size * hq * self.nsplit, dtype=torch.float32, device=dev))
        self._step = 0
        return self

    def select(self, q, req_pool_indices, seq_lens) -> None:
        select_pages(self.budgets, q, self.kmin, self.kmax, req_pool_indices, seq_lens, self.max_pages,
                     out=(self.page_idx, self.page_cnt))

    def run(self, q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens, *,
            reselect: bool | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        if self.page_idx is None:
            raise ValueError("call plan() before run()")
        if q.shape[0] != self.page_idx.shape[0]:
            raise ValueError(f"batch {q.shape[0]} differs from the planned {self.page_idx.shape[0]}")
        if reselect is None:
            reselect = self._step % self.reselect_every == 0
        if reselect:
            self.select(q, req_pool_indices, seq_lens)
        self._step += 1
        return sparse_decode(q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens, self.mode,
                             self.sink, self.window, self.page_idx, self.page_cnt, nsplit=self.nsplit,
                             sm_scale=self.sm_scale, out=out, workspace=self.workspace, groups=self.groups)
