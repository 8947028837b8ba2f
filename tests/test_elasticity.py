"""The profiler's recall/error numbers against a direct computation on the same q/k/v."""
import math

import pytest
import torch

from sglang_shplb.core import block_masks as bm
from sglang_shplb.planning.profile import QUESTION_ROWS, default_options, layer_elasticity, sample_rows
from sglang_shplb.core.patterns import BLOCK


def _direct(q, k, v, mask, rows):
    """Dense softmax over the full row; recall = mass inside the mask; output renormalised in the mask."""
    n, d = q.shape[0], q.shape[1]
    s = (q @ k.T) / math.sqrt(d)
    s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    p = s.softmax(-1)[rows]
    tok_blk = torch.arange(n) // BLOCK
    allowed = mask[rows // BLOCK][:, tok_blk]
    kept = (p * allowed).sum(1)
    dense = p @ v
    sparse = (p * allowed) @ v / kept[:, None]
    return kept.mean().item(), ((sparse - dense).norm() / dense.norm()).item()


@pytest.fixture(scope="module")
def qkv():
    torch.manual_seed(0)
    n, d = 450, 32
    # structured keys (a few strong "retrieval" tokens) so that patterns differ
    k = torch.randn(2, n, d)
    k[:, ::37] *= 3
    return torch.randn(6, n, d), k, torch.randn(2, n, d)


def test_profiler_matches_direct_computation(qkv):
    q, k, v = qkv
    n = q.shape[1]
    opts = default_options(min_blocks=1)
    rows = sample_rows(n, 5, seed=3)
    recall, err, *_ = layer_elasticity(q, k, v, opts, rows)
    nb = math.ceil(n / BLOCK)
    est = bm.pooled_block_scores(q, k)
    last = bm.last_block_mass(q, k)
    for h in (0, 4):
        kh, vh = k[h // 3], v[h // 3]
        for j, o in enumerate(opts):
            if o.family == "topk_oracle":
                continue  # oracle ranks by the sampled rows' block mass: checked for monotonicity below
            mask = bm.head_block_mask(o.budget, nb, est[h], last[h])
            r, e = _direct(q[h], kh, vh, mask, rows)
            assert recall[h, j].item() == pytest.approx(r, abs=2e-5), o.label()
            assert err[h, j].item() == pytest.approx(e, abs=2e-4), o.label()


def test_recall_is_one_at_full_budget_and_monotone(qkv):
    q, k, v = qkv
    opts = default_options(min_blocks=1)
    recall, err, *_ = layer_elasticity(q, k, v, opts, sample_rows(q.shape[1], 4))
    dense = [j for j, o in enumerate(opts) if o.family == "dense"][0]
    assert torch.allclose(recall[:, dense], torch.ones(q.shape[0]), atol=1e-5)
    assert (err[:, dense] < 1e-5).all()
    for fam in ("streaming", "topk", "topk_oracle", "vslash"):
        idx = sorted((j for j, o in enumerate(opts) if o.family == fam),
                     key=lambda j: opts[j].budget.density(q.shape[1]))
        r = recall[:, idx]
        assert (r[:, 1:] >= r[:, :-1] - 1e-6).all(), fam
        assert (r <= 1 + 1e-5).all() and (r > 0).all()
    # the oracle can only beat the estimator at the same budget
    for j, o in enumerate(opts):
        if o.family == "topk_oracle":
            je = next(i for i, x in enumerate(opts) if x.family == "topk" and x.budget == o.budget)
            assert (recall[:, j] >= recall[:, je] - 1e-5).all()


def test_question_and_needle_recall_match_direct_computation(qkv):
    q, k, v = qkv
    n, d = q.shape[1], q.shape[2]
    opts = default_options(min_blocks=1)
    rows = sample_rows(n, 5, seed=3)
    needle = (100, 112)  # tokens of block 1
    e = layer_elasticity(q, k, v, opts, rows, needle)
    nb = math.ceil(n / BLOCK)
    est, last = bm.pooled_block_scores(q, k), bm.last_block_mass(q, k)
    question = torch.arange(n - QUESTION_ROWS, n)
    tok_blk = torch.arange(n) // BLOCK
    for h in (1, 5):
        s = (q[h] @ k[h // 3].T) / math.sqrt(d)
        p = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)[question]
        on_needle = p[:, needle[0]:needle[1]].sum(1)
        assert e.nmass[h].item() == pytest.approx(on_needle.mean().item(), abs=1e-6)
        for j, o in enumerate(opts):
            if o.family == "topk_oracle":
                continue
            mask = bm.head_block_mask(o.budget, nb, est[h], last[h])
            allowed = mask[question // BLOCK][:, tok_blk].float()  # [question rows, n]
            assert e.qrecall[h, j].item() == pytest.approx((p * allowed).sum(1).mean().item(), abs=2e-5), o.label()
            kept = (p[:, needle[0]:needle[1]] * allowed[:, needle[0]:needle[1]]).sum(1).mean()
            assert e.nrecall[h, j].item() == pytest.approx((kept / on_needle.mean()).item(), abs=2e-5), o.label()
    streaming = [j for j, o in enumerate(opts) if o.family == "streaming" and o.budget.window_blocks <= 4]
    assert (e.nrecall[:, streaming] == 0).all()  # block 1 is neither sink (block 0) nor within 256 of the end
    assert (layer_elasticity(q, k, v, opts, rows).nrecall == 1).all()  # no needle: nothing to lose
