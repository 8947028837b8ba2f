"""Measured placement feedback (planning/rank_feedback.py): the mispricing it charges, the multipliers it
gives, and the closed loop on a device whose true head costs differ from the model's."""
from __future__ import annotations

import json

import numpy as np
import pytest

from sglang_shplb.core.buckets import Buckets
from sglang_shplb.core.model_spec import ModelSpec
from sglang_shplb.core.patterns import HeadBudget
from sglang_shplb.core.placement_types import LayerPlacement, Piece
from sglang_shplb.planning.budget import BudgetsFile
from sglang_shplb.planning.cost_model import CostModel, Transfer
from sglang_shplb.planning.place import layer_inputs, place_budgets, solve_layer
from sglang_shplb.planning.rank_feedback import (ALPHA_RANGE, HeadScalesError, cost_fingerprint, head_cost_scale,
                                                 load_head_scales, rank_mispricing, save_head_scales)
from sglang_shplb.planning.solvers import LayerProblem, layer_times


def test_mispricing_ignores_a_part_common_to_every_rank():
    pred = [3.0, 2.0, 2.5, 1.0]
    assert np.allclose(rank_mispricing(pred, [p + 0.7 for p in pred]), 0.0)
    e = rank_mispricing(pred, [4.0, 2.0, 2.5, 1.0])          # rank 0 slower than predicted by 1.0
    assert e[0] == pytest.approx(0.75) and np.allclose(e[1:], -0.25)
    with pytest.raises(ValueError):
        rank_mispricing(pred, [1.0, 2.0])


def test_scale_charges_each_rank_and_blends_a_cut_head():
    costs = np.array([1.0, 1.0, 1.0, 1.0])
    prob = LayerProblem(costs, 1, 2)
    # rank 0: head 0 whole, head 1's first half; rank 1: head 1's second half, heads 2 and 3
    lp = LayerPlacement([[Piece(0), Piece(1, 0.0, 0.5)], [Piece(1, 0.5, 1.0), Piece(2), Piece(3)]])
    pred = layer_times(lp, prob).total
    measured = pred + np.array([0.3, 0.0]) + 1.0             # rank 0 mispriced by +0.3, both by +1.0
    s = head_cost_scale(lp, prob, measured)
    assert s[0] > 1.0 and s[2] < 1.0 and s[2] == s[3]
    assert s[2] < s[1] < s[0]                                # the cut head: between its two ranks
    # the corrected prediction comes close to the measured spread between the ranks (the cut head's blended
    # multiplier leaves a little)
    before = np.abs(rank_mispricing(pred, measured)).max()
    after = np.abs(rank_mispricing(layer_times(lp, LayerProblem(costs * s, 1, 2)).total, measured)).max()
    assert before == pytest.approx(0.15) and after < before / 3
    with pytest.raises(ValueError):
        head_cost_scale(lp, prob, [1.0])


def test_scale_is_bounded_per_round():
    prob = LayerProblem(np.ones(2), 1, 2)
    lp = LayerPlacement([[Piece(0)], [Piece(1)]])
    s = head_cost_scale(lp, prob, [100.0, 0.0])
    assert s[0] == ALPHA_RANGE[1] and s[1] == ALPHA_RANGE[0]


def test_closed_loop_balances_a_device_the_model_misprices():
    """True head times differ from the model's by up to 1.8x per head (one dense KV group, short heads
    beside it); the open loop's placement is 10 % unbalanced on the device, four rounds of feedback bring it
    within 5 % and within 2 % of what the solver gives knowing the true costs."""
    rng = np.random.default_rng(0)
    hq, g, tp, n = 32, 4, 4, 65536
    model = np.where(np.arange(hq) // g == 0, 4.0, rng.uniform(0.1, 0.6, hq)) * 1e-4
    true = model * rng.uniform(1.0, 1.8, hq)
    tr = Transfer(n, 128, 370e9, 5e-6)

    def device(lp):  # the true times of every rank's attention calls and its whole time, a fixed part added
        t = layer_times(lp, LayerProblem(true, g, tp, transfer=tr))
        return t.busy + 3e-5, t.total + 3e-5

    def solve(costs):
        return solve_layer(costs, g, tp, "shplb", transfer=tr, max_replicated_kv=tp - 1).placement

    lp = solve(model)
    busy, m = device(lp)
    open_loop = m.max() / m.mean()
    scale, best = np.ones(hq), m.max()
    for _ in range(4):
        scale = scale * head_cost_scale(lp, LayerProblem(model * scale, g, tp, transfer=tr), busy)
        lp = solve(model * scale)
        busy, m = device(lp)
        best = min(best, m.max())
    assert open_loop > 1.08
    assert best == m.max() and m.max() / m.mean() <= 1.05
    ideal = layer_times(solve(true), LayerProblem(true, g, tp, transfer=tr)).total.max() + 3e-5
    assert best <= ideal * 1.02


def test_staging_the_model_misprices_is_not_charged_to_heads():
    """A home whose gathers take 3x the predicted time, its kernels as predicted: no head changes price (charging
    the home's whole time would make its heads dearer and ship more from it, round 21)."""
    hq, g, tp, n = 16, 4, 4, 65536
    costs = np.where(np.arange(hq) // g == 0, 4e-4, 0.5e-4)
    tr = Transfer(n, 128, 370e9, 5e-6, gather_bytes_per_s=400e9)
    prob = LayerProblem(costs, g, tp, transfer=tr, max_replicated_kv=tp - 1)
    lp = solve_layer(costs, g, tp, "shplb", transfer=tr, max_replicated_kv=tp - 1).placement
    t = layer_times(lp, prob)
    assert t.moved_units > 0 and np.all(t.busy >= t.compute) and np.any(t.total > t.busy)
    slow_gathers = LayerProblem(costs, g, tp, transfer=Transfer(n, 128, 370e9, 5e-6, gather_bytes_per_s=400e9 / 3))
    assert layer_times(lp, slow_gathers).total.max() > t.total.max()      # the device is slower, by staging
    assert np.allclose(head_cost_scale(lp, prob, layer_times(lp, slow_gathers).busy + 1e-5), 1.0)


# --- the head-scales file: measured multipliers for a served plan (place --head-scales) ---

def _small_plan_inputs():
    spec = ModelSpec("LlamaForCausalLM", 2, 8, 2, 64, 65536, "x")
    rng = np.random.default_rng(3)
    budgets = [[HeadBudget.dense() if h // 4 == 0 else HeadBudget.topk(float(rng.uniform(0.05, 0.3)), 16)
                for h in range(8)] for _ in range(2)]
    return spec, budgets, Buckets((32768, 65536)), CostModel.analytic()


def test_head_scales_round_trip_and_refusals(tmp_path):
    spec, budgets, buckets, cm = _small_plan_inputs()
    scale = [1.0, 1.5, 1.0, 1.0, 0.7, 0.7, 1.0, 1.0]
    path = save_head_scales(tmp_path / "s.json", spec, budgets, cm.to_dict(),
                            [{"tp": 2, "seq_len": 65536, "layer": 1, "scale": scale, "best_round": 1}], device="GPU X")
    hs = load_head_scales(path, spec, budgets, buckets, cm.to_dict())
    assert np.array_equal(hs.scale(2, 1, 1), scale) and hs.measured_cuts(2, 1, 1) is None
    assert hs.scale(2, 0, 1) is None and hs.scale(4, 1, 1) is None and hs.scale(2, 1, 0) is None
    assert hs.summary["entries"] == 1 and hs.summary["device"] == "GPU X" and hs.summary["file"] == "s.json"
    assert hs.summary["measured_cuts"] == 0
    # a cost model read from another path prices alike: accepted
    moved = {**cm.to_dict(), "calibration": {"path": "/elsewhere/t.json"}}
    assert cost_fingerprint(moved) == cost_fingerprint({**cm.to_dict(), "calibration": {"path": "t.json"}})

    def refused(match, *, entries=None, spec_=spec, budgets_=budgets, cost_=cm.to_dict(), doc=None):
        p = tmp_path / "bad.json"
        if doc is not None:
            p.write_text(json.dumps(doc))
        else:
            save_head_scales(p, spec, budgets, cm.to_dict(), entries or [{"tp": 2, "seq_len": 65536, "layer": 0,
                                                                         "scale": scale}])
        with pytest.raises(HeadScalesError, match=match):
            load_head_scales(p, spec_, budgets_, buckets, cost_)

    refused("schema", doc={"schema": "other"})
    refused("shaped", spec_=ModelSpec("LlamaForCausalLM", 2, 8, 4, 64, 65536, "x"))
    other = [list(layer) for layer in budgets]
    other[0][5] = HeadBudget.dense()
    refused("other budgets", budgets_=other)
    refused("another cost model", cost_=CostModel.analytic(link_bytes_per_s=100e9).to_dict())
    refused("not a bucket edge", entries=[{"tp": 2, "seq_len": 40000, "layer": 0, "scale": scale}])
    refused("TP must be", entries=[{"tp": 1, "seq_len": 65536, "layer": 0, "scale": scale}])
    refused("layer in", entries=[{"tp": 2, "seq_len": 65536, "layer": 2, "scale": scale}])
    refused("finite positive", entries=[{"tp": 2, "seq_len": 65536, "layer": 0, "scale": [0.0] + scale[1:]}])
    refused("twice", entries=[{"tp": 2, "seq_len": 65536, "layer": 0, "scale": scale}] * 2)
    whole = [[[h, 0.0, 1.0] for h in range(4)], [[h, 0.0, 1.0] for h in range(4, 8)]]
    refused("not a placement", entries=[{"tp": 2, "seq_len": 65536, "layer": 0, "scale": scale,
                                         "pieces": [whole[0][:3], whole[1]]}])          # head 3 on no rank
    refused("not a placement", entries=[{"tp": 2, "seq_len": 65536, "layer": 0, "scale": scale,
                                         "pieces": whole + [[]]}])                      # three ranks at TP 2
    vs = [list(layer) for layer in budgets]
    vs[0][4] = HeadBudget.vslash(0.05)
    cut4 = [whole[0] + [[4, 0.0, 0.5]], [[4, 0.5, 1.0]] + whole[1][1:]]
    with pytest.raises(HeadScalesError, match=r"cut heads \[4\]"):
        p = save_head_scales(tmp_path / "v.json", spec, vs, cm.to_dict(),
                             [{"tp": 2, "seq_len": 65536, "layer": 0, "scale": scale, "pieces": cut4}])
        load_head_scales(p, spec, vs, buckets, cm.to_dict())
    with pytest.raises(ValueError, match="multipliers for"):
        save_head_scales(tmp_path / "x.json", spec, budgets, cm.to_dict(),
                         [{"tp": 2, "seq_len": 65536, "layer": 0, "scale": scale[:3]}])


def test_place_solves_the_measured_layers_with_their_multipliers(tmp_path):
    """A file that finds one rank's heads 2x dearer than priced changes that layer's placement (and only the
    (TP, bucket, layer) it names) to what the solver gives those scaled costs; the plan records the file."""
    spec, budgets, buckets, cm = _small_plan_inputs()
    bf = BudgetsFile({**spec.to_dict(), "checkpoint": "/m"}, "tau=0.9", 8192, 0.9, budgets,
                     np.ones((2, 8)), np.ones((2, 8)))
    scale = np.array([2.0] * 4 + [1.0] * 4)
    path = save_head_scales(tmp_path / "s.json", spec, budgets, cm.to_dict(),
                            [{"tp": 2, "seq_len": 65536, "layer": 0, "scale": scale.tolist()}])
    hs = load_head_scales(path, spec, budgets, buckets, cm.to_dict())
    plain = place_budgets(bf, buckets, [2], cm, "shplb", {"max_replicated_kv": "auto"})
    fed = place_budgets(bf, buckets, [2], cm, "shplb", {"max_replicated_kv": "auto"}, head_scales=hs)
    assert fed.meta["head_scales"]["entries"] == 1 and plain.meta["head_scales"] is None
    assert fed.placements[2][1].layers[0] != plain.placements[2][1].layers[0]
    assert fed.placements[2][1].layers[1] == plain.placements[2][1].layers[1]
    assert fed.placements[2][0].layers == plain.placements[2][0].layers
    costs, prof = layer_inputs(spec, budgets[0], cm, 65536)
    want = solve_layer(costs * scale, spec.group_size, 2, "shplb", profiles=prof, transfer=cm.transfer(65536, 64),
                       piece_overhead=cm.piece_overhead, max_replicated_kv=1).placement
    assert fed.placements[2][1].layers[0] == want


def _placed_small_plan():
    """:func:`_small_plan_inputs` placed at TP 2 (``max_replicated_kv`` auto) and layer 0's problem at 64K:
    ``(spec, budgets, buckets, cost model, budgets file, options, placed plan, problem)``."""
    spec, budgets, buckets, cm = _small_plan_inputs()
    bf = BudgetsFile({**spec.to_dict(), "checkpoint": "/m"}, "tau=0.9", 8192, 0.9, budgets,
                     np.ones((2, 8)), np.ones((2, 8)))
    opts = {"max_replicated_kv": "auto"}
    costs, prof = layer_inputs(spec, budgets[0], cm, 65536)
    prob = LayerProblem(costs, 4, 2, cm.piece_overhead, profiles=prof, transfer=cm.transfer(65536, 64))
    return spec, budgets, buckets, cm, bf, opts, place_budgets(bf, buckets, [2], cm, "shplb", opts), prob


def test_place_adopts_the_measured_cuts_of_its_own_solve_only(tmp_path):
    """An entry with the cuts a refinement measured best: place keeps the solve's structure and takes those cuts
    (the plan's predicted times are theirs); cuts of another structure, or the same file placed with other solver
    options, are refused, naming the layer."""
    from sglang_shplb.planning.rank_feedback import refine_cuts
    spec, budgets, buckets, cm, bf, opts, plain, prob = _placed_small_plan()
    solved = plain.placements[2][1].layers[0]
    measured = layer_times(solved, prob).busy * np.array([1.0, 1.4])
    refined, _ = refine_cuts(solved, prob, measured, measured)
    assert refined != solved

    def entry(lp, layer=0):
        return {"tp": 2, "seq_len": 65536, "layer": layer, "scale": [1.0] * 8,
                "pieces": [[[p.head, p.start, p.end] for p in g] for g in lp.gpus]}

    path = save_head_scales(tmp_path / "s.json", spec, budgets, cm.to_dict(), [entry(refined)])
    hs = load_head_scales(path, spec, budgets, buckets, cm.to_dict())
    fed = place_budgets(bf, buckets, [2], cm, "shplb", opts, head_scales=hs)
    assert fed.meta["head_scales"]["measured_cuts"] == 1
    from sglang_shplb.planning.report import write_report
    text = (write_report(tmp_path / "report", fed, cm, log=lambda *_: None).parent / "report.txt").read_text()
    assert "1 of them holding the cuts a refinement measured best" in text
    assert fed.placements[2][1].layers[0] == refined
    assert fed.placements[2][1].layers[1] == plain.placements[2][1].layers[1]
    assert fed.placements[2][1].predicted != plain.placements[2][1].predicted
    swapped = LayerPlacement(refined.gpus[::-1])            # the same cuts on the other ranks
    path = save_head_scales(tmp_path / "w.json", spec, budgets, cm.to_dict(), [entry(swapped, layer=1)])
    with pytest.raises(HeadScalesError, match="layer 1: the measured cuts refined another placement"):
        place_budgets(bf, buckets, [2], cm, "shplb", opts, head_scales=load_head_scales(path, spec, budgets, buckets,
                                                                                         cm.to_dict()))
    with pytest.raises(HeadScalesError, match="another placement"):      # no moves allowed: another solve
        place_budgets(bf, buckets, [2], cm, "shplb", {"max_replicated_kv": 0}, head_scales=hs)


def test_bench_measures_a_plan_and_place_solves_with_what_it_wrote(tmp_path):
    """bench/head_parallel.py --plan on the committed SmolLM2 budgets (CPU, Triton interpreter, 256 tokens, TP 3):
    the file it writes is accepted by place with the same calibration, whose placements are the ones the bench
    measured best; another calibration is refused, naming the flag."""
    import subprocess
    import sys
    from pathlib import Path

    from sglang_shplb.core.plan import load_plan

    root = Path(__file__).resolve().parents[1]
    budgets, table = root / "bench/results/default_plan", root / "bench/results/calibration_h100_tiles.json"

    def run(*args, check=True):
        r = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=root)
        assert not check or r.returncode == 0, r.stderr[-3000:]
        return r

    place = ["-m", "sglang_shplb", "place", "--budgets", str(budgets), "--tp", "3", "--buckets", "256"]
    run(*place, "--calibration", str(table), "--out", str(tmp_path / "plan"))
    run("bench/head_parallel.py", "--cpu-smoke", "--plan", str(tmp_path / "plan"), "--ctx", "256", "--tp", "3",
        "--layers", "0,7", "--feedback", "1", "--reps", "1", "--calibration", str(table), "--out", str(tmp_path / "m"))
    scales = tmp_path / "m" / "head_scales_smoke.json"
    doc = json.loads(scales.read_text())
    assert [(e["tp"], e["seq_len"], e["layer"]) for e in doc["entries"]] == [(3, 256, 0), (3, 256, 7)]
    assert all(e["max_abs_diff"] < 1e-4 for e in doc["entries"])            # float32, against one device
    run(*place, "--calibration", str(table), "--head-scales", str(scales), "--out", str(tmp_path / "fed"))
    plan = load_plan(tmp_path / "fed")
    assert plan.meta["head_scales"]["entries"] == 2
    measured = json.loads((tmp_path / "m" / "plan_feedback_smoke.json").read_text())["rows"]
    for row, e in zip(measured, doc["entries"]):
        best = row["rounds"][e["best_round"]]["pieces"]
        got = plan.placements[3][0].layers[row["layer"]]
        assert [[[p.head, p.start, p.end] for p in g] for g in got.gpus] == best
    r = run(*place, "--head-scales", str(scales), "--out", str(tmp_path / "x"), check=False)   # analytic model
    assert r.returncode != 0 and "--head-scales" in r.stderr and "another cost model" in r.stderr
    r = run("bench/head_parallel.py", "--cpu-smoke", "--plan", str(tmp_path / "plan"), "--ctx", "300", "--tp", "2",
            "--feedback", "1", "--out", str(tmp_path / "m2"), check=False)
    assert r.returncode != 0 and "not a bucket edge" in r.stderr and "dividing the 9 query heads" in r.stderr


def test_cost_fingerprint_ignores_unit_conversion_rounding_only():
    cm = CostModel.analytic()
    same = CostModel.analytic(unit_overhead_s=cm.unit_overhead_s * 1e6 * 1e-6)   # what --unit-overhead-us gives
    assert cost_fingerprint(same.to_dict()) == cost_fingerprint(cm.to_dict())
    assert cost_fingerprint(CostModel.analytic(unit_overhead_s=cm.unit_overhead_s * 1.001).to_dict()) \
        != cost_fingerprint(cm.to_dict())


def test_bench_measures_layers_with_the_same_budgets_once(tmp_path):
    """A plan whose two layers have the same budgets: one measurement per (TP, length), an entry for each layer."""
    import subprocess
    import sys
    from pathlib import Path

    from sglang_shplb.core.plan import Plan, save_plan
    from sglang_shplb.planning.place import solve_plan_placements

    spec = ModelSpec("LlamaForCausalLM", 3, 4, 2, 64, 1024, "x")
    layer = [HeadBudget.dense(), HeadBudget.topk(0.3, 2), HeadBudget.streaming(64, 64), HeadBudget.vslash(0.3, 1)]
    budgets = [layer, layer, [HeadBudget.dense()] * 4]
    buckets = Buckets((256,))
    save_plan(Plan(spec, buckets, budgets, solve_plan_placements(spec, budgets, buckets, [2], CostModel.analytic())),
              tmp_path / "plan")
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "bench/head_parallel.py", "--cpu-smoke", "--plan", str(tmp_path / "plan"),
                        "--ctx", "256", "--tp", "2", "--feedback", "1", "--reps", "1", "--out", str(tmp_path / "m")],
                       capture_output=True, text=True, cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads((tmp_path / "m" / "head_scales_smoke.json").read_text())
    assert [(e["layer"], e["measured_on"]) for e in doc["entries"]] == [(0, 0), (1, 0), (2, 2)]
    assert doc["entries"][0]["scale"] == doc["entries"][1]["scale"]
    rows = json.loads((tmp_path / "m" / "plan_feedback_smoke.json").read_text())["rows"]
    assert [row["layers"] for row in rows] == [[0, 1], [2]]


# --- refine_cuts: the measured placement's structure kept, its cuts moved ---

def _position_mispriced_device():
    """One dense KV group of 4 and 28 top-k heads at TP 8, 64K; the device runs every piece that starts after
    query 0 1.8x slower than the model says (a piece over a staged prefix), which no per-head multiplier can
    express: the same head is dear in one piece and cheap in the other."""
    from sglang_shplb.planning.cost_model import CostProfile
    from sglang_shplb.planning.solvers.objective import piece_load
    rng = np.random.default_rng(0)
    hq, g, tp, n = 32, 4, 8, 65536
    budgets = [HeadBudget.dense() if h // g == 0 else HeadBudget.topk(float(rng.uniform(0.05, 0.3)), 16)
               for h in range(hq)]
    profiles = [CostProfile.of(b, n) for b in budgets]
    model = np.where(np.arange(hq) // g == 0, 4.0, rng.uniform(0.1, 0.6, hq)) * 1e-4
    prob = LayerProblem(model, g, tp, profiles=profiles, max_replicated_kv=tp - 1)

    def device(lp):
        return np.array([sum(piece_load(pc, model, 0.0, profiles) * (1.8 if pc.start > 0 else 1.0) for pc in gpu)
                         for gpu in lp.gpus]) + 3e-5

    lp = solve_layer(model, g, tp, "shplb", profiles=profiles, max_replicated_kv=tp - 1).placement
    return prob, lp, device


def test_refine_cuts_evens_out_pieces_the_model_misprices_by_position():
    from sglang_shplb.core.placement_types import Placement, check_coverage
    from sglang_shplb.planning.rank_feedback import cut_heads, refine_cuts
    prob, lp, device = _position_mispriced_device()
    m = device(lp)
    structure = {h: [r for r, _ in ps] for h, ps in cut_heads(lp).items()}
    assert structure and m.max() / m.mean() > 1.2
    best = m.max()
    for _ in range(4):
        lp, predicted = refine_cuts(lp, prob, m, m)
        check_coverage(Placement(prob.tp, 65536, "x", [lp]), prob.num_heads)
        assert {h: [r for r, _ in ps] for h, ps in cut_heads(lp).items()} == structure   # only the cuts moved
        m = device(lp)
        assert m.max() <= predicted * 1.05          # the linear model is close to the device near where it measured
        best = min(best, m.max())
    assert best / m.mean() <= 1.05


def test_refine_cuts_keeps_a_placement_without_cuts_and_moves_toward_the_faster_rank():
    from sglang_shplb.planning.rank_feedback import MAX_CUT_STEP, refine_cuts
    costs = np.array([4.0, 1.0, 1.0, 1.0]) * 1e-4
    prob = LayerProblem(costs, 1, 2)
    whole = LayerPlacement([[Piece(0), Piece(1)], [Piece(2), Piece(3)]])
    assert refine_cuts(whole, prob, [1.0, 0.5], [1.0, 0.5])[0] is whole
    cut = LayerPlacement([[Piece(0, 0.0, 0.5), Piece(1)], [Piece(0, 0.5, 1.0), Piece(2), Piece(3)]])
    times = layer_times(cut, prob).busy
    slow1 = times * np.array([1.0, 1.5])          # rank 1 measures 1.5x its prediction
    out, predicted = refine_cuts(cut, prob, slow1, slow1)
    new = dict((pc.head, pc) for pc in out.gpus[0])[0]
    assert 0.5 < new.end <= 0.5 + MAX_CUT_STEP + 1e-9            # rank 0 takes more of head 0, within a step
    assert out.gpus[0][1] == Piece(1) and out.gpus[1][1:] == [Piece(2), Piece(3)]
    assert predicted < slow1.max()


def _bench_layer(*argv):
    """``bench/head_parallel.py`` imported, its arguments ``--cpu-smoke --reps 1 *argv``, and a 256-token layer of 8
    q / 2 KV heads (4 dense, 4 streaming) on the CPU with its single-device output: ``(hp, a, (q, k, v), budgets,
    ref)``."""
    import sys
    from pathlib import Path
    import torch
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import head_parallel as hp

    a = hp.parse_args(["--cpu-smoke", "--reps", "1", *argv])
    q, k, v = hp.layer_qkv(256, 8, 2, 64, "cpu", torch.float32)
    bud = [HeadBudget.dense()] * 4 + [HeadBudget.streaming(64, 128)] * 4
    return hp, a, (q, k, v), bud, hp.single_device_layer(q, k, v, bud)


def test_bench_refine_round_moves_a_cut_and_matches_the_single_device_layer():
    """bench/head_parallel.py --refine on the CPU (Triton interpreter, 256 tokens, TP 2): from a placement whose
    rank 1 is slower, the round keeps the structure, moves head 0's cut toward rank 0, and the emulated output
    equals the single-device layer. The rank times the round reads are the cost model's for that placement (the
    interpreter's wall clock under CI load does not order two ranks of a few ms reliably: 4.60 vs 5.45 ms once)."""
    hp, a, (q, k, v), bud, ref = _bench_layer("--refine", "2")
    hq, d, tp = 8, 64, 2
    cost = CostModel.analytic()
    lp = hp.forced_moves(hq, tp)         # head 0 cut at 0.5 over ranks 0 / 1, rank 1 holding 5 more heads
    e, _ = hp.emulate_checked(lp, bud, q, k, v, ref, tp, d ** -0.5, True, a, cost)
    for t, ms in zip(e["ranks"], e["predicted_rank_ms"]):
        t["total_ms"] = t["compute_ms"] = ms
    assert e["ranks"][1]["total_ms"] > e["ranks"][0]["total_ms"]
    out = hp.refine_rounds(bud, q, k, v, ref, tp, d ** -0.5, True, a, cost, [e])
    assert out and out[0]["kind"] == "cuts" and out[0]["refined_from"] == 0
    moved = hp.placement_of(out[0])
    assert [pc.head for pc in moved.gpus[0]] == [pc.head for pc in lp.gpus[0]]
    assert moved.gpus[0][0].end > 0.5 and moved.gpus[1][0].start == moved.gpus[0][0].end
    assert all(r["max_abs_diff"] < 1e-5 for r in out)


def test_bench_open_cut_round_cuts_a_head_of_the_slowest_rank_and_matches_the_single_device_layer():
    """bench/head_parallel.py --refine --open-cuts on the CPU (Triton interpreter, 256 tokens, TP 2): from whole
    heads only (nothing for refine_cuts to move), the round cuts a head of the slower rank, its first part on the
    other rank, and the emulated output equals the single-device layer. The model is slowed to the interpreter's
    milliseconds, so that a cut can pay in it."""
    hp, a, (q, k, v), bud, ref = _bench_layer("--refine", "1", "--open-cuts")
    d, tp = 64, 2
    cost = CostModel.analytic({"dense": 1e-3, "streaming": 1e-3}, unit_overhead_s=1e-5)
    lp = LayerPlacement([[Piece(h) for h in range(4)], [Piece(h) for h in range(4, 8)]])
    e, _ = hp.emulate_checked(lp, bud, q, k, v, ref, tp, d ** -0.5, True, a, cost)
    slow = max(range(tp), key=lambda r: e["ranks"][r]["total_ms"])
    out = hp.refine_rounds(bud, q, k, v, ref, tp, d ** -0.5, True, a, cost, [e])
    assert len(out) == 1 and out[0]["kind"] == "open" and out[0]["refined_from"] == 0
    new = hp.placement_of(out[0])
    cut = [pc for gpu in new.gpus for pc in gpu if not pc.whole]
    assert len(cut) == 2 and cut[0].head == cut[1].head and cut[0].head in [pc.head for pc in lp.gpus[slow]]
    first = min(cut, key=lambda pc: pc.start)
    assert first.start == 0.0 and first in new.gpus[1 - slow]
    assert out[0]["max_abs_diff"] < 1e-5


def test_bench_pipelined_ranks_and_routing_pair_keep_the_single_device_output():
    """bench/head_parallel.py --pipelined 2 --routing-pair on the CPU (Triton interpreter, 256 tokens, TP 2, a
    placement that moves work): every rank has a per-layer pipelined time, the slowest is reported, and the
    emulated output (after the pipelined calls, and in both runs of the routing pair) equals the single-device
    layer."""
    hp, a, (q, k, v), bud, ref = _bench_layer("--pipelined", "2", "--routing-pair")
    hq, d, tp = 8, 64, 2
    cost = CostModel.analytic()
    e, _ = hp.emulate_checked(hp.forced_moves(hq, tp), bud, q, k, v, ref, tp, d ** -0.5, True, a, cost)
    pl = [t["pipelined_ms"] for t in e["ranks"]]
    assert all(x > 0 for x in pl) and e["pipelined_slowest_ms"] == max(pl) and e["max_abs_diff"] < 1e-5
    pair = hp.routing_pair({"shplb": e}, bud, q, k, v, ref, tp, d ** -0.5, True, a, cost)
    assert hp.placement_of(pair["routed"]) == hp.placement_of(e) == hp.placement_of(pair["unrouted"])
    assert max(pair["routed"]["max_abs_diff"], pair["unrouted"]["max_abs_diff"]) < 1e-5
    with pytest.raises(SystemExit):
        hp.parse_args(["--routing-pair", "--unrouted-prefixes"])


def test_the_gpu_measured_file_for_the_llama_serving_plan_places_with_its_cuts():
    """Round 23's head-scales file (H100, bench/head_parallel.py --plan on the serving benchmark's Llama-3-8B plan,
    --feedback 2 --refine 2) read back with that plan's budgets and calibration: accepted, and the plan takes the
    measured cuts where a refinement was best (TP 4 and 8 at 128K), every solve having the structure they refined."""
    from pathlib import Path
    from sglang_shplb.planning.cost_model import load_cost_model
    from sglang_shplb.planning.synthetic_plans import serving_bench_budget
    root = Path(__file__).resolve().parents[1]
    spec = ModelSpec("LlamaForCausalLM", 32, 32, 8, 128, 131200, "llama8b")
    f = serving_bench_budget()
    budgets = [[f(li, h, spec) for h in range(32)] for li in range(32)]
    cost = load_cost_model(str(root / "bench/results/head_parallel/move_calibration_round13_h100.json"))
    buckets = Buckets((65536, 131072))
    hs = load_head_scales(root / "bench/results/head_parallel/round23_head_scales_llama8b_h100.json", spec, budgets,
                          buckets, cost.to_dict())
    assert hs.summary["entries"] == 128 and hs.summary["measured_cuts"] == 64
    bf = BudgetsFile({**spec.to_dict(), "checkpoint": None}, "synthetic", 8192, 0.0, budgets, np.ones((32, 32)),
                     np.ones((32, 32)))
    fed = place_budgets(bf, buckets, [4, 8], cost, "shplb", {"max_replicated_kv": "auto"}, head_scales=hs)
    for tp in (4, 8):
        cuts = hs.measured_cuts(tp, 1, 0)
        assert cuts is not None and all(lp == cuts for lp in fed.placements[tp][1].layers)
        assert hs.measured_cuts(tp, 0, 0) is None


def _rank_mispriced_device():
    """A dense KV group and 12 top-k heads at TP 4, 64K, placed whole (the model balances them); the device runs
    rank 0's calls 1.3x slower than the model says (a cold-L2 mix, round 17), so its ranks measure uneven and
    no head is cut for :func:`refine_cuts` to move."""
    from sglang_shplb.planning.cost_model import CostProfile
    from sglang_shplb.planning.solvers.objective import piece_load
    hq, g, tp, n = 16, 4, 4, 65536
    budgets = [HeadBudget.dense() if h // g == 0 else HeadBudget.topk(0.1, 16) for h in range(hq)]
    profiles = [CostProfile.of(b, n) for b in budgets]
    model = np.where(np.arange(hq) // g == 0, 3.0, 1.0) * 1e-4
    prob = LayerProblem(model, g, tp, profiles=profiles, max_replicated_kv=tp - 1,
                        whole_heads=frozenset({1}))          # head 1 may not be cut (as a vertical-slash head)
    lp = LayerPlacement([[Piece(0), Piece(1)], [Piece(2), Piece(4), Piece(5), Piece(6)],
                         [Piece(3), Piece(7), Piece(8), Piece(9)], [Piece(10), Piece(11), Piece(12), Piece(13),
                                                                    Piece(14), Piece(15)]])

    def device(lp):
        return np.array([sum(piece_load(pc, model, 0.0, profiles) for pc in gpu) * (1.3 if r == 0 else 1.0)
                         for r, gpu in enumerate(lp.gpus)])
    return prob, lp, device


def test_open_cut_gives_the_slowest_ranks_first_share_to_a_faster_rank():
    from sglang_shplb.core.placement_types import Placement, check_coverage
    from sglang_shplb.planning.rank_feedback import OPEN_CUT_SHARES, cut_heads, open_cut, refine_cuts
    prob, lp, device = _rank_mispriced_device()
    m = device(lp)
    assert refine_cuts(lp, prob, m, m)[0] is lp and m.max() / m.mean() > 1.1
    out, predicted = open_cut(lp, prob, m, m)
    check_coverage(Placement(prob.tp, 65536, "x", [out]), prob.num_heads)
    cuts = cut_heads(out)
    assert list(cuts) == [0]                                   # head 1 stays whole: not cuttable
    (r0, first), (r1, rest) = cuts[0]
    assert r1 == 0 and r0 != 0 and first.start == 0.0 and rest.end == 1.0      # its first part went away
    assert prob.profile(0).share(0.0, first.end) <= OPEN_CUT_SHARES[-1] + 0.05
    assert predicted < m.max() and device(out).max() < m.max()   # predicted lower, and lower on the device
    # then the cut is refined like any other; a measured-even placement opens nothing
    lp2, _ = refine_cuts(out, prob, device(out), device(out))
    assert device(lp2).max() <= device(out).max() + 1e-12
    even = np.full(prob.tp, m.mean())
    assert open_cut(lp, prob, even, even) == (lp, float(even.max()))


def test_open_cut_refuses_bad_measurements_and_cuts_nothing_it_may_not():
    from sglang_shplb.planning.rank_feedback import open_cut
    prob, lp, device = _rank_mispriced_device()
    with pytest.raises(ValueError, match="one measured time per rank"):
        open_cut(lp, prob, [1.0, 2.0], [1.0, 2.0])
    fixed = LayerProblem(prob.costs, prob.group_size, prob.tp, profiles=prob.profiles,
                         whole_heads=frozenset(range(prob.num_heads)))
    m = device(lp)
    assert open_cut(lp, fixed, m, m)[0] is lp


def test_derives_accepts_moved_and_opened_cuts_only():
    from sglang_shplb.planning.rank_feedback import derives, open_cut, refine_cuts
    prob, solved, device = _rank_mispriced_device()
    m = device(solved)
    opened, _ = open_cut(solved, prob, m, m)
    moved, _ = refine_cuts(opened, prob, device(opened), device(opened))
    assert derives(solved, solved) and derives(opened, solved) and derives(moved, solved)
    assert not derives(solved, opened)                                 # a cut head made whole again
    gpus = [list(g) for g in solved.gpus]
    gpus[1], gpus[2] = gpus[1] + [gpus[2][-1]], gpus[2][:-1]          # a whole head on another rank
    assert not derives(LayerPlacement(gpus), solved)
    (g, first), (r, rest) = sorted(((i, pc) for i, gpu in enumerate(opened.gpus) for pc in gpu if not pc.whole),
                                   key=lambda x: x[1].start)
    gpus = [[pc for pc in gpu if pc.whole] for gpu in opened.gpus]    # the head cut with its first piece at home
    gpus[r].append(first)
    gpus[g].append(rest)
    assert not derives(LayerPlacement(gpus), solved)
    assert not derives(LayerPlacement(solved.gpus[:-1]), solved)


def test_place_adopts_an_opened_cut_of_its_own_solve(tmp_path):
    """A head-scales entry whose pieces cut a head the solve keeps whole (``open_cut``), first piece elsewhere:
    place takes it for that layer, and refuses the same cut with the pieces' ranks swapped."""
    from sglang_shplb.planning.rank_feedback import open_cut
    spec, budgets, buckets, cm, bf, opts, plain, prob = _placed_small_plan()
    solved = plain.placements[2][1].layers[0]
    slow = int(np.argmax(layer_times(solved, prob).busy))
    measured = layer_times(solved, prob).busy * np.where(np.arange(2) == slow, 1.5, 1.0)
    opened, _ = open_cut(solved, prob, measured, measured)
    assert opened != solved and len({pc.head for gpu in opened.gpus for pc in gpu if not pc.whole}) > \
        len({pc.head for gpu in solved.gpus for pc in gpu if not pc.whole})

    def entry(lp):
        return {"tp": 2, "seq_len": 65536, "layer": 0, "scale": [1.0] * 8,
                "pieces": [[[p.head, p.start, p.end] for p in g] for g in lp.gpus]}

    hs = load_head_scales(save_head_scales(tmp_path / "o.json", spec, budgets, cm.to_dict(), [entry(opened)]),
                          spec, budgets, buckets, cm.to_dict())
    fed = place_budgets(bf, buckets, [2], cm, "shplb", opts, head_scales=hs)
    assert fed.placements[2][1].layers[0] == opened
    swapped = LayerPlacement(opened.gpus[::-1])
    hs = load_head_scales(save_head_scales(tmp_path / "s.json", spec, budgets, cm.to_dict(), [entry(swapped)]),
                          spec, budgets, buckets, cm.to_dict())
    with pytest.raises(HeadScalesError, match="another placement"):
        place_budgets(bf, buckets, [2], cm, "shplb", opts, head_scales=hs)
