"""Patterns, block masks and buckets: the shared geometry every other stage relies on."""
import math

import pytest
import torch

from sglang_shplb.core import block_masks as bm
from sglang_shplb.core.buckets import Buckets
from sglang_shplb.core.patterns import BLOCK, DECODE_MIN_PAGES, HeadBudget, Pattern


@pytest.mark.parametrize("sink,window", [(0, 64), (64, 64), (64, 256), (128, 512), (256, 4096)])
@pytest.mark.parametrize("n", [1, 64, 65, 300, 2047, 5000])
def test_streaming_pairs_match_mask(sink, window, n):
    b = HeadBudget.streaming(sink, window)
    nb = math.ceil(n / BLOCK)
    m = bm.streaming_mask(b, nb)
    # the dense tail: the last query block's row counts every block
    assert m.sum().item() - m[-1].sum().item() + nb == b.block_pairs(n)
    assert b.row_pairs(nb).tolist() == m[:-1].sum(-1).tolist() + [nb]


@pytest.mark.parametrize("frac,minb", [(0.05, 1), (0.1, 4), (0.5, 2), (1.0, 1)])
def test_topk_mask_size_and_forced_blocks(frac, minb):
    torch.manual_seed(0)
    n = 1000
    q, k = torch.randn(4, n, 16), torch.randn(2, n, 16)
    b = HeadBudget.topk(frac, minb)
    m = bm.build_block_masks([b] * 4, q, k)
    nb = m.shape[-1]
    assert (m.sum(dim=(1, 2)) - m[:, -1].sum(-1) + nb).tolist() == [b.block_pairs(n)] * 4   # + the dense tail
    assert m[:, :, 0].all() and m.diagonal(dim1=1, dim2=2).all()
    assert not m.triu(1).any()


def test_dense_and_full_topk_are_causal():
    n = 700
    q, k = torch.randn(3, n, 8), torch.randn(1, n, 8)
    m = bm.build_block_masks([HeadBudget.dense(), HeadBudget.topk(1.0, 1), HeadBudget.dense()], q, k)
    causal = bm.causal_block_mask(m.shape[-1])
    for h in range(3):
        assert torch.equal(m[h], causal)


def test_vslash_is_monotone_in_fraction():
    torch.manual_seed(1)
    n = 2000
    q, k = torch.randn(1, n, 16), torch.randn(1, n, 16)
    prev = None
    for f in (0.05, 0.1, 0.3, 0.6, 1.0):
        m = bm.build_block_masks([HeadBudget.vslash(f, 1)], q, k)[0]
        if prev is not None:
            assert (prev & ~m).sum() == 0  # a larger budget keeps every block the smaller one kept
        prev = m


def test_bad_budgets_raise():
    with pytest.raises(ValueError):
        HeadBudget.topk(0.0)
    with pytest.raises(ValueError):
        HeadBudget(Pattern.VSLASH, fraction=1.5)
    with pytest.raises(ValueError):
        HeadBudget(Pattern.STREAMING, window_blocks=0)
    with pytest.raises(ValueError):
        bm.build_block_masks([HeadBudget.dense()], torch.randn(2, 64, 8), torch.randn(1, 64, 8))


def test_density_is_one_for_dense_and_falls_for_streaming():
    s = HeadBudget.streaming(64, 512)
    assert HeadBudget.dense().density(10_000) == 1.0
    assert s.density(4096) > s.density(32768) > s.density(131072)


@pytest.mark.parametrize("length,expect", [(1, 0), (4096, 0), (4097, 1), (8192, 1), (8193, 2),
                                           (131072, 5), (131073, 5), (10**7, 5)])
def test_bucket_index_at_edges(length, expect):
    assert Buckets().index(length) == expect


def test_bucket_index_matches_linear_scan():
    b = Buckets((1024, 2048, 4096))
    for n in range(1, 9000, 7):
        want = next((i for i, e in enumerate(b.edges) if n <= e), len(b.edges) - 1)
        assert b.index(n) == want


@pytest.mark.parametrize("edges", [(), (1000, 2000), (1024, 4096), (0, 1)])
def test_bad_bucket_edges(edges):
    with pytest.raises(ValueError):
        Buckets(edges)


@pytest.mark.parametrize("budget", [HeadBudget.topk(0.05, min_blocks=4), HeadBudget.topk(0.3, min_blocks=2, tile=128),
                                    HeadBudget.vslash(0.1, min_blocks=2), HeadBudget.streaming(128, 512),
                                    HeadBudget.dense()])
@pytest.mark.parametrize("npages", [1, 3, 16, 32, 125, 2048])
def test_decode_pages(budget, npages):
    """Dense reads every page, streaming its sinks and window plus the query's block; top-k / vertical-slash
    read their prefill count of the last query block, but never fewer than DECODE_MIN_PAGES (nor more than
    there are)."""
    got = budget.decode_pages(npages)
    if budget.pattern is Pattern.DENSE:
        assert got == npages
    elif budget.pattern is Pattern.STREAMING:
        assert got == min(npages, budget.sink_blocks + budget.window_blocks + 1)
    else:
        sparse = (2 * budget.vslash_count(npages) if budget.pattern is Pattern.VSLASH
                  else budget.blocks_for_query_block(npages - 1, npages))
        assert got == min(npages, max(sparse, DECODE_MIN_PAGES))
        assert got >= min(npages, DECODE_MIN_PAGES)


def test_decode_floor_binds_short_and_not_long():
    b = HeadBudget.topk(0.05, min_blocks=4)
    assert b.blocks_for_query_block(31, 32) == 4 and b.decode_pages(32) == DECODE_MIN_PAGES   # 2K: 4 -> 16 pages
    assert b.decode_pages(2048) == b.blocks_for_query_block(2047, 2048) == 103               # 128K: its fraction
    assert HeadBudget.dense().decode_pages(0) == 0


def test_streaming_heads_below_the_decode_floor_decode_as_quest_heads():
    """decode_budget: a streaming head whose sinks + decode window (window + the query's block) hold fewer than
    DECODE_MIN_PAGES pages decodes as a top-k head reading exactly the floor; at the floor or above, and every
    other pattern, keep their budget."""
    from sglang_shplb.core.patterns import STREAMING_AT_DECODE, decode_budget, decode_budgets
    below = HeadBudget.streaming(64, 64 * (DECODE_MIN_PAGES - 3))    # 1 + 13 + 1 = 15 pages
    at = HeadBudget.streaming(64, 64 * (DECODE_MIN_PAGES - 2))       # 1 + 14 + 1 = 16 pages
    assert below.sink_blocks + below.decode_window_blocks == DECODE_MIN_PAGES - 1
    assert decode_budget(below) is STREAMING_AT_DECODE and decode_budget(at) is at
    for b in (HeadBudget.dense(), HeadBudget.topk(0.01, 2), HeadBudget.vslash(0.1, 1)):
        assert decode_budget(b) is b
    assert [STREAMING_AT_DECODE.decode_pages(n) for n in (1, 8, 16, 17, 512, 2048)] == [1, 8, 16, 16, 16, 16]
    assert decode_budgets([below, at]) == [STREAMING_AT_DECODE, at]
