"""The move calibration (:mod:`sglang_shplb.planning.move_calibration`): the fit recovers known parameters
from synthetic per-rank records, the record loads into the cost model the solver prices with (in the kernel
table's seconds), a missing record keeps the documented defaults, and the per-rank predictions count the
bytes the runtime schedule moves."""
import json
import math
from pathlib import Path

import numpy as np
import pytest

from sglang_shplb.core.head_map import layer_work
from sglang_shplb.core.patterns import HeadBudget
from sglang_shplb.core.placement_types import LayerPlacement, Piece
from sglang_shplb.planning.cost_model import (DEFAULT_UNIT_OVERHEAD_S, CalibrationError, CostModel,
                                              load_cost_model)
from sglang_shplb.planning.move_calibration import (KINDS, MOVE_CALIBRATION_SCHEMA, RankRecord, fit_moves,
                                                    format_fit, model_terms, piece_kind, rank_predictions,
                                                    write_move_calibration)
from sglang_shplb.scheduler.head_schedule import ExtendShape, layer_schedule

ROOT = Path(__file__).resolve().parents[1]
KERNEL_TABLE = ROOT / "bench" / "results" / "calibration_h100_tiles.json"
TRUE = {"sigma": 1.3, "c0": 5e-4, "u": 300e-6, "g": 150e9, "eff": 0.7}


def synthetic(seed=0, noise=0.0, eff_by_kind=None):
    """Per-rank records measured by the module's model with TRUE's parameters (``noise``: relative)."""
    rng = np.random.default_rng(seed)
    eff = eff_by_kind or {k: TRUE["eff"] for k in KINDS}
    s, recs = TRUE["sigma"], []

    def jitter(x):
        return x * (1 + noise * rng.standard_normal())

    for i in range(60):
        rank = int(rng.integers(4))
        home_pred = float(rng.uniform(1e-3, 40e-3))
        units = []
        for _ in range(int(rng.integers(0, 5))):
            kind = KINDS[int(rng.integers(3))]
            units.append({"pred_s": float(rng.uniform(1e-4, 8e-3)), "home": rank if rng.random() < 0.3 else (rank + 1) % 4,
                          "pattern": "dense" if kind.startswith("dense") else "topk",
                          "start": 0.5 if kind == "dense_after_prefix" else 0.0})
        shipped = [u for u in units if u["home"] != rank]
        local = [u for u in units if u["home"] == rank]
        staged = int(rng.integers(1, 200)) << 20 if local else 0
        gathered = int(rng.integers(1, 400)) << 20 if rng.random() < 0.6 else 0

        def t(us, nbytes=0):
            return (len(us) * TRUE["u"] + nbytes / TRUE["g"]
                    + sum(s / eff[piece_kind(u)] * u["pred_s"] for u in us)) * 1e3
        recs.append(RankRecord(rank, jitter((TRUE["c0"] + s * home_pred) * 1e3), home_pred, units,
                               jitter(t(shipped)) if shipped else 0.0,
                               jitter(t(local, staged)) if local else 0.0,
                               jitter(gathered / TRUE["g"] * 1e3) if gathered else 0.0, gathered, staged, f"r{i}"))
    return recs


def test_fit_recovers_known_parameters():
    fit = fit_moves(synthetic())
    assert fit.sigma == pytest.approx(TRUE["sigma"], rel=1e-6)
    assert fit.call_overhead_s == pytest.approx(TRUE["c0"], rel=1e-5)
    assert fit.unit_overhead_s == pytest.approx(TRUE["u"], rel=1e-5)
    assert fit.gather_bytes_per_s == pytest.approx(TRUE["g"], rel=1e-5)
    assert fit.piece_efficiency == pytest.approx(TRUE["eff"], rel=1e-5)
    assert all(v == pytest.approx(TRUE["eff"], rel=1e-5) for v in fit.efficiency_by_kind.values())
    assert fit.residuals["all_units"]["rms_rel"] < 1e-6 and fit.residuals["home"]["rms_rel"] < 1e-6
    text = format_fit(fit)
    assert "residuals" in text and "150 GB/s" in text


def test_fit_with_noise_and_per_kind_efficiency():
    fit = fit_moves(synthetic(seed=1, noise=0.03))
    assert fit.sigma == pytest.approx(TRUE["sigma"], rel=0.05)
    assert fit.unit_overhead_s == pytest.approx(TRUE["u"], rel=0.2)
    assert fit.gather_bytes_per_s == pytest.approx(TRUE["g"], rel=0.1)
    assert fit.piece_efficiency == pytest.approx(TRUE["eff"], rel=0.1)
    assert 0.02 < fit.residuals["all_units"]["rms_rel"] < 0.1
    # pieces of one kind slower: the per-kind fit finds it, the joint one lies between
    by = {"dense_after_prefix": 0.35, "dense_from_start": 1.0, "sparse": 0.9}
    fit = fit_moves(synthetic(seed=2, eff_by_kind=by))
    for k, v in by.items():
        assert fit.efficiency_by_kind[k] == pytest.approx(v, rel=1e-4)
    assert 0.35 < fit.piece_efficiency < 1.0


def test_record_loads_into_the_cost_model(tmp_path):
    fit = fit_moves(synthetic())
    rec = fit.record("GPU X", "2026-12-02", ["a.json"], str(KERNEL_TABLE))
    assert rec["schema"] == MOVE_CALIBRATION_SCHEMA
    path = write_move_calibration(tmp_path / "move.json", rec)
    # the absolute kernel table path is written relative to the record's folder
    assert not Path(json.loads(path.read_text())["kernel_calibration"]).is_absolute()
    cm = load_cost_model(path)
    kernel = load_cost_model(KERNEL_TABLE)
    # kernel fits from the named table; move terms in its seconds (measured / sigma)
    assert cm.source == "calibrated" and cm.to_dict()["fits"] == kernel.to_dict()["fits"]
    assert cm.unit_overhead_s == pytest.approx(TRUE["u"] / TRUE["sigma"], rel=1e-5)
    assert cm.gather_bytes_per_s == pytest.approx(TRUE["g"] * TRUE["sigma"], rel=1e-5)
    assert cm.piece_efficiency == pytest.approx(TRUE["eff"], rel=1e-5)
    t = cm.transfer(65536, 128)
    assert (t.unit_overhead_s, t.gather_bytes_per_s, t.piece_efficiency) == (
        cm.unit_overhead_s, cm.gather_bytes_per_s, cm.piece_efficiency)
    assert cm.move_calibration["device"] == "GPU X"
    # an explicit value overrides the record; the documented default (a CLI flag left alone) does not
    assert load_cost_model(path, unit_overhead_s=DEFAULT_UNIT_OVERHEAD_S).unit_overhead_s == cm.unit_overhead_s
    assert load_cost_model(path, unit_overhead_s=7e-6, link_bytes_per_s=100e9).unit_overhead_s == 7e-6
    assert load_cost_model(path, link_bytes_per_s=100e9).link_bytes_per_s == 100e9
    # a kernel table path relative to the record
    rel = dict(rec, kernel_calibration=None)
    cm2 = load_cost_model(write_move_calibration(tmp_path / "analytic_move.json", rel))
    assert cm2.source == "analytic" and cm2.unit_overhead_s == cm.unit_overhead_s
    # the committed H200 record reads and names its table
    committed = ROOT / "bench" / "results" / "move_calibration_h200.json"
    if committed.exists():
        c = load_cost_model(committed)
        assert c.source == "calibrated" and c.unit_overhead_s > DEFAULT_UNIT_OVERHEAD_S
        assert model_terms(json.loads(committed.read_text()))["piece_efficiency"] == c.piece_efficiency


def test_no_calibration_keeps_the_defaults(tmp_path):
    for cm in (load_cost_model(None), load_cost_model(KERNEL_TABLE)):
        t = cm.transfer(32768, 128)
        assert (t.unit_overhead_s, t.gather_bytes_per_s, t.piece_efficiency) == (DEFAULT_UNIT_OVERHEAD_S, None, 1.0)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema": MOVE_CALIBRATION_SCHEMA, "compute_scale": 1.0, "unit_overhead_s": -1,
                               "piece_efficiency": 1.0}))
    with pytest.raises(CalibrationError):
        load_cost_model(bad)


@pytest.mark.parametrize("tp", [2, 4])
def test_rank_predictions_count_the_schedules_bytes(tp):
    """Gathered bytes (shipped K/V bundles + q rows) are the schedule's inputs; local units' staged K/V and
    the units' predicted seconds are those of the cost model's pieces."""
    n, hq, hkv, d = 8192, 8, 4, 64
    bud = [HeadBudget.dense() if h < 2 else HeadBudget.streaming(64, 512) for h in range(hq)]
    per = hq // tp
    gpus = [[Piece(h) for h in range(r * per, (r + 1) * per)] for r in range(tp)]
    gpus[0] = [p for p in gpus[0] if p.head != 0] + [Piece(0, 0.0, 0.5)]       # head 0 split: a local unit
    gpus[1] = gpus[1] + [Piece(0, 0.5, 1.0)]                                     # and a shipped one
    gpus[0] = [p for p in gpus[0] if p.head != 1]
    gpus[tp - 1] = gpus[tp - 1] + [Piece(1)]                                     # head 1 moved whole
    lp = LayerPlacement(gpus)
    cm = CostModel.analytic()
    preds = rank_predictions(lp, bud, cm, n, hkv, tp, d)
    sched = layer_schedule(layer_work(lp, hq, hkv, tp), ExtendShape((0,), (n,)))
    for r in range(tp):
        assert preds[r]["gathered_bytes"] == sum(sched.input_elems(r, t, d) for t in range(tp)) * 2
    local = [b for b in sched.bundles if b.home == b.target]
    assert preds[0]["local_staged_bytes"] == sum(2 * b.tokens * d * 2 for b in local) > 0
    units = [u for p in preds for u in p["units"]]
    assert len(units) == 3 and {piece_kind(u) for u in units} == {"dense_after_prefix", "dense_from_start"}
    whole = cm.head_time(bud[0], n, d, 2)
    assert sum(u["pred_s"] for u in units if u["head"] == 0) == pytest.approx(whole + cm.piece_overhead, rel=1e-6)
    assert math.isclose(preds[0]["home_pred_s"], sum(cm.head_time(bud[h], n, d, 2) for h in range(2, per)))


def test_bench_pure_parts():
    """bench/head_parallel.py: --quick's grid, the decode side-pool count, the records the fit reads."""
    import sys
    sys.path.insert(0, str(ROOT / "bench"))
    import head_parallel as hp

    a = hp.parse_args(["--quick", "--out", "/tmp/x"])
    assert (a.shapes, a.ctx, a.tp, a.reps) == ("llama8b,llama70b", "65536,131072", "4,8", 20)
    assert a.time_budget_s and a.time_budget_s <= 300
    hq, hkv, tp, n = 8, 4, 2, 4096
    bud = [HeadBudget.dense()] * 2 + [HeadBudget.streaming(64, 256)] * 6
    lp = hp.forced_moves(hq, tp)               # heads 0 (half) and 1 (whole) of KV group 0 computed on rank 1
    dec = hp.decode_balance(bud, hq, hkv, tp, n, lp, d=64, layers=3, elem=2)
    assert dec["side_pool_kv_copies_per_layer"] == 1
    assert dec["side_pool_bytes_per_token_per_layer"] == 2 * 64 * 2 and dec["side_pool_bytes_per_token"] == 3 * 256
    assert dec["slowest_over_mean_low"] > dec["placed_slowest_over_mean_low"]
    cm = CostModel.analytic()
    preds = rank_predictions(lp, bud, cm, n, hkv, tp, 64)
    row = {"shape": "smoke", "plan": "x", "n": n, "tp": tp,
           "shplb": {"ranks": [{"home_ms": 1.0, "units_ms": 0.5, "pred": p} for p in preds]}}
    recs = hp.records_of(row)
    assert len(recs) == tp and recs[1].part(local=False) and recs[0].part(local=True)
    # the best feedback round is the fastest whose output matched the single-device layer; the open loop counts
    rounds = [{"slowest_ms": t, "max_abs_diff": x} for t, x in ((3.0, 1e-3), (2.0, 1e-3), (2.5, 1e-3), (1.0, 1.2))]
    assert hp.best_checked(rounds) == 1
    assert hp.best_checked([{**rounds[0], "max_abs_diff": 0.5}, rounds[3]]) == 0
