"""Where one vertical-slash head's index build spends its time (round 15, exploratory): torch.profiler over
``build_block_index`` of a Llama-3-8B-shaped layer (32 q / 8 KV heads, d = 128, bf16), one vertical-slash head and
31 streaming, one sequence of 64K and 128K tokens, paged; CUDA-event time of the whole build beside it."""
import math
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, "bench")
from layer_path import paged_pool  # noqa: E402

from sglang_shplb.core.patterns import HeadBudget  # noqa: E402
from sglang_shplb.kernels import build_block_index  # noqa: E402

dev, dt = "cuda", torch.bfloat16
budgets = [HeadBudget.vslash(0.1, 4)] + [HeadBudget.streaming(64, 2048)] * 31
for n in (65536, 131072):
    r2t, pool = paged_pool(1, n + 64, dev)
    q = torch.randn(n, 32, 128, device=dev, dtype=dt)
    kb = torch.randn(pool, 8, 128, device=dev, dtype=dt)
    cu = torch.tensor([0, n], dtype=torch.int32, device=dev)
    kvl = torch.tensor([n], dtype=torch.int32, device=dev)
    rpi = torch.zeros(1, dtype=torch.int32, device=dev)

    def build():
        return build_block_index(budgets, q, kb, cu, kvl, n, req_to_token=r2t, req_pool_indices=rpi, max_q_len=n)
    for _ in range(3):
        build()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(10):
        build()
    e.record()
    torch.cuda.synchronize()
    print(f"n={n}: build {s.elapsed_time(e) / 10:.3f} ms per call (CUDA events, back to back)")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            build()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
