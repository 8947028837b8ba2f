"""The solver's objective with the move terms of a calibration (unit overhead, gather bandwidth, moved-piece
efficiency): priced the same by the search and by :func:`layer_times`, unchanged without a calibration,
and a costlier move makes the solver move less."""
import numpy as np
import pytest

from conftest import random_pieces

from sglang_shplb.core.exchange import exchange_elems
from sglang_shplb.core.head_map import layer_work
from sglang_shplb.core.model_spec import ModelSpec
from sglang_shplb.core.patterns import HeadBudget
from sglang_shplb.planning.cost_model import CostModel, CostProfile, Transfer
from sglang_shplb.planning.place import layer_inputs, solve_layer
from sglang_shplb.planning.solvers import LayerProblem, layer_times
from sglang_shplb.planning.solvers.home import _Heads, _placement, _Search
from sglang_shplb.planning.solvers.objective import rank_time
from sglang_shplb.planning.synthetic_plans import serving_bench_budget

N = 65536


def mixed_layer(hq=32, hkv=8, n=N):
    """The serving benchmark's mixed plan (KV group 0 dense) on a Llama shape: costs, profiles."""
    spec = ModelSpec("LlamaForCausalLM", 1, hq, hkv, 128, 131072, "t")
    f = serving_bench_budget()
    bud = [f(0, h, spec) for h in range(hq)]
    costs, prof = layer_inputs(spec, bud, CostModel.analytic(), n)
    return costs, prof, hq // hkv


def tr(unit=50e-6, gather=None, eff=1.0, n=N):
    return Transfer(n, 128, 370e9, unit, 2, gather, eff)


def test_defaults_are_the_documented_objective():
    t = Transfer(N, 128)
    assert (t.gather_bytes_per_s, t.piece_efficiency, t.unit_overhead_s) == (None, 1.0, 50e-6)
    cm = CostModel.analytic()
    assert cm.transfer(N, 128) == t
    args = (1e-3, 4e-4, 3, 100, 4000, 50, 2000)
    sent_in, back_in = exchange_elems(100, 4000, 128)
    got_in, sent_out = exchange_elems(50, 2000, 128)
    old = 1e-3 + 3 * 50e-6 + max(0.0, t.seconds(max(sent_in, got_in)) - 4e-4) + t.seconds(max(back_in, sent_out))
    assert rank_time(t, *args) == pytest.approx(old, rel=1e-15)
    assert rank_time(t, *args, unit_compute=5e-4, staged_kv=9000) == pytest.approx(old, rel=1e-15)
    # the calibrated terms add exactly: piece / eff, gathered bytes / gbw
    c = Transfer(N, 128, 370e9, 50e-6, 2, 100e9, 0.5)
    gathered = (2 * 9000 + 100) * 128 * 2
    assert rank_time(c, *args, unit_compute=5e-4, staged_kv=9000) == pytest.approx(old + 5e-4 + gathered / 100e9)


@pytest.mark.parametrize("tp", [2, 3, 4, 8])
def test_search_prices_like_the_objective_with_move_terms(tp):
    """The search's incremental sums (unit compute, gathered K/V incl. local bundles) are layer_times'."""
    costs, prof, gs = mixed_layer()
    rng = np.random.default_rng(tp)
    p = LayerProblem(costs, gs, tp, 5e-6, profiles=prof, transfer=tr(300e-6, 150e9, 0.6))
    for _ in range(6):
        segs = random_pieces(rng, tp)
        search = _Search(p, _Heads(p), segs)
        want = layer_times(_placement(segs, tp), p).total.tolist()
        assert search.T == pytest.approx(want, rel=1e-12, abs=1e-15)
        # and after applying moves
        for h in rng.integers(0, 32, 3).tolist():
            seg = search.segs[h][0]
            res = search.evaluate({h: search._replace(h, seg, [(seg[0], seg[1], int(rng.integers(tp)))])})
            if res is not None:
                search.apply(res[3])
        assert search.T == pytest.approx(layer_times(_placement(search.segs, tp), p).total.tolist(), rel=1e-12,
                                         abs=1e-15)


@pytest.mark.parametrize("tp", [4, 8])
def test_larger_unit_overhead_moves_fewer_units(tp):
    costs, prof, gs = mixed_layer()
    units = []
    for u in (0.0, 50e-6, 500e-6, 2e-3, 50e-3):
        r = solve_layer(costs, gs, tp, profiles=prof, transfer=tr(u), piece_overhead=5e-6, max_replicated_kv=tp - 1)
        units.append(int(r.times.units.sum()))
    assert units == sorted(units, reverse=True), units
    assert units[0] > units[2] and units[-1] == 0, units


@pytest.mark.parametrize("tp", [4, 8])
def test_slower_gathers_and_pieces_move_less(tp):
    costs, prof, gs = mixed_layer()
    kw = dict(profiles=prof, piece_overhead=5e-6, max_replicated_kv=tp - 1)
    moved = [solve_layer(costs, gs, tp, transfer=tr(50e-6, g), **kw).times.moved_bytes for g in (None, 1e12, 50e9, 5e9)]
    assert moved[0] >= moved[-1] and moved[-1] < moved[0], moved
    comp = []
    for eff in (1.0, 0.7, 0.4, 0.1):
        r = solve_layer(costs, gs, tp, transfer=tr(50e-6, None, eff), **kw)
        w = layer_work(r.placement, 32, 8, tp)
        comp.append(sum(costs[u.head] * (u.end - u.start) for u in w.units))
    assert comp[-1] < comp[0], comp
    # never worse than home under any of these prices
    for t in (tr(500e-6, 50e9, 0.5), tr(0.0, 1e9, 0.2)):
        s = solve_layer(costs, gs, tp, transfer=t, **kw)
        home = solve_layer(costs, gs, tp, "contiguous", transfer=t, **kw)
        assert s.slowest <= home.slowest * (1 + 1e-12)


def test_cost_model_round_trips_move_terms():
    cm = CostModel.analytic(unit_overhead_s=400e-6, gather_bytes_per_s=2e11, piece_efficiency=0.8)
    back = CostModel.from_dict(cm.to_dict())
    assert back.transfer(N, 128) == cm.transfer(N, 128) == Transfer(N, 128, 370e9, 400e-6, 2, 2e11, 0.8)
    with pytest.raises(ValueError):
        CostModel.analytic(piece_efficiency=0.0)
    with pytest.raises(ValueError):
        CostModel.analytic(gather_bytes_per_s=-1.0)
    # a plan written before the move terms reads with the defaults
    d = cm.to_dict()
    for k in ("gather_bytes_per_s", "piece_efficiency", "move_calibration"):
        d.pop(k)
    old = CostModel.from_dict(d).transfer(N, 128)
    assert (old.gather_bytes_per_s, old.piece_efficiency) == (None, 1.0)
    assert CostProfile.of(HeadBudget.dense(), 128).nb == 2


def test_the_wider_search_is_kept_where_it_wins_and_never_costs(monkeypatch):
    """``shplb`` keeps the best of its search widths: on the 70B shape's mixed layer at 32K, TP 4, under the
    H100 move calibration of round 13, the width-4 search finds a placement 17 % faster than width 2's; the
    pair is never worse than width 2 alone (the serving benchmark's shapes and lengths)."""
    from pathlib import Path

    from sglang_shplb.planning.cost_model import load_cost_model
    from sglang_shplb.planning.solvers import home
    cal = Path(__file__).resolve().parents[1] / "bench/results/head_parallel/move_calibration_round13_h100.json"
    cm = load_cost_model(cal)
    f = serving_bench_budget()

    def slowest(n, tp, hq):
        sp = ModelSpec("LlamaForCausalLM", 1, hq, 8, 128, 131072, "t")
        costs, prof = layer_inputs(sp, [f(0, h, sp) for h in range(hq)], cm, n)
        p = LayerProblem(costs, hq // 8, tp, cm.piece_overhead, profiles=prof, transfer=cm.transfer(n, 128))
        return max(home.solve_shplb(p).times.total)

    assert home.EXACT_PER_KIND[0] == 2 and 4 in home.EXACT_PER_KIND
    cells = [(n, tp, hq) for n in (32768, 65536, 131072) for tp in (2, 4, 8) for hq in (32, 64)]
    both = {c: slowest(*c) for c in cells}
    monkeypatch.setattr(home, "EXACT_PER_KIND", (2,))
    narrow = {c: slowest(*c) for c in cells}
    assert all(both[c] <= narrow[c] * (1 + 1e-12) for c in cells)
    assert both[(32768, 4, 64)] < 0.9 * narrow[(32768, 4, 64)]
