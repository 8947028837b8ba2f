"""``bench/decode_balance.py``: the per-rank decode cost model at home placement (pure, CPU)."""
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import decode_balance as db  # noqa: E402

from sglang_shplb.core.buckets import Buckets  # noqa: E402
from sglang_shplb.core.model_spec import ModelSpec  # noqa: E402
from sglang_shplb.core.patterns import BLOCK, HeadBudget, decode_budgets  # noqa: E402
from sglang_shplb.planning.stock_decision import StockOptions, group_pages, layer_times  # noqa: E402

CFG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 2,
       "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 256, "head_dim": 64,
       "max_position_embeddings": 131072, "vocab_size": 100}
SPEC = ModelSpec.from_config(CFG)                      # 2 KV groups of 2 query heads
BUCKETS = Buckets((4096, 8192, 16384))
OPT = StockOptions()
NONE = [frozenset()] * len(BUCKETS)
DENSE, STREAM = HeadBudget.dense(), HeadBudget.streaming(64, 256)
MIXED = [[DENSE, DENSE, STREAM, STREAM]] * SPEC.num_layers   # group 0 dense, group 1 streaming
PER_PAGE = OPT.decode_batch * BLOCK * SPEC.head_dim * 2 * OPT.kv_dtype_bytes / OPT.hbm_bytes_per_s


def test_all_dense_is_balanced_and_without_overhead_sparse_is_dense():
    budgets = [[DENSE] * 4] * SPEC.num_layers
    no_overhead = StockOptions(decode_layer_overhead_s=0.0)
    for tp in (1, 2):
        for r in db.decode_balance(budgets, SPEC, BUCKETS, NONE, tp, no_overhead):
            d = r.to_dict()
            assert d["imbalance"] == 1.0 and d["pages_imbalance"] == 1.0
            assert r.served_s == r.dense_s == r.sparse_slowest_s
            assert r.worst_pages == [4 // tp // SPEC.group_size * r.npages] * tp
    # with the fixed sparse cost, all dense sparse is still balanced but slower than dense by that cost per layer
    for r in db.decode_balance(budgets, SPEC, BUCKETS, NONE, 2, OPT):
        assert r.to_dict()["imbalance"] == 1.0
        assert r.sparse_slowest_s - r.dense_s == pytest.approx(SPEC.num_layers * OPT.decode_layer_overhead_s)


def test_dense_group_against_streaming_group_at_tp2():
    rows = db.decode_balance(MIXED, SPEC, BUCKETS, NONE, 2, OPT)
    for r in rows:
        stream_pages = group_pages(decode_budgets([STREAM, STREAM]), r.npages)
        assert r.npages == math.ceil(r.upper / BLOCK) and stream_pages < r.npages
        assert r.worst_pages == [r.npages, stream_pages]            # the slowest rank reads every page
        d = r.to_dict()
        assert d["imbalance"] > 1.0 and d["speedup_balanced"] > d["speedup_sparse"]
        assert d["pages_imbalance"] == pytest.approx(r.npages / ((r.npages + stream_pages) / 2))
        fixed = OPT.decode_base_s + OPT.decode_layer_overhead_s
        assert r.sparse_slowest_s == pytest.approx(SPEC.num_layers * (fixed + r.npages * PER_PAGE))
        assert r.dense_s == pytest.approx(SPEC.num_layers * (OPT.decode_base_s + r.npages * PER_PAGE))
        assert r.served_s == r.sparse_slowest_s
    assert rows[-1].to_dict()["imbalance"] > rows[0].to_dict()["imbalance"]   # the gap grows with the length


def test_tp1_matches_layer_times_of_the_whole_layer():
    for r in db.decode_balance(MIXED, SPEC, BUCKETS, NONE, 1, OPT):
        sparse, stock = layer_times("decode", MIXED[0], r.upper, SPEC, None, OPT)
        assert r.to_dict()["imbalance"] == 1.0
        assert r.sparse_slowest_s == pytest.approx(SPEC.num_layers * sparse)
        assert r.dense_s == pytest.approx(SPEC.num_layers * stock)


def test_stock_layers_are_served_dense():
    sparse = db.decode_balance(MIXED, SPEC, BUCKETS, NONE, 2, OPT)
    half = db.decode_balance(MIXED, SPEC, BUCKETS, [frozenset({0})] * len(BUCKETS), 2, OPT)
    full = db.decode_balance(MIXED, SPEC, BUCKETS, [frozenset({0, 1})] * len(BUCKETS), 2, OPT)
    for s, h, f in zip(sparse, half, full):
        assert f.served_s == pytest.approx(f.dense_s) and f.n_stock == 2
        assert h.served_s == pytest.approx((s.dense_s + s.sparse_slowest_s) / 2) and h.n_stock == 1
        assert h.sparse_slowest_s == s.sparse_slowest_s          # the marks change only what is served


@pytest.mark.parametrize("tp", [0, 3, 4])
def test_tp_not_dividing_the_kv_heads_raises(tp):
    with pytest.raises(ValueError, match="KV heads"):
        db.decode_balance(MIXED, SPEC, BUCKETS, NONE, tp, OPT)


def test_run_skips_tp_sizes_not_dividing_the_kv_heads():
    plan = db.PlanInput("toy", SPEC, MIXED, BUCKETS, NONE, (1, 2, 3, 4))
    rows = db.run([plan], OPT)
    assert sorted({r["tp"] for r in rows}) == [1, 2] and len(rows) == 2 * len(BUCKETS)
    assert "toy" in db.table(rows)


def test_default_plans_load():
    plans = {p.name: p for p in db.default_plans()}
    llama = plans["llama8b"]
    assert (llama.spec.num_layers, llama.spec.num_heads, llama.spec.num_kv_heads) == (32, 32, 8)
    topk = HeadBudget.topk(0.1).pattern   # serve_gpu's mixed plan: group 0 dense, odd groups top-k, even streaming
    assert [b.pattern for b in llama.budgets[0][::4]] == [DENSE.pattern, *[topk, STREAM.pattern] * 3, topk]
    for p in plans.values():
        assert len(p.stock) == len(p.buckets) and all(p.spec.num_kv_heads % tp == 0 for tp in p.tp_sizes)
