"""bench/home_calls.py's summary: the home call's miss per kind of rank (pure, CPU)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import home_calls as hc  # noqa: E402


def _rank(budgets, ms, pred):
    return {"budgets": budgets, "parts": {"home": {"ms": ms, "pred_ms": pred}}}


def test_ranks_are_grouped_by_the_index_they_build():
    assert hc.rank_class(["dense", "stream(sink=64,win=128)"]) == "no index"
    assert hc.rank_class(["topk(0.15,min=16)", "dense"]) == "topk"
    assert hc.rank_class(["vslash(0.1,min=4)", "topk(0.1,min=2)"]) == "topk+vslash"
    cells = [{"ranks": [_rank(["dense"], 2.0, 2.0), _rank(["vslash(0.1,min=4)"], 3.0, 1.0)]},
             {"ranks": [_rank(["dense"], 1.0, 2.0), _rank(["vslash(0.1,min=4)"], 2.5, 1.0),
                        _rank(["vslash(0.1,min=4)"], 1.0, 1.0)]}]
    out = hc.by_class(cells)
    assert set(out) == {"no index", "vslash"}
    assert out["vslash"]["n"] == 3 and out["vslash"]["median_residual_ms"] == pytest.approx(1.5)
    assert out["vslash"]["median_ratio"] == pytest.approx(2.5)
    assert out["no index"]["median_residual_ms"] == pytest.approx(-0.5)
