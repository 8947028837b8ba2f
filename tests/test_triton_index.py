"""Triton top-k index builder (kernels/triton_index.py) vs build_block_index, under the CPU interpreter."""
import math
import random

import pytest
import torch

from conftest import make_batch
from sglang_shplb.core.patterns import BLOCK, HeadBudget, Pattern
from sglang_shplb.kernels import build_block_index
from sglang_shplb.kernels.block_index import BlockIndex
from sglang_shplb.kernels.triton_index import build_topk_index


def compare(budgets, lens, q_lens, got: BlockIndex, ref: BlockIndex, min_same: float = 1.0):
    """Top-k rows: counts equal everywhere; indices equal on every row that has queries (rows without any
    have all-zero pooled queries, so all scores tie and either builder may pick any ids: only checked for
    validity there)."""
    th = [h for h, b in enumerate(budgets) if b.pattern is Pattern.TOPK]
    gi, gc, ri, rc = (x.cpu() for x in (got.block_idx, got.block_cnt, ref.block_idx, ref.block_cnt))
    assert gi.shape == ri.shape and torch.equal(got.head_dense.cpu(), ref.head_dense.cpu())
    assert torch.equal(gc[:, th], rc[:, th])
    nb = gi.shape[2]
    same = total = 0
    for b, (n, nq) in enumerate(zip(lens, q_lens)):
        first, last = (n - nq) // BLOCK, math.ceil(n / BLOCK)
        for h in th:
            for qi in range(nb):
                c = int(gc[b, h, qi])
                row = gi[b, h, qi, :c].tolist()
                assert row == sorted(set(row)) and row[0] == 0 and row[-1] == qi, (b, h, qi, row)
                assert not gi[b, h, qi, c:].any()
                if first <= qi < last:
                    same += len(set(row) & set(ri[b, h, qi, :c].tolist()))
                    total += c
    assert total and same / total >= min_same, f"{same}/{total} identical index entries"
    return same / total


CASES = [
    # lens, q_lens (chunked when smaller), hq, hkv, d, dtype, paged, max_kv_len slack
    ([200, 77], [200, 77], 3, 3, 64, torch.float32, False, 0),        # GQA 1, batch of 2, unaligned
    ([300, 130], [300, 130], 6, 2, 64, torch.float32, True, 40),      # GQA 3, paged, looser max_kv_len
    ([700, 190], [300, 190], 6, 2, 64, torch.float32, True, 0),       # GQA 3, chunked (prefix 400), paged
    ([1100, 700], [1100, 700], 2, 2, 64, torch.float32, False, 0),    # 18 query blocks: 2 row tiles
    ([1000, 333], [1000, 100], 6, 2, 128, torch.bfloat16, True, 0),   # bf16, d=128, chunked, paged
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_topk_rows_match_build_block_index(case):
    lens, q_lens, hq, hkv, d, dtype, paged, slack = CASES[case]
    rng = random.Random(case)
    opts = [HeadBudget.topk(0.1, 2), HeadBudget.topk(0.3, 3), HeadBudget.topk(0.6, 1), HeadBudget.topk(0.2, 5),
            HeadBudget.dense(), HeadBudget.streaming(64, 128), HeadBudget.vslash(0.2, 1)]
    budgets = [opts[h] if h < 4 else rng.choice(opts) for h in range(hq)]
    q, k, _, cu_q, kvl, kw = make_batch(lens, q_lens, hq, hkv, d, dtype, paged, 100 + case)
    mkl = max(lens) + slack
    ref = build_block_index(budgets, q, k, cu_q, kvl, mkl, builder="torch", **kw)
    got = build_topk_index(budgets, q, k, cu_q, kvl, mkl, **kw)
    compare(budgets, lens, q_lens, got, ref, 0.99 if dtype == torch.bfloat16 else 1.0)
    other = [h for h, b in enumerate(budgets) if b.pattern is not Pattern.TOPK]
    assert not got.block_cnt[:, other].any() and not got.block_idx[:, other].any()
    # build_block_index's own switch: top-k rows from Triton, every other head's rows as before
    full = build_block_index(budgets, q, k, cu_q, kvl, mkl, builder="triton", **kw)
    compare(budgets, lens, q_lens, full, ref, 0.99 if dtype == torch.bfloat16 else 1.0)
    assert torch.equal(full.block_idx[:, other], ref.block_idx[:, other])
    assert torch.equal(full.block_cnt[:, other], ref.block_cnt[:, other])


def test_kv_heads_without_topk_heads_are_not_pooled():
    """The pool reads only KV heads holding a top-k head: here KV heads 1 and 2 of 3 (KV head 0 has none), so a
    wrong map from program to KV head selects from the wrong keys."""
    budgets = [HeadBudget.dense(), HeadBudget.streaming(64, 64), HeadBudget.topk(0.2, 2), HeadBudget.dense(),
               HeadBudget.vslash(0.2, 1), HeadBudget.topk(0.1, 3)]
    lens, q_lens = [900, 333], [500, 333]
    q, k, _, cu_q, kvl, kw = make_batch(lens, q_lens, 6, 3, 64, torch.float32, True, 7)
    ref = build_block_index(budgets, q, k, cu_q, kvl, max(lens), builder="torch", **kw)
    got = build_topk_index(budgets, q, k, cu_q, kvl, max(lens), **kw)
    assert compare(budgets, lens, q_lens, got, ref, 1.0) == 1.0


def test_fills_out_in_place_and_leaves_other_heads():
    budgets = [HeadBudget.topk(0.3, 2), HeadBudget.dense(), HeadBudget.streaming(64, 64), HeadBudget.topk(0.1, 4)]
    lens = [390, 150]
    q, k, _, cu_q, kvl, kw = make_batch(lens, lens, 4, 2, 64, torch.float32, False, 7)
    ref = build_block_index(budgets, q, k, cu_q, kvl, 400, builder="torch", **kw)
    out = BlockIndex(ref.block_idx.clone(), ref.block_cnt.clone(), ref.head_dense)
    out.block_idx[:, [0, 3]] = -7
    out.block_cnt[:, [0, 3]] = -1
    res = build_topk_index(budgets, q, k, cu_q, kvl, 400, out=out, **kw)
    assert res is out
    compare(budgets, lens, lens, out, ref)
    assert torch.equal(out.block_idx[:, 1:3], ref.block_idx[:, 1:3])
    assert torch.equal(out.block_cnt[:, 1:3], ref.block_cnt[:, 1:3])
    with pytest.raises(ValueError):
        build_topk_index(budgets, q, k, cu_q, kvl, 900, out=out, **kw)     # NB of the out does not match


def test_no_topk_heads_and_bad_layout():
    q, k, _, cu_q, kvl, kw = make_batch([100], [100], 2, 1, 64, torch.float32, False, 3)
    res = build_topk_index([HeadBudget.dense()] * 2, q, k, cu_q, kvl, 100, **kw)
    assert not res.block_cnt.any() and res.head_dense.tolist() == [1, 1]
    with pytest.raises(ValueError):
        build_topk_index([HeadBudget.topk(0.1)] * 2, q, k, cu_q, kvl, 100)   # no KV layout
    with pytest.raises(ValueError, match="builder"):
        build_block_index([HeadBudget.topk(0.1)] * 2, q, k, cu_q, kvl, 100, builder="cuda", **kw)


def test_block_index_makes_no_tensor_from_host_lists_after_the_first_call(monkeypatch):
    """Every constant of a layer's index build (head lists, vertical-slash fractions, counts) is made once:
    a copy from a host list waits for the GPU stream, and the host then launches the rest with the GPU idle
    (three such copies cost 1.7 ms per vertical-slash call on an H100, ``bench/results/home_calls``)."""
    budgets = [HeadBudget.dense(), HeadBudget.streaming(64, 128), HeadBudget.topk(0.3, 2),
               HeadBudget.vslash(0.2, 2), HeadBudget.vslash(0.1, 4), HeadBudget.topk(0.5, 2, tile=128)]
    q, k, _, cu, kvl, kw = make_batch([400, 250], [400, 250], 6, 2, 64, torch.float32, True, seed=3)
    first = build_block_index(budgets, q, k, cu, kvl, 400, **kw)
    made = []
    real = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: made.append(a) or real(*a, **k))
    again = build_block_index(budgets, q, k, cu, kvl, 400, **kw)
    assert made == []
    assert torch.equal(first.block_idx, again.block_idx) and torch.equal(first.block_cnt, again.block_cnt)


@pytest.mark.parametrize("tile", [BLOCK, 2 * BLOCK])
def test_query_rows_only_equal_the_full_build_where_the_kernels_read(tile):
    """``max_q_len``: the rows of each sequence's query blocks equal the full build (tile 64 and the tile-128
    pairs, a prefix not a multiple of 128: its first query pair starts a block early); the rows before them
    are left as allocated (count 0), so the selection ran on those rows only."""
    budgets = [HeadBudget.topk(0.3, 2, tile=tile), HeadBudget.dense(), HeadBudget.topk(0.1, 3, tile=tile)] * 2
    lens, q_lens = [1000, 333, 260], [200, 100, 260]          # prefixes 800, 233, none
    q, k, _, cu_q, kvl, kw = make_batch(lens, q_lens, 6, 2, 64, torch.float32, True, 31)
    full = build_topk_index(budgets, q, k, cu_q, kvl, max(lens), **kw)
    got = build_topk_index(budgets, q, k, cu_q, kvl, max(lens), max_q_len=max(q_lens), **kw)
    th = [0, 2, 3, 5]
    for b, (n, nq) in enumerate(zip(lens, q_lens)):
        first = (n - nq) // tile * (tile // BLOCK)           # the row of the (pair holding the) first query
        rows = slice(first, math.ceil(n / BLOCK))
        assert torch.equal(got.block_cnt[b, th, rows], full.block_cnt[b, th, rows]), b
        assert torch.equal(got.block_idx[b, th, rows], full.block_idx[b, th, rows]), b
        assert not got.block_cnt[b, th, :first].any(), b
        assert first == 0 or full.block_cnt[b, th, :first].all()


VSLASH_CASES = [
    # lens, q_lens, hq, hkv, d, dtype, paged
    ([700, 190], [300, 190], 6, 2, 64, torch.float32, True),      # chunked (prefix 400), paged, GQA 3
    ([450, 130], [450, 130], 6, 2, 64, torch.float32, False),     # contiguous varlen
    ([1100, 333], [1100, 100], 4, 2, 128, torch.bfloat16, True),  # bf16, d=128, 2 mass chunks, chunked
]


@pytest.mark.parametrize("case", range(len(VSLASH_CASES)))
def test_vslash_rows_match_the_torch_builder(case):
    """The fused vertical-slash builder gives the torch builder's rows exactly (no tied masses on random inputs),
    and with ``max_q_len`` the same rows where the kernels read, none before them."""
    from sglang_shplb.kernels.triton_vslash import build_vslash_index
    lens, q_lens, hq, hkv, d, dtype, paged = VSLASH_CASES[case]
    budgets = [HeadBudget.vslash(0.2, 2), HeadBudget.dense(), HeadBudget.vslash(0.1, 1), HeadBudget.topk(0.3, 2),
               HeadBudget.streaming(64, 64), HeadBudget.vslash(0.5, 3)][:hq]
    vh = [h for h, b in enumerate(budgets) if b.pattern is Pattern.VSLASH]
    q, k, _, cu_q, kvl, kw = make_batch(lens, q_lens, hq, hkv, d, dtype, paged, 60 + case)
    ref = build_block_index(budgets, q, k, cu_q, kvl, max(lens), builder="torch", **kw)
    got = build_vslash_index(budgets, q, k, cu_q, kvl, max(lens), **kw)
    assert torch.equal(got.block_cnt[:, vh], ref.block_cnt[:, vh])
    assert torch.equal(got.block_idx[:, vh], ref.block_idx[:, vh])
    others = [h for h in range(hq) if h not in vh]
    assert not got.block_cnt[:, others].any()
    rows_only = build_vslash_index(budgets, q, k, cu_q, kvl, max(lens), max_q_len=max(q_lens), **kw)
    for b, (n, nq) in enumerate(zip(lens, q_lens)):
        first = (n - nq) // BLOCK
        rows = slice(first, math.ceil(n / BLOCK))
        assert torch.equal(rows_only.block_idx[b, vh, rows], ref.block_idx[b, vh, rows])
        assert not rows_only.block_cnt[b, vh, :first].any()
