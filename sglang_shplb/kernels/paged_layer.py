"""Every head of one attention layer on the sparse kernels, over SGLang's paged KV pool (no SGLang import).

This is the GPU path of the ``shplb`` backend: it replaces the stock backend for a layer that has sparse
heads, instead of letting the stock backend compute all heads and recomputing the sparse ones.

* **Extend** (prefill, chunked prefill, radix prefix hit): :class:`~sglang_shplb.kernels.SparsePrefill`
  for all heads of the layer. A batch without cached prefixes reads the new tokens' K/V directly
  (contiguous layout; dense heads on torch SDPA / cuDNN); a batch with prefixes reads the pool through
  ``req_to_token`` (dense heads on the 128-row Triton kernel). Layers with top-k / vertical-slash heads
  then (re)build the per-page key min/max of the pages the batch wrote (from each request's first new token)
  for decode. These page summaries are indexed by KV-pool page (one row per 64 pool slots, ``--page-size 64``;
  a request's page ``j`` is pool page ``req_to_token[req, 64j] // 64``), so they cost 1/64 of the layer's K+V
  whatever the number of request slots.
* **Decode**: fold the new token into its page summary and choose the pages of top-k / vertical-slash
  heads (Quest / LServe upper bound) and build the union lists of KV groups that mix budgets, all in one
  Triton launch (:func:`~sglang_shplb.kernels.triton_select.update_and_select_pages`), then run
  :func:`~sglang_shplb.kernels.triton_decode.group_decode` for all heads (dense: every page; streaming:
  sink + window pages; one launch with its split-K combine; a layer that selects no pages but has a KV group
  mixing budgets runs a page-union launch first), which with ``--page-size 64`` loads one pool slot per page
  (``pool_page_size``) instead of one per token. Fixed shapes and no host sync: safe inside a captured CUDA graph.
  A selection is kept per request slot for ``reselect_every`` steps
  (:class:`~sglang_shplb.kernels.triton_select.KeptSelections`, :func:`~sglang_shplb.core.patterns.reselect_due`):
  the steps between skip the scoring and the bisection. An extend forgets the selections of its requests' slots.

The layer's heads are classified once (:class:`~sglang_shplb.kernels.layer_heads.LayerHeads`) and handed to
every kernel front end. Batch metadata is built once per forward (:class:`ExtendBatch`); decode scratch
buffers are shared by all layers (:class:`DecodeWorkspace`), sized for the largest batch before graph capture.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from sglang_shplb.core.patterns import BLOCK, DECODE_RESELECT_EVERY, HeadBudget
from sglang_shplb.kernels.api import SparsePrefill
from sglang_shplb.kernels.block_index import to_device
from sglang_shplb.kernels.layer_heads import LayerHeads
from sglang_shplb.kernels.triton_decode import (SPLIT_MIN_PAGES, DecodeScratch, SummaryRows, alloc_page_summaries,
                                                build_page_summaries, decode_splits, decode_walks, group_decode,
                                                max_decode_splits, max_selected_pages, page_rules, summary_rows)
from sglang_shplb.kernels.triton_select import KeptSelections, SelectScratch, selector_consts, update_and_select_pages


@dataclass
class ExtendBatch:
    """One extend batch's metadata, shared by all layers (built on the host once per forward)."""
    cu_seqlens_q: torch.Tensor       # [B + 1] int32, device
    seq_lens: torch.Tensor           # [B] int32, device: tokens per sequence, prefix included
    req_to_token: torch.Tensor       # [R, max_ctx] int32
    req_pool_indices: torch.Tensor   # [B] int32, device
    q_lens_cpu: list[int]
    kv_lens_cpu: list[int]
    _summary_rows: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def has_prefix(self) -> bool:
        return any(a != b for a, b in zip(self.q_lens_cpu, self.kv_lens_cpu))

    def summary_rows(self, scratch_page: int) -> SummaryRows:
        """Where the pages this batch writes are (:func:`~.triton_decode.summary_rows`): per request from the
        page holding its first new token (``prefix // 64``) to its last page, so a chunk of a long prompt
        summarizes its own pages, not the whole prompt again. Built on the first layer that summarizes and kept
        for the others."""
        if scratch_page not in self._summary_rows:
            first = [(kv - q) // BLOCK for q, kv in zip(self.q_lens_cpu, self.kv_lens_cpu)]
            width = max(math.ceil(kv / BLOCK) - f for f, kv in zip(first, self.kv_lens_cpu))
            self._summary_rows[scratch_page] = summary_rows(
                self.req_to_token, self.req_pool_indices, self.seq_lens, scratch_page, width,
                first_page=to_device(torch.tensor(first, dtype=torch.int64), self.req_pool_indices.device))
        return self._summary_rows[scratch_page]

    @staticmethod
    def build(req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, q_lens_cpu: Sequence[int],
              kv_lens_cpu: Sequence[int]) -> "ExtendBatch":
        dev = req_pool_indices.device
        ql, kl = [int(x) for x in q_lens_cpu], [int(x) for x in kv_lens_cpu]
        if len(ql) != len(kl) or any(a < 1 or a > b for a, b in zip(ql, kl)):
            raise ValueError(f"extend lengths disagree: q {ql} vs kv {kl}")
        cu = torch.tensor([0] + ql, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        return ExtendBatch(to_device(cu, dev), to_device(torch.tensor(kl, dtype=torch.int32), dev),
                           req_to_token, req_pool_indices.int(), ql, kl)


class DecodeWorkspace:
    """Scratch of the decode path shared by every layer: chosen pages, page scores, split-K partials and
    union lists (:class:`~.triton_decode.DecodeScratch`). Allocated for the largest batch up front
    (``ensure`` before CUDA-graph capture), then only sliced. The partials are sized for the most splits a
    layer of ``max_pages`` pages can take (:func:`~.triton_decode.max_decode_splits`)."""

    def __init__(self, num_q_heads: int, num_kv_heads: int, head_dim: int, max_pages: int, max_sel: int, device,
                 max_selected_heads: int = 1) -> None:
        self.hq, self.hkv, self.d, self.max_pages, self.max_sel = num_q_heads, num_kv_heads, head_dim, max_pages, max_sel
        self.device = device
        self.max_selected_heads = max(1, max_selected_heads)
        self.capacity = 0

    def ensure(self, max_bs: int) -> None:
        if max_bs <= self.capacity:
            return
        if torch.device(self.device).type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"shplb: decode workspace holds {self.capacity} requests, the captured batch has "
                               f"{max_bs}; it must be sized before capture (init_cuda_graph_state)")
        self.page_idx = torch.zeros(max_bs, self.hq, self.max_sel, dtype=torch.int32, device=self.device)
        self.page_cnt = torch.zeros(max_bs, self.hq, dtype=torch.int32, device=self.device)
        self.select = SelectScratch.alloc(max_bs, self.max_selected_heads, self.max_pages, self.hkv, self.device)
        rows = max(bs * self.hq * max_decode_splits(self.max_pages, bs) for bs in range(1, max_bs + 1))
        self.scratch = DecodeScratch(max_bs, self.hq, self.hkv, self.d, self.max_pages, rows, self.device)
        self.capacity = max_bs


def layer_max_selected(budgets: Sequence[HeadBudget], max_ctx: int) -> int:
    """Width of a layer's ``page_idx`` at context ``max_ctx`` (:func:`~.triton_decode.max_selected_pages`)."""
    return max_selected_pages(LayerHeads.of(budgets), math.ceil(max_ctx / BLOCK))


def selected_heads(budgets: Sequence[HeadBudget]) -> int:
    """How many of a layer's heads select their pages (top-k, vertical-slash)."""
    return len(LayerHeads.of(budgets).selected)


class LayerKernels:
    """One layer's rank-local heads at their budgets, all on the kernels (see the module docstring).
    ``pool_tokens``: slots of SGLang's token pool (the K buffer's first dimension), which the decode page
    summaries cover page by page; the pool must hand out 64-slot pages (``--page-size 64``). ``decode=False``:
    the layer never decodes on the kernels (stock in every decode bucket), so it keeps no summaries.
    ``pool_page_size``: the pool's page size as decode reads it (:func:`~.triton_decode.group_decode`): 64 when
    each 64-token page of a request is 64 consecutive slots (one index load per page), 1 for any layout
    (one per token; a server whose plan selects no pages may run with ``--page-size 1``). ``request_slots``:
    rows of ``req_to_token``, for the selections kept ``reselect_every`` decode steps (None, or ``reselect_every``
    1: every step selects). ``decode_budgets`` (default ``budgets``): the budgets decode follows; the server
    passes :func:`~sglang_shplb.core.patterns.decode_budgets` of the layer."""

    def __init__(self, budgets: Sequence[HeadBudget], num_kv_heads: int, head_dim: int, max_ctx: int,
                 kv_dtype: torch.dtype, device, *, pool_tokens: int, decode: bool = True,
                 pool_page_size: int = 1, request_slots: int | None = None,
                 reselect_every: int = DECODE_RESELECT_EVERY,
                 decode_budgets: Sequence[HeadBudget] | None = None) -> None:
        self.budgets = list(budgets)
        self.decode_budgets = self.budgets if decode_budgets is None else list(decode_budgets)
        if len(self.decode_budgets) != len(self.budgets):
            raise ValueError(f"{len(self.decode_budgets)} decode budgets for {len(self.budgets)} heads")
        self.pool_page_size = pool_page_size
        self.heads = LayerHeads.of(budgets, num_kv_heads, head_dim)
        dh = self.decode_heads = LayerHeads.of(self.decode_budgets, num_kv_heads, head_dim)
        self.hq, self.hkv, self.d = len(budgets), num_kv_heads, head_dim
        self.max_pages = math.ceil(max_ctx / BLOCK)
        self.prefill = SparsePrefill(self.budgets, num_kv_heads, head_dim)
        self.page_rules = page_rules(dh, num_kv_heads, device)
        self.walks = decode_walks(dh, num_kv_heads, self.max_pages)
        self.selects = bool(dh.selected)
        self.kmin = self.kmax = None
        self.kept: KeptSelections | None = None
        #: an int32 device scalar the server writes per batch (None: always sparse): nonzero runs the decode step
        #: dense on the same launches, so a decode CUDA graph shared by every bucket follows the bucket's route
        self.route: torch.Tensor | None = None
        if self.selects and decode:   # page summaries [pool pages + 1, Hkv, d] x 2, indexed by pool page
            self.kmin, self.kmax = alloc_page_summaries(pool_tokens, num_kv_heads, head_dim,
                                                        dtype=kv_dtype, device=device)
            self.select_consts = selector_consts(dh, device, self.max_pages)
            if request_slots and reselect_every > 1:
                self.kept = KeptSelections.alloc(request_slots, len(dh.selected), self.max_pages,
                                                 num_kv_heads, reselect_every, device)

    @property
    def summary_bytes(self) -> int:
        return 0 if self.kmin is None else 2 * self.kmin.numel() * self.kmin.element_size()

    @property
    def kept_bytes(self) -> int:
        return 0 if self.kept is None else self.kept.nbytes

    def extend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_buffer: torch.Tensor,
               v_buffer: torch.Tensor, batch: ExtendBatch, scale: float, out: torch.Tensor) -> torch.Tensor:
        """``q [T, Hq, d]``, ``k/v [T, Hkv, d]``: this batch's new tokens, already written to the pool."""
        self.prefill_batch(q, k, v, k_buffer, v_buffer, batch, scale, out)
        self.summarize(k_buffer, batch)
        return out

    def prefill_batch(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_buffer: torch.Tensor,
                      v_buffer: torch.Tensor, batch: ExtendBatch, scale: float, out: torch.Tensor) -> None:
        """The attention of :meth:`extend` without the summaries: a batch with a cached prefix reads the pool
        (paged), one without reads the new tokens (contiguous)."""
        max_q, max_kv = max(batch.q_lens_cpu), max(batch.kv_lens_cpu)
        sp = self.prefill
        sp.sm_scale = scale
        if batch.has_prefix:
            sp.plan(batch.cu_seqlens_q, batch.seq_lens, max_q, max_kv, req_to_token=batch.req_to_token,
                    req_pool_indices=batch.req_pool_indices, q_lens_cpu=batch.q_lens_cpu,
                    kv_lens_cpu=batch.kv_lens_cpu, kv_page_size=self.pool_page_size)
            sp.run(q, k_buffer, v_buffer, out=out)
        else:
            sp.plan(batch.cu_seqlens_q, batch.seq_lens, max_q, max_kv, cu_seqlens_k=batch.cu_seqlens_q,
                    q_lens_cpu=batch.q_lens_cpu, kv_lens_cpu=batch.kv_lens_cpu)
            sp.run(q, k, v, out=out)

    def summarize(self, k_buffer: torch.Tensor, batch: ExtendBatch) -> None:
        """(Re)build the key min/max of the pool pages the batch wrote, which decode's page selection reads
        (through ``req_to_token``), and forget the selections their slots kept."""
        if self.kmin is not None:
            build_page_summaries(k_buffer, batch.req_to_token, batch.req_pool_indices, batch.seq_lens,
                                 self.kmin, self.kmax, rows=batch.summary_rows(self.kmin.shape[0] - 1))
        if self.kept is not None:
            self.kept.forget(batch.req_pool_indices)

    def decode(self, q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor, req_to_token: torch.Tensor,
               req_pool_indices: torch.Tensor, seq_lens: torch.Tensor, ws: DecodeWorkspace, scale: float,
               out: torch.Tensor) -> torch.Tensor:
        """``q [B, Hq, d]``: the token at position ``seq_lens - 1``, already written to the pool."""
        bs = q.shape[0]
        ws.ensure(bs)
        page_idx, page_cnt = ws.page_idx[:bs], ws.page_cnt[:bs]
        if self.selects:
            if self.kmin is None:
                raise RuntimeError("shplb: this layer was built without decode page summaries (decode=False)")
            update_and_select_pages(q, k_buffer, req_to_token, req_pool_indices, seq_lens, self.kmin, self.kmax,
                                    self.select_consts, self.max_pages, page_idx, page_cnt, scratch=ws.select,
                                    union=(self.page_rules, ws.scratch), kept=self.kept, route=self.route)
        nsplit, split_pages = self.splits(bs)
        if self.route is not None:   # enough slices for a dense walk too (at least SPLIT_MIN_PAGES pages each)
            nsplit = max(nsplit, decode_splits([self.max_pages] * self.hkv, bs)[0])
        return group_decode(q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens, self.page_rules,
                            page_idx, page_cnt, ws.scratch, nsplit, split_pages, sm_scale=scale, out=out,
                            pool_page_size=self.pool_page_size, union_built=self.selects, route=self.route,
                            dense_split_pages=SPLIT_MIN_PAGES)

    def splits(self, bs: int) -> tuple[int, int]:
        """``(nsplit, split_pages)`` of this layer's page walks at batch size ``bs``."""
        return decode_splits(self.walks, bs)
