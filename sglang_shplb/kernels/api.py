"""FlashInfer-like plan()/run() objects over the Triton kernels."""
from __future__ import annotations

import math
from typing import Sequence

import torch

from sglang_shplb.core.patterns import BLOCK, HeadBudget, Pattern
from sglang_shplb.kernels.index import BlockIndex, build_block_index, check_budgets, check_qkv, pair_union_index
from sglang_shplb.kernels.triton_decode import (DecodeScratch, alloc_page_summaries, build_page_summaries, decode_heads, decode_splits,
                            decode_walks,
                            max_selected_pages, select_pages, sparse_decode, update_page_summaries)
from sglang_shplb.kernels.triton_prefill import RULE_DENSE_WINDOW, rule_prefill, sparse_prefill, tile_prefill, union_prefill


def _sdpa(qq, kk, vv, scale, gqa: bool):
    """torch SDPA, causal, preferring cuDNN then flash on CUDA (the fastest dense kernels on an H100)."""
    f = torch.nn.functional.scaled_dot_product_attention
    if qq.is_cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                 SDPBackend.MATH]
        try:
            ctx = sdpa_kernel(order, set_priority=True)
        except TypeError:  # pragma: no cover - torch < 2.6
            ctx = sdpa_kernel(order)
        with ctx:
            return f(qq, kk, vv, is_causal=True, scale=scale, enable_gqa=gqa)
    return f(qq, kk, vv, is_causal=True, scale=scale, enable_gqa=gqa)


class SparsePrefill:
    """Sparse causal prefill / extend with per-head budgets.

    >>> sp = SparsePrefill(budgets, num_kv_heads=8, head_dim=128)
    >>> sp.plan(cu_seqlens_q, kv_lens, max_q_len, max_kv_len, cu_seqlens_k=cu_k)   # or req_to_token=..., req_pool_indices=...
    >>> o = sp.run(q, k, v)        # builds the block index on the device (no host sync), then the kernels

    Heads are split by kind, all writing one ``out`` tensor:

    * **dense** heads go to torch SDPA (cuDNN / flash, grouped per KV head with ``enable_gqa``) for every
      sequence without a prefix, when the per-sequence lengths are known on the host: from CPU
      ``cu_seqlens_q``/``kv_lens``, from ``plan(..., q_lens_cpu=, kv_lens_cpu=)``, or for one sequence from
      the shapes. Otherwise (a prefix, lengths only on the device) they go to the 128-row Triton kernel;
    * **streaming** heads (and dense heads not sent to SDPA): :func:`.triton_prefill.rule_prefill`,
      128-row query tiles, no index;
    * **top-k (``tile=128``)** heads: :func:`.triton_prefill.tile_prefill`, 128 x 128 tiles over superblock
      lists (TMA loads of contiguous KV on sm90+);
    * **top-k (``tile=64``) / vertical-slash** heads: the block-index kernel :func:`.triton_prefill.sparse_prefill`.

    ``run(..., index=BlockIndex)`` skips the index builders and runs every head through the block-index
    kernel (explicit masks: :func:`block_index_from_masks`).
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
        g = self.num_q_heads // num_kv_heads
        self.dense_heads = [h for h, b in enumerate(budgets) if b.pattern is Pattern.DENSE]
        self.stream_heads = [h for h, b in enumerate(budgets) if b.pattern is Pattern.STREAMING]
        self.listed_heads = [h for h, b in enumerate(budgets) if b.pattern in (Pattern.TOPK, Pattern.VSLASH)]
        self.tile_heads = [h for h in self.listed_heads if budgets[h].tile != BLOCK]
        # dense heads grouped for SDPA: KV heads with the same number c of dense q heads share one call
        per_kv: dict[int, list[int]] = {}
        for h in self.dense_heads:
            per_kv.setdefault(h // g, []).append(h)
        by_c: dict[int, tuple[list[int], list[int]]] = {}
        for kvh, hs in sorted(per_kv.items()):
            qs, ks = by_c.setdefault(len(hs), ([], []))
            qs.extend(hs)
            ks.append(kvh)
        self._dense_groups = [(qs, ks, c) for c, (qs, ks) in sorted(by_c.items())]
        self._dev_cache: dict = {}
        self.last_index: BlockIndex | None = None
        self._planned = False

    def _t(self, key, vals, device) -> torch.Tensor:
        ck = (key, str(device))
        if ck not in self._dev_cache:
            self._dev_cache[ck] = torch.tensor(vals, dtype=torch.long if key[0] in ("qh", "kvsel") else torch.int32,
                                               device=device)
        return self._dev_cache[ck]

    def plan(self, cu_seqlens_q: torch.Tensor, kv_lens: torch.Tensor, max_q_len: int, max_kv_len: int, *,
             cu_seqlens_k: torch.Tensor | None = None, req_to_token: torch.Tensor | None = None,
             req_pool_indices: torch.Tensor | None = None, q_lens_cpu: Sequence[int] | None = None,
             kv_lens_cpu: Sequence[int] | None = None) -> "SparsePrefill":
        """``q_lens_cpu`` / ``kv_lens_cpu``: optional host copies of the per-sequence lengths (SGLang has
        them as ``extend_seq_lens_cpu`` / ``seq_lens_cpu``); they let dense heads use SDPA on a varlen batch
        without a host sync. A contiguous KV layout is then assumed packed (``cu_seqlens_k`` = cumsum)."""
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
        bsz = kv_lens.shape[0]
        if q_lens_cpu is None and not cu_seqlens_q.is_cuda:
            c = cu_seqlens_q.tolist()
            q_lens_cpu = [c[i + 1] - c[i] for i in range(bsz)]
        if kv_lens_cpu is None and not kv_lens.is_cuda:
            kv_lens_cpu = kv_lens.tolist()
        if (q_lens_cpu is None) != (kv_lens_cpu is None) or (q_lens_cpu is not None and
                                                             (len(q_lens_cpu) != bsz or len(kv_lens_cpu) != bsz)):
            raise ValueError("give both q_lens_cpu and kv_lens_cpu, one entry per sequence")
        self._host_lens = None if q_lens_cpu is None else (list(map(int, q_lens_cpu)), list(map(int, kv_lens_cpu)))
        self._sdpa_ok = (self.all_dense and bsz == 1 and self.cu_seqlens_k is not None
                         and self.max_q_len == self.max_kv_len)
        self._planned = True
        return self

    def _dense_segments(self, q, k):
        """``[(q_start, n, kv_rows)]`` for SDPA (kv_rows: a slice or a device index tensor), or None when
        some sequence has a prefix or the lengths are unknown on the host."""
        if self._host_lens is not None:
            ql, kl = self._host_lens
        elif self.kv_lens.shape[0] == 1 and self.max_q_len == self.max_kv_len == q.shape[0]:
            ql, kl = [q.shape[0]], [q.shape[0]]        # n_q = total_q <= n_kv <= max_kv_len = n_q
            if self.cu_seqlens_k is not None and k.shape[0] != q.shape[0]:
                return None
        else:
            return None
        if any(a != b for a, b in zip(ql, kl)):
            return None
        if self.cu_seqlens_k is not None and k.shape[0] != sum(kl):
            return None                                # not packed: cu_seqlens_k unknown on the host
        segs, qs, ks = [], 0, 0
        for b, n in enumerate(ql):
            if n > 0:
                if self.req_to_token is not None:
                    rows = self.req_to_token[self.req_pool_indices[b:b + 1].long(), :n].view(-1).long()
                else:
                    rows = slice(ks, ks + n)
                segs.append((qs, n, rows))
            qs += n
            ks += kl[b]
        return segs

    def _run_dense_sdpa(self, q, k, v, out, segs) -> None:
        hq, hkv = self.num_q_heads, self.num_kv_heads
        for gi, (qh, kvh, c) in enumerate(self._dense_groups):
            all_q = qh == list(range(hq))
            all_kv = kvh == list(range(hkv))
            qh_t = self._t(("qh", gi), qh, q.device) if not all_q else None
            kv_t = self._t(("kvsel", gi), kvh, q.device) if not all_kv else None
            for qs, n, rows in segs:
                qb = q[qs:qs + n]
                kb, vb = k[rows], v[rows]
                if qh_t is not None:
                    qb = qb.index_select(1, qh_t)
                if kv_t is not None:
                    kb, vb = kb.index_select(1, kv_t), vb.index_select(1, kv_t)
                o = _sdpa(qb.transpose(0, 1)[None], kb.transpose(0, 1)[None], vb.transpose(0, 1)[None],
                          self.sm_scale, c > 1)[0].transpose(0, 1)
                if qh_t is None:
                    out[qs:qs + n].copy_(o)
                else:
                    out[qs:qs + n].index_copy_(1, qh_t, o.to(out.dtype))

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, index: BlockIndex | None = None,
            out: torch.Tensor | None = None, use_sdpa: bool = True, rule_tiles: bool = True,
            union_tiles: bool = False) -> torch.Tensor:
        """``use_sdpa=False``: dense heads through the Triton kernels too; ``rule_tiles=False``: dense and
        streaming heads through the block-index (64-row) kernel instead of the 128-row rule kernel;
        ``union_tiles=True``: top-k / vertical-slash heads through the 128-row union kernel (pairs of query
        blocks over the union of their lists: faster only when adjacent query blocks pick similar blocks)."""
        if not self._planned:
            raise ValueError("call plan() before run()")
        check_qkv(q, k, v)
        if q.shape[1] != self.num_q_heads or k.shape[1] != self.num_kv_heads or q.shape[2] != self.head_dim:
            raise ValueError(f"q {tuple(q.shape)} / k {tuple(k.shape)} disagree with the plan "
                             f"({self.num_q_heads} q heads, {self.num_kv_heads} KV heads, d={self.head_dim})")
        o = out if out is not None else torch.empty_like(q)
        kvkw = dict(cu_seqlens_k=self.cu_seqlens_k, req_to_token=self.req_to_token,
                    req_pool_indices=self.req_pool_indices)
        if index is not None:
            self.last_index = index
            return sparse_prefill(q, k, v, index.block_idx, index.block_cnt, index.head_dense, self.cu_seqlens_q,
                                  self.kv_lens, self.max_q_len, sm_scale=self.sm_scale, out=o, **kvkw)
        segs = self._dense_segments(q, k) if (use_sdpa and self.dense_heads) else None
        triton_dense = [] if segs is not None else self.dense_heads
        if self.listed_heads or not rule_tiles:
            index = build_block_index(self.budgets, q, k, self.cu_seqlens_q, self.kv_lens, self.max_kv_len, **kvkw)
            self.last_index = index
        else:
            self.last_index = None
        if segs is not None:
            self._run_dense_sdpa(q, k, v, o, segs)
        if rule_tiles:
            listed = self.listed_heads
            rule = sorted(triton_dense + self.stream_heads)
        else:
            listed = sorted(triton_dense + self.stream_heads + self.listed_heads)
            rule = []
        tiled = [h for h in listed if h in self.tile_heads] if rule_tiles else []
        if tiled:
            tile_prefill(q, k, v, index.block_idx, index.block_cnt, index.head_dense,
                         self._t(("tiled", tuple(tiled)), tiled, q.device), self.cu_seqlens_q, self.kv_lens,
                         self.max_q_len, sm_scale=self.sm_scale, out=o, **kvkw)
            listed = [h for h in listed if h not in tiled]
        if listed and union_tiles and rule_tiles:
            lt = self._t(("listed", tuple(listed)), listed, q.device)
            pi, pc, pf = pair_union_index(index.block_idx, index.block_cnt, lt)
            union_prefill(q, k, v, lt, pi, pc, pf, self.cu_seqlens_q, self.kv_lens, self.max_q_len,
                          sm_scale=self.sm_scale, out=o, **kvkw)
        elif listed:
            sparse_prefill(q, k, v, index.block_idx, index.block_cnt, index.head_dense, self.cu_seqlens_q,
                           self.kv_lens, self.max_q_len, sm_scale=self.sm_scale, out=o,
                           heads=self._t(("listed", tuple(listed)), listed, q.device), **kvkw)
        if rule:
            sinks = [0 if self.budgets[h].pattern is Pattern.DENSE else self.budgets[h].sink_blocks for h in rule]
            wins = [RULE_DENSE_WINDOW if self.budgets[h].pattern is Pattern.DENSE else self.budgets[h].window_blocks
                    for h in rule]
            key = tuple(rule)
            rule_prefill(q, k, v, self._t(("rule", key), rule, q.device), self._t(("sink", key), sinks, q.device),
                         self._t(("win", key), wins, q.device), self.cu_seqlens_q, self.kv_lens, self.max_q_len,
                         sm_scale=self.sm_scale, out=o, **kvkw)
        return o

    def index(self, q: torch.Tensor, k: torch.Tensor) -> BlockIndex:
        """The block index of every head (dense heads unlisted), e.g. to inspect or to compare masks."""
        return build_block_index(self.budgets, q, k, self.cu_seqlens_q, self.kv_lens, self.max_kv_len,
                                 cu_seqlens_k=self.cu_seqlens_k, req_to_token=self.req_to_token,
                                 req_pool_indices=self.req_pool_indices)


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
        self.heads = decode_heads(budgets, num_kv_heads, device)
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
        self.nsplit, self.split_pages = decode_splits(decode_walks(self.budgets, self.num_kv_heads, self.max_pages),
                                                      batch_size)
        if nsplit is not None:       # a fixed split count: the walks cut into nsplit even slices
            self.nsplit, self.split_pages = nsplit, 1
        self.page_idx = torch.zeros(batch_size, hq, self.maxsel, dtype=torch.int32, device=dev)
        self.page_cnt = torch.zeros(batch_size, hq, dtype=torch.int32, device=dev)
        self.scratch = DecodeScratch(batch_size, hq, self.num_kv_heads, d, self.max_pages,
                                     batch_size * hq * self.nsplit, dev)
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
        return sparse_decode(q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens, self.heads,
                             self.page_idx, self.page_cnt, self.scratch, self.nsplit, self.split_pages,
                             sm_scale=self.sm_scale, out=out)
