"""The same prefill interface on top of FlashInfer's ``VariableBlockSparseAttentionWrapper`` (optional).

FlashInfer keys its block mask by KV head, so per-query-head masks run with one "KV head" per query head
(K/V repeated ``Hq / Hkv`` times). One sequence per call, contiguous KV, no prefix (what the wrapper
supports). FlashInfer is imported lazily; without it, :class:`FlashInferUnavailable` says how to install it.
"""
from __future__ import annotations

from typing import Sequence

import torch

from sglang_shplb.core.patterns import BLOCK, HeadBudget
from sglang_shplb.kernels.block_index import BlockIndex
from sglang_shplb.kernels.checks import check_qkv
from sglang_shplb.kernels.index import build_block_index
from sglang_shplb.kernels.layer_heads import LayerHeads

FLASHINFER_VERSION = "0.6.15.post1"


class FlashInferUnavailable(ImportError):
    pass


def import_flashinfer():
    try:
        import flashinfer  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        raise FlashInferUnavailable(
            "FlashInfer is not installed: `pip install sglang_shplb[gpu]` "
            f"(flashinfer-python=={FLASHINFER_VERSION}, the version SGLang 0.5.17 pins) "
            f"to use the FlashInfer backend ({type(e).__name__}: {e})") from e
    return flashinfer


def index_to_dense_mask(index: BlockIndex, b: int, nb: int) -> torch.Tensor:
    """``[Hq, nb, nb]`` bool on the index's device, sync-free."""
    idx, cnt = index.block_idx[b, :, :nb].long(), index.block_cnt[b, :, :nb]
    hq, _, maxk = idx.shape
    keep = torch.arange(maxk, device=idx.device)[None, None, :] < cnt[:, :, None]
    m = torch.zeros(hq, nb, nb + 1, dtype=torch.bool, device=idx.device)
    m.scatter_(2, torch.where(keep, idx, torch.full_like(idx, nb)), True)   # padding goes to column nb
    m = m[..., :nb]
    causal = torch.ones(nb, nb, dtype=torch.bool, device=idx.device).tril()
    dense = index.head_dense.bool()[:, None, None]
    return torch.where(dense, causal, m)


class FlashInferSparsePrefill:
    """``plan(budgets-derived masks)`` / ``run(q, k, v)`` for one sequence, on FlashInfer."""

    def __init__(self, budgets: Sequence[HeadBudget], num_kv_heads: int, head_dim: int,
                 workspace_bytes: int = 128 << 20, device="cuda") -> None:
        fi = import_flashinfer()
        LayerHeads.of(budgets, num_kv_heads)
        self.budgets = list(budgets)
        self.num_q_heads = len(budgets)
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.workspace = torch.empty(workspace_bytes, dtype=torch.uint8, device=device)
        self.wrapper = fi.VariableBlockSparseAttentionWrapper(self.workspace)

    def plan_masks(self, masks: torch.Tensor, seq_len: int, dtype=torch.bfloat16) -> None:
        """``masks [Hq, nb, nb]`` bool (diagonal last in every row, as ours)."""
        hq, nb, _ = masks.shape
        dev = masks.device
        sz = torch.full((hq, nb), BLOCK, dtype=torch.int32, device=dev)
        sz[:, -1] = seq_len - (nb - 1) * BLOCK
        self.wrapper.plan(masks, sz, sz.clone(), hq, hq, self.head_dim, causal=True,
                          q_data_type=dtype, kv_data_type=dtype)
        self.seq_len = seq_len

    def plan(self, q: torch.Tensor, k: torch.Tensor) -> BlockIndex:
        """Builds the block index with our GPU builders (one sequence) and plans FlashInfer with it."""
        n = q.shape[0]
        cu = torch.tensor([0, n], dtype=torch.int32, device=q.device)
        kvl = torch.tensor([n], dtype=torch.int32, device=q.device)
        index = build_block_index(self.budgets, q, k, cu, kvl, n, cu_seqlens_k=cu)
        nb = -(-n // BLOCK)
        self.plan_masks(index_to_dense_mask(index, 0, nb), n, q.dtype)
        return index

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``q [n, Hq, d]``, ``k, v [n, Hkv, d]`` → ``[n, Hq, d]``."""
        check_qkv(q, k, v)
        g = self.num_q_heads // self.num_kv_heads
        qh = q.transpose(0, 1).contiguous()
        kh = k.transpose(0, 1).repeat_interleave(g, 0).contiguous()
        vh = v.transpose(0, 1).repeat_interleave(g, 0).contiguous()
        return self.wrapper.run(qh, kh, vh).transpose(0, 1)
