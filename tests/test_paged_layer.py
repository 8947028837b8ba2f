"""The backend's GPU path (:mod:`sglang_shplb.kernels.paged_layer`: every head of a layer on the kernels,
over SGLang's paged pool) against the dense single-device reference, under Triton's CPU interpreter.
Extend without and with cached prefixes, page summaries built by extend and kept up by decode, decode
steps for dense / streaming / top-k / vertical-slash heads, the shared decode workspace."""
import math

import pytest
import torch

import conftest
from conftest import DEV, LAYER_TOL, budgets_mixed, budgets_positional, mask_reference, sequence
from sglang_shplb.core import patterns
from sglang_shplb.core.patterns import BLOCK, HeadBudget, decode_budgets
from sglang_shplb.kernels.layer_heads import LayerHeads
from sglang_shplb.kernels.layer_reference import sparse_attention
from sglang_shplb.kernels.paged_layer import (DecodeWorkspace, ExtendBatch, LayerKernels, layer_max_selected,
                                              selected_heads)
from sglang_shplb.kernels.reference import (reference_decode_pages, reference_page_summaries,
                                            reference_sparse_decode, relative_error)

HQ, HKV, D = 6, 2, 64
SCALE = 1 / math.sqrt(D)
MAX_CTX, SLOTS, POOL = 1024, 4, 4096


def make_pool(seed=0) -> "conftest.PagedPool":
    return conftest.PagedPool(POOL, SLOTS, MAX_CTX, HKV, D, seed)


def seq(n, seed):
    return tuple(x.to(DEV) for x in sequence(n, HQ, HKV, D, seed))


def reference(budgets, q, k, v):
    return mask_reference(budgets, q, k, v, SCALE)


def layer(budgets, pool_page_size=1):
    return LayerKernels(budgets, HKV, D, MAX_CTX, torch.float32, DEV, pool_tokens=POOL, pool_page_size=pool_page_size)


def extend(lk, pool, reqs, qs, ks, vs, prefix_lens):
    """Write the new tokens to the pool (as the backend does), then run the layer's extend."""
    for r, p, k, v in zip(reqs, prefix_lens, ks, vs):
        pool.put(r, p, k, v)
    q_lens = [q.shape[0] for q in qs]
    batch = ExtendBatch.build(pool.req_to_token, torch.tensor(reqs, device=DEV), q_lens, [p + n for p, n in zip(prefix_lens, q_lens)])
    q = torch.cat(qs)
    out = torch.full_like(q, float("nan"))
    lk.extend(q, torch.cat(ks), torch.cat(vs), pool.k, pool.v, batch, SCALE, out)
    return out


@pytest.mark.parametrize("budgets", [budgets_mixed(), budgets_positional()], ids=["mixed", "positional"])
def test_extend_batch_without_prefix_all_heads(budgets):
    pool, lk = make_pool(), layer(budgets)
    lens = [200, 130, 64]
    seqs = [seq(n, 1 + r) for r, n in enumerate(lens)]
    out = extend(lk, pool, [2, 0, 1], [s[0] for s in seqs], [s[1] for s in seqs], [s[2] for s in seqs], [0, 0, 0])
    ref = torch.cat([reference(budgets, *s) for s in seqs])
    assert torch.isfinite(out).all(), "every head, dense ones included, is written by the kernel path"
    assert relative_error(out, ref) < LAYER_TOL
    if budgets == budgets_mixed():   # the sparse heads really are sparse at this length
        dense = torch.cat([reference([HeadBudget.dense()] * HQ, *s) for s in seqs])
        assert relative_error(out[:, [1, 2, 3]], dense[:, [1, 2, 3]]) > 1e-2


@pytest.mark.parametrize("prefix", [448, 448 + 17, 1])
def test_extend_with_cached_prefix_positional(prefix):
    """A radix hit / a later chunk: the rows equal the full-sequence reference's rows."""
    budgets = budgets_positional()
    n = 700
    q, k, v = seq(n, 9)
    pool, lk = make_pool(seed=prefix), layer(budgets)
    pool.put(0, 0, k[:prefix], v[:prefix])
    out = extend(lk, pool, [0], [q[prefix:]], [k[prefix:]], [v[prefix:]], [prefix])
    assert relative_error(out, reference(budgets, q, k, v)[prefix:]) < LAYER_TOL


def test_extend_with_prefix_mixed_matches_reference_path():
    """Top-k / vertical-slash with a prefix: the kernels equal the backend's CPU reference path (same index
    rule), and the dense heads equal dense attention."""
    budgets = budgets_mixed()
    n, prefix = 600, 256
    q, k, v = seq(n, 4)
    pool, lk = make_pool(), layer(budgets)
    pool.put(1, 0, k[:prefix], v[:prefix])
    out = extend(lk, pool, [1], [q[prefix:]], [k[prefix:]], [v[prefix:]], [prefix])
    ref = torch.full_like(out, float("nan"))
    sparse_attention(q[prefix:], pool.k, pool.v, pool.req_to_token, torch.tensor([1], device=DEV),
                     torch.tensor([n], device=DEV), torch.tensor([n - prefix], device=DEV), budgets, SCALE, ref,
                     use_kernel=False)
    cols = [1, 2, 3, 4]
    assert relative_error(out[:, cols], ref[:, cols]) < LAYER_TOL
    dense = reference([HeadBudget.dense()] * HQ, q, k, v)[prefix:]
    assert relative_error(out[:, [0, 5]], dense[:, [0, 5]]) < LAYER_TOL


def decode_step(lk, pool, reqs, full, lens, step, ws):
    """Decode step ``step`` of the requests ``reqs`` (their tokens ``full``, prompts of ``lens``): the runner writes
    the new token's slot + K/V, then the layer decodes; checks that the page summaries follow the tokens.
    Returns ``(seq_lens, q, out)``."""
    for i, (f, n) in enumerate(zip(full, lens)):
        pool.put(reqs[i], n + step, f[1][n + step:n + step + 1], f[2][n + step:n + step + 1])
    seq_lens = torch.tensor([n + step + 1 for n in lens], device=DEV)
    q = torch.stack([f[0][n + step] for f, n in zip(full, lens)])
    out = torch.full_like(q, float("nan"))
    lk.decode(q, pool.k, pool.v, pool.req_to_token, torch.tensor(reqs, device=DEV), seq_lens, ws, SCALE, out)
    for b, r in enumerate(reqs):
        n = int(seq_lens[b])
        lo, hi = reference_page_summaries(pool.k, pool.req_to_token, r, n)
        pid = pool.req_to_token[r, :n:BLOCK].long() // BLOCK       # the request's pool pages
        assert torch.equal(lk.kmin[pid].transpose(0, 1), lo), "summaries follow the appended tokens"
        assert torch.equal(lk.kmax[pid].transpose(0, 1), hi)
    return seq_lens, q, out


@pytest.mark.parametrize("pool_page", [1, BLOCK], ids=["per_token", "pool_pages"])
def test_decode_steps_keep_summaries_and_match_reference(pool_page):
    """Decode steps over the page-64 pool, its slots read per token or one per page (``pool_page_size``)."""
    budgets = budgets_mixed()
    pool, lk = make_pool(), layer(budgets, pool_page)
    lens = [300, 64, 129]
    reqs = [3, 0, 2]
    full = [seq(n + 3, 20 + r) for r, n in enumerate(lens)]
    extend(lk, pool, reqs, [f[0][:n] for f, n in zip(full, lens)], [f[1][:n] for f, n in zip(full, lens)],
           [f[2][:n] for f, n in zip(full, lens)], [0, 0, 0])
    ws = DecodeWorkspace(HQ, HKV, D, MAX_CTX // BLOCK, layer_max_selected(budgets, MAX_CTX), DEV, selected_heads(budgets))
    ws.ensure(8)
    rpi = torch.tensor(reqs, device=DEV)
    for step in range(3):
        seq_lens, q, out = decode_step(lk, pool, reqs, full, lens, step, ws)
        sets = []
        for b in range(3):
            n = int(seq_lens[b])
            sets.append(reference_decode_pages(budgets, q[b], pool.k, pool.req_to_token, reqs[b], n)[0])
        ref = reference_sparse_decode(q, pool.k, pool.v, pool.req_to_token, rpi, seq_lens, sets, SCALE)
        assert relative_error(out, ref) < LAYER_TOL, step
        # dense heads read every page: they equal dense attention on the whole prefix
        for b in range(3):
            n = int(seq_lens[b])
            loc = pool.req_to_token[reqs[b], :n].long()
            s = (pool.k[loc, 0] @ q[b, 0]) * SCALE
            assert torch.allclose(out[b, 0], torch.softmax(s, 0) @ pool.v[loc, 0], atol=LAYER_TOL)


def test_chunked_prefill_then_decode_keeps_summaries():
    """A prompt extended in two chunks (the second summarizes only the pages from its first new token on) then
    decoded: the summaries equal the whole requests' at every step and decode equals the reference path."""
    budgets = budgets_mixed()
    pool, lk = make_pool(), layer(budgets, BLOCK)
    lens, cut = [300, 129], [200, 100]                                   # chunk ends: 200 (mid page), 100
    reqs = [3, 2]
    full = [seq(n + 2, 30 + r) for r, n in enumerate(lens)]
    for a, b in (([0, 0], cut), (cut, lens)):                           # chunk 1, then chunk 2 after it
        parts = [[f[i][x:y] for f, x, y in zip(full, a, b)] for i in range(3)]
        extend(lk, pool, reqs, *parts, a)
    ws = DecodeWorkspace(HQ, HKV, D, MAX_CTX // BLOCK, layer_max_selected(budgets, MAX_CTX), DEV,
                         selected_heads(budgets))
    ws.ensure(8)
    rpi = torch.tensor(reqs, device=DEV)
    for step in range(2):
        seq_lens, q, out = decode_step(lk, pool, reqs, full, lens, step, ws)
        sets = [reference_decode_pages(budgets, q[b], pool.k, pool.req_to_token, reqs[b], int(seq_lens[b]))[0]
                for b in range(2)]
        ref = reference_sparse_decode(q, pool.k, pool.v, pool.req_to_token, rpi, seq_lens, sets, SCALE)
        assert relative_error(out, ref) < LAYER_TOL, step


def test_streaming_heads_below_the_decode_floor_decode_on_quest_pages(monkeypatch):
    """The server's decode rule (``decode_budgets``): the layer prefills by the streaming rules and decodes its
    short-window streaming heads as top-k heads at the decode floor, on the kernels as in the reference. The
    floor is 8 pages here, so that at 16 pages Quest chooses half of them."""
    monkeypatch.setattr(patterns, "DECODE_MIN_PAGES", 8)
    budgets = budgets_positional()
    at_decode = decode_budgets(budgets)
    assert at_decode[:3] == budgets[:3] and all(b.pattern.value == "topk" for b in at_decode[3:])
    pool = make_pool(1)
    lk = LayerKernels(budgets, HKV, D, MAX_CTX, torch.float32, DEV, pool_tokens=POOL, decode_budgets=at_decode)
    assert lk.heads.streaming == (3, 4, 5) and lk.decode_heads.selected == (3, 4, 5) and lk.kmin is not None
    lens, reqs = [1000, 700], [1, 3]
    full = [seq(n + 2, 40 + r) for r, n in enumerate(lens)]
    out = extend(lk, pool, reqs, [f[0][:n] for f, n in zip(full, lens)], [f[1][:n] for f, n in zip(full, lens)],
                 [f[2][:n] for f, n in zip(full, lens)], [0, 0])
    ref = torch.cat([reference(budgets, *(x[:n] for x in f)) for f, n in zip(full, lens)])
    assert relative_error(out, ref) < LAYER_TOL                 # prefill: the streaming rules
    ws = DecodeWorkspace(HQ, HKV, D, MAX_CTX // BLOCK, layer_max_selected(at_decode, MAX_CTX), DEV,
                         selected_heads(at_decode))
    rpi = torch.tensor(reqs, device=DEV)
    for step in range(2):
        seq_lens, q, out = decode_step(lk, pool, reqs, full, lens, step, ws)
        sets = [reference_decode_pages(at_decode, q[b], pool.k, pool.req_to_token, reqs[b], int(seq_lens[b]))[0]
                for b in range(2)]
        assert all(len(sets[b][h]) == min(8, -(-int(seq_lens[b]) // BLOCK)) for b in range(2) for h in (3, 4, 5))
        ref = reference_sparse_decode(q, pool.k, pool.v, pool.req_to_token, rpi, seq_lens, sets, SCALE)
        assert relative_error(out, ref) < LAYER_TOL, step


def test_layers_without_selected_heads_have_no_summaries_and_workspace_grows():
    lk = layer(budgets_positional())
    assert lk.kmin is None and lk.summary_bytes == 0
    assert lk.prefill.heads is lk.heads                  # the layer's heads classified once
    assert layer(budgets_mixed()).summary_bytes == 2 * (POOL // BLOCK + 1) * HKV * D * 4   # pool pages + scratch
    ws = DecodeWorkspace(HQ, HKV, D, MAX_CTX // BLOCK, 4, DEV)
    ws.ensure(2)
    assert ws.capacity == 2 and ws.page_idx.shape == (2, HQ, 4)
    ws.ensure(5)
    lk = layer(budgets_mixed())
    assert ws.capacity == 5 and ws.scratch.batch == 5
    assert all(ws.scratch.mid_l.shape[0] >= bs * HQ * lk.splits(bs)[0] for bs in range(1, 6))


def test_extend_batch_rejects_bad_lengths():
    with pytest.raises(ValueError, match="disagree"):
        ExtendBatch.build(torch.zeros(1, 8, dtype=torch.int32, device=DEV), torch.tensor([0], device=DEV), [5], [4])


def test_decode_splits_follow_the_walks_and_stay_within_the_workspace_bound():
    from sglang_shplb.kernels.triton_decode import decode_splits, decode_walks, max_decode_splits
    pages = 2048
    walks = decode_walks(LayerHeads.of(budgets_mixed()), HKV, pages)
    assert walks == [pages, pages]                       # each KV group has a dense head
    stream = decode_walks(LayerHeads.of(budgets_positional()[3:] * 2), HKV, pages)
    assert stream == [(1 + 2) + (0 + 1) + (2 + 1)] * 2     # a union list: at most the sum of sink + window pages
    for walks in ([pages] * 8, [34] * 8, [pages, 34, 820, 34, 820, 34, 820, 34], [3, 1]):
        for bs in (1, 2, 4, 16, 64, 160):
            ns, sp = decode_splits(walks, bs)
            assert ns & (ns - 1) == 0 and sp >= 1 and ns <= 64
            assert ns <= max_decode_splits(pages, bs)
            assert max(walks) <= ns * sp < max(walks) + ns    # the longest walk is cut into ns slices of sp pages
            if max(walks) >= 64:
                assert ns >= 8                               # a long walk is never cut into fewer than 8
    assert decode_splits([pages] * 8, 1) == (32, 64)         # batch 1: ~256 programs over the batch
    assert decode_splits([256] * 8, 1) == (32, 8) and decode_splits([256] * 8, 16) == (8, 32)


def test_decode_route_switches_dense_and_sparse_on_the_same_launches():
    """``LayerKernels.route`` (a device flag the server writes per batch, read inside a shared CUDA graph): at 1
    every head attends every page (dense reference) while the summaries keep following the tokens; at 0 the
    plan's rule with kept selections (the reference with a SelectionMemory). Steps alternate the route."""
    from sglang_shplb.kernels.reference import SelectionMemory
    budgets = budgets_mixed()
    pool = make_pool()
    lk = LayerKernels(budgets, HKV, D, MAX_CTX, torch.float32, DEV, pool_tokens=POOL, pool_page_size=BLOCK,
                      request_slots=SLOTS, reselect_every=3)
    lk.route = torch.zeros(1, dtype=torch.int32, device=DEV)
    lens, reqs = [300, 129], [3, 1]
    full = [seq(n + 6, 40 + r) for r, n in enumerate(lens)]
    extend(lk, pool, reqs, [f[0][:n] for f, n in zip(full, lens)], [f[1][:n] for f, n in zip(full, lens)],
           [f[2][:n] for f, n in zip(full, lens)], [0, 0])
    ws = DecodeWorkspace(HQ, HKV, D, MAX_CTX // BLOCK, layer_max_selected(budgets, MAX_CTX), DEV, selected_heads(budgets))
    ws.ensure(2)
    rpi = torch.tensor(reqs, device=DEV)
    memory = SelectionMemory(3)
    dense = [HeadBudget.dense()] * HQ
    for step, route in enumerate([0, 1, 0, 0, 1, 0]):
        lk.route.fill_(route)
        seq_lens, q, out = decode_step(lk, pool, reqs, full, lens, step, ws)
        sets = []
        for b in range(2):
            n = int(seq_lens[b])
            sets.append(reference_decode_pages(dense, q[b], pool.k, pool.req_to_token, reqs[b], n)[0] if route else
                        memory.pages(0, budgets, q[b], pool.k, pool.req_to_token, reqs[b], n))
        ref = reference_sparse_decode(q, pool.k, pool.v, pool.req_to_token, rpi, seq_lens, sets, SCALE)
        assert relative_error(out, ref) < LAYER_TOL, (step, route)
    all_pages = reference_sparse_decode(q, pool.k, pool.v, pool.req_to_token, rpi, seq_lens,
                                     [reference_decode_pages(dense, q[b], pool.k, pool.req_to_token, reqs[b],
                                                             int(seq_lens[b]))[0] for b in range(2)], SCALE)
    assert relative_error(out, all_pages) > 0.05   # the last (sparse) step differs from dense (0.096 on the H200,
    # where LAYER_TOL is 1e-2): the test can tell the routes apart
