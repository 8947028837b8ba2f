"""The decode group kernel with its split-K combine folded in (issue 15 item 2), under Triton's CPU interpreter.

A walk cut into several slices is merged by the last slice to finish (an atomic counter per (request, KV
head) in :class:`DecodeScratch`, zeroed again by that slice); a walk of one slice writes the output directly.
Two calls in a row on one scratch (as every layer and every step share it) both equal the reference, with a
KV group that mixes dense, streaming and top-k heads (the union-list walk) next to an all-dense group.

Contiguous pool pages (``pool_page_size=64``, SGLang's ``--page-size 64``): one ``req_to_token`` load per page
gives the per-token gather's output exactly, for list, dense and streaming walks, one slice or several."""
import math

import pytest
import torch

from conftest import DEV, LAYER_TOL
from sglang_shplb.core.patterns import BLOCK, HeadBudget
from sglang_shplb.kernels.layer_heads import LayerHeads
from sglang_shplb.kernels.reference import reference_decode_pages, reference_sparse_decode, relative_error
from sglang_shplb.kernels.triton_decode import (DecodeScratch, alloc_page_summaries, build_page_summaries,
                                                group_decode, max_selected_pages, page_rules, select_pages)

HKV, GROUP, D = 2, 4, 64
HQ = HKV * GROUP
MAX_CTX = 330


def page_pool(g: torch.Generator, bsz: int, hkv: int = HKV) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``k, v`` of a pool of 64-slot pages (two never handed out) and ``req_to_token [bsz, MAX_CTX]`` as SGLang
    lays it out with ``--page-size 64``: page ``j`` of request ``r`` is one whole pool page (64 consecutive
    slots from a multiple of 64), the pages of all requests in shuffled order."""
    max_pages = math.ceil(MAX_CTX / BLOCK)
    units = bsz * max_pages + 2
    k = torch.randn(units * BLOCK, hkv, D, generator=g).to(DEV)
    v = torch.randn(units * BLOCK, hkv, D, generator=g).to(DEV)
    first = torch.randperm(units, generator=g)[:bsz * max_pages].view(bsz, max_pages, 1) * BLOCK
    return k, v, (first + torch.arange(BLOCK)).view(bsz, -1)[:, :MAX_CTX].int().to(DEV)


@pytest.mark.parametrize("nsplit", [1, 4])
@pytest.mark.parametrize("lens", [[300], [300, 40, 130]], ids=["batch1", "batch3"])
def test_fused_combine_twice_on_one_scratch(nsplit, lens):
    g = torch.Generator().manual_seed(len(lens) * 10 + nsplit)
    bsz = len(lens)
    max_pages = math.ceil(MAX_CTX / BLOCK)
    k, v, r2t = page_pool(g, bsz)
    rpi = torch.arange(bsz, dtype=torch.int32, device=DEV).flip(0)
    seq_lens = torch.tensor(lens, dtype=torch.int64, device=DEV)
    # KV head 0: dense + streaming + two top-k heads (a union list); KV head 1: all dense (a range)
    budgets = [HeadBudget.dense(), HeadBudget.streaming(64, 64), HeadBudget.topk(0.3, 2),
               HeadBudget.topk(0.1, 2)] + [HeadBudget.dense()] * GROUP
    heads = LayerHeads.of(budgets, HKV, D)
    rules = page_rules(heads, HKV, DEV)
    assert rules.gmode.tolist() == [2, 0]
    kmin, kmax = alloc_page_summaries(k.shape[0], HKV, D, dtype=torch.float32, device=DEV)
    build_page_summaries(k, r2t, rpi, seq_lens, kmin, kmax)
    page_idx = torch.zeros(bsz, HQ, max_selected_pages(heads, max_pages), dtype=torch.int32, device=DEV)
    page_cnt = torch.zeros(bsz, HQ, dtype=torch.int32, device=DEV)
    sc = DecodeScratch(bsz, HQ, HKV, D, max_pages, bsz * HQ * nsplit, DEV)
    sc.mid_o.fill_(float("nan"))                    # a partial read before it is written shows up as NaN
    sc.mid_l.fill_(float("nan"))
    out = torch.empty(bsz, HQ, D, device=DEV)
    for call in range(2):
        q = torch.randn(bsz, HQ, D, generator=g).to(DEV)
        select_pages(heads, q, kmin, kmax, r2t, rpi, seq_lens, max_pages, out=(page_idx, page_cnt))
        out.fill_(float("nan"))
        # split_pages 1: the 5-page walks take all 4 slices, the 1-page walk of the 40-token request one
        res = group_decode(q, k, v, r2t, rpi, seq_lens, rules, page_idx, page_cnt, sc, nsplit, 1, out=out)
        assert res is out
        sets = [reference_decode_pages(budgets, q[b], k, r2t, int(rpi[b]), lens[b])[0] for b in range(bsz)]
        ref = reference_sparse_decode(q, k, v, r2t, rpi, seq_lens, sets)
        assert relative_error(out, ref) < LAYER_TOL, call
        assert not sc.done.any(), "the last slice of every walk zeroes its counter"
        if nsplit > 1:   # the split walks went through the partials; the 1-page walk did not
            assert torch.isfinite(sc.mid_l.view(bsz, HQ, nsplit)[0]).all()
            if bsz == 3:
                assert torch.isnan(sc.mid_l.view(bsz, HQ, nsplit)[1]).all()


@pytest.mark.parametrize("nsplit", [1, 4])
def test_contiguous_pool_pages_equal_the_per_token_gather(nsplit):
    """``pool_page_size=64`` on a page-contiguous pool: the output of ``pool_page_size=1`` bit for bit, and the
    reference, for a union-list walk (dense + streaming + top-k heads), a dense range and a streaming range, at
    lengths off the page grid; only the first ``req_to_token`` entry of each page is read."""
    g = torch.Generator().manual_seed(100 + nsplit)
    lens = [300, 40, 130]
    hkv, bsz = 3, len(lens)
    hq = hkv * GROUP
    max_pages = math.ceil(MAX_CTX / BLOCK)
    k, v, r2t = page_pool(g, bsz, hkv)
    rpi = torch.tensor([1, 2, 0], dtype=torch.int32, device=DEV)
    seq_lens = torch.tensor(lens, dtype=torch.int64, device=DEV)
    # KV head 0: dense + streaming + two top-k heads (a union list); 1: all dense; 2: all one streaming budget
    st = HeadBudget.streaming(64, 64)
    budgets = ([HeadBudget.dense(), st, HeadBudget.topk(0.3, 2), HeadBudget.topk(0.1, 2)]
               + [HeadBudget.dense()] * GROUP + [st] * GROUP)
    heads = LayerHeads.of(budgets, hkv, D)
    rules = page_rules(heads, hkv, DEV)
    assert rules.gmode.tolist() == [2, 0, 1]
    kmin, kmax = alloc_page_summaries(k.shape[0], hkv, D, dtype=torch.float32, device=DEV)
    build_page_summaries(k, r2t, rpi, seq_lens, kmin, kmax)
    q = torch.randn(bsz, hq, D, generator=g).to(DEV)
    page_idx, page_cnt = select_pages(heads, q, kmin, kmax, r2t, rpi, seq_lens, max_pages)
    sc = DecodeScratch(bsz, hq, hkv, D, max_pages, bsz * hq * nsplit, DEV)

    def run(table, pool_page_size):   # split_pages 1: the long walks take all nsplit slices
        return group_decode(q, k, v, table, rpi, seq_lens, rules, page_idx, page_cnt, sc, nsplit, 1,
                            pool_page_size=pool_page_size)
    gather, contig = run(r2t, 1), run(r2t, BLOCK)
    sets = [reference_decode_pages(budgets, q[b], k, r2t, int(rpi[b]), lens[b])[0] for b in range(bsz)]
    ref = reference_sparse_decode(q, k, v, r2t, rpi, seq_lens, sets)
    assert relative_error(gather, ref) < LAYER_TOL
    assert torch.equal(contig, gather)
    # every entry of a page replaced by the page's first slot: the per-token gather reads the wrong keys,
    # the contiguous path (one load per page) does not see the change
    firsts = r2t[:, ::BLOCK].repeat_interleave(BLOCK, 1)[:, :MAX_CTX].contiguous()
    assert relative_error(run(firsts, 1), ref) > 0.1
    assert torch.equal(run(firsts, BLOCK), contig)
    assert not sc.done.any()


def test_pool_page_size_other_than_1_or_64_is_refused():
    g = torch.Generator().manual_seed(5)
    k, v, r2t = page_pool(g, 1)
    heads = LayerHeads.of([HeadBudget.dense()] * HQ, HKV, D)
    max_pages = math.ceil(MAX_CTX / BLOCK)
    q = torch.randn(1, HQ, D, generator=g).to(DEV)
    page_idx = torch.zeros(1, HQ, 1, dtype=torch.int32, device=DEV)
    page_cnt = torch.zeros(1, HQ, dtype=torch.int32, device=DEV)
    sc = DecodeScratch(1, HQ, HKV, D, max_pages, HQ, DEV)
    args = (q, k, v, r2t, torch.zeros(1, dtype=torch.int32, device=DEV), torch.tensor([100], device=DEV),
            page_rules(heads, HKV, DEV), page_idx, page_cnt, sc, 1, 1)
    for bad in (7, 0, 128):
        with pytest.raises(ValueError, match="pool_page_size must be 1"):
            group_decode(*args, pool_page_size=bad)
    assert torch.isfinite(group_decode(*args, pool_page_size=BLOCK)).all()
