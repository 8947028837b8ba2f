"""Sparse attention kernels with per-head budgets: Triton prefill/extend and paged decode, GPU index
builders, FlashInfer wrappers behind the same interface, and a PyTorch reference beside each."""
from sglang_shplb.kernels.api import SparseDecode, SparsePrefill
from sglang_shplb.kernels.index import BlockIndex, block_index_from_masks, build_block_index, mask_to_index, max_blocks_per_row
from sglang_shplb.kernels.triton_decode import (alloc_page_summaries, build_page_summaries, DecodeHeads, DecodeScratch, decode_heads, select_pages,
                            sparse_decode, update_page_summaries)
from sglang_shplb.kernels.triton_prefill import sparse_prefill

__all__ = [
    "SparsePrefill", "SparseDecode", "BlockIndex", "build_block_index", "block_index_from_masks",
    "mask_to_index", "max_blocks_per_row", "sparse_prefill", "sparse_decode", "alloc_page_summaries",
    "build_page_summaries", "update_page_summaries", "select_pages", "decode_heads",
    "DecodeHeads", "DecodeScratch",
]
