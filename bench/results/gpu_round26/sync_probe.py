"""Where the cuDNN route makes the host wait (round 26: bench/head_parallel.py counted one host sync per rank call
with the route on, none with it off). Runs the route once (compile), then again under CUDA's sync debug mode set
to error, and prints the stack of the first synchronising call; the same for cuDNN's call alone and the merge."""
import math
import traceback

import torch

from sglang_shplb.core.patterns import HeadBudget
from sglang_shplb.kernels import build_block_index
from sglang_shplb.kernels.cudnn_blocks import block_sparse_heads, cudnn_listed_blocks
from sglang_shplb.kernels.triton_diagonal import diagonal_merge

n, hq, hkv, d = 8192, 32, 8, 128
dev, dt = "cuda", torch.bfloat16
q, k, v = (torch.randn(n, h, d, device=dev, dtype=dt) for h in (hq, hkv, hkv))
cu = torch.tensor([0, n], dtype=torch.int32, device=dev)
idx = build_block_index([HeadBudget.topk(0.1, 2)] * hq, q, k, cu, cu[1:], n, cu_seqlens_k=cu)
heads = torch.arange(hq, dtype=torch.int32, device=dev)
out = torch.empty_like(q)
nb = math.ceil(n / 64)
counts = (idx.block_cnt[0] - 1).clamp(min=0).int()
parts = {
    "block_sparse_heads": lambda: block_sparse_heads(q, k, v, idx.block_idx[0], idx.block_cnt[0], heads, out, 0.1),
    "cudnn_listed_blocks": lambda: cudnn_listed_blocks(q[None], k[None], v[None], idx.block_idx[0][None, :, :nb],
                                                       counts[None], 0.1),
    "diagonal_merge": lambda: diagonal_merge(q, k, v, torch.zeros(1, n, hq, d, device=dev, dtype=dt),
                                             torch.zeros(1, hq, n, device=dev), heads, out, 0.1),
}
for name, fn in parts.items():
    fn()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        print(f"{name}: no host sync")
    except RuntimeError as e:
        print(f"{name}: host sync: {e}")
        traceback.print_exc(limit=-12)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
print("probe done")
