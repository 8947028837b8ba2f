"""The 128-wide KV tile of the block-index prefill kernel (``sparse_prefill(..., kv_tile=128)``) against the
PyTorch reference and the 64-wide kernel, under Triton's CPU interpreter (tiny shapes)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import math  # noqa: E402
import random  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from sglang_shplb.kernels import block_index_from_masks, build_block_index, sparse_prefill  # noqa: E402
from sglang_shplb.kernels.reference import reference_sparse_prefill, relative_error  # noqa: E402
from sglang_shplb.core.patterns import BLOCK, HeadBudget  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
TOL = {torch.float32: 3e-3 if DEV == "cuda" else 1e-4, torch.bfloat16: 2e-2}   # the GPU's fp32 dot is TF32
# 128-wide vs 64-wide: same math, another summation order (bf16: p is rounded to bf16 at other maxima)
TOL_VS_64 = {torch.float32: 3e-3 if DEV == "cuda" else 1e-5, torch.bfloat16: 1e-2}
PAGE = 16   # pool page of the paged layout: a 64-token block spans 4 scattered pages


def mixed_budgets(hq: int, rng: random.Random) -> list[HeadBudget]:
    kinds = [HeadBudget.topk(rng.choice([0.2, 0.4, 0.7]), rng.choice([1, 3])),
             HeadBudget.vslash(rng.choice([0.3, 0.6]), rng.choice([1, 2])),
             HeadBudget.streaming(rng.choice([0, 64]), rng.choice([64, 192])),
             HeadBudget.dense()]
    return [kinds[h % 4] if h < 4 else rng.choice(kinds) for h in range(hq)]


def make_batch(lens, q_lens, hq, hkv, d, dtype, paged, seed):
    """Varlen batch, ``q_lens[b] <= lens[b]`` (chunked prefill when smaller); KV contiguous or in a pool of
    ``PAGE``-token pages handed out in random order."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(q_lens), hq, d, generator=g).to(dtype)
    cu_q = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32)
    kvl = torch.tensor(lens, dtype=torch.int32)
    if paged:
        r, pages = len(lens) + 1, math.ceil((max(lens) + 3) / PAGE)
        perm = torch.randperm(r * pages + 5, generator=g)[:r * pages].view(r, pages, 1)
        req_to_token = (perm * PAGE + torch.arange(PAGE)).view(r, -1).int()
        pool = (r * pages + 5) * PAGE
        k = torch.randn(pool, hkv, d, generator=g).to(dtype)
        v = torch.randn(pool, hkv, d, generator=g).to(dtype)
        kw = dict(req_to_token=req_to_token, req_pool_indices=torch.randperm(r, generator=g)[:len(lens)].int())
    else:
        k = torch.randn(sum(lens), hkv, d, generator=g).to(dtype)
        v = torch.randn(sum(lens), hkv, d, generator=g).to(dtype)
        kw = dict(cu_seqlens_k=torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32))
    kw = {key: t.to(DEV) for key, t in kw.items()}
    return q.to(DEV), k.to(DEV), v.to(DEV), cu_q.to(DEV), kvl.to(DEV), kw


def off_diagonal_counts(index, lens) -> set[int]:
    """Parities of the off-diagonal list lengths the listed heads walk (dense heads: ``qi``)."""
    par = set()
    for b, n in enumerate(lens):
        nb = math.ceil(n / BLOCK)
        for h in range(index.block_cnt.shape[1]):
            cnt = torch.arange(nb) + 1 if index.head_dense[h] else index.block_cnt[b, h, :nb]
            par |= set(((cnt - 1) % 2).tolist())
    return par


def run_both(q, k, v, index, cu_q, kvl, max_q, kw, **extra):
    outs = []
    for tile in (64, 128):
        o = torch.full_like(q, float("nan"))                                # poison
        sparse_prefill(q, k, v, index.block_idx, index.block_cnt, index.head_dense, cu_q, kvl, max_q, out=o,
                       kv_tile=tile, **kw, **extra)
        outs.append(o)
    return outs


CASES = [
    # lens, q_lens (chunked when smaller), hq, hkv, d, dtype, paged
    ([263, 141], [263, 141], 4, 4, 64, torch.float32, False),   # GQA 1, batch of 2, unaligned lengths
    ([300, 90], [300, 90], 8, 2, 64, torch.bfloat16, True),     # GQA 4, bf16, scattered pages
    ([331], [140], 8, 2, 64, torch.float32, True),              # chunked: prefix 191 (unaligned), paged
    ([200, 150], [71, 150], 4, 1, 128, torch.bfloat16, False),  # d=128, GQA 4, chunked + whole in one batch
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_wide_tile_matches_reference_and_64(case):
    lens, q_lens, hq, hkv, d, dtype, paged = CASES[case]
    budgets = mixed_budgets(hq, random.Random(case))
    q, k, v, cu_q, kvl, kw = make_batch(lens, q_lens, hq, hkv, d, dtype, paged, 50 + case)
    index = build_block_index(budgets, q, k, cu_q, kvl, max(lens), **kw)
    assert off_diagonal_counts(index, lens) == {0, 1}                       # odd and even lists
    o64, o128 = run_both(q, k, v, index, cu_q, kvl, max(q_lens), kw)
    masks = [index.masks(b, math.ceil(n / BLOCK)) for b, n in enumerate(lens)]
    ref = reference_sparse_prefill(q, k, v, masks, cu_q, kvl, **kw)
    assert relative_error(o128, ref) < TOL[dtype]
    assert relative_error(o128, o64.float()) < TOL_VS_64[dtype]


@pytest.mark.parametrize("paged", [False, True])
def test_wide_tile_every_list_length(paged):
    # explicit masks: query block qi of head h lists (qi + h) % 5 off-diagonal blocks (0..4, odd and even,
    # the first ones, a scattered choice, the ones just before the diagonal) + a custom scale
    lens, hq = [470, 333], 4
    q, k, v, cu_q, kvl, kw = make_batch(lens, lens, hq, 2, 64, torch.float32, paged, 7 + paged)
    gen = torch.Generator().manual_seed(3)
    masks = []
    for n in lens:
        nb = math.ceil(n / BLOCK)
        m = torch.eye(nb, dtype=torch.bool).expand(hq, nb, nb).clone()
        for h in range(hq):
            for qi in range(nb):
                c = min((qi + h) % 5, qi)
                pick = [torch.arange(c), torch.randperm(qi, generator=gen)[:c], torch.arange(qi - c, qi)][(qi + h) % 3]
                m[h, qi, pick] = True
        masks.append(m)
    index = block_index_from_masks(masks, device=DEV)
    o64, o128 = run_both(q, k, v, index, cu_q, kvl, max(lens), kw, sm_scale=0.07)
    ref = reference_sparse_prefill(q, k, v, masks, cu_q, kvl, sm_scale=0.07, **kw)
    assert relative_error(o128, ref) < TOL[torch.float32]
    assert relative_error(o128, o64) < TOL_VS_64[torch.float32]


def test_wide_tile_head_subset_and_dense_heads():
    # heads= leaves the other heads untouched; dense heads walk 0..qi-1 in pairs (no index loads)
    lens = [260]
    budgets = [HeadBudget.dense(), HeadBudget.topk(0.5, 2), HeadBudget.dense(), HeadBudget.vslash(0.5, 1)]
    q, k, v, cu_q, kvl, kw = make_batch(lens, lens, 4, 2, 64, torch.float32, False, 11)
    index = build_block_index(budgets, q, k, cu_q, kvl, 260, **kw)
    heads = torch.tensor([0, 3], dtype=torch.int32, device=DEV)
    o64, o128 = run_both(q, k, v, index, cu_q, kvl, 260, kw, heads=heads)
    ref = reference_sparse_prefill(q, k, v, [index.masks(0, 5)], cu_q, kvl, **kw)
    assert torch.isnan(o128[:, [1, 2]]).all()
    assert relative_error(o128[:, [0, 3]], ref[:, [0, 3]]) < TOL[torch.float32]
    assert relative_error(o128[:, [0, 3]], o64[:, [0, 3]]) < TOL_VS_64[torch.float32]


def test_bad_kv_tile_raises():
    q, k, v, cu_q, kvl, kw = make_batch([64], [64], 2, 1, 64, torch.float32, False, 0)
    index = build_block_index([HeadBudget.dense()] * 2, q, k, cu_q, kvl, 64, **kw)
    with pytest.raises(ValueError, match="kv_tile"):
        sparse_prefill(q, k, v, index.block_idx, index.block_cnt, index.head_dense, cu_q, kvl, 64, kv_tile=256, **kw)
