"""Sparse kernels vs the PyTorch reference, under Triton's CPU interpreter (tiny shapes)."""
import math
import random
import sys

import pytest
import torch

from conftest import DEV, make_batch, seq_kv, tol
from sglang_shplb.core.block_masks import build_block_masks
from sglang_shplb.core.patterns import BLOCK, HeadBudget, Pattern
from sglang_shplb.kernels import LayerHeads, SparsePrefill, block_index_from_masks, build_block_index, sparse_prefill
from sglang_shplb.kernels.dense_pieces import piece_backend
from sglang_shplb.kernels.reference import (reference_decode_pages, reference_page_summaries,
                                            reference_sparse_decode, reference_sparse_prefill, relative_error)
from sglang_shplb.kernels.triton_decode import (DecodeScratch, alloc_page_summaries, build_page_summaries,
                                                group_decode, max_selected_pages, page_rules, select_pages,
                                                update_page_summaries)


def random_budgets(hq: int, rng: random.Random) -> list[HeadBudget]:
    out = []
    for _ in range(hq):
        p = rng.choice(list(Pattern))
        if p is Pattern.DENSE:
            out.append(HeadBudget.dense())
        elif p is Pattern.STREAMING:
            out.append(HeadBudget.streaming(rng.choice([0, 64, 128]), rng.choice([64, 128])))
        elif p is Pattern.TOPK:
            out.append(HeadBudget.topk(rng.choice([0.1, 0.3, 0.6]), rng.choice([2, 3]),   # min 1: see below
                                       tile=rng.choice([BLOCK, 2 * BLOCK])))
        else:
            out.append(HeadBudget.vslash(rng.choice([0.2, 0.5]), rng.choice([1, 2])))
    return out


# ---------------------------------------------------------------------------------------------------
# index builders agree with block_masks.build_block_masks
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("group,paged,seed", [(1, False, 0), (4, True, 1), (8, False, 2), (4, False, 3)])
def test_index_builders_match_block_masks(group, paged, seed):
    rng = random.Random(seed)
    hkv = 2 if group < 8 else 1
    hq = hkv * group
    lens = [rng.randint(65, 330) for _ in range(3)]
    budgets = random_budgets(hq, rng)
    q, k, v, cu_q, kvl, kw = make_batch(lens, lens, hq, hkv, 64, torch.float32, paged, seed)
    idx = build_block_index(budgets, q, k, cu_q, kvl, max(lens) + 40, **kw)   # max_kv_len: a looser bound
    for b, n in enumerate(lens):
        qb, kb = q[cu_q[b]:cu_q[b + 1]].transpose(0, 1), seq_kv(k, b, n, kw).transpose(0, 1)
        ref = build_block_masks(budgets, qb, kb).cpu()
        got = idx.masks(b, math.ceil(n / BLOCK))
        assert torch.equal(got, ref), f"sequence {b}: heads {[(h, budgets[h]) for h in range(hq) if not torch.equal(got[h], ref[h])]}"


def test_topk_min_blocks_1_keeps_the_diagonal():
    # HeadBudget.blocks_for_query_block gives top-k heads at least 2 blocks (block 0 and the diagonal),
    # even with min_blocks=1: both forced blocks are listed, the diagonal last
    q, k, v, cu_q, kvl, kw = make_batch([200], [200], 2, 1, 64, torch.float32, False, 9)
    idx = build_block_index([HeadBudget.topk(0.1, 1)] * 2, q, k, cu_q, kvl, 200, **kw)
    assert torch.equal(idx.block_cnt[0, :, :4].cpu(), torch.tensor([1, 2, 2, 2], dtype=torch.int32).expand(2, 4))
    assert torch.equal(idx.block_idx[0, :, 0, 0].cpu(), torch.zeros(2, dtype=torch.int32))
    for qi in range(1, 4):
        assert idx.block_idx[0, :, qi, :2].tolist() == [[0, qi]] * 2


def test_vslash_rows_longer_than_2n_are_kept():
    # n = vslash_count = 1 at nb = 11, but forced block 0 / offset 0 give rows of up to 2n + 2 = 4 blocks
    n = 700
    budgets = [HeadBudget.vslash(0.1, 1)] * 4
    q, k, v, cu_q, kvl, kw = make_batch([n], [n], 4, 1, 64, torch.float32, False, 11)
    idx = build_block_index(budgets, q, k, cu_q, kvl, n, **kw)
    ref = build_block_masks(budgets, q.transpose(0, 1), k.transpose(0, 1)).cpu()
    assert ref.sum(-1).max() > 2 * budgets[0].vslash_count(ref.shape[-1])
    assert torch.equal(idx.masks(0, ref.shape[-1]), ref)


def test_index_rows_sorted_with_diagonal_last():
    rng = random.Random(5)
    budgets = random_budgets(8, rng)
    q, k, v, cu_q, kvl, kw = make_batch([300], [300], 8, 2, 64, torch.float32, False, 5)
    idx = build_block_index(budgets, q, k, cu_q, kvl, 300, **kw)
    nb = math.ceil(300 / BLOCK)
    for h in range(8):
        if idx.head_dense[h]:
            continue
        for qi in range(nb):
            row = idx.block_idx[0, h, qi, :idx.block_cnt[0, h, qi]].tolist()
            assert row == sorted(set(row)) and row[-1] == qi


# ---------------------------------------------------------------------------------------------------
# prefill kernel vs reference
# ---------------------------------------------------------------------------------------------------
PREFILL_CASES = [
    # lens, q_lens (chunked when smaller), hq, hkv, d, dtype, paged
    ([200, 130, 65], [200, 130, 65], 4, 4, 64, torch.float32, False),      # GQA 1, varlen
    ([190, 257], [190, 100], 8, 2, 64, torch.float32, True),               # GQA 4, paged, chunked
    ([250], [70], 8, 1, 128, torch.bfloat16, True),                        # GQA 8, d=128, chunked, unaligned prefix
    ([140, 77], [140, 77], 4, 1, 64, torch.float16, False),                # GQA 4, fp16
    ([450], [450], 2, 1, 64, torch.float32, False),                        # long vslash rows (2n + 2)
]


@pytest.mark.parametrize("case", range(len(PREFILL_CASES)))
def test_sparse_prefill_matches_reference(case):
    lens, q_lens, hq, hkv, d, dtype, paged = PREFILL_CASES[case]
    rng = random.Random(10 + case)
    budgets = random_budgets(hq, rng)
    budgets[0] = HeadBudget.dense()
    if hq > 1:
        budgets[1] = HeadBudget.topk(0.3, 1)
    if lens == [450]:
        budgets = [HeadBudget.vslash(0.1, 1)] * hq
    q, k, v, cu_q, kvl, kw = make_batch(lens, q_lens, hq, hkv, d, dtype, paged, 100 + case)
    sp = SparsePrefill(budgets, hkv, d).plan(cu_q, kvl, max(q_lens), max(lens), **kw)
    out = torch.full_like(q, float("nan"))                                  # poison
    sp.run(q, k, v, out=out)
    index = sp.last_index if sp.last_index is not None else sp.index(q, k)
    masks = [index.masks(b, math.ceil(n / BLOCK)) for b, n in enumerate(lens)]
    ref = reference_sparse_prefill(q, k, v, masks, cu_q, kvl, **kw)
    assert relative_error(out, ref) < tol(dtype)


def test_sparse_prefill_explicit_masks_and_scale():
    rng = random.Random(7)
    lens = [150, 64]
    hq, hkv, d = 4, 2, 64
    q, k, v, cu_q, kvl, kw = make_batch(lens, lens, hq, hkv, d, torch.float32, False, 7)
    masks = []
    for n in lens:
        nb = math.ceil(n / BLOCK)
        m = (torch.rand(hq, nb, nb, generator=torch.Generator().manual_seed(rng.randint(0, 99))) < 0.5).tril()
        m |= torch.eye(nb, dtype=torch.bool)
        masks.append(m)
    index = block_index_from_masks(masks, device=DEV)
    o = sparse_prefill(q, k, v, index.block_idx, index.block_cnt, index.head_dense, cu_q, kvl, max(lens),
                       sm_scale=0.05, **kw)
    ref = reference_sparse_prefill(q, k, v, masks, cu_q, kvl, sm_scale=0.05, **kw)
    assert relative_error(o, ref) < tol(torch.float32)


@pytest.mark.parametrize("paged", [False, True])
def test_mixed_layer_dense_fast_path_and_rule_tiles(paged):
    # dense heads: SDPA (no prefix), two attention calls merged (a prefix), or, lengths only on the device,
    # the 128-row rule kernel; streaming edge cases (window of one block, sinks inside / outside the window)
    # through the rule kernel; top-k through the index kernel; with an explicit index (run(index=)), every
    # head through the index kernel.
    # Dense heads are 3 + 1 per KV head: two SDPA groups.
    hq, hkv, d = 8, 2, 64
    budgets = [HeadBudget.dense(), HeadBudget.dense(), HeadBudget.dense(), HeadBudget.streaming(64, 64),
               HeadBudget.dense(), HeadBudget.streaming(0, 128), HeadBudget.topk(0.3, 2), HeadBudget.vslash(0.3, 1)]
    lens, q_lens = ([270, 140], [270, 140]) if not paged else ([270, 200], [140, 71])   # prefixes 130, 129
    q, k, v, cu_q, kvl, kw = make_batch(lens, q_lens, hq, hkv, d, torch.float32, paged, 40 + paged)
    host = dict(q_lens_cpu=q_lens, kv_lens_cpu=lens)                        # on the GPU too: SDPA without a sync
    sp = SparsePrefill(budgets, hkv, d).plan(cu_q, kvl, max(q_lens), max(lens), **host, **kw)
    assert sp._dense_groups == [([4], [1], 1), ([0, 1, 2], [0], 3)]
    sp2 = SparsePrefill([HeadBudget.streaming(128, 64)] * 2 + [HeadBudget.topk(0.5, 2)] * 6, hkv, d).plan(
        cu_q, kvl, max(q_lens), max(lens), **kw)                             # sinks outside a 1-block window
    refs = {}
    for s in (sp, sp2):
        index = s.index(q, k)
        masks = [index.masks(b, math.ceil(n / BLOCK)) for b, n in enumerate(lens)]
        ref = refs[id(s)] = reference_sparse_prefill(q, k, v, masks, cu_q, kvl, **kw)
        for explicit in (None, index):
            out = torch.full_like(q, float("nan"))
            s.run(q, k, v, out=out, index=explicit)
            assert relative_error(out, ref) < tol(torch.float32), (s.heads.budgets, explicit is None)
    segs = sp._dense_segments(q, k)
    if paged and piece_backend(q) == "math":      # a prefix in float32 on CUDA: no kernel returns a log-sum-exp
        assert segs is None
    else:
        assert [(n, L) for _, n, L, _ in segs] == list(zip(q_lens, lens))  # prefixes too: no rule kernel
    sp._host_lens = None                                                    # lengths only on the device
    assert sp._dense_segments(q, k) is None
    out = torch.full_like(q, float("nan"))
    sp.run(q, k, v, out=out)                                                # dense heads on the rule kernel
    assert relative_error(out, refs[id(sp)]) < tol(torch.float32)


@pytest.mark.parametrize("budgets,heads,n,seed", [
    ([HeadBudget.topk(0.5, 2)] * 4, [1, 3], 150, 8),
    ([HeadBudget.dense(), HeadBudget.topk(0.5, 2), HeadBudget.dense(), HeadBudget.vslash(0.5, 1)], [0, 3], 260, 11),
], ids=["topk", "dense+vslash"])
def test_sparse_prefill_head_subset_leaves_other_heads(budgets, heads, n, seed):
    # heads= leaves the other heads untouched; dense heads walk 0..qi-1 (no index loads)
    q, k, v, cu_q, kvl, kw = make_batch([n], [n], 4, 2, 64, torch.float32, False, seed)
    idx = build_block_index(budgets, q, k, cu_q, kvl, n, **kw)
    out = torch.full_like(q, float("nan"))
    sparse_prefill(q, k, v, idx.block_idx, idx.block_cnt, idx.head_dense, cu_q, kvl, n, out=out,
                   heads=torch.tensor(heads, dtype=torch.int32, device=DEV), **kw)
    ref = reference_sparse_prefill(q, k, v, [idx.masks(0, math.ceil(n / BLOCK))], cu_q, kvl, **kw)
    others = [h for h in range(4) if h not in heads]
    assert torch.isnan(out[:, others]).all()
    assert relative_error(out[:, heads], ref[:, heads]) < tol(torch.float32)


def every_kind(hq: int, rng: random.Random) -> list[HeadBudget]:
    """Heads 0..3 top-k, vertical-slash, streaming, dense; the others drawn from these four kinds."""
    kinds = [HeadBudget.topk(rng.choice([0.2, 0.4, 0.7]), rng.choice([1, 3])),
             HeadBudget.vslash(rng.choice([0.3, 0.6]), rng.choice([1, 2])),
             HeadBudget.streaming(rng.choice([0, 64]), rng.choice([64, 192])),
             HeadBudget.dense()]
    return [kinds[h % 4] if h < 4 else rng.choice(kinds) for h in range(hq)]


INDEX_CASES = [
    # lens, q_lens (chunked when smaller), hq, hkv, d, dtype, paged (16-token pool pages)
    ([263, 141], [263, 141], 4, 4, 64, torch.float32, False),   # GQA 1, batch of 2, unaligned lengths
    ([300, 90], [300, 90], 8, 2, 64, torch.bfloat16, True),     # GQA 4, bf16, scattered pages
    ([331], [140], 8, 2, 64, torch.float32, True),              # chunked: prefix 191 (unaligned), paged
    ([200, 150], [71, 150], 4, 1, 128, torch.bfloat16, False),  # d=128, GQA 4, chunked + whole in one batch
]


@pytest.mark.parametrize("case", range(len(INDEX_CASES)))
def test_index_kernel_every_kind_matches_reference(case):
    # the block-index kernel on the rows of every head kind (streaming and dense ones too)
    lens, q_lens, hq, hkv, d, dtype, paged = INDEX_CASES[case]
    budgets = every_kind(hq, random.Random(case))
    q, k, v, cu_q, kvl, kw = make_batch(lens, q_lens, hq, hkv, d, dtype, paged, 50 + case, page=16)
    index = build_block_index(budgets, q, k, cu_q, kvl, max(lens), **kw)
    out = torch.full_like(q, float("nan"))
    sparse_prefill(q, k, v, index.block_idx, index.block_cnt, index.head_dense, cu_q, kvl, max(q_lens), out=out, **kw)
    masks = [index.masks(b, math.ceil(n / BLOCK)) for b, n in enumerate(lens)]
    ref = reference_sparse_prefill(q, k, v, masks, cu_q, kvl, **kw)
    assert relative_error(out, ref) < tol(dtype)


@pytest.mark.parametrize("paged", [False, True])
def test_index_kernel_every_list_length(paged):
    # explicit masks: query block qi of head h lists (qi + h) % 5 off-diagonal blocks (0..4: the first ones,
    # a scattered choice, the ones just before the diagonal) + a custom scale
    lens, hq = [470, 333], 4
    q, k, v, cu_q, kvl, kw = make_batch(lens, lens, hq, 2, 64, torch.float32, paged, 7 + paged, page=16)
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
    out = torch.full_like(q, float("nan"))
    sparse_prefill(q, k, v, index.block_idx, index.block_cnt, index.head_dense, cu_q, kvl, max(lens), out=out,
                   sm_scale=0.07, **kw)
    ref = reference_sparse_prefill(q, k, v, masks, cu_q, kvl, sm_scale=0.07, **kw)
    assert relative_error(out, ref) < tol(torch.float32)


# ---------------------------------------------------------------------------------------------------
# decode
# ---------------------------------------------------------------------------------------------------
def _decode_setup(seed, hq=8, hkv=2, d=64, dtype=torch.float32):
    """A token pool of 64-slot pages handed out in random order (SGLang with --page-size 64)."""
    g = torch.Generator().manual_seed(seed)
    max_ctx, r = 330, 4
    pages = math.ceil(max_ctx / BLOCK)
    units = r * pages + 3
    pool = units * BLOCK
    k = torch.randn(pool, hkv, d, generator=g).to(DEV, dtype)
    v = torch.randn(pool, hkv, d, generator=g).to(DEV, dtype)
    first = torch.randperm(units, generator=g)[:r * pages].view(r, pages, 1) * BLOCK
    req_to_token = (first + torch.arange(BLOCK)).view(r, -1)[:, :max_ctx].int().to(DEV)
    return k, v, req_to_token, max_ctx, r


@pytest.mark.parametrize("group,dtype,grouped", [(4, torch.float32, False), (1, torch.bfloat16, False),
                                                 (8, torch.float16, False), (4, torch.bfloat16, True)])
def test_group_decode_with_page_reuse(group, dtype, grouped):
    # the decode kernels with a page selection made once and reused for two steps while the sequences grow
    # (the torch selector, select_pages; the serving path reselects every step: test_paged_layer)
    rng = random.Random(20 + group)
    hkv = 2 if group < 8 else 1
    hkv = 3 if grouped else hkv
    hq = hkv * group
    d = 64
    k, v, req_to_token, max_ctx, r = _decode_setup(group, hq, hkv, d, dtype)
    budgets = random_budgets(hq, rng)
    budgets[0] = HeadBudget.topk(0.3, 2)
    if grouped:  # KV head 1 all dense, KV head 2 one streaming budget: the group kernel reads them
        budgets[group:2 * group] = [HeadBudget.dense()] * group
        budgets[2 * group:] = [HeadBudget.streaming(64, 128)] * group
    rpi = torch.tensor([2, 0, 3], dtype=torch.int32, device=DEV)
    lens = torch.tensor([250, 64, 130], dtype=torch.int64 if grouped else torch.int32,   # SGLang's are int64
                        device=DEV)                                        # 64 / 130: a page just filled / just begun
    heads = LayerHeads.of(budgets, hkv, d)
    max_pages = math.ceil(max_ctx / BLOCK)
    rules = page_rules(heads, hkv, DEV)
    kmin, kmax = alloc_page_summaries(k.shape[0], hkv, d, dtype=dtype, device=DEV)
    build_page_summaries(k, req_to_token, rpi, lens - 1, kmin, kmax)
    page_idx = torch.zeros(3, hq, max_selected_pages(heads, max_pages), dtype=torch.int32, device=DEV)
    page_cnt = torch.zeros(3, hq, dtype=torch.int32, device=DEV)
    nsplit = 4                                                              # each walk cut into 4 even slices
    sc = DecodeScratch(3, hq, hkv, d, max_pages, 3 * hq * nsplit, DEV)
    if grouped:
        assert rules.gmode.tolist()[1:] == [0, 1]                          # ranges; KV head 0 walks a union list
    chosen = None
    for step in range(3):                                                   # select, then reuse twice
        update_page_summaries(k, req_to_token, rpi, lens, kmin, kmax)
        for b in range(3):                                                  # summaries are exact
            lo, hi = reference_page_summaries(k, req_to_token, int(rpi[b]), int(lens[b]))
            np_ = lo.shape[1]
            pid = req_to_token[int(rpi[b]), ::BLOCK][:np_].long() // BLOCK      # the request's pool pages
            assert torch.equal(kmin[pid].transpose(0, 1).float(), lo)
            assert torch.equal(kmax[pid].transpose(0, 1).float(), hi)
        q = torch.randn(3, hq, d, generator=torch.Generator().manual_seed(step)).to(DEV, dtype)
        if step == 0:
            select_pages(heads, q, kmin, kmax, req_to_token, rpi, lens, max_pages, out=(page_idx, page_cnt))
        out = group_decode(q, k, v, req_to_token, rpi, lens, rules, page_idx, page_cnt, sc, nsplit, 1)
        sets, new_chosen = [], []
        for b in range(3):
            rows, picks = reference_decode_pages(budgets, q[b], k, req_to_token, int(rpi[b]), int(lens[b]),
                                                 None if chosen is None else chosen[b])
            sets.append(rows)
            new_chosen.append(picks)
        chosen = new_chosen
        ref = reference_sparse_decode(q, k, v, req_to_token, rpi, lens, sets)
        assert relative_error(out, ref) < tol(dtype), f"step {step}"
        for b, hk in ((b, hk) for b in range(3) for hk in range(hkv) if rules.gmode[hk] == 2):
            group_heads = range(hk * group, (hk + 1) * group)               # each list-mode KV head's union
            union = sorted(set().union(*(sets[b][h] for h in group_heads)))
            c = int(sc.ucnt[b, hk])
            assert sc.ulist[b, hk, :c].tolist() == union, (step, b, hk)
            bits = [sum(1 << r for r, h in enumerate(group_heads) if p in sets[b][h]) for p in union]
            assert sc.ubits[b, hk, :c].tolist() == bits
        assert not sc.map.any(), "the page-union kernel leaves its byte map zero"
        lens = lens + 1


# ---------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------
def test_bad_inputs_raise_value_error():
    b4 = [HeadBudget.dense()] * 4
    q, k, v, cu_q, kvl, kw = make_batch([100], [100], 4, 2, 64, torch.float32, False, 0)
    with pytest.raises(ValueError, match="3 budgets for 4 query heads"):
        build_block_index(b4[:3], q, k, cu_q, kvl, 100, **kw)
    with pytest.raises(ValueError, match="not a HeadBudget"):
        SparsePrefill(b4[:3] + ["dense"], 2, 64)
    with pytest.raises(ValueError, match="fraction"):
        HeadBudget.topk(1.5)
    with pytest.raises(ValueError, match="head_dim"):
        SparsePrefill(b4, 2, 96)
    with pytest.raises(ValueError, match="multiple"):
        SparsePrefill(b4, 3, 64)
    sp = SparsePrefill(b4, 2, 64).plan(cu_q, kvl, 100, 100, **kw)
    with pytest.raises(ValueError, match="dtype"):
        sp.run(q.double(), k.double(), v.double())
    with pytest.raises(ValueError, match="disagree"):
        sp.run(q, k[:, :, :32].contiguous(), v)
    with pytest.raises(ValueError, match="disagree"):
        sp.run(q[:, :2], k, v)
    with pytest.raises(ValueError, match="disagree"):
        SparsePrefill(b4, 2, 64).plan(cu_q[:1], kvl, 100, 100, **kw)
    m = torch.ones(4, 2, 2, dtype=torch.bool).tril()
    m[1, 1] = False
    with pytest.raises(ValueError, match="empty row|diagonal"):
        block_index_from_masks([m])
    m = torch.ones(4, 2, 2, dtype=torch.bool).tril()
    m[2, 1, :] = False
    with pytest.raises(ValueError, match="empty row"):
        block_index_from_masks([m])
    with pytest.raises(ValueError, match="lower-triangular"):
        block_index_from_masks([torch.ones(4, 2, 2, dtype=torch.bool)])


def test_flashinfer_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "flashinfer", None)   # `import flashinfer` fails, installed or not
    from sglang_shplb.kernels.flashinfer_wrappers import FlashInferSparsePrefill, FlashInferUnavailable
    with pytest.raises(FlashInferUnavailable, match=r"pip install sglang_shplb\[gpu\].*0\.6\.15\.post1"):
        FlashInferSparsePrefill([HeadBudget.dense()] * 2, 1, 64, device="cpu")
    assert issubclass(FlashInferUnavailable, ImportError)


def test_dense_heads_hand_attention_kernels_token_major_operands(monkeypatch):
    """Every operand the dense-head routes of ``SparsePrefill`` pass to an attention kernel (the first chunk's
    SDPA, both pieces after a prefix) is token-major, ``x.transpose(1, 2).is_contiguous()``: the layout in
    which torch's cuDNN attention keys its plans by length bucket under TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1
    instead of building one for every new length. Outputs stay the reference's."""
    import sglang_shplb.kernels.dense_pieces as dp
    seen = []

    def record(name, f):
        def wrapped(q, k, v, *a, **kw):
            seen.append((name, [x.dim() == 4 and x.transpose(1, 2).is_contiguous() for x in (q, k, v)]))
            return f(q, k, v, *a, **kw)
        return wrapped

    monkeypatch.setattr(dp, "causal_sdpa", record("first chunk", dp.causal_sdpa))
    monkeypatch.setattr(dp, "_attention_with_lse", record("piece", dp._attention_with_lse))
    hq, hkv, d = 8, 2, 64
    # the dtype whose pieces have a kernel with a log-sum-exp (float32 on CUDA has none: the rule kernel then
    # reads the prefix in place, and no piece is cut)
    dt = torch.bfloat16 if DEV == "cuda" else torch.float32
    budgets = [HeadBudget.dense()] * 3 + [HeadBudget.streaming(64, 64)] + [HeadBudget.dense()] * 4
    for lens, q_lens in (([200], [200]), ([270], [140])):            # no prefix; a 130-token prefix
        q, k, v, cu_q, kvl, kw = make_batch(lens, q_lens, hq, hkv, d, dt, True, 3)
        sp = SparsePrefill(budgets, hkv, d).plan(cu_q, kvl, max(q_lens), max(lens), q_lens_cpu=q_lens,
                                                 kv_lens_cpu=lens, **kw)
        index = sp.index(q, k)
        ref = reference_sparse_prefill(q, k, v, [index.masks(0, math.ceil(lens[0] / BLOCK))], cu_q, kvl, **kw)
        assert relative_error(sp.run(q, k, v), ref) < tol(dt)
    kinds = {name for name, _ in seen}
    assert kinds == {"first chunk", "piece"} and all(all(ok) for _, ok in seen), seen
