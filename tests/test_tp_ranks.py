"""Tensor parallelism on CPU (torch.distributed, gloo): each rank takes the budgets of the heads it holds
(:func:`sglang_shplb.core.head_map.rank_heads`), runs its slice of one layer on the kernel path
(:class:`sglang_shplb.kernels.paged_layer.LayerKernels`, Triton interpreter), and the gathered outputs
equal the single-device run of all heads and the dense-mask reference."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import math  # noqa: E402
import tempfile  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from sglang_shplb.core.block_masks import build_block_masks  # noqa: E402
from sglang_shplb.core.head_map import rank_heads  # noqa: E402
from sglang_shplb.kernels.paged_layer import ExtendBatch, LayerKernels  # noqa: E402
from sglang_shplb.kernels.reference import masked_attention, relative_error  # noqa: E402
from sglang_shplb.core.patterns import HeadBudget  # noqa: E402

HQ, HKV, D, N, TP = 8, 2, 64, 300, 2
SCALE = 1 / math.sqrt(D)
BUDGETS = [HeadBudget.dense(), HeadBudget.topk(0.3, 2), HeadBudget.streaming(64, 128), HeadBudget.vslash(0.3, 1),
           HeadBudget.streaming(0, 64), HeadBudget.topk(0.5, 2), HeadBudget.dense(), HeadBudget.streaming(64, 64)]


def inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, HQ, D, generator=g), torch.randn(N, HKV, D, generator=g) * 2, torch.randn(N, HKV, D, generator=g)


def run_layer(budgets, q, k, v):
    """One sequence, no prefix, its tokens at pool slots 1..N of a one-request pool."""
    lk = LayerKernels(budgets, k.shape[1], D, 1024, 2, torch.float32, "cpu")
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
    ref = masked_attention(q, k, v, build_block_masks(BUDGETS, q.transpose(0, 1), k.transpose(0, 1)), SCALE)
    assert relative_error(gathered, ref) < 1e-5
    assert rank_heads(HQ, TP, 1) == [4, 5, 6, 7]
