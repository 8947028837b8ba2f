"""Fused page-summary update + page selection (+ union lists) (triton_select) vs update_page_summaries +
select_pages (+ the page-union kernel)."""
import random

import pytest
import torch

from conftest import DEV
from sglang_shplb.core.patterns import BLOCK, HeadBudget, Pattern
from sglang_shplb.kernels.layer_heads import LayerHeads
from sglang_shplb.kernels.triton_decode import (DecodeScratch, alloc_page_summaries, build_page_summaries,
                                                group_decode, max_selected_pages, page_rules, select_pages,
                                                update_page_summaries)
from sglang_shplb.kernels import triton_select
from sglang_shplb.kernels.reference import SelectionMemory, reference_decode_pages
from sglang_shplb.kernels.triton_select import (KeptSelections, select_scratch, selector_consts,
                                                update_and_select_pages)

MAXP = 13  # not a power of two: 832 tokens


def random_budgets(hq, rng):
    out = []
    for i in range(hq):
        p = [Pattern.TOPK, Pattern.VSLASH][i] if i < 2 else rng.choice(list(Pattern))
        if p is Pattern.DENSE:
            out.append(HeadBudget.dense())
        elif p is Pattern.STREAMING:
            out.append(HeadBudget.streaming(64, 128))
        elif p is Pattern.TOPK:
            out.append(HeadBudget.topk(rng.uniform(0.1, 0.6), rng.randint(1, 3)))
        else:
            out.append(HeadBudget.vslash(rng.uniform(0.1, 0.6), rng.randint(1, 3)))
    rng.shuffle(out)
    return out


def paged_table(r, pages, g, spare=11):
    """``req_to_token [r, pages * 64]`` over a pool of 64-slot pages handed out in random order
    (``--page-size 64``), and the pool's size in tokens."""
    units = r * pages + spare
    first = torch.randperm(units, generator=g)[:r * pages].view(r, pages, 1) * BLOCK
    return (first + torch.arange(BLOCK)).view(r, -1).int().to(DEV), units * BLOCK


def setup(lens, hkv, group, d, dtype, seed, maxp=MAXP):
    """3 requests in scattered slots (never slot 0) of a pool of scattered 64-slot pages, plus a CUDA-graph
    padding row (slot 0, seq_len 1); summaries built over all tokens but the last (update folds it)."""
    g = torch.Generator().manual_seed(seed)
    r = 6
    r2t, pool = paged_table(r, maxp, g)
    k = torch.randn(pool, hkv, d, generator=g).to(dtype).to(DEV)
    rpi = torch.cat([torch.randperm(r - 1, generator=g)[:len(lens)] + 1, torch.zeros(1, dtype=torch.long)])
    rpi = rpi.int().to(DEV)
    sl = torch.tensor(list(lens) + [1], dtype=torch.int32, device=DEV)
    kmin, kmax = alloc_page_summaries(pool, hkv, d, dtype=dtype, device=DEV)
    build_page_summaries(k, r2t, rpi, sl - 1, kmin, kmax)
    for b in range(len(lens)):  # pages with no token yet hold stale data (a reused page): the first token resets
        p0 = (lens[b] - 1 + BLOCK - 1) // BLOCK
        pid = r2t[rpi[b], p0 * BLOCK::BLOCK].long() // BLOCK
        kmin[pid] = torch.randn(kmin[pid].shape, generator=g).to(dtype).to(DEV) - 3
        kmax[pid] = kmin[pid] + 6
    return g, k, r2t, rpi, sl, kmin, kmax


@pytest.mark.parametrize("group,d,dtype,lens,seed", [
    (1, 64, torch.float32, (1, 64, 700), 0),
    (4, 128, torch.bfloat16, (65, 130, 128), 1),
    (4, 64, torch.float32, (63, 129, 640), 2),
    (1, 128, torch.bfloat16, (2, 192, 705), 3),
])
def test_update_and_select_matches_torch(group, d, dtype, lens, seed, maxp=MAXP):
    rng = random.Random(seed)
    hkv = 2
    hq = hkv * group
    heads = LayerHeads.of(random_budgets(hq, rng))
    g, k, r2t, rpi, sl, kmin, kmax = setup(lens, hkv, group, d, dtype, seed, maxp)
    bsz = sl.shape[0]
    consts = selector_consts(heads, DEV, maxp)
    assert consts is selector_consts(LayerHeads.of(list(heads.budgets)), torch.device(DEV), maxp)  # cached
    width = max_selected_pages(heads, maxp)
    scratch = select_scratch(bsz + 2, consts, hkv)                                   # larger than needed is fine
    kmin2, kmax2 = kmin.clone(), kmax.clone()
    idx2 = torch.full((bsz, hq, width), -7, dtype=torch.int32, device=DEV)
    cnt2 = torch.full((bsz, hq), 99, dtype=torch.int32, device=DEV)              # must all be rewritten
    for step in range(3):
        q = torch.randn(bsz, hq, d, generator=g).to(dtype).to(DEV)
        update_page_summaries(k, r2t, rpi, sl, kmin, kmax)
        idx, cnt = select_pages(heads, q, kmin, kmax, r2t, rpi, sl, maxp)
        update_and_select_pages(q, k, r2t, rpi, sl, kmin2, kmax2, consts, maxp, idx2, cnt2, scratch)
        # every pool page alike (the last row is the scratch row: what lands there is unspecified)
        assert torch.equal(kmin[:-1], kmin2[:-1]) and torch.equal(kmax[:-1], kmax2[:-1]), step
        assert torch.equal(cnt, cnt2), (step, cnt, cnt2)
        for b in range(bsz):
            for h in heads.selected:
                c = int(cnt[b, h])
                want = sorted(idx[b, h, :c].tolist())
                got = idx2[b, h, :c].tolist()
                assert got == want, (step, b, h, got, want)                     # ascending, same set
                assert c == 0 or got[0] == 0                                     # page 0 forced
        assert int(cnt[:, list(heads.selected)].sum()) > 0
        sl = sl + 1                            # real requests append a token; the padding row stays at 1
        sl[-1] = 1


@pytest.mark.parametrize("group,d,dtype,seed", [(2, 64, torch.float32, 4), (4, 128, torch.bfloat16, 5)])
def test_narrower_widths_match_torch(monkeypatch, group, d, dtype, seed):
    """A layer sized for 100 pages (P2 128) selects a request of up to 32 pages over 32 columns, up to 64 over
    64, longer ones over 128 (``_select_fit``; the narrowest width lowered from 256 to 32 so that small shapes
    reach it): the pages equal the reference's in each range, over steps that cross 2048 tokens."""
    monkeypatch.setattr(triton_select, "MIN_SELECT_WIDTH", 32)
    assert (triton_select._narrower(128, 4), triton_select._narrower(128, 2)) == (32, 64)
    test_update_and_select_matches_torch(group, d, dtype, (2047, 3000, 6200), seed, maxp=100)


@pytest.mark.parametrize("every,maxp,lens", [(3, 24, (120, 250)), (4, 24, (120, 250)), (3, 100, (2043, 4090))])
def test_kept_selections_follow_the_reference_rule(monkeypatch, every, maxp, lens):
    """Over decode steps that cross page boundaries, with a fresh random query each step: the pages the fused
    selector gives with kept selections equal the reference's with a SelectionMemory (core.patterns.reselect_due),
    which differ from selecting anew at some step (so reuse happened); forgetting a slot selects anew. At 100
    pages (narrowest width lowered to 32) the first request moves from the 32-column width to the 64-column one
    at 2049 tokens and the second from 64 to 128 at 4097, their kept words written at one width, read at it."""
    from sglang_shplb.core import patterns
    monkeypatch.setattr(patterns, "DECODE_MIN_PAGES", 3)     # small budgets, so a selection is a strict subset
    monkeypatch.setattr(triton_select, "MIN_SELECT_WIDTH", 32)
    hkv, group, d = 2, 2, 64
    heads = LayerHeads.of([HeadBudget.topk(0.2, 1), HeadBudget.dense(), HeadBudget.streaming(64, 64),
                           HeadBudget.vslash(0.15, 1)])
    g = torch.Generator().manual_seed(7)
    r2t, pool = paged_table(5, maxp, g)
    k = torch.randn(pool, hkv, d, generator=g).to(DEV)
    rpi = torch.tensor([3, 1, 0], dtype=torch.int32, device=DEV)            # slot 0: a CUDA-graph padding row
    sl = torch.tensor([*lens, 1], dtype=torch.int32, device=DEV)
    kmin, kmax = alloc_page_summaries(pool, hkv, d, device=DEV)
    build_page_summaries(k, r2t, rpi, sl - 1, kmin, kmax)
    consts = selector_consts(heads, DEV, maxp)
    kept = KeptSelections.alloc(r2t.shape[0], consts.num_sel, maxp, hkv, every, DEV)
    scratch = select_scratch(3, consts, hkv)
    idx = torch.zeros(3, 4, max(1, consts.maxsel), dtype=torch.int32, device=DEV)
    cnt = torch.zeros(3, 4, dtype=torch.int32, device=DEV)
    memory = SelectionMemory(every)
    reused = 0
    try:
        for step in range(12):
            if step == 7:                                                 # slot 3 refilled by an extend
                kept.forget(rpi[:1])
                memory.forget([3])
            q = torch.randn(3, 4, d, generator=g).to(DEV)
            update_and_select_pages(q, k, r2t, rpi, sl, kmin, kmax, consts, maxp, idx, cnt, scratch, kept=kept)
            for b in range(2):
                n, slot = int(sl[b]), int(rpi[b])
                want = memory.pages(0, heads.budgets, q[b], k, r2t, slot, n)
                anew = reference_decode_pages(heads.budgets, q[b], k, r2t, slot, n)[0]
                npg = -(-n // BLOCK)
                for h in heads.selected:
                    got = sorted(set(idx[b, h, :int(cnt[b, h])].tolist()) | {npg - 1})
                    assert got == want[h], (step, b, h, got, want[h])
                    reused += want[h] != anew[h]
            sl = sl + 1
            sl[-1] = 1
    finally:
        triton_select._consts.cache_clear()                               # tables made under the patched floor
    assert reused > 0


def test_no_selected_heads_and_no_host_tensors(monkeypatch):
    """With one / no selected head, every count is written. No torch.tensor/as_tensor at call time."""
    budgets = [HeadBudget.dense(), HeadBudget.streaming(64, 64), HeadBudget.topk(0.3, 1), HeadBudget.dense()]
    for bud in (budgets, [HeadBudget.dense()] * 4):
        heads = LayerHeads.of(bud)
        g, k, r2t, rpi, sl, kmin, kmax = setup((1, 65, 300), 2, 2, 64, torch.float32, 5)
        consts = selector_consts(heads, DEV, MAXP)
        scratch = select_scratch(4, consts, 2)
        idx = torch.zeros(4, 4, max(1, consts.maxsel), dtype=torch.int32, device=DEV)
        cnt = torch.full((4, 4), 5, dtype=torch.int32, device=DEV)
        q = torch.randn(4, 4, 64, generator=g).to(DEV)

        def boom(*a, **kw):
            raise AssertionError("tensor made from host data at call time")
        with monkeypatch.context() as m:
            m.setattr(torch, "tensor", boom)
            m.setattr(torch, "as_tensor", boom)
            update_and_select_pages(q, k, r2t, rpi, sl, kmin, kmax, consts, MAXP, idx, cnt, scratch)
        ref = select_pages(heads, q, kmin, kmax, r2t, rpi, sl, MAXP)[1]
        assert torch.equal(cnt, ref)


@pytest.mark.skipif(DEV != "cuda", reason="CUDA-graph capture needs a GPU")
def test_cuda_graph_capture():  # pragma: no cover - GPU only
    rng = random.Random(7)
    heads = LayerHeads.of(random_budgets(8, rng))
    g, k, r2t, rpi, sl, kmin, kmax = setup((5, 64, 700), 2, 4, 128, torch.bfloat16, 7)
    consts = selector_consts(heads, DEV, MAXP)
    scratch = select_scratch(4, consts, 2)
    idx = torch.zeros(4, 8, consts.maxsel, dtype=torch.int32, device=DEV)
    cnt = torch.zeros(4, 8, dtype=torch.int32, device=DEV)
    q = torch.randn(4, 8, 128, device=DEV).bfloat16()
    kmin2, kmax2 = kmin.clone(), kmax.clone()
    update_and_select_pages(q, k, r2t, rpi, sl, kmin2, kmax2, consts, MAXP, idx, cnt, scratch)  # compile
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        update_and_select_pages(q, k, r2t, rpi, sl, kmin, kmax, consts, MAXP, idx, cnt, scratch)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(kmin, kmin2) and torch.equal(kmax, kmax2)                               # same as eager
    ref = select_pages(heads, q, kmin, kmax, r2t, rpi, sl, MAXP)[1]
    assert torch.equal(cnt, ref)


@pytest.mark.parametrize("d,all_tied", [(64, False), (128, False), (64, True)])
def test_ties_negative_scores_several_tiles(d, all_tied):
    """70 pages (2-5 score tiles), single-key pages (signed scores q.k) with exact duplicates: the chosen
    pages are the top ``cnt`` by score, the lowest ids among exact ties, ascending, page 0 first."""
    maxp, hkv, group = 70, 1, 4
    g = torch.Generator().manual_seed(d)
    heads = LayerHeads.of([HeadBudget.topk(0.6, 1), HeadBudget.vslash(0.3, 2), HeadBudget.topk(0.1, 3),
                           HeadBudget.dense()])
    lens = [maxp * BLOCK, 1000, 64 * 35 + 1]
    r = 4
    r2t, pool = paged_table(r, maxp, g, spare=0)
    k = torch.randn(pool, hkv, d, generator=g).to(DEV)
    rpi = torch.tensor([2, 1, 3], dtype=torch.int32, device=DEV)
    sl = torch.tensor(lens, dtype=torch.int32, device=DEV)
    slot_min = torch.randn(r, hkv, maxp, d, generator=g).to(DEV)          # per request slot, then into pool pages
    slot_min[:, :, 10:60:7] = slot_min[:, :, 5:6]                          # exact ties with page 5
    slot_min[:, :, 33] = slot_min[:, :, 2]
    if all_tied:
        slot_min[:] = slot_min[:, :, :1]
    kmin = alloc_page_summaries(pool, hkv, d, dtype=torch.float32, device=DEV)[0]
    kmin[r2t[:, ::BLOCK].long().flatten() // BLOCK] = slot_min.transpose(1, 2).flatten(0, 1)
    kmax = kmin.clone()
    kmin_r, kmax_r = kmin.clone(), kmax.clone()
    consts = selector_consts(heads, DEV, maxp)
    idx = torch.zeros(3, 4, consts.maxsel, dtype=torch.int32, device=DEV)
    cnt = torch.full((3, 4), -1, dtype=torch.int32, device=DEV)
    q = torch.randn(3, 4, d, generator=g).to(DEV)
    update_and_select_pages(q, k, r2t, rpi, sl, kmin, kmax, consts, maxp, idx, cnt)
    update_page_summaries(k, r2t, rpi, sl, kmin_r, kmax_r)
    assert torch.equal(kmin[:-1], kmin_r[:-1]) and torch.equal(kmax[:-1], kmax_r[:-1])
    ref_cnt = select_pages(heads, q, kmin_r, kmax_r, r2t, rpi, sl, maxp)[1]
    assert torch.equal(cnt, ref_cnt)
    for b in range(3):
        npg = (lens[b] + BLOCK - 1) // BLOCK
        for h in range(3):
            c = int(cnt[b, h])
            assert c > 1
            score = (q[b, h].float() * slot_min[rpi[b], 0, :npg - 1].float()).sum(-1).tolist()   # q.k, page 0 forced
            score[0] = float("inf")
            got = idx[b, h, :c].tolist()
            assert got == sorted(set(got)) and got[0] == 0 and got[-1] < npg - 1
            rest = [p for p in range(npg - 1) if p not in got]
            thr = min(score[p] for p in got)
            assert all(score[p] <= thr + 1e-4 for p in rest)                      # top cnt (fp tolerance)
            assert all(p > max(x for x in got if score[x] == score[p]) for p in rest if score[p] == thr)
            if all_tied:
                assert got == list(range(c))


@pytest.mark.parametrize("group,seed", [(4, 11), (3, 12), (1, 13)])
def test_union_lists_match_page_union_kernel(group, seed):
    """With ``union``, the one launch also writes the union lists of list-mode KV heads: the same lists,
    bit masks and counts as the page-union launch of group_decode on the same selection, for groups that
    mix dense, streaming and selected heads; the counters are zero again after each call."""
    rng = random.Random(seed)
    hkv = 3
    hq = hkv * group
    budgets = random_budgets(hq, rng)
    if group > 1:   # one group all streaming (a range walk), one mixing dense + streaming (a list, no selection)
        budgets[:group] = [HeadBudget.streaming(64, 128)] * group
        budgets[group:2 * group] = [HeadBudget.dense()] + [HeadBudget.streaming(64, 64)] * (group - 1)
        budgets[2 * group] = HeadBudget.topk(0.3, 2)
    heads = LayerHeads.of(budgets)
    rules = page_rules(heads, hkv, DEV)
    assert rules.lists
    g, k, r2t, rpi, sl, kmin, kmax = setup((700, 65, 640), hkv, group, 64, torch.float32, seed)
    bsz = sl.shape[0]
    consts = selector_consts(heads, DEV, MAXP)
    width = max(1, max_selected_pages(heads, MAXP))
    sel_scr = select_scratch(bsz, consts, hkv)
    fused, plain = (DecodeScratch(bsz, hq, hkv, 64, MAXP, bsz * hq * 2, DEV) for _ in range(2))
    for step in range(2):
        q = torch.randn(bsz, hq, 64, generator=g).to(DEV)
        idx = torch.zeros(bsz, hq, width, dtype=torch.int32, device=DEV)
        cnt = torch.zeros(bsz, hq, dtype=torch.int32, device=DEV)
        update_and_select_pages(q, k, r2t, rpi, sl, kmin, kmax, consts, MAXP, idx, cnt, sel_scr,
                                union=(rules, fused))
        assert int(sel_scr.done.abs().sum()) == 0
        # the page-union launch of group_decode on the same selection (its output is not compared here)
        group_decode(q, k, k, r2t, rpi, sl, rules, idx, cnt, plain, 1, MAXP)
        for b in range(bsz):
            for hk in range(hkv):
                if int(rules.gmode[hk]) != 2:
                    continue
                n = int(plain.ucnt[b, hk])
                assert n > 0 and int(fused.ucnt[b, hk]) == n, (step, b, hk)
                assert torch.equal(fused.ulist[b, hk, :n], plain.ulist[b, hk, :n]), (step, b, hk)
                assert torch.equal(fused.ubits[b, hk, :n], plain.ubits[b, hk, :n]), (step, b, hk)
        sl = sl + 1
        sl[-1] = 1
