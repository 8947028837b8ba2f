"""Sparse attention kernels with per-head budgets: Triton prefill/extend and paged decode, GPU index
builders, FlashInfer wrappers behind the same interface, and a PyTorch reference beside each."""
from sglang_shplb.kernels.api import SparsePrefill
from sglang_shplb.kernels.block_index import BlockIndex, max_blocks_per_row
from sglang_shplb.kernels.index import block_index_from_masks, build_block_index, mask_to_index
from sglang_shplb.kernels.layer_heads import LayerHeads
from sglang_shplb.kernels.triton_decode import (DecodeScratch, PageRules, alloc_page_summaries, build_page_summaries,
                                                group_decode, page_rules, select_pages, update_page_summaries)
from sglang_shplb.kernels.triton_prefill import sparse_prefill

__all__ = [
    "SparsePrefill", "LayerHeads", "BlockIndex", "build_block_index", "block_index_from_masks",
    "mask_to_index", "max_blocks_per_row", "sparse_prefill", "group_decode", "alloc_page_summaries",
    "build_page_summaries", "update_page_summaries", "select_pages", "page_rules",
    "PageRules", "DecodeScratch",
]
