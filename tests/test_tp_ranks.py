"""Tensor parallelism on CPU (torch.distributed, gloo): each rank takes the budgets of the heads it holds
(:func:`sglang_shplb.core.head_map.rank_heads`), runs its slice of one layer on the kernel path
(:class:`sglang_shplb.kernels.paged_layer.LayerKernels`, Triton interpreter), and the gathered outputs
equal the single-device run of all heads and the dense-mask reference."""
import math
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import mask_reference, sequence
from sglang_shplb.core.head_map import rank_heads
from sglang_shplb.core.patterns import HeadBudget
from sglang_shplb.kernels.paged_layer import ExtendBatch, LayerKernels
from sglang_shplb.kernels.reference import relative_error

HQ, HKV, D, N, TP = 8, 2, 64, 300, 2
SCALE = 1 / math.sqrt(D)
BUDGETS = [HeadBudget.dense(), HeadBudget.topk(0.3, 2), HeadBudget.streaming(64, 128), HeadBudget.vslash(0.3, 1),
           HeadBudget.streaming(0, 64), HeadBudget.topk(0.5, 2), HeadBudget.dense(), HeadBudget.streaming(64, 64)]


def inputs():
    return sequence(N, HQ, HKV, D, 0)


def run_layer(budgets, q, k, v):
    """One sequence, no prefix, its tokens at pool slots 1..N of a one-request pool."""
    lk = LayerKernels(budgets, k.shape[1], D, 1024, torch.float32, "cpu", pool_tokens=N + 1)
    kb = torch.zeros(N + 1, k.shape[1], D)
    vb = torch.zeros(N + 1, k.shape[1], D)
    kb[1:], vb[1:] = k, v
    r2t = torch.zeros(2, 1024, dtype=torch.int32)
    r2t[0, :N] = torch.arange(1, N + 1)
    out = torch.empty_like(q)
    return lk.extend(q, k, v, kb, vb, ExtendBatch.build(r2t, torch.tensor([0]), [N], [N]), SCALE, out)


def rank_main(rank: int, init_file: str, result_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=TP)
    q, k, v = inputs()
    heads = rank_heads(HQ, TP, rank)
    kv = sorted({h // (HQ // HKV) for h in heads})
    o = run_layer([BUDGETS[h] for h in heads], q[:, heads].contiguous(), k[:, kv].contiguous(), v[:, kv].contiguous())
    parts = [torch.empty_like(o) for _ in range(TP)]
    dist.all_gather(parts, o)
    if rank == 0:
        torch.save(torch.cat(parts, 1), result_file)
    dist.destroy_process_group()


def test_tp2_ranks_compose_to_the_single_device_layer():
    with tempfile.TemporaryDirectory() as d:
        init, res = os.path.join(d, "init"), os.path.join(d, "out.pt")
        mp.spawn(rank_main, args=(init, res), nprocs=TP, join=True)
        gathered = torch.load(res)
    q, k, v = inputs()
    single = run_layer(BUDGETS, q, k, v)
    assert torch.allclose(gathered, single, atol=1e-5), "TP ranks' heads differ from the single-device run"
    assert relative_error(gathered, mask_reference(BUDGETS, q, k, v, SCALE)) < 1e-5
    assert rank_heads(HQ, TP, 1) == [4, 5, 6, 7]
