"""Top-k at 128-token superblocks (``HeadBudget(tile=128)``): count rule, masks, both index builders, and
the 128 x 128 tile kernel (pointer and TMA loads) against the reference, under Triton's CPU interpreter."""
import math

import pytest
import torch

from conftest import DEV, make_batch, seq_kv, tol
from sglang_shplb.core.block_masks import build_block_masks
from sglang_shplb.core.patterns import BLOCK, HeadBudget
from sglang_shplb.kernels import SparsePrefill, build_block_index
from sglang_shplb.kernels.index import expand_pair_rows
from sglang_shplb.kernels.reference import reference_sparse_prefill, relative_error
from sglang_shplb.kernels.triton_prefill import sparse_prefill, tile_prefill
from sglang_shplb.planning.cost_model import query_block_pairs

T128 = 2 * BLOCK


def test_budget_tile_rule_and_serialisation():
    b = HeadBudget.topk(0.1, 4, tile=T128)
    assert HeadBudget.from_dict(b.to_dict()) == b
    assert "tile" not in HeadBudget.topk(0.1).to_dict()          # plans written before `tile` read the same
    for bad in (dict(pattern="topk", tile=96), dict(pattern="vslash", tile=T128), dict(pattern="dense", tile=T128)):
        with pytest.raises(ValueError):
            HeadBudget(**bad)
    nb = 37
    rows = [b.blocks_for_query_block(qi, nb) for qi in range(nb)]
    for p in range(nb // 2):                                     # rows 2p, 2p+1: the pair's superblocks
        assert rows[2 * p] == 2 * b.superblocks_for_pair(p) - 1 and rows[2 * p + 1] == rows[2 * p] + 1
    assert list(query_block_pairs(b, nb * BLOCK)) == rows[:-1] + [nb]   # the cost model: the same pairs, the tail's row whole
    assert abs(b.density(65536) - HeadBudget.topk(0.1, 4).density(65536)) < 0.01


@pytest.mark.parametrize("n", [64, 130, 1000, 1024])
def test_masks_select_whole_superblocks(n):
    g = torch.Generator().manual_seed(n)
    q, k = torch.randn(4, n, 64, generator=g), torch.randn(2, n, 64, generator=g)
    budgets = [HeadBudget.topk(f, 2, tile=T128) for f in (0.05, 0.2, 0.5, 1.0)]
    m = build_block_masks(budgets, q, k)
    nb = m.shape[-1]
    causal = torch.ones(nb, nb, dtype=torch.bool).tril()
    assert torch.equal(m[3], causal)                             # fraction 1: everything
    for h, b in enumerate(budgets):
        assert m[h].sum(-1).tolist() == [b.blocks_for_query_block(qi, nb) for qi in range(nb)]
        assert not (m[h] & ~causal).any() and m[h].diagonal().all() and m[h][:, 0].all()
        mp = torch.nn.functional.pad(m[h], (0, nb % 2, 0, nb % 2))
        mp[nb:, :] = mp[nb - 1:nb, :] | torch.nn.functional.pad(torch.eye(nb + nb % 2, dtype=torch.bool)[nb:, :], (0, 0))
        sup = mp.view(-1, 2, mp.shape[1] // 2, 2)                # [pairs, 2, superblocks, 2]
        full = sup.all(-1) | torch.eye(sup.shape[0], dtype=torch.bool)[:, None, :]
        assert torch.equal(sup.any(-1), full)                    # a superblock is taken whole (diagonal: causal)
        assert torch.equal(sup.any(-1)[:, 0], sup.any(-1)[:, 1])  # both rows of a pair take the same ones


def test_expand_pair_rows_counts_and_padding():
    top = torch.tensor([[0, 2, 3], [0, 1, 0]])                   # pairs 3 and 1 (one count short)
    cnt = torch.tensor([3, 2])
    idx, c = expand_pair_rows(top, cnt, 3)
    assert c.tolist() == [5, 6, 3]
    assert idx[0].tolist() == [0, 1, 4, 5, 6, 0] and idx[1].tolist() == [0, 1, 4, 5, 6, 7]
    assert idx[2].tolist() == [0, 1, 2, 0, 0, 0]


@pytest.mark.parametrize("paged,chunked,group", [(False, False, 1), (True, True, 4), (False, True, 8)])
def test_triton_builder_matches_torch_builder(paged, chunked, group):
    hkv = 2 if group < 8 else 1
    hq = hkv * group
    lens = [333, 128, 257]
    q_lens = [100, 128, 257] if chunked else lens
    budgets = [HeadBudget.topk((0.1, 0.3, 0.6)[h % 3], 2 + h % 3, tile=(T128, BLOCK)[h % 2]) for h in range(hq)]
    q, k, v, cu_q, kvl, kw = make_batch(lens, q_lens, hq, hkv, 64, torch.float32, paged, 5 + group)
    a = build_block_index(budgets, q, k, cu_q, kvl, max(lens) + 70, builder="torch", **kw)
    b = build_block_index(budgets, q, k, cu_q, kvl, max(lens) + 70, builder="triton", **kw)
    assert torch.equal(a.block_cnt, b.block_cnt)
    for s, n in enumerate(lens):   # rows past a sequence's end have no scores (ties): not compared
        nb = math.ceil(n / BLOCK)
        assert torch.equal(a.block_idx[s, :, :nb], b.block_idx[s, :, :nb])
    if not chunked:   # whole prompts: the masks of block_masks (the profiler's definition)
        for s, n in enumerate(lens):
            ref = build_block_masks(budgets, q[cu_q[s]:cu_q[s + 1]].transpose(0, 1), seq_kv(k, s, n, kw).transpose(0, 1))
            assert torch.equal(b.masks(s, math.ceil(n / BLOCK)), ref.cpu())


TILE_CASES = [
    # lens, q_lens, hq, hkv, d, dtype, paged, tma, block_n
    ([300, 200, 450], [300, 200, 130], 4, 2, 64, torch.float32, False, False, 128),   # varlen, unaligned prefix
    ([300, 200, 450], [300, 200, 130], 4, 2, 64, torch.float32, False, True, 64),     # TMA boxes of 64 rows
    ([260, 190], [131, 190], 8, 2, 64, torch.bfloat16, True, False, 64),              # paged, chunked, GQA 4
    ([257], [257], 8, 1, 128, torch.bfloat16, False, True, 128),                      # GQA 8, d=128, TMA
    ([140, 77], [140, 77], 4, 4, 64, torch.float16, False, False, 128),               # GQA 1, fp16
]


@pytest.mark.parametrize("case", range(len(TILE_CASES)))
def test_tile_kernel_matches_reference(case):
    lens, q_lens, hq, hkv, d, dtype, paged, tma, block_n = TILE_CASES[case]
    budgets = [HeadBudget.dense() if h == 1 else HeadBudget.topk((0.1, 0.3, 0.6)[h % 3], 2, tile=T128)
               for h in range(hq)]
    q, k, v, cu_q, kvl, kw = make_batch(lens, q_lens, hq, hkv, d, dtype, paged, 50 + case)
    idx = build_block_index(budgets, q, k, cu_q, kvl, max(lens), **kw)
    heads = torch.arange(1, hq, dtype=torch.int32, device=DEV)             # head 0 left alone
    out = torch.full_like(q, float("nan"))
    tile_prefill(q, k, v, idx.block_idx, idx.block_cnt, idx.head_dense, heads, cu_q, kvl, max(q_lens),
                 out=out, tma=tma if DEV == "cpu" else None, block_n=block_n, num_warps=8 if DEV != "cpu" else 4,
                 num_stages=2 if DEV != "cpu" else 1, **kw)
    masks = [idx.masks(b, math.ceil(n / BLOCK)).to(DEV) for b, n in enumerate(lens)]
    ref = reference_sparse_prefill(q, k, v, masks, cu_q, kvl, **kw)
    assert torch.isnan(out[:, 0]).all()
    assert relative_error(out[:, 1:], ref[:, 1:]) < tol(dtype)
    # the 64-row index kernel reads the same rows (a tile-128 index is an ordinary BlockIndex)
    o64 = sparse_prefill(q, k, v, idx.block_idx, idx.block_cnt, idx.head_dense, cu_q, kvl, max(q_lens), **kw)
    assert relative_error(o64[:, 1:], ref[:, 1:]) < tol(dtype)


def test_sparse_prefill_api_routes_tile_heads():
    hq, hkv, d = 8, 2, 64
    budgets = [HeadBudget.dense(), HeadBudget.topk(0.2, 2, tile=T128), HeadBudget.topk(0.2, 2),
               HeadBudget.streaming(64, 128), HeadBudget.topk(0.5, 4, tile=T128), HeadBudget.vslash(0.3, 1),
               HeadBudget.dense(), HeadBudget.topk(0.05, 2, tile=T128)]
    lens, q_lens = [390, 200], [390, 71]
    q, k, v, cu_q, kvl, kw = make_batch(lens, q_lens, hq, hkv, d, torch.float32, True, 77)
    sp = SparsePrefill(budgets, hkv, d).plan(cu_q, kvl, max(q_lens), max(lens), **kw)
    assert sp.heads.tiled == (1, 4, 7)
    out = torch.full_like(q, float("nan"))
    sp.run(q, k, v, out=out)
    masks = [sp.last_index.masks(b, math.ceil(n / BLOCK)).to(DEV) for b, n in enumerate(lens)]
    ref = reference_sparse_prefill(q, k, v, masks, cu_q, kvl, **kw)
    assert relative_error(out, ref) < tol(torch.float32)


def test_tile_kernel_bad_inputs():
    q, k, v, cu_q, kvl, kw = make_batch([200], [200], 2, 1, 64, torch.float32, True, 3)
    idx = build_block_index([HeadBudget.topk(0.3, 2, tile=T128)] * 2, q, k, cu_q, kvl, 200, **kw)
    heads = torch.arange(2, dtype=torch.int32, device=DEV)
    args = (q, k, v, idx.block_idx, idx.block_cnt, idx.head_dense, heads, cu_q, kvl, 200)
    with pytest.raises(ValueError, match="block_n"):
        tile_prefill(*args, block_n=32, **kw)
    with pytest.raises(ValueError, match="TMA"):
        tile_prefill(*args, tma=True, **kw)                                  # paged KV has no TMA layout
    with pytest.raises(ValueError, match="block index shapes"):
        tile_prefill(q, k, v, idx.block_idx[:, :1], idx.block_cnt[:, :1], idx.head_dense, heads, cu_q, kvl, 200, **kw)


def test_profiler_scores_tile_128_options():
    from sglang_shplb.planning.profile import default_options, layer_elasticity, sample_rows
    g = torch.Generator().manual_seed(4)
    n = 700
    q, k, v = torch.randn(4, n, 64, generator=g), torch.randn(2, n, 64, generator=g), torch.randn(2, n, 64, generator=g)
    opts = default_options(topk_tiles=(BLOCK, T128))
    recall, err, *_ = layer_elasticity(q, k, v, opts, sample_rows(n, 4))
    assert (recall <= 1 + 1e-5).all() and (recall > 0).all() and torch.isfinite(err).all()
    for fam in ("topk", "topk_oracle"):
        js = [j for j, o in enumerate(opts) if o.family == fam and o.budget.tile == T128]
        fr = [opts[j].budget.fraction for j in js]
        assert fr == sorted(fr) and len(js) >= 4
        r = recall[:, js]
        assert (r[:, 1:] >= r[:, :-1] - 1e-6).all()          # more superblocks never keep less mass
    dense = [j for j, o in enumerate(opts) if o.family == "dense"][0]
    assert torch.allclose(recall[:, dense], torch.ones(4))
