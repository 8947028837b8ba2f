"""Decode page summaries indexed by KV-pool page (issue 15, item 5), under Triton's CPU interpreter.

The summaries of a layer are one row per 64-slot page of SGLang's token pool (``--page-size 64``), read
through ``req_to_token`` (page ``j`` of a request is pool page ``req_to_token[req, 64j] // 64``), instead of
``[request slots, Hkv, pages per request, d]``. Here: for a batch whose pages are scattered in the pool (a
prefix page shared by two requests, as the radix cache shares it, and a CUDA-graph padding row whose stale
``req_to_token`` row points at live pages) the pool-page summaries equal the slot-indexed ones of the
reference path, select the same pages and give the same decode output; their memory follows the pool, not
``--max-running-requests``, and is counted in SGLang's per-token cell size; another page size is refused
with the flag named."""
import argparse
import math
import types

import pytest
import torch

import conftest
from conftest import DEV, LAYER_TOL, budgets_mixed, sequence
from sglang_shplb.core.buckets import Buckets
from sglang_shplb.core.patterns import BLOCK, HeadBudget
from sglang_shplb.kernels.layer_heads import LayerHeads
from sglang_shplb.kernels.paged_layer import (DecodeWorkspace, ExtendBatch, LayerKernels, layer_max_selected,
                                              selected_heads)
from sglang_shplb.kernels.reference import (reference_decode_pages, reference_page_summaries,
                                            reference_sparse_decode, relative_error)
from sglang_shplb.kernels.triton_decode import (alloc_page_summaries, build_page_summaries, select_pages,
                                                update_page_summaries)

HQ, HKV, D = 6, 2, 64
SCALE = 1 / math.sqrt(D)
MAX_CTX, SLOTS, POOL = 1024, 6, 64 * 64


def make_pool(seed=0) -> "conftest.PagedPool":
    return conftest.PagedPool(POOL, SLOTS, MAX_CTX, HKV, D, seed)


def slot_summaries(pool, reqs, lens):
    """The old layout, as the reference path computes it: ``[slots, Hkv, pages, d]`` per request slot."""
    lo = torch.full((SLOTS, HKV, MAX_CTX // BLOCK, D), float("inf"))
    hi = torch.full_like(lo, float("-inf"))
    for r, n in zip(reqs, lens):
        a, b = reference_page_summaries(pool.k, pool.req_to_token, r, n)
        lo[r, :, :a.shape[1]], hi[r, :, :b.shape[1]] = a.cpu(), b.cpu()
    return lo, hi


def by_slot(kmin, pool, r, n):
    """Pool-page summaries seen as request ``r``'s ``[Hkv, pages, d]`` (through req_to_token)."""
    pid = pool.req_to_token[r, :n:BLOCK].long() // BLOCK
    return kmin[pid].transpose(0, 1).cpu().float()


def test_pool_page_summaries_equal_the_slot_indexed_ones_and_decode_the_same():
    budgets = budgets_mixed()
    heads = LayerHeads.of(budgets)
    pool = make_pool()
    lk = LayerKernels(budgets, HKV, D, MAX_CTX, torch.float32, DEV, pool_tokens=POOL)
    # request 3: 300 tokens; request 1: shares its first 2 pages (128-token radix hit) and extends to 260;
    # request 4: 129 tokens. Slot 0 is free but its req_to_token row still names request 3's pages, shifted.
    seqs = {3: sequence(303, HQ, HKV, D, 1), 1: sequence(263, HQ, HKV, D, 2), 4: sequence(132, HQ, HKV, D, 3)}
    seqs[1] = tuple(torch.cat([s3[:128], s1[128:]]) for s3, s1 in zip(seqs[3], seqs[1]))   # the shared prefix
    lens = {3: 300, 1: 260, 4: 129}
    pool.put(3, 0, seqs[3][1][:300], seqs[3][2][:300])
    pool.share(1, 3, 2)
    pool.put(1, 128, seqs[1][1][128:260], seqs[1][2][128:260])
    pool.put(4, 0, seqs[4][1][:129], seqs[4][2][:129])
    pool.req_to_token[0, :192] = pool.req_to_token[3, 64:256]          # stale: slot 0's page 0 = request 3's page 1
    reqs = [3, 1, 4]
    # one extend of the three (request 1 with its cached prefix): builds the summaries of their pool pages
    q_lens = [300, 132, 129]
    batch = ExtendBatch.build(pool.req_to_token, torch.tensor(reqs, device=DEV), q_lens, [lens[r] for r in reqs])
    lk.summarize(pool.k, batch)
    ws = DecodeWorkspace(HQ, HKV, D, MAX_CTX // BLOCK, layer_max_selected(budgets, MAX_CTX), DEV,
                         selected_heads(budgets))
    ws.ensure(4)
    rpi = torch.tensor(reqs + [0], device=DEV)                         # + a CUDA-graph padding row
    for step in range(3):                                               # 300 -> 301..303: no page boundary
        for r in reqs:
            n = lens[r] + step
            pool.put(r, n, seqs[r][1][n:n + 1], seqs[r][2][n:n + 1])
        n_now = [lens[r] + step + 1 for r in reqs]
        seq_lens = torch.tensor(n_now + [1], device=DEV)
        q = torch.stack([seqs[r][0][n - 1] for r, n in zip(reqs, n_now)] + [seqs[3][0][0]]).to(DEV)
        # the torch pair (update + select) on a copy of the summaries, then the fused kernels of the layer
        kmin_t, kmax_t = lk.kmin.clone(), lk.kmax.clone()
        update_page_summaries(pool.k, pool.req_to_token, rpi, seq_lens, kmin_t, kmax_t)
        idx_t, cnt_t = select_pages(heads, q, kmin_t, kmax_t, pool.req_to_token, rpi, seq_lens, lk.max_pages)
        out = torch.full_like(q, float("nan"))
        lk.decode(q, pool.k, pool.v, pool.req_to_token, rpi, seq_lens, ws, SCALE, out)
        assert torch.equal(lk.kmin[:-1], kmin_t[:-1]) and torch.equal(lk.kmax[:-1], kmax_t[:-1])
        # 1. the same summaries as the slot-indexed layout, for every request (the padding row wrote nothing)
        lo, hi = slot_summaries(pool, reqs, n_now)
        for r, n in zip(reqs, n_now):
            npg = math.ceil(n / BLOCK)
            assert torch.equal(by_slot(lk.kmin, pool, r, n), lo[r, :, :npg]), (step, r)
            assert torch.equal(by_slot(lk.kmax, pool, r, n), hi[r, :, :npg]), (step, r)
        # 2. the same pages as the reference's selection from the slot-indexed summaries
        sets = []
        for b, (r, n) in enumerate(zip(reqs, n_now)):
            rows, _ = reference_decode_pages(budgets, q[b], pool.k, pool.req_to_token, r, n)
            sets.append(rows)
            npg = math.ceil(n / BLOCK)
            for h in heads.selected:
                c = int(ws.page_cnt[b, h])
                assert c == int(cnt_t[b, h]) and c > 0
                got = set(ws.page_idx[b, h, :c].tolist()) | {npg - 1}
                assert got == set(rows[h]), (step, r, h)
                assert set(idx_t[b, h, :c].tolist()) | {npg - 1} == set(rows[h])
        # 3. the same decode output as the reference path
        ref = reference_sparse_decode(q[:3], pool.k, pool.v, pool.req_to_token, rpi[:3], seq_lens[:3], sets, SCALE)
        assert relative_error(out[:3], ref) < LAYER_TOL, step
    # the shared prefix pages are one summary for both requests
    assert pool.pages[1][:2] == pool.pages[3][:2]


def test_a_new_page_resets_and_pages_past_the_length_are_not_written():
    """Crossing a page boundary in decode resets the fresh pool page (stale data from an earlier owner), and
    a rebuild for a short request never writes the pages its stale req_to_token entries name."""
    pool = make_pool(seed=3)
    k, v = sequence(130, HQ, HKV, D, 5)[1:]
    pool.put(2, 0, k[:128], v[:128])
    kmin, kmax = alloc_page_summaries(POOL, HKV, D, dtype=torch.float32, device=DEV)
    kmin.fill_(-5.0), kmax.fill_(5.0)                                   # stale everywhere
    pool.req_to_token[2, 128:192] = pool.req_to_token[2, :64]          # stale entries past the length
    build_page_summaries(pool.k, pool.req_to_token, torch.tensor([2], device=DEV), torch.tensor([128], device=DEV),
                         kmin, kmax)
    lo, hi = reference_page_summaries(pool.k, pool.req_to_token, 2, 128)
    assert torch.equal(by_slot(kmin, pool, 2, 128), lo) and torch.equal(by_slot(kmax, pool, 2, 128), hi)
    pool.put(2, 128, k[128:129], v[128:129])                            # position 128: a new page
    fresh = pool.pages[2][2]
    update_page_summaries(pool.k, pool.req_to_token, torch.tensor([2], device=DEV), torch.tensor([129], device=DEV),
                          kmin, kmax)
    assert torch.equal(kmin[fresh], k[128].to(DEV)) and torch.equal(kmax[fresh], k[128].to(DEV))
    untouched = [p for p in range(POOL // BLOCK) if p not in pool.pages[2]]
    assert (kmin[untouched] == -5).all() and (kmax[untouched] == 5).all()


def test_a_batch_builds_its_page_rows_once_for_every_layer():
    """ExtendBatch.summary_rows is built by the first layer and reused: two layers (two K pools) summarised
    through the kept rows equal each layer summarised alone, for a batch of two requests of other lengths."""
    pool = make_pool(seed=4)
    lens = [200, 70]
    for req, n in enumerate(lens):
        k, v = sequence(n, HQ, HKV, D, 10 + req)[1:]
        pool.put(req + 1, 0, k, v)
    other_k = torch.randn_like(pool.k)                                  # the second layer's pool
    rpi = torch.tensor([1, 2], device=DEV)
    batch = ExtendBatch.build(pool.req_to_token, rpi, lens, lens)
    for kb in (pool.k, other_k):
        alone = alloc_page_summaries(POOL, HKV, D, dtype=torch.float32, device=DEV)
        kept = alloc_page_summaries(POOL, HKV, D, dtype=torch.float32, device=DEV)
        build_page_summaries(kb, pool.req_to_token, rpi, batch.seq_lens, *alone)
        build_page_summaries(kb, pool.req_to_token, rpi, batch.seq_lens, *kept,
                             rows=batch.summary_rows(kept[0].shape[0] - 1))
        assert torch.equal(alone[0], kept[0]) and torch.equal(alone[1], kept[1])
        for req, n in enumerate(lens):
            lo, hi = reference_page_summaries(kb, pool.req_to_token, req + 1, n)
            assert torch.equal(by_slot(kept[0], pool, req + 1, n), lo)
            assert torch.equal(by_slot(kept[1], pool, req + 1, n), hi)
    assert len(batch._summary_rows) == 1                                # built once, kept for the second layer


def test_a_chunk_summarizes_the_pages_it_wrote_and_leaves_the_prefix_pages():
    """Chunked prefill: an extend after a prefix rebuilds the pages from the one holding its first new token
    (the prefix's partial last page included) to its last, and leaves the earlier prefix pages as the earlier
    chunk summarized them; a request without a prefix in the same batch is summarized whole. The result equals
    the reference summaries of the whole requests."""
    pool = make_pool(seed=5)
    k, v = sequence(330, HQ, HKV, D, 21)[1:]
    k2, v2 = sequence(150, HQ, HKV, D, 22)[1:]
    kmin, kmax = alloc_page_summaries(POOL, HKV, D, dtype=torch.float32, device=DEV)
    pool.put(1, 0, k[:200], v[:200])                                     # chunk 1 of request 1: 200 tokens
    first = ExtendBatch.build(pool.req_to_token, torch.tensor([1], device=DEV), [200], [200])
    build_page_summaries(pool.k, pool.req_to_token, first.req_pool_indices, first.seq_lens, kmin, kmax,
                         rows=first.summary_rows(kmin.shape[0] - 1))
    done = pool.pages[1][:3]                                             # pages 0-2 (tokens 0-191) are full
    kept = kmin[done].clone(), kmax[done].clone()
    kmin[done], kmax[done] = -7.0, 7.0                                   # a mark: a rebuild would overwrite it
    pool.put(1, 200, k[200:], v[200:])                                   # chunk 2: 130 tokens after 200
    pool.put(2, 0, k2, v2)                                               # and request 2, whole, in one batch
    batch = ExtendBatch.build(pool.req_to_token, torch.tensor([1, 2], device=DEV), [130, 150], [330, 150])
    rows = batch.summary_rows(kmin.shape[0] - 1)
    assert rows.locs.shape == (2, 3 * BLOCK)                             # 3 pages each: 3-5 and 0-2
    build_page_summaries(pool.k, pool.req_to_token, batch.req_pool_indices, batch.seq_lens, kmin, kmax, rows=rows)
    assert (kmin[done] == -7).all() and (kmax[done] == 7).all()         # the prefix's full pages: not rewritten
    kmin[done], kmax[done] = kept                                        # as chunk 1 left them
    for r, n in ((1, 330), (2, 150)):
        lo, hi = reference_page_summaries(pool.k, pool.req_to_token, r, n)
        assert torch.equal(by_slot(kmin, pool, r, n), lo) and torch.equal(by_slot(kmax, pool, r, n), hi)


# ---- memory ----------------------------------------------------------------------------------------------

class _Pool:
    def __init__(self, tokens):
        self.k = torch.zeros(tokens, 3, D, dtype=torch.bfloat16)

    def get_key_buffer(self, li):
        return self.k


def _plan(stock=None, stream=HeadBudget.streaming(64, 1024)):
    from sglang_shplb.core.plan import Plan
    from sglang_shplb.core.model_spec import ModelSpec
    from sglang_shplb.planning.cost_model import CostModel
    from sglang_shplb.planning.place import solve_plan_placements
    spec = ModelSpec.from_config({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                  "num_hidden_layers": 4, "num_attention_heads": 9, "num_key_value_heads": 3,
                                  "hidden_size": 576, "head_dim": 64, "max_position_embeddings": 8192,
                                  "vocab_size": 100})
    top, dense = HeadBudget.topk(0.2, 2), HeadBudget.dense()
    budgets = [[top] * 3 + [dense] * 6, [stream] * 3 + [dense] * 6, [dense] * 6 + [top] * 3, [top] * 9]
    buckets = Buckets((4096, 8192))
    pl = solve_plan_placements(spec, budgets, buckets, [1], CostModel.analytic(), "contiguous")
    return Plan(spec, buckets, budgets, pl, {}, stock)


def _backend_with_kernels(monkeypatch, plan, req_slots, pool_tokens, page_size=64, max_context=8192):
    """The backend's kernel-path setup on the CPU (as on CUDA): what it allocates for ``req_slots`` request
    slots and a pool of ``pool_tokens``."""
    from sglang_shplb.serving import backend as be_mod
    be = object.__new__(be_mod.ShplbAttnBackend)
    be.plan, be.max_context, be.device, be.dense_backend_name = plan, max_context, "cpu", "flashinfer"
    be.cfg = be_mod.ServingConfig.from_env({})
    be.layer_budgets = dict(enumerate(plan.budgets))
    be.kernels, be.decode_ws, be.route_by_bucket = {}, None, None
    be.token_to_kv_pool = _Pool(pool_tokens)
    be.req_to_token_pool = types.SimpleNamespace(req_to_token=torch.zeros(req_slots, 8192, dtype=torch.int32))
    runner = types.SimpleNamespace(
        page_size=page_size, server_args=types.SimpleNamespace(page_size=page_size),
        model_config=types.SimpleNamespace(get_num_kv_heads=lambda tp: 3, head_dim=D))
    be.tp_size = 1
    be._init_stock_layers()
    be._init_kernel_path(runner)
    return be


def test_summary_memory_follows_the_pool_not_the_running_requests(monkeypatch):
    plan = _plan()
    tokens = 64 * 100 + 64
    small = _backend_with_kernels(monkeypatch, plan, 5, tokens)
    large = _backend_with_kernels(monkeypatch, plan, 4097, tokens)
    per_layer = 2 * (tokens // 64 + 1) * 3 * D * 2                      # kmin + kmax, bf16, + the scratch row
    for be in (small, large):
        assert {li for li, lk in be.kernels.items() if lk.kmin is not None} == {0, 2, 3}
        assert sum(lk.summary_bytes for lk in be.kernels.values()) == 3 * per_layer
        assert all(lk.kmin.shape == (tokens // 64 + 1, 3, D) for lk in be.kernels.values() if lk.kmin is not None)
    # kept page selections: per request slot and selected head one bit per page (8K: 128 pages, 4 words)
    for be, slots in ((small, 5), (large, 4097)):
        for lk in be.kernels.values():
            if lk.kmin is not None:
                assert lk.kept.bits.shape == (slots, len(lk.heads.selected), 4) and lk.kept.stamp.shape == (slots, 3)
    # the old layout: 2 x slots x Hkv x pages x d per layer, 4097 slots at 8K context (SmolLM2's default)
    assert 2 * 4097 * 3 * (8192 // 64) * D * 2 > 1000 * per_layer
    # a layer stock in every decode bucket keeps none
    import numpy as np
    stock = np.zeros((2, 2, 4), dtype=bool)
    stock[1, :, 3] = True
    be = _backend_with_kernels(monkeypatch, _plan(stock), 5, tokens)
    assert {li for li, lk in be.kernels.items() if lk.kmin is not None} == {0, 2}


def test_summary_bytes_are_counted_in_the_cell_size(monkeypatch):
    from sglang_shplb.core import plan as plan_mod
    from sglang_shplb.serving import backend as be_mod
    import sglang.srt.runtime_context as rc
    plan = _plan()
    assert be_mod.summary_layers(plan) == frozenset({0, 2, 3})
    assert be_mod.summary_cell_bytes(be_mod.summary_layers(plan), 3, 64, torch.bfloat16) == 3 * 12      # 2 x 3 x 64 x 2 B / 64 per layer
    monkeypatch.setattr(plan_mod, "load_plan", lambda path, *a, **k: plan)
    monkeypatch.setattr(rc, "get_parallel", lambda: types.SimpleNamespace(attn_tp_size=1))
    monkeypatch.setenv("SHPLB_PLAN", "/some/plan")
    mc = types.SimpleNamespace(get_num_kv_heads=lambda tp: 3, head_dim=64, context_len=8192)

    def kvc(device="cuda", backend="shplb"):
        return types.SimpleNamespace(server_args=types.SimpleNamespace(attention_backend=backend, device=device),
                                     model_config=mc, kv_cache_dtype=torch.bfloat16)
    cell = 4 * 3 * 128 * 2                                               # K+V of 4 layers, bf16
    assert be_mod.cell_size_with_summaries(cell, None, kvc(), 4) == cell + 36
    assert be_mod.cell_size_with_summaries(cell, None, kvc(device="cpu"), 4) is None   # reference path
    assert be_mod.cell_size_with_summaries(cell, None, kvc(backend="flashinfer"), 4) is None
    from sglang.srt.plugins.hook_registry import HookRegistry
    assert any(h is be_mod.cell_size_with_summaries for _, h, _ in HookRegistry._hooks[be_mod.CELL_SIZE_TARGET])


def test_streaming_heads_below_the_decode_floor_keep_summaries(monkeypatch):
    """A layer of streaming heads whose windows are below the decode floor selects pages at decode
    (core.patterns.decode_budget): it keeps page summaries, counted in the cell size; prefill keeps the rule."""
    from sglang_shplb.serving import backend as be_mod
    plan = _plan(stream=HeadBudget.streaming(64, 128))
    assert be_mod.summary_layers(plan) == frozenset({0, 1, 2, 3})
    assert be_mod.summary_cell_bytes(be_mod.summary_layers(plan), 3, 64, torch.bfloat16) == 4 * 12
    be = _backend_with_kernels(monkeypatch, plan, 5, 64 * 100 + 64)
    lk = be.kernels[1]
    assert lk.kmin is not None and lk.heads.streaming == (0, 1, 2) and lk.decode_heads.selected == (0, 1, 2)
    assert [b.pattern.value for b in be.layer_decode_budgets[1][:3]] == ["topk"] * 3
    assert lk.kept.bits.shape[1] == 3


# ---- page size -------------------------------------------------------------------------------------------

def test_another_page_size_is_refused_naming_the_flag(monkeypatch):
    from sglang_shplb.serving.backend import ShplbPageSizeError, check_summary_page_size
    from sglang_shplb.serving.backend import page_size_args
    check_summary_page_size(64)
    for ps in (None, 1, 16, 128):
        with pytest.raises(ShplbPageSizeError, match="--page-size 64"):
            check_summary_page_size(ps)
    with pytest.raises(ShplbPageSizeError, match=r"--page-size 64 \(got --page-size 1\)"):
        _backend_with_kernels(monkeypatch, _plan(), 5, 64 * 10, page_size=1)
    plan = _plan()
    ns = lambda **kw: argparse.Namespace(**{"device": "cuda", "page_size": None, **kw})  # noqa: E731
    extra, why = page_size_args(plan, ns(), [])                                    # set when not given
    assert extra == ["--page-size", "64"] and "page summaries" in why
    assert page_size_args(plan, ns(page_size=64), ["--page-size", "64"]) == ([], "")
    with pytest.raises(ShplbPageSizeError, match="--page-size 64"):
        page_size_args(plan, ns(page_size=16), ["--page-size=16"])
    assert page_size_args(plan, ns(device="cpu", page_size=1), ["--page-size", "1"]) == ([], "")  # CPU reference
    assert page_size_args(None, ns(), []) == ([], "")


def test_the_cudnn_route_asks_for_64_slot_pages_without_requiring_them(monkeypatch):
    """A plan with no decode selection but streaming prefill heads (which cuDNN's route may take) gets
    ``--page-size 64`` when no page size is given: with ``SHPLB_CUDNN_BLOCKS=1``, or at ``auto`` (the default) where
    a whole prefill of the server's context pays (9 heads x 32K x 32K = 9.7e9 pairs; 8K: 6.0e8 does not), never with
    ``0``; another page size is kept (the route is then off, and the server's log line says why); a dense-only plan
    asks for nothing."""
    from sglang_shplb.kernels.cudnn_blocks import SWITCH
    from sglang_shplb.serving.backend import cudnn_route_layers, summary_layers
    from sglang_shplb.serving.backend import page_size_args
    ns = lambda **kw: argparse.Namespace(**{"device": "cuda", "page_size": None, **kw})  # noqa: E731
    no_select = _plan()
    no_select.budgets = [[HeadBudget.streaming(64, 1024)] * 9] * 4   # windows at the decode floor: no selection
    assert summary_layers(no_select) == frozenset() and cudnn_route_layers(no_select) == {0, 1, 2, 3}
    assert cudnn_route_layers(no_select, 8192, "auto") == frozenset()
    assert cudnn_route_layers(no_select, 32768, "auto") == {0, 1, 2, 3}
    assert cudnn_route_layers(no_select, 32768, "0") == frozenset()
    monkeypatch.delenv(SWITCH, raising=False)
    assert page_size_args(no_select, ns(), []) == ([], "")                            # auto at the plan's 8K
    extra, why = page_size_args(no_select, ns(context_length=32768), [])
    assert extra == ["--page-size", "64"] and "cuDNN's block-sparse prefill" in why and "summaries" not in why
    assert page_size_args(no_select, ns(page_size=1, context_length=32768), ["--page-size", "1"]) == ([], "")
    monkeypatch.setenv(SWITCH, "1")
    assert page_size_args(no_select, ns(), [])[0] == ["--page-size", "64"]
    monkeypatch.setenv(SWITCH, "0")
    assert page_size_args(no_select, ns(), []) == ([], "")
    monkeypatch.setenv(SWITCH, "2")
    with pytest.raises(ValueError, match=SWITCH):
        page_size_args(no_select, ns(), [])
    monkeypatch.setenv(SWITCH, "1")
    tiled = _plan()
    tiled.budgets = [[HeadBudget.dense()] * 3 + [HeadBudget.topk(0.1, 2, tile=128)] * 6] * 4   # tile kernel's
    assert cudnn_route_layers(tiled) == frozenset()
    dense = _plan()
    dense.budgets = [[HeadBudget.dense()] * 9] * 4
    assert page_size_args(dense, ns(), []) == ([], "")


def test_layers_stock_in_some_decode_buckets_follow_the_bucket_in_graphs(monkeypatch):
    """A kernel-path layer stock for decode in one bucket and sparse in the other gets a route flag, written per
    batch from its bucket (a shared decode CUDA graph then runs it dense where the plan says stock); a layer stock
    in every bucket stays on the stock backend in graphs; the others have no flag."""
    import types

    import numpy as np
    stock = np.zeros((2, 2, 4), dtype=bool)
    stock[1, 0, [0, 2]] = True          # decode, bucket 0: layers 0 and 2 stock
    stock[1, :, 3] = True               # layer 3 stock in every decode bucket
    be = _backend_with_kernels(monkeypatch, _plan(stock), 5, 64 * 40)
    assert be.stock_layers["decode"] == [frozenset({0, 2, 3}), frozenset({3})] and be.graph_decode_stock == {3}
    be._init_decode_routes()
    assert be.kernels[0].route is not None and be.kernels[2].route is not None
    assert be.kernels[1].route is None and be.kernels[3].route is None
    for bucket, want in ((0, [1, 0, 1, 1]), (1, [0, 0, 0, 1])):
        be._set_bucket(types.SimpleNamespace(shplb_bucket=bucket))
        assert be.decode_route.tolist() == want
        assert int(be.kernels[0].route) == want[0] and int(be.kernels[2].route) == want[2]


def test_routed_layers_are_stock_in_some_buckets_not_all():
    from sglang_shplb.serving.backend import routed_layers
    stock_by_bucket = [frozenset({0, 1, 2}), frozenset({0, 1}), frozenset({0})]
    # 0: stock everywhere (captured on the stock backend), 3: sparse everywhere
    assert routed_layers(stock_by_bucket, [0, 1, 2, 3]) == {1, 2}
    assert routed_layers([frozenset({1})] * 3, [0, 1]) == frozenset()       # one route per layer: none routed
    assert routed_layers([], [0, 1]) == frozenset()


def test_buckets_above_the_servers_context_do_not_count(monkeypatch):
    """A plan that decodes sparse only in its last bucket (4K-8K) served at a 4K context: every layer is stock in
    each bucket the server can meet, so decode graphs run the stock backend everywhere, no layer keeps page
    summaries (none counted in the cell size, no --page-size needed) and layers stock in both phases there get no
    kernels; at the plan's full 8K context the same plan keeps them."""
    import numpy as np
    from sglang_shplb.serving import backend as be_mod
    from sglang_shplb.serving.backend import page_size_args
    stock = np.zeros((2, 2, 4), dtype=bool)
    stock[:, 0, :] = True               # bucket 0 (up to 4K): every layer stock in both phases
    stock[0, 1, 2] = True               # bucket 1: layer 2 prefills stock
    plan = _plan(stock)
    assert list(plan.reachable_buckets(4096)) == [0] and list(plan.reachable_buckets(4097)) == [0, 1]
    assert list(plan.reachable_buckets(None)) == [0, 1]
    assert be_mod.summary_layers(plan, 4096) == frozenset() and be_mod.summary_layers(plan, 8192) == {0, 2, 3}
    assert be_mod.summary_cell_bytes(be_mod.summary_layers(plan, 4096), 3, 64, torch.bfloat16) == 0
    full = _backend_with_kernels(monkeypatch, plan, 5, 64 * 40)
    assert full.graph_decode_stock == frozenset() and set(full.kernels) == {0, 1, 2, 3}
    short = _backend_with_kernels(monkeypatch, plan, 5, 64 * 40, page_size=1, max_context=4096)   # no page check
    assert short.graph_decode_stock == {0, 1, 2, 3} and short.summarized_layers == frozenset()
    assert short.kernels == {} and short.decode_ws is None
    assert short.stock_everywhere["prefill"] == {0, 1, 2, 3}
    ns = types.SimpleNamespace
    monkeypatch.setenv("SHPLB_CUDNN_BLOCKS", "0")    # the summaries alone
    assert page_size_args(plan, ns(device="cuda", page_size=None, context_length=4096), []) == ([], "")
    assert page_size_args(plan, ns(device="cuda", page_size=None, context_length=None), [])[0] == ["--page-size", "64"]


def test_sglang_own_launcher_gets_the_page_size_our_launcher_asks_for(monkeypatch, tmp_path):
    """The plugin hooks SGLang's page-size default: a ``shplb`` server started by ``sglang.launch_server`` with
    ``SHPLB_PLAN`` set and no ``--page-size`` gets 64 on CUDA where :func:`page_size_args` would add it; SGLang's
    default stands on CPU, for another backend, for a page size given, for a plan that asks for none."""
    from types import SimpleNamespace

    from sglang.srt.plugins import load_plugins
    from sglang.srt.plugins.hook_registry import HookRegistry

    from sglang_shplb.core.plan import save_plan
    from sglang_shplb.kernels.cudnn_blocks import SWITCH
    from sglang_shplb.serving.config import ENV_PLAN
    from sglang_shplb.serving.plugin import register
    load_plugins()
    register()
    HookRegistry.apply_hooks()
    import sglang.srt.arg_groups.overrides as overrides
    base = {"page_size": None, "attention_backend": "shplb", "device": "cuda", "context_length": None}
    view = lambda **kw: SimpleNamespace(**{**base, **kw})  # noqa: E731
    sel = _plan()                                        # decodes top-k heads: page summaries
    monkeypatch.setenv(ENV_PLAN, str(save_plan(sel, tmp_path / "sel")))
    assert overrides._page_size_default(view()) == {"page_size": 64}
    assert overrides._page_size_default(view(device="cpu")) == {"page_size": 1}
    assert overrides._page_size_default(view(attention_backend="flashinfer")) == {"page_size": 1}
    assert overrides._page_size_default(view(page_size=16)) == {}
    dense = _plan()
    dense.budgets = [[HeadBudget.dense()] * 9] * 4
    monkeypatch.setenv(ENV_PLAN, str(save_plan(dense, tmp_path / "dense")))
    assert overrides._page_size_default(view()) == {"page_size": 1}
    no_select = _plan()                                  # streaming heads only: the cuDNN route's pages
    no_select.budgets = [[HeadBudget.streaming(64, 1024)] * 9] * 4
    monkeypatch.setenv(ENV_PLAN, str(save_plan(no_select, tmp_path / "stream")))
    monkeypatch.setenv(SWITCH, "1")
    assert overrides._page_size_default(view()) == {"page_size": 64}
    monkeypatch.setenv(SWITCH, "0")
    assert overrides._page_size_default(view()) == {"page_size": 1}
    monkeypatch.delenv(ENV_PLAN)
    assert overrides._page_size_default(view()) == {"page_size": 1}
