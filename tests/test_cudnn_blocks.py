"""The cuDNN block-sparse route's own parts on the CPU: the diagonal-merge kernel (Triton interpreter) against its
torch reference, and the whole route (:func:`block_sparse_heads`, cuDNN's call replaced by its torch stand-in)
against the masked dense reference of the same block index, full prefills and chunks after a prefix."""
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import DEV, PagedPool, tol

from sglang_shplb.core.patterns import BLOCK, HeadBudget, Pattern
from sglang_shplb.kernels import build_block_index
from sglang_shplb.kernels.cudnn_blocks import (block_sparse_heads, cudnn_blocks_unavailable,
                                               listed_blocks_reference)
from sglang_shplb.kernels.reference import masked_attention, relative_error
from sglang_shplb.kernels.triton_diagonal import diagonal_merge, diagonal_merge_reference

BUDGETS = [HeadBudget.topk(0.3, 2), HeadBudget.streaming(64, 128), HeadBudget.dense(), HeadBudget.topk(0.5, 1),
           HeadBudget.vslash(0.3, 2), HeadBudget.streaming(0, 64)]


def _qkv(n_q: int, n_kv: int, hq: int, hkv: int, d: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n_q, hq, d, generator=g).to(DEV), torch.randn(n_kv, hkv, d, generator=g).to(DEV),
            torch.randn(n_kv, hkv, d, generator=g).to(DEV))


@pytest.mark.parametrize("n_q,n_kv", [(256, 256), (128, 320), (100, 292)])
def test_diagonal_merge_equals_reference(n_q, n_kv):
    q, k, v = _qkv(n_q, n_kv, 4, 2, 64, 1)
    g = torch.Generator().manual_seed(2)
    o_p = torch.randn(1, n_q, 4, 64, generator=g).to(DEV)
    lse_p = torch.randn(1, 4, n_q, generator=g).to(DEV) * 3
    lse_p[0, 1, :70] = float("-inf")                     # rows that listed nothing but the diagonal
    heads = torch.tensor([0, 1, 3], dtype=torch.int32, device=DEV)
    out = torch.full_like(q, 7.0)
    ref = torch.full_like(q, 7.0)
    diagonal_merge(q, k, v, o_p, lse_p, heads, out, 0.125)
    diagonal_merge_reference(q, k, v, o_p, lse_p, heads, ref, 0.125)
    assert relative_error(out, ref) < tol(torch.float32)
    assert bool((out[:, 2] == 7.0).all())                # a head not asked for is left alone
    assert bool(torch.isfinite(out).all())


def test_diagonal_merge_refuses_an_unaligned_prefix():
    q, k, v = _qkv(64, 100, 2, 1, 64, 3)
    with pytest.raises(ValueError, match="multiple of 64"):
        diagonal_merge(q, k, v, torch.zeros(1, 64, 2, 64), torch.zeros(1, 2, 64), torch.tensor([0], dtype=torch.int32),
                       torch.empty_like(q), 0.125)


@pytest.mark.parametrize("n_q,n_kv", [(384, 384), (192, 448), (130, 386)])
def test_block_sparse_heads_equals_masked_reference(n_q, n_kv):
    """Every sparse head of a mixed layer (top-k, streaming with and without sinks, vertical-slash) through the
    route equals the masked dense reference of the index the route read; the dense head stays untouched."""
    hq, hkv, d = len(BUDGETS), 3, 64
    q, k, v = _qkv(n_q, n_kv, hq, hkv, d, 4)
    cu = torch.tensor([0, n_q], dtype=torch.int32, device=DEV)
    kvl = torch.tensor([n_kv], dtype=torch.int32, device=DEV)
    index = build_block_index(BUDGETS, q, k, cu, kvl, n_kv, cu_seqlens_k=torch.tensor([0, n_kv], device=DEV))
    sparse = [h for h, b in enumerate(BUDGETS) if b.pattern is not Pattern.DENSE]
    heads = torch.tensor(sparse, dtype=torch.int32, device=DEV)
    out = torch.full_like(q, float("nan"))
    block_sparse_heads(q, k, v, index.block_idx[0], index.block_cnt[0], heads, out, d ** -0.5,
                       listed=listed_blocks_reference)
    ref = masked_attention(q, k, v, index.masks(0, math.ceil(n_kv / BLOCK)))
    assert relative_error(out[:, sparse], ref[:, sparse]) < tol(torch.float32)
    assert bool(out[:, [h for h in range(hq) if h not in sparse]].isnan().all())


@pytest.mark.parametrize("n_q,n_kv", [(256, 256), (130, 386)])
def test_block_sparse_heads_reads_a_paged_pool_in_place(n_q, n_kv):
    """The sequence's K/V in SGLang's pool of 64-slot pages handed out in shuffled order (``--page-size 64``):
    read in place through its ``req_to_token`` row, the route gives what it gives on the contiguous rows."""
    hq, hkv, d = len(BUDGETS), 3, 64
    q, k, v = _qkv(n_q, n_kv, hq, hkv, d, 5)
    pool = PagedPool(2048, 3, 512, hkv, d, seed=6)
    pool.put(2, 0, k, v)
    cu = torch.tensor([0, n_q], dtype=torch.int32, device=DEV)
    kvl = torch.tensor([n_kv], dtype=torch.int32, device=DEV)
    index = build_block_index(BUDGETS, q, k, cu, kvl, n_kv, cu_seqlens_k=torch.tensor([0, n_kv], device=DEV))
    heads = torch.tensor([h for h, b in enumerate(BUDGETS) if b.pattern is not Pattern.DENSE], dtype=torch.int32,
                         device=DEV)
    paged, flat = torch.zeros_like(q), torch.zeros_like(q)
    block_sparse_heads(q, pool.k, pool.v, index.block_idx[0], index.block_cnt[0], heads, paged, d ** -0.5,
                       listed=listed_blocks_reference, kv_rows=pool.req_to_token[2], n_kv=n_kv)
    block_sparse_heads(q, k, v, index.block_idx[0], index.block_cnt[0], heads, flat, d ** -0.5,
                       listed=listed_blocks_reference)
    assert relative_error(paged, flat) < 1e-6 and float(flat.abs().sum()) > 0


@pytest.mark.parametrize("n_q,n_kv,paged", [(384, 384, False), (130, 386, False), (320, 448, True)])
def test_a_long_chunk_runs_as_pieces_of_at_most_max_rows(n_q, n_kv, paged):
    """``max_rows`` bounds the query rows of every cuDNN call (its partial output is rows x every q head): a chunk
    longer than that runs as pieces, each the end of a shorter sequence, and gives what one call gives."""
    hq, hkv, d = len(BUDGETS), 3, 64
    q, k, v = _qkv(n_q, n_kv, hq, hkv, d, 10)
    cu = torch.tensor([0, n_q], dtype=torch.int32, device=DEV)
    kvl = torch.tensor([n_kv], dtype=torch.int32, device=DEV)
    index = build_block_index(BUDGETS, q, k, cu, kvl, n_kv, cu_seqlens_k=torch.tensor([0, n_kv], device=DEV))
    heads = torch.tensor([h for h, b in enumerate(BUDGETS) if b.pattern is not Pattern.DENSE], dtype=torch.int32,
                         device=DEV)
    kv = dict(kv_rows=None)
    kb, vb = k, v
    if paged:
        pool = PagedPool(2048, 3, 512, hkv, d, seed=11)
        pool.put(1, 0, k, v)
        kb, vb, kv = pool.k, pool.v, dict(kv_rows=pool.req_to_token[1], n_kv=n_kv)
    rows = []

    def listed(q4, *rest):
        rows.append(q4.shape[1])
        return listed_blocks_reference(q4, *rest)

    whole, cut = torch.zeros_like(q), torch.zeros_like(q)
    block_sparse_heads(q, kb, vb, index.block_idx[0], index.block_cnt[0], heads, whole, d ** -0.5, listed=listed,
                       **kv)
    assert rows == [math.ceil(n_q / BLOCK) * BLOCK]
    rows.clear()
    block_sparse_heads(q, kb, vb, index.block_idx[0], index.block_cnt[0], heads, cut, d ** -0.5, listed=listed,
                       max_rows=128, **kv)
    assert len(rows) == math.ceil(n_q / 128) and max(rows) <= 128
    assert relative_error(cut, whole) < 1e-6 and float(whole.abs().sum()) > 0
    with pytest.raises(ValueError, match="multiple of 64"):
        block_sparse_heads(q, kb, vb, index.block_idx[0], index.block_cnt[0], heads, cut, d ** -0.5,
                           listed=listed, max_rows=100, **kv)


def test_diagonal_merge_paged_equals_reference():
    q, k, v = _qkv(128, 320, 4, 2, 64, 7)
    pool = PagedPool(1024, 2, 512, 2, 64, seed=8)
    pool.put(1, 0, k, v)
    g = torch.Generator().manual_seed(9)
    o_p, lse_p = torch.randn(1, 128, 4, 64, generator=g).to(DEV), torch.randn(1, 4, 128, generator=g).to(DEV)
    heads = torch.tensor([1, 2], dtype=torch.int32, device=DEV)
    out, ref = torch.zeros_like(q), torch.zeros_like(q)
    diagonal_merge(q, pool.k, pool.v, o_p, lse_p, heads, out, 0.125, kv_rows=pool.req_to_token[1], n_kv=320)
    diagonal_merge_reference(q, k, v, o_p, lse_p, heads, ref, 0.125)
    assert relative_error(out, ref) < tol(torch.float32)


def test_cudnn_unavailable_on_the_cpu_says_why():
    assert cudnn_blocks_unavailable(torch.zeros(1, 1, 64)) == "not on CUDA"


def test_sparse_prefill_takes_the_route_where_it_pays_or_when_switched(cudnn_stand_in, monkeypatch):
    """``SHPLB_CUDNN_BLOCKS`` unset (``auto``): no route call while the call's head x row x key pairs stay under
    ``ROUTE_MIN_PAIRS``, one from it; ``1``: a call whatever the size; ``0``: none; anything else refused."""
    import sglang_shplb.kernels.cudnn_blocks as cb
    from sglang_shplb.kernels import SparsePrefill

    monkeypatch.delenv("SHPLB_CUDNN_BLOCKS")
    q, k, v = _qkv(128, 128, len(MIXED), 3, 64, 13)
    cu = torch.tensor([0, 128], dtype=torch.int32, device=DEV)

    def run():
        sp = SparsePrefill(MIXED, 3, 64).plan(cu, cu[1:], 128, 128, q_lens_cpu=[128], kv_lens_cpu=[128],
                                              cu_seqlens_k=cu)
        return sp, sp.run(q, k, v)

    sp, _ = run()
    assert cudnn_stand_in == []
    pairs = len(sp._cudnn_candidates) * 128 * 128
    monkeypatch.setattr(cb, "ROUTE_MIN_PAIRS", pairs + 1)
    run()
    assert cudnn_stand_in == []
    monkeypatch.setattr(cb, "ROUTE_MIN_PAIRS", pairs)
    run()
    assert cudnn_stand_in == [128]
    monkeypatch.setattr(cb, "ROUTE_MIN_PAIRS", 1e10)
    monkeypatch.setenv("SHPLB_CUDNN_BLOCKS", "1")
    run()
    assert cudnn_stand_in == [128, 128]
    monkeypatch.setenv("SHPLB_CUDNN_BLOCKS", "0")
    monkeypatch.setattr(cb, "ROUTE_MIN_PAIRS", 0)
    run()
    assert cudnn_stand_in == [128, 128]
    monkeypatch.setenv("SHPLB_CUDNN_BLOCKS", "on")
    with pytest.raises(ValueError, match="SHPLB_CUDNN_BLOCKS='on'"):
        run()


def test_route_pays_from_the_measured_work_per_call():
    """The mean work per call (sequences without queries make no call) against ROUTE_MIN_PAIRS, which sits between
    the measured loser and winners (H100, 2026-12-07)."""
    from sglang_shplb.kernels.cudnn_blocks import ROUTE_MIN_PAIRS, route_pays

    n = 8192
    assert 28 * n * 16384 < ROUTE_MIN_PAIRS <= 28 * n * 32768
    assert route_pays(28, [n], [32768])
    assert route_pays(28, [2 * n], [2 * n])
    assert not route_pays(28, [n], [2 * n])
    assert not route_pays(28, [64], [131072])           # a short extend over a long prefix
    assert route_pays(28, [n, 0], [32768, 100])         # the empty sequence makes no call
    assert not route_pays(28, [n, 64], [32768, 32768])  # two calls, the second small: the mean is under
    assert not route_pays(28, [0], [131072])


def test_bench_smoke_route_equals_the_triton_kernels(tmp_path, monkeypatch):
    """bench/cudnn_blocks.py on the CPU (cuDNN's call on its stand-in): its checks pass; per budget, the route
    gives the package's own kernels' output on the same index; the mixed layer through SparsePrefill takes the
    route only when switched on, with the same output."""
    import sglang_shplb.kernels.api as api
    import sglang_shplb.kernels.cudnn_blocks as cb
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import cudnn_blocks

    # the smoke run points the route at the stand-in; put it back afterwards
    monkeypatch.setattr(api, "cudnn_blocks_unavailable", api.cudnn_blocks_unavailable)
    monkeypatch.setattr(cb, "cudnn_listed_blocks", cb.cudnn_listed_blocks)
    cudnn_blocks.main(["--cpu-smoke", "--out", str(tmp_path)])
    doc = json.loads((tmp_path / "cudnn_blocks_smoke.json").read_text())
    assert len(doc["checks"]) == 3 and max(c["rel_err"] for c in doc["checks"]) < 1e-5
    configs = doc["prefill"][0]["configs"]
    assert {c["name"] for c in configs} == set(cudnn_blocks.BUDGETS)
    for c in configs:
        assert c["variants"]["cudnn_route"]["max_abs_diff_vs_ours"] < 1e-4
        assert c["variants"]["cudnn_route_paged"]["max_abs_diff_vs_ours"] < 1e-4
        assert c["variants"]["ours"]["ms"] > 0 and c["route_speedup_vs_ours"] > 0
    cases = doc["layer"][0]["cases"]
    assert len(cases) == 2
    for e in cases.values():
        assert e["routed_heads_0"] == 0 and e["routed_heads_1"] == 3 and e["max_abs_diff"] < 1e-4


@pytest.fixture
def cudnn_stand_in(monkeypatch):
    """cuDNN's route "available" on this device, its call on the torch stand-in; yields the calls made."""
    import sglang_shplb.kernels.api as api
    import sglang_shplb.kernels.cudnn_blocks as cb
    calls = []

    def listed(*a):
        calls.append(a[0].shape[1])
        return listed_blocks_reference(*a)
    monkeypatch.setattr(api, "cudnn_blocks_unavailable", lambda q: None)
    monkeypatch.setenv("SHPLB_CUDNN_BLOCKS", "1")
    monkeypatch.setattr(cb, "cudnn_listed_blocks", listed)
    return calls


MIXED = [HeadBudget.dense(), HeadBudget.topk(0.3, 2), HeadBudget.streaming(64, 128), HeadBudget.vslash(0.3, 2),
         HeadBudget.topk(0.3, 2, tile=128), HeadBudget.streaming(0, 64)]


@pytest.mark.parametrize("paged", [False, True])
def test_sparse_prefill_routes_listed_heads_to_cudnn(cudnn_stand_in, paged):
    """SparsePrefill with cuDNN's route on (its call on the stand-in): a two-sequence batch, one a chunk after an
    aligned prefix, contiguous or in a pool of 64-slot pages: one route call per sequence, and every head equals
    the masked reference of the run's index (the dense head on SDPA, the tile-128 head on the tile kernel)."""
    from sglang_shplb.kernels import SparsePrefill
    from sglang_shplb.kernels.reference import reference_sparse_prefill

    hq, hkv, d = len(MIXED), 3, 64
    lens, q_lens = [320, 200], [128, 200]
    g = torch.Generator().manual_seed(10)
    q = torch.randn(sum(q_lens), hq, d, generator=g).to(DEV)
    ks = [torch.randn(n, hkv, d, generator=g).to(DEV) for n in lens]
    vs = [torch.randn(n, hkv, d, generator=g).to(DEV) for n in lens]
    cu = torch.tensor([0, q_lens[0], sum(q_lens)], dtype=torch.int32, device=DEV)
    kvl = torch.tensor(lens, dtype=torch.int32, device=DEV)
    if paged:
        pool = PagedPool(2048, 3, 512, hkv, d, seed=11)
        for r, (kk, vv) in enumerate(zip(ks, vs)):
            pool.put(r, 0, kk, vv)
        k, v = pool.k, pool.v
        kw = dict(req_to_token=pool.req_to_token, req_pool_indices=torch.tensor([0, 1], dtype=torch.int32,
                                                                               device=DEV))
    else:
        k, v = torch.cat(ks), torch.cat(vs)
        kw = dict(cu_seqlens_k=torch.tensor([0, lens[0], sum(lens)], dtype=torch.int32, device=DEV))
    sp = SparsePrefill(MIXED, hkv, d).plan(cu, kvl, max(q_lens), max(lens), q_lens_cpu=q_lens, kv_lens_cpu=lens,
                                           kv_page_size=64 if paged else 1, **kw)
    out = sp.run(q, k, v)
    assert cudnn_stand_in == [128, 256]       # one call per sequence, whole 64-row query blocks
    masks = [sp.last_index.masks(b, math.ceil(n / BLOCK)).to(DEV) for b, n in enumerate(lens)]
    ref = reference_sparse_prefill(q, k, v, masks, cu, kvl, **kw)
    assert relative_error(out, ref) < tol(torch.float32)


def test_sparse_prefill_keeps_triton_where_cudnn_cannot_take_the_batch(cudnn_stand_in):
    """A prefix that is not a multiple of 64, or a pool of 1-slot pages: no route call, the same output."""
    from sglang_shplb.kernels import SparsePrefill

    hq, hkv, d = len(MIXED), 3, 64
    q, k, v = _qkv(100, 300, hq, hkv, d, 12)
    cu = torch.tensor([0, 100], dtype=torch.int32, device=DEV)
    kvl = torch.tensor([300], dtype=torch.int32, device=DEV)
    kw = dict(cu_seqlens_k=torch.tensor([0, 300], dtype=torch.int32, device=DEV))
    out = SparsePrefill(MIXED, hkv, d).plan(cu, kvl, 100, 300, q_lens_cpu=[100], kv_lens_cpu=[300], **kw).run(q, k, v)
    assert cudnn_stand_in == [] and bool(torch.isfinite(out).all())
    r2t = torch.arange(300, dtype=torch.int32, device=DEV)[None]
    SparsePrefill(MIXED, hkv, d).plan(cu, kvl, 100, 300, q_lens_cpu=[100], kv_lens_cpu=[300], req_to_token=r2t,
                                      req_pool_indices=torch.zeros(1, dtype=torch.int32, device=DEV)).run(q, k, v)
    assert cudnn_stand_in == []


def test_head_parallel_home_heads_take_the_route_from_a_64_slot_pool(cudnn_stand_in):
    """The head-parallel executor's sparse heads read from SGLang's pool (``KVRows`` with the pool's page size):
    with 64-slot pages the route reads them in place and equals the reference; with 1-slot pages it is not
    taken."""
    from sglang_shplb.kernels.head_parallel import KVRows, _sparse_kernels
    from sglang_shplb.kernels.layer_reference import sparse_attention

    hq, hkv, d = len(MIXED), 3, 64
    n_q, n_kv = 128, 320
    q, k, v = _qkv(n_q, n_kv, hq, hkv, d, 14)
    pool = PagedPool(2048, 2, 512, hkv, d, seed=15)
    pool.put(1, 0, k, v)
    rpi = torch.tensor([1], dtype=torch.int32, device=DEV)
    heads = [1, 2, 3, 5]
    out = torch.zeros_like(q)
    _sparse_kernels(q, pool.k, pool.v, KVRows(pool.req_to_token, rpi, page_size=64), [n_q], [n_kv], MIXED, heads,
                    d ** -0.5, out)
    assert cudnn_stand_in == [n_q]
    ref = torch.zeros_like(q)
    only = [b if h in heads else HeadBudget.dense() for h, b in enumerate(MIXED)]
    sparse_attention(q, pool.k, pool.v, pool.req_to_token, rpi, torch.tensor([n_kv], device=DEV),
                     torch.tensor([n_q], device=DEV), only, d ** -0.5, ref, max_kv_len=n_kv)
    assert relative_error(out[:, heads], ref[:, heads]) < tol(torch.float32)
    _sparse_kernels(q, pool.k, pool.v, KVRows(pool.req_to_token, rpi), [n_q], [n_kv], MIXED, heads, d ** -0.5, out)
    assert cudnn_stand_in == [n_q]


def test_route_status_names_the_mode_and_why_not(monkeypatch):
    """The server's log line: off with the switch at 0, the reason where cuDNN cannot run (here: not on CUDA, or a
    KV pool whose pages are not 64 slots), the rule where it can; a bad switch value is refused."""
    import sglang_shplb.kernels.cudnn_blocks as cb

    kv = torch.zeros(4, 2, 128, dtype=torch.bfloat16)
    monkeypatch.setenv("SHPLB_CUDNN_BLOCKS", "0")
    assert cb.route_status(kv, 128) == "off (SHPLB_CUDNN_BLOCKS=0)"
    monkeypatch.delenv("SHPLB_CUDNN_BLOCKS", raising=False)
    assert cb.route_status(kv, 128) == "unavailable: not on CUDA"
    monkeypatch.setattr(cb, "cudnn_blocks_unavailable", lambda q: None if q.shape[-1] == 128 else "head dim")
    assert cb.route_status(kv, 128) == "auto: calls of >= 5e+09 head x row x key pairs"
    assert cb.route_status(kv, 96) == "unavailable: head dim"
    assert cb.route_status(kv, 128, page_size=1).startswith("unavailable: the KV pool's pages hold 1 slot(s)")
    assert "--page-size 64" in cb.route_status(kv, 128, page_size=16)
    monkeypatch.setenv("SHPLB_CUDNN_BLOCKS", "1")
    assert "wherever it can run" in cb.route_status(kv, 128)
    monkeypatch.setenv("SHPLB_CUDNN_BLOCKS", "yes")
    with pytest.raises(ValueError, match="expected one of auto, 1, 0"):
        cb.route_status(kv, 128)


def test_the_server_warm_up_reaches_the_route_where_serving_would():
    """The route's kernel compiles on its first call (1.2-3.4 s on an H100): a server whose requests can take it
    (the serving benchmark's layer: 28 routed heads, 8K chunks, 131,200 tokens) has a warm-up shape that takes it,
    and an 8K-context server (SmolLM2: 9 heads, none routed by a request) has none."""
    from sglang_shplb.kernels.cudnn_blocks import route_pays
    from sglang_shplb.kernels.warmup import extend_warmup

    shapes, _ = extend_warmup(8192, 131200)
    assert any(route_pays(28, [m], [p + m]) for m, p in shapes)
    small, _ = extend_warmup(8192, 8192)
    assert not any(route_pays(9, [m], [p + m]) for m, p in small)
    assert not any(route_pays(9, [m], [L]) for m in range(64, 8193, 64) for L in (m, 8192))
