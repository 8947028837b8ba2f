"""A FlashInfer-like plan()/run() object over the Triton prefill kernels (the decode front end is
:meth:`.paged_layer.LayerKernels.decode`)."""
from __future__ import annotations

from typing import Sequence

import torch

from sglang_shplb.core.patterns import BLOCK, HeadBudget, Pattern
from sglang_shplb.kernels.block_index import BlockIndex, pool_rows
from sglang_shplb.kernels.checks import check_qkv
from sglang_shplb.kernels.cudnn_blocks import block_sparse_heads, cudnn_blocks_unavailable, route_mode, route_takes
from sglang_shplb.kernels.dense_pieces import dense_heads_by_group, piece_backend
from sglang_shplb.kernels.index import build_block_index
from sglang_shplb.kernels.layer_heads import LayerHeads
from sglang_shplb.kernels.triton_prefill import RULE_DENSE_WINDOW, rule_prefill, sparse_prefill, tile_prefill


#: the patterns whose heads :class:`SparsePrefill` hands to cuDNN's block-sparse attention where it can
CUDNN_PATTERNS: frozenset[Pattern] = frozenset({Pattern.TOPK, Pattern.VSLASH, Pattern.STREAMING})


def cudnn_candidates(heads: LayerHeads) -> tuple[int, ...]:
    """The heads cuDNN's route may take: the sparse heads of :data:`CUDNN_PATTERNS` at 64-token blocks (a tile-128
    top-k head stays on the tile kernel)."""
    return tuple(h for h in heads.sparse if heads.budgets[h].pattern in CUDNN_PATTERNS and h not in heads.tiled)


class SparsePrefill:
    """Sparse causal prefill / extend with per-head budgets.

    >>> sp = SparsePrefill(budgets, num_kv_heads=8, head_dim=128)
    >>> sp.plan(cu_seqlens_q, kv_lens, max_q_len, max_kv_len, cu_seqlens_k=cu_k)   # or req_to_token=..., req_pool_indices=...
    >>> o = sp.run(q, k, v)        # builds the block index on the device (no host sync), then the kernels

    Heads are split by kind (:class:`.layer_heads.LayerHeads`), all writing one ``out`` tensor:

    * **dense** heads go to torch SDPA (cuDNN / flash, grouped per KV head with ``enable_gqa``) when the
      per-sequence lengths are known on the host: from CPU ``cu_seqlens_q``/``kv_lens``, from
      ``plan(..., q_lens_cpu=, kv_lens_cpu=)``, or for one sequence from the shapes; a sequence with a cached
      prefix (chunked prefill, a radix hit) as two cuDNN calls merged (:func:`.dense_pieces.dense_piece`).
      Otherwise (lengths only on the device, a prefix in float32 on CUDA) they go to the 128-row Triton kernel;
    * **streaming** heads (and dense heads not sent to SDPA): :func:`.triton_prefill.rule_prefill`,
      128-row query tiles, no index;
    * **top-k (``tile=128``)** heads: :func:`.triton_prefill.tile_prefill`, 128 x 128 tiles over superblock
      lists (TMA loads of contiguous KV on sm90+);
    * **top-k (``tile=64``) / vertical-slash** heads: the block-index kernel :func:`.triton_prefill.sparse_prefill`;
    * heads of the patterns in :data:`CUDNN_PATTERNS` (but tile-128 top-k) instead go to cuDNN's block-sparse
      attention (:func:`.cudnn_blocks.block_sparse_heads`, one call per sequence, over the same index) when
      cuDNN's kernel runs (SM90, bf16 / fp16, the package importable), the host knows the lengths, every prefix
      is a multiple of 64 tokens, the keys are contiguous or in a pool of 64-slot pages
      (``plan(..., kv_page_size=64)``) and where it was measured to win: enough head x row x key pairs per
      call (:func:`.cudnn_blocks.route_pays`; ``SHPLB_CUDNN_BLOCKS=1`` / ``0``: always / never).

    ``run(..., index=BlockIndex)`` skips the index builders and runs every head through the block-index
    kernel (explicit masks: :func:`block_index_from_masks`).
    """

    def __init__(self, budgets: Sequence[HeadBudget], num_kv_heads: int, head_dim: int,
                 sm_scale: float | None = None) -> None:
        self.heads = heads = LayerHeads.of(budgets, num_kv_heads, head_dim)
        self.num_q_heads = heads.num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.sm_scale = sm_scale
        # the block-index kernel's heads: the selected ones but the tile-128 top-k heads (the tile kernel's)
        self.indexed = [h for h in heads.selected if h not in heads.tiled]
        self._cudnn_candidates = cudnn_candidates(heads)
        g = self.num_q_heads // num_kv_heads
        # dense heads grouped for SDPA: KV heads with the same number c of dense q heads share one call
        per_kv: dict[int, list[int]] = {}
        for h in heads.dense:
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
             kv_lens_cpu: Sequence[int] | None = None, kv_page_size: int = 1) -> "SparsePrefill":
        """``q_lens_cpu`` / ``kv_lens_cpu``: optional host copies of the per-sequence lengths (SGLang has
        them as ``extend_seq_lens_cpu`` / ``seq_lens_cpu``); they let dense heads use SDPA on a varlen batch
        without a host sync. A contiguous KV layout is then assumed packed (``cu_seqlens_k`` = cumsum).
        ``kv_page_size``: the pool's page size (``req_to_token``); 64 lets cuDNN read it in place."""
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
        self.kv_page_size = int(kv_page_size)
        self._planned = True
        return self

    def _dense_segments(self, q, k):
        """``[(q_start, n_q, n_kv, kv_rows)]`` of the sequences with queries (kv_rows: a slice or a device index
        tensor over all ``n_kv`` keys), or None when the lengths are unknown on the host, or when a sequence has
        a prefix and :func:`.dense_pieces.piece_backend` has no kernel for ``q`` (e.g. float32 on CUDA)."""
        if self._host_lens is not None:
            ql, kl = self._host_lens
        elif self.kv_lens.shape[0] == 1 and self.max_q_len == self.max_kv_len == q.shape[0]:
            ql, kl = [q.shape[0]], [q.shape[0]]        # n_q = total_q <= n_kv <= max_kv_len = n_q
            if self.cu_seqlens_k is not None and k.shape[0] != q.shape[0]:
                return None
        else:
            return None
        if self.cu_seqlens_k is not None and k.shape[0] != sum(kl):
            return None                                # not packed: cu_seqlens_k unknown on the host
        if any(n != L for n, L in zip(ql, kl)) and piece_backend(q) == "math":
            return None    # no kernel returns a log-sum-exp for this dtype: the rule kernel reads the prefix in place
        segs, qs, ks = [], 0, 0
        for b, (n, L) in enumerate(zip(ql, kl)):
            if n > 0:
                if self.req_to_token is not None:
                    rows = pool_rows(self.req_to_token, self.req_pool_indices, b, L)
                else:
                    rows = slice(ks, ks + L)
                segs.append((qs, n, L, rows))
            qs += n
            ks += L
        return segs

    def _run_dense_sdpa(self, q, k, v, out, segs) -> None:
        """Dense heads per sequence and group of KV heads with as many dense q heads
        (:func:`.dense_pieces.dense_heads_by_group`: cuDNN SDPA without a prefix, two merged cuDNN calls after
        one)."""
        hq, hkv = self.num_q_heads, self.num_kv_heads
        scale = self.sm_scale if self.sm_scale is not None else self.head_dim ** -0.5
        groups = [(slice(None) if qh == list(range(hq)) else self._t(("qh", gi), qh, q.device),
                   slice(None) if kvh == list(range(hkv)) else self._t(("kvsel", gi), kvh, q.device), c)
                  for gi, (qh, kvh, c) in enumerate(self._dense_groups)]
        dense_heads_by_group(q, k, v, out, segs, groups, scale)

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, index: BlockIndex | None = None,
            out: torch.Tensor | None = None) -> torch.Tensor:
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
        heads = self.heads
        segs = self._dense_segments(q, k) if heads.dense else None
        routed = self._cudnn_heads(q)
        self.last_index = index = (build_block_index(heads.budgets, q, k, self.cu_seqlens_q, self.kv_lens,
                                                     self.max_kv_len, max_q_len=self.max_q_len, **kvkw)
                                   if heads.selected or routed else None)
        if segs is not None:
            self._run_dense_sdpa(q, k, v, o, segs)
        if routed:
            self._run_cudnn(q, k, v, o, index, routed)
        if heads.tiled:
            tile_prefill(q, k, v, index.block_idx, index.block_cnt, index.head_dense,
                         self._t(("tiled", heads.tiled), heads.tiled, q.device), self.cu_seqlens_q, self.kv_lens,
                         self.max_q_len, sm_scale=self.sm_scale, out=o, **kvkw)
        indexed = [h for h in self.indexed if h not in routed]
        if indexed:
            sparse_prefill(q, k, v, index.block_idx, index.block_cnt, index.head_dense, self.cu_seqlens_q,
                           self.kv_lens, self.max_q_len, sm_scale=self.sm_scale, out=o,
                           heads=self._t(("listed", tuple(indexed)), indexed, q.device), **kvkw)
        rule = sorted([h for h in heads.streaming if h not in routed] + list(heads.dense if segs is None else ()))
        if rule:
            # a dense head is the rule (sink 0, window RULE_DENSE_WINDOW)
            sinks = [0 if h in heads.dense else heads.budgets[h].sink_blocks for h in rule]
            wins = [RULE_DENSE_WINDOW if h in heads.dense else heads.budgets[h].window_blocks for h in rule]
            key = tuple(rule)
            rule_prefill(q, k, v, self._t(("rule", key), rule, q.device), self._t(("sink", key), sinks, q.device),
                         self._t(("win", key), wins, q.device), self.cu_seqlens_q, self.kv_lens, self.max_q_len,
                         sm_scale=self.sm_scale, out=o, **kvkw)
        return o

    def _cudnn_heads(self, q: torch.Tensor) -> tuple[int, ...]:
        """The heads this run hands to cuDNN (see the class): the 64-token-block heads of
        :data:`CUDNN_PATTERNS`, or none where cuDNN's route cannot take this batch."""
        routed, mode = self._cudnn_candidates, route_mode()
        if not routed or mode == "0" or self._host_lens is None or cudnn_blocks_unavailable(q) is not None:
            return ()
        if self.req_to_token is not None and self.kv_page_size != BLOCK:
            return ()
        ql, kl = self._host_lens
        if any((L - n) % BLOCK for n, L in zip(ql, kl)):
            return ()
        return routed if route_takes(mode, len(routed), ql, kl) else ()

    def _run_cudnn(self, q, k, v, out, index: BlockIndex, routed: tuple[int, ...]) -> None:
        """:func:`.cudnn_blocks.block_sparse_heads` per sequence with queries."""
        scale = self.sm_scale if self.sm_scale is not None else self.head_dim ** -0.5
        hs = self._t(("cudnn", routed), routed, q.device)
        qs = ks = 0
        for b, (n, L) in enumerate(zip(*self._host_lens)):
            if n > 0:
                if self.req_to_token is not None:
                    kv = dict(kv_rows=pool_rows(self.req_to_token, self.req_pool_indices, b, L), n_kv=L)
                    kb, vb = k, v
                else:
                    kv, kb, vb = {}, k[ks:ks + L], v[ks:ks + L]
                block_sparse_heads(q[qs:qs + n], kb, vb, index.block_idx[b], index.block_cnt[b], hs,
                                   out[qs:qs + n], scale, **kv)
            qs += n
            ks += L

    def index(self, q: torch.Tensor, k: torch.Tensor) -> BlockIndex:
        """The block index of every head (dense heads unlisted), e.g. to inspect or to compare masks."""
        return build_block_index(self.heads.budgets, q, k, self.cu_seqlens_q, self.kv_lens, self.max_kv_len,
                                 cu_seqlens_k=self.cu_seqlens_k, req_to_token=self.req_to_token,
                                 req_pool_indices=self.req_pool_indices)
