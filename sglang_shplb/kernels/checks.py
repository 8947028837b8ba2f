"""What the kernels accept: head dims, dtypes, the ``[tokens, heads, head_dim]`` layout of q, k, v.
One check each, shared by every front end."""
from __future__ import annotations

import torch

SUPPORTED_HEAD_DIMS = (64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_head_dim(d: int) -> None:
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim {d} is not supported (only {SUPPORTED_HEAD_DIMS})")


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"q, k, v must be [tokens, heads, head_dim]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    d = q.shape[-1]
    check_head_dim(d)
    if k.shape[-1] != d or v.shape[-1] != d:
        raise ValueError(f"head_dim of q ({d}), k ({k.shape[-1]}) and v ({v.shape[-1]}) disagree")
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} disagree")
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype {q.dtype} is not supported (only {SUPPORTED_DTYPES})")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"dtypes disagree: q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} KV heads")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("q, k, v need a contiguous last dimension")
