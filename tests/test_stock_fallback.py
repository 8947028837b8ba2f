"""Where sparse pays (issue 15, item 1): the pure stock decision at its edges, the plan's ``stock`` array
(round trip, old plans), ``place`` computing it, and the backend running the stock backend for a layer the
plan marks stock (CPU reference path, a fake stock backend: the output is exactly the stock one's)."""
import json
import math
import types

import numpy as np
import pytest
import torch

import sglang  # noqa: F401  (tests/run.sh installs it; a missing SGLang must fail, not skip)

from sglang_shplb.core.buckets import Buckets
from sglang_shplb.core.model_spec import ModelSpec
from sglang_shplb.core.patterns import DECODE_MIN_PAGES, HeadBudget
from sglang_shplb.core.plan import PHASES, Plan, load_plan, save_plan
from sglang_shplb.planning.cost_model import CostModel
from sglang_shplb.planning.place import solve_plan_placements
from sglang_shplb.planning.stock_decision import StockOptions, choose_stock, decide_stock, layer_times, sparse_vs_stock
from sglang_shplb.scheduler import bucket_hook as bh

CFG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 4,
       "num_attention_heads": 9, "num_key_value_heads": 3, "hidden_size": 576, "head_dim": 64,
       "max_position_embeddings": 8192, "vocab_size": 100}
SPEC = ModelSpec.from_config(CFG)
LLAMA8B = ModelSpec.from_config(dict(CFG, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                                     hidden_size=4096))
COST = CostModel.analytic()
NO_OVERHEAD = StockOptions(prefill_layer_overhead_s=0.0, decode_layer_overhead_s=0.0)
DENSE = HeadBudget.dense()


# ---- the pure decision ----------------------------------------------------------------------------------

def test_exactly_at_the_margin_is_sparse_and_just_above_is_stock():
    assert choose_stock(2.0, 4.0, 0.5) is False
    assert choose_stock(math.nextafter(2.0, 3.0), 4.0, 0.5) is True
    assert choose_stock(1.9, 2.0, 0.95) is False          # 0.95 * 2.0 == 1.9 in binary floating point
    assert choose_stock(math.nextafter(1.9, 2.0), 2.0, 0.95) is True
    assert choose_stock(2.0, 2.0, 1.0) is False and choose_stock(2.0, 2.0, 0.95) is True


def test_nothing_to_compute_is_stock():
    assert choose_stock(0.0, 0.0) is True and choose_stock(0.0, -1.0) is True
    layer = [HeadBudget.streaming(64, 64)] * 9
    for phase in PHASES:
        assert layer_times(phase, layer, 0, SPEC, COST, NO_OVERHEAD) == (0.0, 0.0)


@pytest.mark.parametrize("margin", [0.0, -0.1, 1.01, float("nan")])
def test_margin_out_of_range_is_refused(margin):
    with pytest.raises(ValueError, match="margin"):
        StockOptions(margin=margin)


def test_all_dense_layer_is_stock_everywhere_even_without_overheads():
    budgets = [[DENSE] * 9] * 4
    dec = decide_stock(SPEC, budgets, Buckets((4096, 8192, 16384)), COST, NO_OVERHEAD)
    assert dec.stock.all()
    assert np.allclose(dec.sparse_s, dec.stock_s)          # same work: sparse can never win by a margin


def test_one_cheap_streaming_head_among_dense_ones():
    layer = [HeadBudget.streaming(64, 64)] + [DENSE] * 8
    n = 16384
    sp, st = layer_times("prefill", layer, n, SPEC, COST, NO_OVERHEAD)
    ratio = sp / st
    assert 8 / 9 < ratio < 0.902   # it saves (almost) one head in nine: the dense tail's row is 1/256 of a head
    assert choose_stock(sp, st, ratio + 1e-9) is False and choose_stock(sp, st, ratio - 1e-9) is True
    assert choose_stock(sp, st, 0.95) is False             # sparse pays without the per-layer overhead ...
    sp1, st1 = layer_times("prefill", layer, n, SPEC, COST, StockOptions())
    assert st1 == st and sp1 == sp + 1e-3 and choose_stock(sp1, st1)   # ... not with the 1 ms host overhead
    # decode: its KV group has dense heads, so the group kernel reads every page anyway
    sp, st = layer_times("decode", layer, n, SPEC, COST, NO_OVERHEAD)
    assert sp == st and choose_stock(sp, st)


def test_small_heads_decode_stock_where_a_llama8b_shape_decodes_sparse():
    """Decode reads little KV with 3 KV heads of 64: the sparse path's fixed cost (90 us per layer, the served
    H200 fit) never pays up to 256K; 8 KV heads of 128 pay from the bucket judged at 128K."""
    layer = [HeadBudget.streaming(64, 256)] * 9
    edges = (32768, 65536, 131072, 262144)
    dec = decide_stock(SPEC, [layer] * 4, Buckets(edges), COST, StockOptions())
    assert dec.stock[1].all()                                          # decode: stock everywhere
    assert not dec.stock[0, 1:].any()                                  # prefill pays at 32K+
    llama = decide_stock(LLAMA8B, [[HeadBudget.streaming(64, 256)] * 32] * 4, Buckets(edges), COST)
    assert llama.stock[1, :3].all() and not llama.stock[1, 3].any()   # judged at 65,537 stock, 131,073 sparse
    # the earlier fit (18 us, 3 TB/s) had it sparse from the 64K bucket (judged at 32,769)
    old = decide_stock(LLAMA8B, [[HeadBudget.streaming(64, 256)] * 32] * 4, Buckets(edges), COST,
                       StockOptions(decode_layer_overhead_s=18e-6, hbm_bytes_per_s=3.0e12))
    assert old.stock[1, 0].all() and not old.stock[1, 1:].any()


def test_sparse_layer_pays_at_long_lengths_only():
    spec = LLAMA8B
    layer = [HeadBudget.streaming(64, 256)] * 32
    buckets = Buckets((4096, 8192, 16384, 32768, 65536, 131072, 262144))
    dec = decide_stock(spec, [layer] * 4, buckets, COST, StockOptions())
    assert dec.lengths == [1, 4097, 8193, 16385, 32769, 65537, 131073]   # judged at each bucket's shortest length
    for p in range(len(PHASES)):
        assert dec.stock[p, 0].all()                         # one token: nothing to win
        assert not dec.stock[p, -1].any()                    # 128K+ tokens, 5 of 2048 blocks: sparse
        # a layer never goes back to stock as buckets get longer
        first_sparse = [int(np.argmin(dec.stock[p, :, li])) for li in range(4)]
        for li, b in enumerate(first_sparse):
            assert not dec.stock[p, b:, li].any()
    assert dec.stock[0, 1].all()                            # prefill at 4K: the 1 ms overhead does not pay
    upper = decide_stock(spec, [layer] * 4, buckets, COST, StockOptions(at="upper"))
    assert upper.lengths == list(buckets.edges) and upper.stock.sum() <= dec.stock.sum()
    off = decide_stock(spec, [layer] * 4, buckets, COST, StockOptions(enabled=False))
    assert not off.stock.any() and np.array_equal(off.sparse_s, dec.sparse_s)


def test_decode_model_bytes():
    """Decode: stock reads every page of every KV head; a group of streaming heads reads sink + window; a
    streaming head below the decode floor reads DECODE_MIN_PAGES Quest pages (the server's decode rule)."""
    layer = [HeadBudget.streaming(64, 1024)] * 9
    o = NO_OVERHEAD
    sp, st = layer_times("decode", layer, 64 * 100, SPEC, COST, o)
    per_page = 64 * 64 * 2 * 2 / o.hbm_bytes_per_s
    assert st == pytest.approx(o.decode_base_s + 3 * 100 * per_page)
    assert sp == pytest.approx(o.decode_base_s + 3 * 18 * per_page)      # 1 sink + 16 + 1 window pages per group
    both = StockOptions(prefill_layer_overhead_s=0.0, decode_layer_overhead_s=5e-6, decode_batch=4)
    sp4, st4 = layer_times("decode", layer, 64 * 100, SPEC, COST, both)
    assert st4 == pytest.approx(o.decode_base_s + 4 * 3 * 100 * per_page)
    assert sp4 == pytest.approx(o.decode_base_s + 5e-6 + 4 * 3 * 18 * per_page)
    short = [HeadBudget.streaming(64, 128)] * 9                           # 1 + 2 + 1 pages < the floor
    sp_short, _ = layer_times("decode", short, 64 * 100, SPEC, COST, o)
    assert sp_short == pytest.approx(o.decode_base_s + 3 * 3 * DECODE_MIN_PAGES * per_page)
    sp_tiny, _ = layer_times("decode", short, 64 * 20, SPEC, COST, o)     # 3 x 16 pages capped at the 20 there are
    assert sp_tiny == pytest.approx(o.decode_base_s + 3 * 20 * per_page)


# ---- the plan file ---------------------------------------------------------------------------------------

def _plan(stock=True) -> Plan:
    mix = [DENSE, HeadBudget.streaming(64, 512), HeadBudget.topk(0.1)]
    budgets = [[mix[(li + h) % 3] for h in range(9)] for li in range(4)]
    buckets = Buckets((4096, 8192, 16384))
    pl = solve_plan_placements(SPEC, budgets, buckets, [2], COST, "contiguous")
    st = decide_stock(SPEC, budgets, buckets, COST).stock if stock else None
    return Plan(SPEC, buckets, budgets, pl, {"stock_decision": StockOptions().to_dict()}, st)


def test_plan_round_trip_with_the_stock_array(tmp_path):
    plan = _plan()
    plan.stock[1, 2, 3] = not plan.stock[1, 2, 3]            # not only what the decision gives
    save_plan(plan, tmp_path / "p")
    back = load_plan(tmp_path / "p", CFG, tp=2)
    assert back.stock.dtype == np.bool_ and np.array_equal(back.stock, plan.stock)
    for p, phase in enumerate(PHASES):
        for b in range(3):
            assert back.stock_layers(phase, b) == frozenset(np.flatnonzero(plan.stock[p, b]).tolist())


def test_plan_without_the_array_loads_as_all_sparse(tmp_path):
    save_plan(_plan(stock=False), tmp_path / "old")
    import json
    doc = json.loads((tmp_path / "old" / "plan.json").read_text())
    assert "stock" not in doc and doc["schema_version"] == 1   # a plan as written before the array
    back = load_plan(tmp_path / "old", CFG)
    assert back.stock is None and all(not back.stock_layers(ph, b) for ph in PHASES for b in range(3))


def test_save_refuses_a_malformed_stock_array(tmp_path):
    plan = _plan()
    plan.stock = plan.stock.astype(np.uint8)
    with pytest.raises(ValueError, match="bool"):
        save_plan(plan, tmp_path / "bad")
    plan.stock = np.zeros((2, 3, 5), dtype=bool)
    with pytest.raises(ValueError, match=r"\[2, 3, 4\]"):
        save_plan(plan, tmp_path / "bad")


def test_sparse_vs_stock_table():
    plan = _plan()
    rows = sparse_vs_stock(plan)
    assert [(r["bucket"], r["phase"]) for r in rows] == [(b, ph) for b in range(3) for ph in PHASES]
    for r in rows:
        assert r["stock_layers"] == sorted(plan.stock_layers(r["phase"], r["bucket"]))
        assert r["n_stock"] == len(r["stock_layers"]) and r["upper"] == plan.buckets.upper(r["bucket"])
        # the decision takes the faster path of each layer, margin aside: served never slower than stock / 0.95
        assert r["served_s"] <= max(r["sparse_s"], r["stock_s"]) + 1e-12
        assert r["served_s"] <= r["stock_s"] + 1e-12
    none = sparse_vs_stock(_plan(stock=False))
    assert all(r["n_stock"] == 0 and r["served_s"] == pytest.approx(r["sparse_s"]) for r in none)


def test_place_budgets_writes_the_decision_and_no_stock_fallback_disables_it():
    from sglang_shplb.planning.place import place_budgets
    plan = _plan()
    bf = types.SimpleNamespace(spec=SPEC, budgets=plan.budgets, mode="tau", tau=0.95, ref_len=2048,
                               model={"checkpoint": None}, stability=None)
    on = place_budgets(bf, plan.buckets, [2], COST, "contiguous")
    assert np.array_equal(on.stock, decide_stock(SPEC, plan.budgets, plan.buckets, COST).stock)
    assert on.meta["stock_decision"]["margin"] == 0.95 and on.stock.any()
    off = place_budgets(bf, plan.buckets, [2], COST, "contiguous", stock_options=StockOptions(enabled=False))
    assert off.stock is not None and not off.stock.any() and off.meta["stock_decision"]["enabled"] is False
    # sparse prefill only: decode stock everywhere, prefill as the times say (here: nothing, fallback off)
    pre = place_budgets(bf, plan.buckets, [2], COST, "contiguous",
                        stock_options=StockOptions(enabled=False, stock_phases=("decode",)))
    assert pre.stock[PHASES.index("decode")].all() and not pre.stock[PHASES.index("prefill")].any()
    again = StockOptions.from_dict(json.loads(json.dumps(pre.meta["stock_decision"])))
    assert again.stock_phases == ("decode",)
    with pytest.raises(ValueError, match="stock phases"):
        StockOptions(stock_phases=("verify",))


def test_cli_flags():
    from sglang_shplb.cli import _stock_opts, build_parser
    a = build_parser().parse_args(["place", "--sparse-margin", "0.8", "--no-stock-fallback",
                                   "--decode-layer-overhead-us", "7"])
    o = _stock_opts(a)
    assert (o.margin, o.enabled, o.decode_layer_overhead_s, o.stock_phases) == (0.8, False, 7e-6, ())
    assert _stock_opts(build_parser().parse_args(["place", "--stock-decode"])).stock_phases == ("decode",)
    o = _stock_opts(build_parser().parse_args(["plan"]))
    d = StockOptions()
    assert (o.margin, o.enabled) == (0.95, True)
    assert o.prefill_layer_overhead_s == pytest.approx(d.prefill_layer_overhead_s)
    assert o.decode_layer_overhead_s == pytest.approx(d.decode_layer_overhead_s)
    assert o.hbm_bytes_per_s == pytest.approx(d.hbm_bytes_per_s)
    with pytest.raises(SystemExit, match="margin"):
        _stock_opts(build_parser().parse_args(["place", "--sparse-margin", "1.5"]))
    assert o.decode_batch == 1 and _stock_opts(build_parser().parse_args(["place", "--decode-batch", "4"])).decode_batch == 4
    with pytest.raises(SystemExit, match="decode_batch"):
        _stock_opts(build_parser().parse_args(["place", "--decode-batch", "0"]))


# ---- the backend on the CPU reference path ---------------------------------------------------------------

HQ, HKV, D, NL = 9, 3, 64, 4
SCALE = 1 / math.sqrt(D)


class Pool:
    def __init__(self, size=2048, reqs=4, ctx=1024):
        g = torch.Generator().manual_seed(0)
        self.k = [torch.randn(size, HKV, D, generator=g) for _ in range(NL)]
        self.v = [torch.randn(size, HKV, D, generator=g) for _ in range(NL)]
        self.req_to_token = torch.zeros(reqs, ctx, dtype=torch.int32)

    def get_key_buffer(self, li):
        return self.k[li]

    def get_value_buffer(self, li):
        return self.v[li]

    def set_kv_buffer(self, layer, loc, k, v):
        self.k[layer.layer_id][loc.long()] = k.reshape(-1, HKV, D)
        self.v[layer.layer_id][loc.long()] = v.reshape(-1, HKV, D)


class FakeStock:
    """A stock backend: writes K/V, then dense causal attention over the pool, every head."""

    calls = 0

    def __init__(self, runner):
        self.pool, self.r2t = runner.token_to_kv_pool, runner.req_to_token_pool.req_to_token
        self.forward_metadata = None

    def init_forward_metadata(self, fb):
        pass

    def _attend(self, q, layer, fb, q_lens):
        FakeStock.calls += 1
        q3 = q.reshape(-1, HQ, D)
        o = torch.empty_like(q3)
        t = 0
        kb, vb = self.pool.get_key_buffer(layer.layer_id), self.pool.get_value_buffer(layer.layer_id)
        for r, n, m in zip(fb.req_pool_indices.tolist(), fb.seq_lens.tolist(), q_lens):
            loc = self.r2t[r, :n].long()
            k = kb[loc].repeat_interleave(HQ // HKV, 1).transpose(0, 1)
            v = vb[loc].repeat_interleave(HQ // HKV, 1).transpose(0, 1)
            qq = q3[t:t + m].transpose(0, 1)
            mask = torch.arange(n)[None, :] <= torch.arange(n - m, n)[:, None]
            o[t:t + m] = torch.softmax((qq @ k.transpose(1, 2)) * SCALE + torch.where(mask, 0.0, -math.inf), -1) \
                .matmul(v).transpose(0, 1)
            t += m
        return o.reshape(q.shape[0], -1)

    def forward_extend(self, q, k, v, layer, fb, save_kv_cache=True, **kw):
        if save_kv_cache:
            self.pool.set_kv_buffer(layer, fb.out_cache_loc, k, v)
        return self._attend(q, layer, fb, fb.extend_seq_lens_cpu)

    def forward_decode(self, q, k, v, layer, fb, save_kv_cache=True, **kw):
        if save_kv_cache:
            self.pool.set_kv_buffer(layer, fb.out_cache_loc, k, v)
        return self._attend(q, layer, fb, [1] * len(fb.seq_lens))


def _backend(monkeypatch, plan, pp_size=1):
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
    from sglang_shplb.serving.backend import ShplbAttnBackend
    from sglang_shplb.serving.config import ServingConfig
    monkeypatch.setitem(ATTENTION_BACKENDS, "fake_stock", FakeStock)
    pool = Pool()
    runner = types.SimpleNamespace(
        device="cpu", req_to_token_pool=types.SimpleNamespace(req_to_token=pool.req_to_token), token_to_kv_pool=pool,
        server_args=types.SimpleNamespace(), ps=types.SimpleNamespace(tp_size=1, tp_rank=0, pp_size=pp_size),
        model_config=types.SimpleNamespace(context_len=1024, model_path=None))
    cfg = ServingConfig(plan_path=None, dense_fallback=False, dense_backend=None, group_prefill_by_bucket=False,
                        bucket_log_every=0)
    return ShplbAttnBackend(runner, cfg, plan=plan, dense_backend="fake_stock"), pool


def _mode(extend):
    return types.SimpleNamespace(is_extend=lambda: extend, is_decode=lambda: not extend)


def _layer(li):
    return types.SimpleNamespace(layer_id=li, tp_q_head_num=HQ, tp_k_head_num=HKV, qk_head_dim=D, v_head_dim=D,
                                 scaling=SCALE, is_cross_attention=False)


def _run(monkeypatch, plan, ends=None, pp_size=1):
    """A prefill of two requests (300 and 700 tokens) then one decode step, every layer; the outputs. ``ends``:
    which requests' extends end their prompt, kept as the scheduler hook keeps them (none: nothing kept)."""
    be, pool = _backend(monkeypatch, plan, pp_size)
    lens = [300, 700]
    slots = torch.randperm(2000, generator=torch.Generator().manual_seed(1))[:sum(lens) + 2] + 1
    pool.req_to_token[0, :301] = slots[:301].int()
    pool.req_to_token[1, :701] = slots[301:1002].int()
    g = torch.Generator().manual_seed(2)
    outs = []
    T = sum(lens)
    fb = types.SimpleNamespace(forward_mode=_mode(True), extend_seq_lens_cpu=lens, seq_lens_cpu=torch.tensor(lens),
                               seq_lens=torch.tensor(lens), req_pool_indices=torch.tensor([0, 1]),
                               extend_seq_lens=torch.tensor(lens), out_cache_loc=torch.cat([slots[:300], slots[301:1001]]),
                               shplb_bucket=1)
    bh._STATE["prompt_ends"] = None if ends is None else (tuple(lens), ends)   # as the hook keeps them
    be.init_forward_metadata(fb)
    for li in range(NL):
        q, k, v = (torch.randn(T, h * D, generator=g) for h in (HQ, HKV, HKV))
        outs.append(be.forward_extend(q, k, v, _layer(li), fb).clone())
    dl = [301, 701]
    fb = types.SimpleNamespace(forward_mode=_mode(False), seq_lens_cpu=torch.tensor(dl), seq_lens=torch.tensor(dl),
                               req_pool_indices=torch.tensor([0, 1]), out_cache_loc=torch.stack([slots[300], slots[1001]]),
                               shplb_bucket=1)
    be.init_forward_metadata(fb)
    for li in range(NL):
        q, k, v = (torch.randn(2, h * D, generator=g) for h in (HQ, HKV, HKV))
        outs.append(be.forward_decode(q, k, v, _layer(li), fb).clone())
    return outs, be.stats


def _sparse_plan():
    budgets = [[DENSE] * 3 + [HeadBudget.streaming(64, 64)] * 3 + [HeadBudget.topk(0.2, min_blocks=1)] * 3] * NL
    buckets = Buckets((256, 512, 1024))
    return Plan(SPEC, buckets, budgets, solve_plan_placements(SPEC, budgets, buckets, [1], COST, "contiguous"))


def test_backend_all_stock_plan_gives_exactly_the_stock_output(monkeypatch):
    stock_plan = _sparse_plan()
    stock_plan.stock = np.ones((2, 3, NL), dtype=bool)
    stock_out, stats = _run(monkeypatch, stock_plan)
    assert stats["extend_layers_stock"] == NL and stats["decode_layers_stock"] == NL
    assert stats["extend_layers_sparse"] == stats["decode_layers_sparse"] == 0
    dense_plan = _sparse_plan()
    dense_plan.budgets = [[DENSE] * HQ] * NL                  # every head dense: the stock backend's output
    want, _ = _run(monkeypatch, dense_plan)
    for a, b in zip(stock_out, want):
        assert torch.equal(a, b)
    sparse_out, stats = _run(monkeypatch, _sparse_plan())     # no stock array: every layer sparse, and it differs
    assert stats["extend_layers_sparse"] == NL and stats["decode_layers_sparse"] == NL
    assert not torch.allclose(sparse_out[0], want[0])


def test_backend_computes_the_dense_tail_where_the_extend_ends_the_prompt(monkeypatch):
    """What the scheduler hook keeps reaches the dense tail: with request 0's extend an earlier chunk of its prompt,
    its last 64 rows keep the sparse heads' sparse output (they differ from the unmarked run's, where every
    request has a tail), and every other row, head and decode output is the unmarked run's; marking both as
    ending their prompt is the unmarked run exactly."""
    plan = _sparse_plan()
    unmarked, _ = _run(monkeypatch, plan)
    both, _ = _run(monkeypatch, plan, ends=(True, True))
    assert all(torch.equal(a, b) for a, b in zip(unmarked, both))
    first_chunk, stats = _run(monkeypatch, plan, ends=(False, True))
    assert stats["extend_mid_prompt"] == 1
    tail = torch.zeros(1000, HQ, dtype=torch.bool)
    tail[300 - 64:300, 3:] = True                                       # request 0's tail rows, sparse heads
    for li in range(NL):
        got, want = first_chunk[li].reshape(1000, HQ, D), unmarked[li].reshape(1000, HQ, D)
        assert torch.equal(got[~tail], want[~tail])
        assert not torch.allclose(got[tail], want[tail], atol=1e-3)
    assert all(torch.equal(a, b) for a, b in zip(first_chunk[NL:], unmarked[NL:]))   # decode
    # pipeline parallelism builds micro-batches ahead of their forwards: what the hook kept is not taken there
    staged, stats = _run(monkeypatch, plan, ends=(False, True), pp_size=2)
    assert all(torch.equal(a, b) for a, b in zip(staged, unmarked)) and stats["extend_mid_prompt"] == 0
    bh._STATE["prompt_ends"] = None


def test_backend_follows_the_plan_per_phase_bucket_and_layer(monkeypatch):
    plan = _sparse_plan()
    plan.stock = np.zeros((2, 3, NL), dtype=bool)
    plan.stock[0, 1, [0, 2]] = True                             # prefill, bucket 1 (the batches' bucket): layers 0, 2
    plan.stock[1, 1, 3] = True                                  # decode, bucket 1: layer 3
    plan.stock[1, 0, 1] = True                                  # another bucket: not this batch's
    plan.stock[1, :, 2] = True                                  # decode, every bucket: also stock in CUDA graphs
    out, stats = _run(monkeypatch, plan)
    assert stats["extend_layers_stock"] == 2 and stats["extend_layers_sparse"] == 2
    assert stats["decode_layers_stock"] == 2 and stats["decode_layers_sparse"] == 2
    all_sparse, _ = _run(monkeypatch, _sparse_plan())
    all_stock_plan = _sparse_plan()
    all_stock_plan.stock = np.ones((2, 3, NL), dtype=bool)
    all_stock, _ = _run(monkeypatch, all_stock_plan)
    # each layer's output is the stock one where marked, the sparse one elsewhere (a layer's K/V does not
    # depend on the path, so the layers are independent here)
    pick = [1 - int(plan.stock[0, 1, li]) for li in range(NL)] + [1 - int(plan.stock[1, 1, li]) for li in range(NL)]
    for i, p in enumerate(pick):
        assert torch.equal(out[i], (all_sparse if p else all_stock)[i]), i
    be, _ = _backend(monkeypatch, plan)
    assert be.graph_decode_stock == frozenset({2})
    assert be.summarized_layers == frozenset({0, 1, 3})


def test_a_synthetic_plan_can_carry_the_stock_decision(tmp_path):
    """``synthetic_plan(stock=...)`` marks what ``decide_stock`` marks with the analytic cost model (the serving
    bench's Llama-3-8B plan as ``place`` would ship it); without it no layer is stock."""
    from sglang_shplb.planning.synthetic_plans import serving_bench_budget, synthetic_plan
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 2,
           "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_size": 4096, "head_dim": 128,
           "max_position_embeddings": 131072, "vocab_size": 100}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    budget = serving_bench_budget()
    marked = load_plan(synthetic_plan(tmp_path, budget, tmp_path / "a", stock=StockOptions()).parent)
    plain = load_plan(synthetic_plan(tmp_path, budget, tmp_path / "b").parent)
    spec = ModelSpec.from_config(tmp_path)
    want = decide_stock(spec, marked.budgets, marked.buckets, CostModel.analytic(), StockOptions()).stock
    assert np.array_equal(marked.stock, want) and want.any() and not want.all()
    assert StockOptions.from_dict(marked.meta["stock_decision"]) == StockOptions()
    assert plain.stock is None



def test_one_set_of_marks_holds_at_every_tp_size_the_plan_is_placed_for(tmp_path):
    """At TP 8 the mixed Llama-3-8B plan's slowest rank holds the dense KV group, so even without fixed costs
    neither phase gains there (the rank's sparse time equals its stock time): a plan placed for TP 1 and 8
    runs those layers stock where TP 1 alone runs them sparse; the report recomputes the same marks."""
    from sglang_shplb.planning.stock_decision import rank_times
    from sglang_shplb.planning.synthetic_plans import serving_bench_budget, synthetic_plan
    cfg = dict(CFG, num_attention_heads=32, num_key_value_heads=8, head_dim=128, hidden_size=4096,
               num_hidden_layers=2, max_position_embeddings=131072)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    opts = StockOptions(prefill_layer_overhead_s=0.0, decode_layer_overhead_s=0.0, decode_batch=4)
    tp1 = load_plan(synthetic_plan(tmp_path, serving_bench_budget(), tmp_path / "a", stock=opts).parent)
    both = load_plan(synthetic_plan(tmp_path, serving_bench_budget(), tmp_path / "b", stock=opts,
                                    tp_sizes=(1, 8)).parent)
    last = len(tp1.buckets) - 1
    for phase in PHASES:
        assert tp1.stock_layers(phase, last) == frozenset(), phase          # sparse pays at TP 1, 128K
        assert both.stock_layers(phase, last) == frozenset({0, 1}), phase   # not on the dense group's rank
    assert (both.stock >= tp1.stock).all()                                   # TP 8 only adds marks
    rows = sparse_vs_stock(both, COST, opts)
    assert [r["n_stock"] for r in rows] == [int(both.stock[PHASES.index(r["phase"]), r["bucket"]].sum()) for r in rows]
    from sglang_shplb.planning.place import decide_stock_at_tps
    assert np.array_equal(decide_stock_at_tps(both.model, both.budgets, both.buckets, COST, opts,
                                              both.placements).stock, both.stock)
    assert not np.array_equal(decide_stock(both.model, both.budgets, both.buckets, COST, opts).stock, both.stock)
    # decode at TP 8, 128K: rank 0 reads every page of its (dense) KV group, the stock time per rank exactly
    layer = both.budgets[0]
    sp, st = rank_times("decode", layer, 131072, both.model, COST, 8, opts)
    assert sp == pytest.approx(st)
    sp1, st1 = rank_times("decode", layer, 131072, both.model, COST, 1, opts)
    assert (sp1, st1) == layer_times("decode", layer, 131072, both.model, COST, opts) and sp1 < 0.5 * st1
    with pytest.raises(ValueError, match="per-rank loads"):
        rank_times("prefill", layer, 131072, both.model, COST, 8, opts)


def test_stock_everywhere_is_the_layers_stock_in_every_bucket():
    from sglang_shplb.core.plan import always_stock
    assert always_stock([{0, 1, 2}, frozenset({1, 2}), [2, 1]]) == {1, 2}
    assert always_stock([]) == frozenset()
    buckets = Buckets((4096, 8192))
    stock = np.zeros((len(PHASES), 2, SPEC.num_layers), dtype=bool)
    stock[1, :, 3] = True
    stock[1, 0, 1] = True
    plan = Plan(SPEC, buckets, [[DENSE] * SPEC.num_heads] * SPEC.num_layers, {}, {}, stock)
    assert plan.stock_everywhere("decode") == {3} and plan.stock_everywhere("prefill") == frozenset()
    assert Plan(SPEC, buckets, plan.budgets, {}, {}, None).stock_everywhere("decode") == frozenset()


def test_all_stock_and_the_launcher_serving_the_stock_backend_outright():
    """Every layer stock in both phases in every bucket the server's context reaches: the launcher serves the stock
    backend itself (``stock_outright``); one layer, one phase or one reachable bucket short of it: ``shplb``."""
    from sglang_shplb.serving.backend import stock_outright
    buckets = Buckets((4096, 8192, 16384))
    stock = np.ones((len(PHASES), 3, SPEC.num_layers), dtype=bool)
    stock[0, 2, 1] = False                          # layer 1 prefills sparse in the 16K bucket only
    plan = Plan(SPEC, buckets, [[DENSE] * SPEC.num_heads] * SPEC.num_layers, {}, {}, stock)
    assert plan.all_stock(8192) and plan.all_stock(4096)
    assert not plan.all_stock(16384) and not plan.all_stock()
    ctx = lambda n, device="cuda": types.SimpleNamespace(context_length=n, device=device)   # noqa: E731
    assert stock_outright(plan, ctx(8192), None) == "flashinfer"
    assert stock_outright(plan, ctx(8192, "cpu"), None) == "torch_native"
    assert stock_outright(plan, ctx(8192), "triton") == "triton"
    assert stock_outright(plan, ctx(8192), None, always=True) is None            # --shplb-always-backend
    assert stock_outright(plan, ctx(16384), None) is None
    # no --context-length: the model's (8192 here, the plan's model)
    assert stock_outright(plan, ctx(None), None) == "flashinfer"
    stock[1, 0, 3] = False                          # layer 3 decodes sparse in the first bucket
    assert not plan.all_stock(4096) and stock_outright(plan, ctx(8192), None) is None
    assert not Plan(SPEC, buckets, plan.budgets, {}, {}, None).all_stock(4096)   # no stock array: all sparse
    assert stock_outright(None, ctx(8192), None) is None                        # dense fallback: no plan


def test_the_backend_factory_and_the_bucket_hook_serve_an_all_stock_plan_outright(monkeypatch):
    """A server SGLang's own launcher started with ``--attention-backend shplb`` and ``SHPLB_PLAN`` (the plugin):
    the backend factory builds the stock backend itself where our launcher would serve it outright, and the
    scheduler's bucket hook stays off there; past the plan's stock context, or with ``SHPLB_ALWAYS_BACKEND=1``,
    both are ours (the same rule, ``stock_outright``)."""
    from sglang.srt.layers.attention import attention_registry
    from sglang_shplb.scheduler import bucket_hook
    from sglang_shplb.serving import backend, plugin
    from sglang_shplb.serving.config import ENV_ALWAYS, ENV_PLAN
    stock = np.ones((len(PHASES), 3, SPEC.num_layers), dtype=bool)
    stock[0, 2, 1] = False                          # layer 1 prefills sparse in the 16K bucket only
    plan = Plan(SPEC, Buckets((4096, 8192, 16384)), [[DENSE] * SPEC.num_heads] * SPEC.num_layers, {}, {}, stock)
    monkeypatch.setenv(ENV_PLAN, "plan-dir")
    monkeypatch.setattr(backend, "load_runner_plan", lambda cfg, model_path, tp_size: plan)
    monkeypatch.setattr(plugin, "_configured_plan", lambda: plan)
    monkeypatch.setitem(attention_registry.ATTENTION_BACKENDS, "torch_native", lambda runner: "torch_native")
    monkeypatch.setattr(backend, "ShplbAttnBackend", lambda runner, cfg, plan: "shplb")
    hooked = []
    monkeypatch.setattr(bucket_hook, "configure_buckets", lambda buckets, *a, **k: hooked.append(buckets) or
                        types.SimpleNamespace(buckets=buckets, _counter=None))

    def serve(ctx: int) -> tuple[str, bool]:
        args = types.SimpleNamespace(context_length=ctx, device="cpu", attention_backend="shplb")
        runner = types.SimpleNamespace(model_config=types.SimpleNamespace(model_path="m"),
                                       ps=types.SimpleNamespace(tp_size=1), server_args=args)
        n = len(hooked)
        built = backend.create_shplb_backend(runner)
        plugin.after_scheduler_init(None, types.SimpleNamespace(server_args=args))
        return built, len(hooked) > n

    monkeypatch.delenv(ENV_ALWAYS, raising=False)
    assert serve(8192) == ("torch_native", False)
    assert serve(16384) == ("shplb", True) and hooked[-1] is plan.buckets
    monkeypatch.setenv(ENV_ALWAYS, "1")
    assert serve(8192) == ("shplb", True)
