"""The dense tail (``patterns.DENSE_TAIL``): the last query rows of every request of an extend attend to every
key in every head. The serving function (:func:`sglang_shplb.kernels.dense_tail.dense_tail`, over SGLang's
paged pool) against its reference (:func:`sglang_shplb.kernels.reference.dense_tail_rows`) and against SDPA;
the refine / quality reference (``quality.masked_prefill``) keeps the budgets before the tail."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import DEV, tol

from sglang_shplb.core.patterns import DENSE_TAIL, HeadBudget, tail_rows
from sglang_shplb.kernels.dense_tail import dense_tail, gathered_tail
from sglang_shplb.kernels.head_parallel import KVRows
from sglang_shplb.kernels.reference import dense_tail_rows


def scattered_pool(pool, hkv, d, lens, slots, dtype=torch.float32):
    """K/V of a ``pool``-slot pool and its ``req_to_token`` (512 columns, rows up to the largest slot): request
    ``i`` (``lens[i]`` tokens) in request slot ``slots[i]``, its tokens at consecutive entries of a random
    permutation of the pool; and the request slots as ``req_pool_indices``."""
    kb, vb = torch.randn(pool, hkv, d).to(dtype), torch.randn(pool, hkv, d).to(dtype)
    perm = torch.randperm(pool)
    req_to_token = torch.zeros(max(slots) + 1, 512, dtype=torch.int32)
    c = 0
    for r, n in zip(slots, lens):
        req_to_token[r, :n] = perm[c:c + n].int()
        c += n
    return kb, vb, req_to_token, torch.tensor(slots, dtype=torch.int32)


def tail_positions(q_lens, ends=None):
    """Rows of a packed batch in the tail (each request's last tail_rows(n, ends[i])), and the tail lengths."""
    rows, tails, c = [], [], 0
    for i, n in enumerate(q_lens):
        t = tail_rows(n, ends is None or ends[i])
        rows += range(c + n - t, c + n)
        tails.append(t)
        c += n
    return rows, tails


@pytest.mark.parametrize("hkv,heads", [(2, [0, 2, 5]), (2, [4, 3]), (2, [1]), (3, [5, 0])])
def test_dense_tail_over_a_scattered_pool_with_a_prefix(hkv, heads):
    """Two requests in a scattered pool: one without a prefix (150 new tokens), one extend of 40 tokens after a
    260-token prefix (all 40 are its tail). Tail heads of 6 (2 or 3 KV heads), in every group, in one, or in
    two groups that are not neighbours (the others are not computed), out of order: their tail rows equal the
    reference and SDPA; every other row and head keeps what was there."""
    torch.manual_seed(0)
    hq, d = 6, 32
    scale = d ** -0.5
    lens, q_lens = [150, 300], [150, 40]
    kb, vb, req_to_token, rpi = scattered_pool(1000, hkv, d, lens, [1, 3])
    q_full = [torch.randn(n, hq, d) for n in lens]                       # every position's query
    q = torch.cat([qf[n - m:] for qf, n, m in zip(q_full, lens, q_lens)])  # the extend's queries
    out = torch.randn(q.shape[0], hq, d)
    before = out.clone()
    dense_tail(q, kb, vb, KVRows(req_to_token, rpi), q_lens, lens, heads, scale, out)
    rows, tails = tail_positions(q_lens)
    assert tails == [DENSE_TAIL, 40]
    c = 0
    for i, (n, m) in enumerate(zip(lens, q_lens)):
        loc = req_to_token[int(rpi[i]), :n].long()
        t = tail_rows(m)                                                   # the extend's tail, not the sequence's
        ref = dense_tail_rows(q_full[i], kb[loc], vb[loc], scale)[-t:]     # [t, hq, d]
        got = out[c + m - t:c + m]
        assert torch.allclose(got[:, heads], ref[:, heads], atol=1e-5)
        # SDPA, the whole sequence causal: its last t rows
        kk, vv = kb[loc].transpose(0, 1), vb[loc].transpose(0, 1)
        sd = torch.nn.functional.scaled_dot_product_attention(q_full[i].transpose(0, 1), kk, vv, is_causal=True,
                                                              scale=scale, enable_gqa=True).transpose(0, 1)
        assert torch.allclose(got[:, heads], sd[n - t:, heads], atol=1e-5)
        c += m
    untouched = torch.ones(q.shape[0], hq, dtype=torch.bool)
    untouched[torch.tensor(rows)[:, None], torch.tensor(heads)[None, :]] = False
    assert torch.equal(out[untouched], before[untouched])
    assert not torch.allclose(out[~untouched], before[~untouched])
    if torch.cuda.is_available():   # the serving device and dtype (cuDNN pieces) against float32 on the same inputs
        dev = torch.device("cuda")
        qb, kbb, vbb, ob = (x.to(torch.bfloat16) for x in (q, kb, vb, before))
        want = ob.float()
        dense_tail(qb.float(), kbb.float(), vbb.float(), KVRows(req_to_token, rpi), q_lens, lens, heads, scale, want)
        got = ob.to(dev)
        dense_tail(qb.to(dev), kbb.to(dev), vbb.to(dev), KVRows(req_to_token.to(dev), rpi.to(dev)), q_lens, lens,
                   heads, scale, got)
        assert (got.float().cpu() - want).abs().max().item() < 2e-2


def test_masked_prefill_keeps_the_budgets_before_the_tail():
    """quality.masked_prefill (the refine gate's and the in-process check's prefill): rows before the tail
    follow the streaming budget (and differ from dense), the tail rows equal dense; a prompt shorter than
    the tail is dense throughout."""
    from sglang_shplb.core.block_masks import build_block_masks
    from sglang_shplb.kernels.reference import masked_attention
    from sglang_shplb.planning.quality import masked_prefill

    torch.manual_seed(1)
    hq, hkv, d = 4, 2, 16
    scale = d ** -0.5
    budgets = [HeadBudget.streaming(64, 64)] * 2 + [HeadBudget.topk(0.1, 2)] * 2
    for n in (400, DENSE_TAIL - 20):
        q, k, v = torch.randn(1, hq, n, d), torch.randn(1, hkv, n, d), torch.randn(1, hkv, n, d)
        got = masked_prefill(budgets, q, k, v, scale)[0]                      # [n, hq, d]
        dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                                 enable_gqa=True)[0].transpose(0, 1)
        t = tail_rows(n)
        assert torch.allclose(got[n - t:], dense[n - t:], atol=1e-5)
        if n > t:
            masks = build_block_masks(budgets, q[0], k[0])
            sparse = masked_attention(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), masks, scale)
            assert torch.allclose(got[:n - t], sparse[:n - t], atol=1e-5)
            assert not torch.allclose(got[:n - t], dense[:n - t], atol=1e-3)


def test_the_tail_is_counted_in_the_density():
    """block_pairs counts the tail as one full query-block row: a streaming head at 8K reads 2 + 1 blocks a
    row, and the tail adds the last row's missing ones."""
    b = HeadBudget.streaming(64, 128)
    n = 8192
    nb = math.ceil(n / 64)
    plain = int(b.blocks_for_query_blocks(torch.arange(nb).numpy(), nb).sum())
    assert b.block_pairs(n) == plain - b.blocks_for_query_block(nb - 1, nb) + nb
    assert b.density(n) > plain / (nb * (nb + 1) // 2)
    assert HeadBudget.dense().density(n) == 1.0


@pytest.mark.parametrize("hkv,heads,dtype", [(2, [0, 2, 5], torch.float32), (3, [4], torch.float32),
                                             (2, [5, 1, 0, 3], torch.bfloat16)])
def test_triton_tail_equals_the_torch_route(hkv, heads, dtype):
    """The CUDA route (:func:`triton_tail.tail_attention`: keys read in place through ``req_to_token``, split
    into slices and merged) against the torch route (:func:`gathered_tail`, float32) on the same inputs: three
    requests in a scattered pool (150 new tokens; 40 after a 260-token prefix; 7 after a 393-token prefix,
    shorter than one 64-key step), heads in and out of order, one head alone (its keys cut into more slices);
    tail rows equal, nothing else written."""
    from sglang_shplb.kernels.triton_tail import BLOCK_N, _sm_count, tail_attention, tail_slices

    torch.manual_seed(2)
    hq, d = 6, 32
    scale = d ** -0.5
    lens, q_lens = [150, 300, 400], [150, 40, 7]
    kb, vb, req_to_token, rpi = scattered_pool(1200, hkv, d, lens, [4, 0, 2], dtype)
    q = torch.randn(sum(q_lens), hq, d).to(dtype)
    before = torch.randn(q.shape[0], hq, d).to(dtype)
    want, got = before.float(), before.to(DEV, copy=True)
    gathered_tail(q.float(), kb.float(), vb.float(), KVRows(req_to_token, rpi), q_lens, lens, heads, scale, want)
    tail_attention(*(x.to(DEV) for x in (q, kb, vb, req_to_token, rpi)), q_lens, lens, heads, scale, got)
    got = got.cpu()
    slice_len, ns = tail_slices(len(lens) * len(heads), max(lens), _sm_count(DEV))
    assert ns >= 2 and slice_len % BLOCK_N == 0          # the merge is exercised
    rows, _ = tail_positions(q_lens)
    touched = torch.zeros(q.shape[0], hq, dtype=torch.bool)
    touched[torch.tensor(rows)[:, None], torch.tensor(heads)[None, :]] = True
    assert (got.float()[touched] - want[touched]).abs().max().item() < tol(dtype)   # TF32 dots on a GPU
    assert torch.equal(got[~touched], before[~touched])
    assert not torch.allclose(got.float()[touched], before.float()[touched])


def test_tail_rows_only_where_the_extend_ends_the_prompt():
    """The rule: an extend that ends its prompt has min(q_len, DENSE_TAIL) tail rows, an earlier chunk none."""
    assert tail_rows(8192) == tail_rows(8192, True) == DENSE_TAIL
    assert tail_rows(10) == 10
    assert tail_rows(8192, False) == tail_rows(10, False) == 0


@pytest.mark.parametrize("ends", [(False, True, True), (True, False, False), (False, False, False)])
def test_requests_that_do_not_end_their_prompt_get_no_tail(ends):
    """``ends``: a request whose extend is an earlier chunk of its prompt keeps what the sparse route wrote in
    every row, on both routes (the CUDA route on the interpreter here; its longest request need not have a tail);
    the others' tail rows equal the tail computed with every request ending its prompt; nothing else is
    written, and with no request ending its prompt nothing at all."""
    from sglang_shplb.kernels.triton_tail import tail_attention

    torch.manual_seed(3)
    hkv, hq, d, heads = 2, 4, 32, [1, 2]
    scale = d ** -0.5
    lens, q_lens = [400, 150, 300], [100, 150, 40]
    kb, vb, req_to_token, rpi = scattered_pool(1000, hkv, d, lens, [0, 1, 2])
    kv = KVRows(req_to_token, rpi)
    q = torch.randn(sum(q_lens), hq, d)
    before = torch.randn(q.shape[0], hq, d)
    every = before.clone()
    gathered_tail(q, kb, vb, kv, q_lens, lens, heads, scale, every)            # every request ends its prompt
    rows, tails = tail_positions(q_lens, ends)
    assert tails == [DENSE_TAIL if e else 0 for e in ends[:2]] + [40 if ends[2] else 0]
    touched = torch.zeros(q.shape[0], hq, dtype=torch.bool)
    if rows:
        touched[torch.tensor(rows)[:, None], torch.tensor(heads)[None, :]] = True
    torch_route = before.clone()
    dense_tail(q, kb, vb, kv, q_lens, lens, heads, scale, torch_route, ends)
    triton_route = before.to(DEV, copy=True)
    tail_attention(*(x.to(DEV) for x in (q, kb, vb, req_to_token, rpi)), q_lens, lens, heads, scale, triton_route,
                   ends)
    for got in (torch_route, triton_route.cpu()):
        assert torch.equal(got[~touched], before[~touched])
        assert (got[touched] - every[touched]).abs().max().item() < 1e-4 if rows else True
    assert not any(ends) or not torch.allclose(torch_route[touched], before[touched])


def test_tail_slices_fill_the_gpu_and_cover_the_keys():
    """Slices are whole 64-key steps, cover the longest request, and give about two programs per SM when the
    keys allow it; a short request is one slice."""
    from sglang_shplb.kernels.triton_tail import BLOCK_N, PROGRAMS_PER_SM, tail_slices

    for tiles, kv, sms in [(28, 65536, 132), (4, 131072, 132), (256, 8192, 132), (1, 100, 132), (6, 300, 4)]:
        slice_len, ns = tail_slices(tiles, kv, sms)
        assert slice_len % BLOCK_N == 0 and slice_len >= BLOCK_N
        assert ns * slice_len >= kv > (ns - 1) * slice_len                  # covered, no empty slice
        want = -(-PROGRAMS_PER_SM * sms // tiles)
        steps = -(-kv // BLOCK_N)
        assert ns <= want, "more slices than the programs-per-SM target asks for"
        assert ns <= steps, "a slice without a 64-key step"
        assert tiles * ns >= min(PROGRAMS_PER_SM * sms, tiles * steps) / 2  # at least half the target
    assert tail_slices(28, 65536, 132) == (103 * BLOCK_N, 10)               # TP 1 Llama-8B, 7 sparse groups
    assert tail_slices(512, 8192, 132) == (8192, 1)                         # enough tiles: no split
