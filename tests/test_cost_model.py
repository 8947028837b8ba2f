import json
import math

import numpy as np
import pytest

from sglang_shplb.planning.cost_model import (CALIBRATION_SCHEMA, CalibrationError, CostModel, CostProfile, block_pairs,
                                     calibration_record, flops_per_pair, query_block_pairs, write_calibration)
from sglang_shplb.core.patterns import HeadBudget

BUDGETS = [HeadBudget.dense(), HeadBudget.streaming(64, 1024), HeadBudget.streaming(0, 64),
           HeadBudget.topk(0.1), HeadBudget.topk(0.37, min_blocks=2), HeadBudget.vslash(0.2)]


@pytest.mark.parametrize("b", BUDGETS, ids=lambda b: b.describe())
@pytest.mark.parametrize("n", [1, 63, 64, 65, 1000, 8192, 20000])
def test_block_pairs_and_profile_match_patterns(b, n):
    assert block_pairs(b, n) == b.block_pairs(n)
    assert query_block_pairs(b, n).sum() == b.block_pairs(n)


@pytest.mark.parametrize("b", BUDGETS + [HeadBudget.topk(0.2, 3, tile=128)], ids=lambda b: b.describe())
@pytest.mark.parametrize("nb", [1, 2, 7, 64, 129])
def test_vectorised_rule_is_the_scalar_rule(b, nb):
    rows = b.blocks_for_query_blocks(np.arange(nb), nb)
    assert rows.tolist() == [b.blocks_for_query_block(qi, nb) for qi in range(nb)]
    # the cost profile: the same rule, but the last query block counts every block (the dense tail)
    assert query_block_pairs(b, nb * 64).tolist() == rows[:-1].tolist() + [nb] == b.row_pairs(nb).tolist()


def test_analytic_head_time():
    cm = CostModel.analytic()
    b = HeadBudget.dense()
    t = cm.head_time(b, 8192, 128, 4)
    expect = 5e-6 + b.block_pairs(8192) * flops_per_pair(128) / 600e12
    assert t == pytest.approx(expect, rel=1e-12)
    assert cm.head_time(HeadBudget.topk(0.1), 8192, 128) < t
    assert cm.piece_overhead == pytest.approx(5e-6)
    assert json.loads(json.dumps(cm.to_dict()))["source"] == "analytic"


def _table(records, **kw):
    return {"schema": CALIBRATION_SCHEMA, "device": "test", "date": "2025-01-01", "kernel": "synthetic",
            "records": records, **kw}


def _rec(pattern, pairs, time_ms, heads=8, d=128, gqa=4, ctx=8192, density=0.5):
    return {"pattern": pattern, "density": density, "ctx_len": ctx, "head_dim": d, "gqa": gqa,
            "num_heads": heads, "time_ms": time_ms, "block_pairs": pairs}


def test_fit_recovers_known_line(tmp_path):
    a, b = 0.02, 3e-7  # ms per call, ms per pair
    rng = np.random.default_rng(0)
    pairs = rng.integers(1_000, 2_000_000, size=12)
    recs = [_rec("dense", int(p), a + b * p) for p in pairs]
    path = tmp_path / "cal.json"
    path.write_text(json.dumps(_table(recs)))
    cm = CostModel.from_calibration(path)
    f = cm.fits[("dense", 128)]
    assert f.a == pytest.approx(a * 1e-3, rel=1e-6)
    assert f.b == pytest.approx(b * 1e-3, rel=1e-6)
    # per head: the call's intercept shared by its 8 heads
    budget = HeadBudget.dense()
    assert cm.head_time(budget, 4096, 128, 4) == pytest.approx(a * 1e-3 / 8 + b * 1e-3 * budget.block_pairs(4096))
    # absent pattern: dense fit scaled by the analytic throughput ratio
    tk = HeadBudget.topk(0.1)
    assert cm.head_time(tk, 4096, 128, 4) == pytest.approx(a * 1e-3 / 8 + b * 1e-3 * 2 * block_pairs(tk, 4096))
    assert CostModel.from_dict(json.loads(json.dumps(cm.to_dict()))).head_time(budget, 4096, 128, 4) == \
        pytest.approx(cm.head_time(budget, 4096, 128, 4))


def test_fit_with_varying_heads_recovers_per_head_cost():
    a, b, c = 0.01, 2e-7, 0.004
    recs = [_rec("topk", p, a + b * p + c * h, heads=h) for p, h in
            [(10_000, 4), (500_000, 8), (90_000, 16), (2_000_000, 32), (40_000, 2), (700_000, 12)]]
    cm = CostModel.from_calibration(_table(recs))
    f = cm.fits[("topk", 128)]
    assert (f.a, f.b, f.c) == pytest.approx((a * 1e-3, b * 1e-3, c * 1e-3), rel=1e-5)
    assert cm.piece_overhead == pytest.approx(c * 1e-3, rel=1e-5)


def test_fit_is_nonnegative():
    # noisy records whose unconstrained intercept would be negative
    recs = [_rec("dense", p, t) for p, t in [(1000, 0.0001), (2000, 0.5), (3000, 1.0)]]
    f = CostModel.from_calibration(_table(recs)).fits[("dense", 128)]
    assert f.a >= 0 and f.b > 0


@pytest.mark.parametrize("mutate,msg", [
    (lambda d: d.update(schema="shplb-calibration/2"), "schema"),
    (lambda d: d.pop("device"), "device"),
    (lambda d: d.update(records=[]), "non-empty"),
    (lambda d: d["records"][0].pop("time_ms"), "time_ms"),
    (lambda d: d["records"][0].update(pattern="banana"), "unknown pattern"),
    (lambda d: d["records"][0].update(time_ms=-1.0), "time_ms"),
    (lambda d: d["records"][0].update(ctx_len="8192"), "ctx_len"),
    (lambda d: d["records"][0].update(density=1.5), "density"),
    (lambda d: d["records"][0].update(tile=128), "not a tile of pattern 'dense'"),
])
def test_bad_calibration_schema(mutate, msg):
    doc = _table([_rec("dense", 1000, 0.1), _rec("dense", 2000, 0.2)])
    mutate(doc)
    with pytest.raises(CalibrationError, match=msg):
        CostModel.from_calibration(doc)


def test_unreadable_calibration_file(tmp_path):
    p = tmp_path / "cal.json"
    p.write_text('{"schema": "shplb-calibration/1", "records": [')
    with pytest.raises(CalibrationError, match="cannot read"):
        CostModel.from_calibration(p)


def test_cost_profile_query_fraction():
    n = 64 * 100
    dense = CostProfile.of(HeadBudget.dense(), n)
    # dense: cost of blocks [0, b) is b(b+1)/2 of nb(nb+1)/2; half the cost is at b ~ nb / sqrt(2)
    q = dense.query_fraction(0.5)
    assert abs(q - 1 / math.sqrt(2)) < 0.01
    assert dense.share(0.0, q) == pytest.approx(0.5, abs=0.01)
    stream = CostProfile.of(HeadBudget.streaming(64, 640), 10 * n)
    assert abs(stream.query_fraction(0.5) - 0.5) < 0.05  # about constant per block (and the dense tail's row)
    assert dense.query_fraction(0.0) == 0.0 and dense.query_fraction(1.0) == 1.0


def test_tile128_topk_has_its_own_fit_and_falls_back_to_topk():
    fast, slow = 2e-7, 3e-7                      # ms per pair: the 128-row kernel is faster
    recs = [_rec("topk", p, slow * p) for p in (10_000, 500_000, 90_000)]
    recs += [dict(_rec("topk", p, fast * p), tile=128) for p in (20_000, 400_000, 70_000)]
    cm = CostModel.from_calibration(_table(recs))
    assert set(cm.fits) == {("topk", 128), ("topk@128", 128)}
    b64, b128 = HeadBudget.topk(0.1, 4), HeadBudget.topk(0.1, 4, tile=128)
    assert cm.head_time(b64, 32768, 128, 4) == pytest.approx(slow * 1e-3 * block_pairs(b64, 32768))
    assert cm.head_time(b128, 32768, 128, 4) == pytest.approx(fast * 1e-3 * block_pairs(b128, 32768))
    # a table without tile-128 records prices a tile-128 head with the topk fit
    only64 = CostModel.from_calibration(_table(recs[:3]))
    assert only64.head_time(b128, 32768, 128, 4) == pytest.approx(slow * 1e-3 * block_pairs(b128, 32768))
    assert CostModel.analytic().head_time(b128, 32768, 128) > 0


def test_calibration_writer_round_trip(tmp_path):
    b64, b128 = HeadBudget.topk(0.1, 2), HeadBudget.topk(0.1, 2, tile=128)
    recs = [calibration_record(b, n, 128, 4, 32, 0.5 * n / 16384, config="test")
            for b in (b64, b128) for n in (16384, 32768)]
    recs.append(calibration_record(HeadBudget.vslash(0.1, 2), 16384, 128, 4, 32, 0.3, pairs=123_456))
    assert recs[0]["block_pairs"] == 32 * b64.block_pairs(16384) and recs[0]["tile"] == 64
    assert recs[0]["density"] == round(b64.density(16384), 6) and recs[0]["config"] == "test"
    assert recs[-1]["block_pairs"] == 123_456 and "tile" not in recs[-1]
    path = write_calibration(tmp_path / "cal.json", "GPU", "2026-12-01", "test kernel", recs)
    cm = CostModel.from_calibration(path)
    assert set(cm.fits) == {("topk", 128), ("topk@128", 128), ("vslash", 128)}
    with pytest.raises(CalibrationError, match="non-empty"):
        write_calibration(tmp_path / "empty.json", "GPU", "2026-12-01", "test kernel", [])


def test_transfer_term_defaults_round_trip_and_rows():
    from sglang_shplb.planning.cost_model import (DEFAULT_LINK_BYTES_PER_S, DEFAULT_UNIT_OVERHEAD_S, Transfer,
                                                  load_cost_model)
    cm = CostModel.analytic()
    assert (cm.link_bytes_per_s, cm.unit_overhead_s) == (DEFAULT_LINK_BYTES_PER_S, DEFAULT_UNIT_OVERHEAD_S)
    assert (DEFAULT_LINK_BYTES_PER_S, DEFAULT_UNIT_OVERHEAD_S) == (370e9, 50e-6)
    d = json.loads(json.dumps(CostModel.analytic(link_bytes_per_s=1e11, unit_overhead_s=1e-5).to_dict()))
    back = CostModel.from_dict(d)
    assert (back.link_bytes_per_s, back.unit_overhead_s) == (1e11, 1e-5)
    for key in ("link_bytes_per_s", "unit_overhead_s"):  # plans solved before the transfer term: the defaults
        d.pop(key)
    assert CostModel.from_dict(d).transfer(4096, 64) == Transfer(4096, 64, 370e9, 50e-6, 2)
    assert load_cost_model(None, link_bytes_per_s=2e11).link_bytes_per_s == 2e11
    with pytest.raises(ValueError, match="link bandwidth"):
        CostModel.analytic(link_bytes_per_s=0)
    t = cm.transfer(1000, 128)
    # 1000 tokens = 16 query blocks; the tail [0.5, 1) owns blocks 8..15: rows 512..999
    assert t.rows(0.5, 1.0) == (512, 1000) and t.rows(0.0, 0.5) == (0, 512) and t.rows(0.99, 1.0) == (0, 0)
    assert t.seconds(370e9 / 2) == pytest.approx(1.0)
