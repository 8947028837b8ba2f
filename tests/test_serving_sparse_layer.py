"""One attention layer of the shplb backend (its sparse path over SGLang's paged pool) against the
single-process sparse reference: scattered pages, radix prefix hit, chunked prefill, decode step."""
import dataclasses
import math

import pytest
import torch

import sglang  # noqa: F401  (tests/run.sh installs it; a missing SGLang must fail, not skip)

from conftest import budgets_mixed, budgets_positional, mask_reference, sequence
from sglang_shplb.core.patterns import BLOCK, HeadBudget
from sglang_shplb.kernels.layer_reference import gathered_block_attention, sparse_attention, sparse_decode
from sglang_shplb.kernels.reference import masked_attention, reference_decode_pages, reference_sparse_decode


def at_decode(budgets):
    """The budgets whose prefill rule, at a query block's last row, is what decode reads: a streaming
    head's window grows by the query's block (``HeadBudget.decode_window_blocks``)."""
    return [dataclasses.replace(b, window_blocks=b.decode_window_blocks) if b.pattern.value == "streaming" else b
            for b in budgets]

HQ, HKV, D = 6, 2, 64
SCALE = 1 / math.sqrt(D)


def dense_full(q, k, v):
    """Full-sequence reference: q [n, Hq, d], k/v [n, Hkv, d]."""
    n = q.shape[0]
    nb = math.ceil(n / BLOCK)
    return masked_attention(q, k, v, torch.ones(HQ, nb, nb, dtype=torch.bool).tril(), SCALE)


def reference(budgets, q, k, v):
    """The single-process sparse reference on one contiguous sequence (block_masks + masked attention)."""
    return mask_reference(budgets, q, k, v, SCALE)


class Pool:
    """A token pool with scattered (shuffled) slots and a req_to_token table, like SGLang's."""

    def __init__(self, size=4096, max_ctx=2048, reqs=4, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.k = torch.randn(size, HKV, D, generator=g)
        self.v = torch.randn(size, HKV, D, generator=g)
        self.free = torch.randperm(size - 1, generator=g) + 1   # slot 0 reserved, like SGLang
        self.next = 0
        self.req_to_token = torch.zeros(reqs, max_ctx, dtype=torch.int32)

    def put(self, req, start, k, v):
        n = k.shape[0]
        slots = self.free[self.next:self.next + n]
        self.next += n
        self.k[slots], self.v[slots] = k, v
        self.req_to_token[req, start:start + n] = slots.int()


def seq(n, seed):
    return sequence(n, HQ, HKV, D, seed)


def run_extend(pool, reqs, budgets, qs, prefix_lens, seq_lens):
    q = torch.cat(qs)
    out = dense_placeholder = torch.full_like(q, float("nan"))
    sparse_attention(q, pool.k, pool.v, pool.req_to_token, torch.tensor(reqs), torch.tensor(seq_lens),
                     torch.tensor([s - p for s, p in zip(seq_lens, prefix_lens)]), budgets, SCALE, out)
    return out


def sparse_cols(budgets):
    return [h for h, b in enumerate(budgets) if b.pattern.value != "dense"]


@pytest.mark.parametrize("budgets", [budgets_positional(), budgets_mixed()], ids=["streaming", "mixed"])
def test_prefill_scattered_pages_batch(budgets):
    pool = Pool()
    lens = [300, 777, 64]
    qs, refs = [], []
    for r, n in enumerate(lens):
        q, k, v = seq(n, r)
        pool.put(r, 0, k, v)
        qs.append(q)
        refs.append(reference(budgets, q, k, v))
    out = run_extend(pool, [0, 1, 2], budgets, qs, [0, 0, 0], lens)
    cols = sparse_cols(budgets)
    ref = torch.cat(refs)
    assert torch.allclose(out[:, cols], ref[:, cols], atol=2e-5, rtol=1e-4)
    dense_cols = [h for h in range(HQ) if h not in cols]
    assert torch.isnan(out[:, dense_cols]).all(), "dense heads are the stock backend's: left untouched"
    # and the sparse heads really differ from dense attention at this length
    full = dense_full(qs[1], *seq(777, 1)[1:])
    assert not torch.allclose(out[300:300 + 777, cols], full[:, cols], atol=1e-3)


def test_radix_prefix_hit_and_chunked_prefill_streaming():
    """With streaming budgets the masks depend on positions only, so every row of a chunk / a request with
    a cached prefix equals the same row of the full-sequence reference."""
    budgets = budgets_positional()
    cols = sparse_cols(budgets)
    n, p = 900, 448  # prefix not block aligned on purpose is tested below
    q, k, v = seq(n, 7)
    ref = reference(budgets, q, k, v)
    for prefix in (p, 448 + 17, 1):
        pool = Pool(seed=prefix)
        pool.put(0, 0, k[:prefix], v[:prefix])       # cached prefix (radix hit / earlier chunk)
        pool.put(0, prefix, k[prefix:], v[prefix:])  # this extend's tokens, written by the stock backend
        out = run_extend(pool, [0], budgets, [q[prefix:]], [prefix], [n])
        assert torch.allclose(out[:, cols], ref[prefix:, cols], atol=2e-5, rtol=1e-4), prefix


def test_chunked_prefill_two_chunks_mixed_budgets_match_kernel_semantics():
    """Top-k/vslash with a cached prefix: the index uses the queries present (kernels' documented rule);
    at least the first chunk equals the full-prefill reference restricted to its rows (block-aligned)."""
    budgets = budgets_mixed()
    cols = sparse_cols(budgets)
    n = 512
    q, k, v = seq(n, 3)
    pool = Pool()
    pool.put(0, 0, k[:256], v[:256])
    first = run_extend(pool, [0], budgets, [q[:256]], [0], [256])
    assert torch.allclose(first[:, cols], reference(budgets, q[:256], k[:256], v[:256])[:, cols], atol=2e-5)
    pool.put(0, 256, k[256:], v[256:])
    second = run_extend(pool, [0], budgets, [q[256:]], [256], [n])
    assert torch.isfinite(second[:, cols]).all()


@pytest.mark.parametrize("budgets", [budgets_positional(), budgets_mixed()], ids=["streaming", "mixed"])
def test_decode_step(budgets):
    cols = sparse_cols(budgets)
    lens = [1000, 130, 64, 65]
    pool = Pool()
    qd, refs = [], []
    for r, n in enumerate(lens):
        q, k, v = seq(n, 10 + r)
        pool.put(r, 0, k, v)
        qd.append(q[-1:])
        if all(b.pattern.value in ("dense", "streaming") for b in budgets):
            refs.append(reference(at_decode(budgets), q, k, v)[-1:])
        else:  # top-k / vertical-slash heads: the CUDA kernel path's Quest pages (reference_decode_pages)
            pages, _ = reference_decode_pages(budgets, q[-1], pool.k, pool.req_to_token, r, n)
            refs.append(("pages", pages))
    q = torch.cat(qd)
    out = torch.full_like(q, float("nan"))
    sparse_decode(q, pool.k, pool.v, pool.req_to_token, torch.arange(len(lens)), torch.tensor(lens), budgets,
                  SCALE, out)
    assert torch.isfinite(out[:, cols]).all()
    for b, ref in enumerate(refs):
        if isinstance(ref, tuple):   # every head by the GPU rule's page sets: the reference decode of those pages
            want = reference_sparse_decode(q[b:b + 1], pool.k, pool.v, pool.req_to_token, torch.tensor([b]),
                                           torch.tensor([lens[b]]), [ref[1]], SCALE)
            assert torch.allclose(out[b, cols], want[0, cols], atol=2e-5, rtol=1e-4), b
        else:
            assert torch.allclose(out[b, cols], ref[0, cols], atol=2e-5, rtol=1e-4), b
    if isinstance(refs[0], tuple):
        # streaming heads of the mixed plan still match the full reference row exactly
        st = [h for h in cols if budgets[h].pattern.value == "streaming"]
        for r, n in enumerate(lens):
            qf, kf, vf = seq(n, 10 + r)
            ref = reference(at_decode([budgets[h] if h in st else HeadBudget.dense() for h in range(HQ)]), qf, kf, vf)
            assert torch.allclose(out[r, st], ref[-1, st], atol=2e-5, rtol=1e-4)


def test_decode_equals_one_token_extend():
    """Decode through the graph-safe streaming path == the same step as a one-token extend with the decode
    window (and != with the prefill window, which a token at a block's start would see almost nothing of)."""
    budgets = budgets_positional()
    cols = sparse_cols(budgets)
    pool = Pool()
    q, k, v = seq(700, 5)
    pool.put(0, 0, k, v)
    a = torch.full((1, HQ, D), float("nan"))
    sparse_decode(q[-1:], pool.k, pool.v, pool.req_to_token, torch.tensor([0]), torch.tensor([700]), budgets, SCALE, a)
    b = run_extend(pool, [0], at_decode(budgets), [q[-1:]], [699], [700])
    assert torch.allclose(a[:, cols], b[:, cols], atol=2e-5)
    c = run_extend(pool, [0], budgets, [q[-1:]], [699], [700])
    assert not torch.allclose(a[:, cols], c[:, cols], atol=2e-5)


def test_gathered_block_attention_equals_the_masked_reference():
    """The CPU path's per-query-block gather equals masked dense attention under the index's block mask:
    a prefix (the queries are the last rows), a repeated block counted once, a listed block after the query
    block ignored, padding slots past the count ignored, a short last block."""
    torch.manual_seed(0)
    n, n_q, d = 300, 200, 16                       # blocks 0..4, queries from row 100 (block 1) on
    q, k, v = torch.randn(n_q, d), torch.randn(n, d), torch.randn(n, d)
    nb = math.ceil(n / BLOCK)
    idx = torch.tensor([[0, 0, 0, 0], [0, 1, 1, 3], [2, 0, 4, 9], [1, 3, 2, 2], [4, 0, 2, 7]])
    cnt = torch.tensor([1, 4, 2, 3, 3])            # row 2 lists blocks 2, 0 (4 past the count); row 1 repeats 1
    mask = torch.zeros(nb, nb, dtype=torch.bool)
    for i in range(nb):
        mask[i, idx[i, :cnt[i]]] = True
    mask &= torch.ones(nb, nb, dtype=torch.bool).tril()           # row 1's block 3 comes after it: ignored
    ref = masked_attention(q[:, None], k[:, None], v[:, None], mask[None], 0.3)[:, 0]
    got = gathered_block_attention(q, k, v, idx, cnt, 0.3)
    assert got.shape == (n_q, d) and torch.allclose(got, ref, atol=1e-5)
    # the mask matters: with every block listed the answer is dense attention, not this
    full = gathered_block_attention(q, k, v, torch.arange(nb).expand(nb, nb), torch.full((nb,), nb), 0.3)
    dense = masked_attention(q[:, None], k[:, None], v[:, None], torch.ones(1, nb, nb, dtype=torch.bool).tril(), 0.3)
    assert torch.allclose(full, dense[:, 0], atol=1e-5) and not torch.allclose(got, full, atol=1e-3)
