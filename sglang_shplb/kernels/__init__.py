"""Sparse attention kernels with per-head budgets: Triton prefill/extend and paged decode, GPU index
builders, FlashInfer wrappers behind the same interface, and a PyTorch reference beside each."""
