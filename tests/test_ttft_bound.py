"""bench/ttft_bound.py: the plan's pair shares, the fit, and the bound's arithmetic."""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import ttft_bound as tb  # noqa: E402

from sglang_shplb.core.patterns import HeadBudget  # noqa: E402


def _heads():
    return [HeadBudget.from_dict({"pattern": "streaming", "sink_blocks": 2, "window_blocks": 32, "fraction": 1.0,
                                  "min_blocks": 4}),
            HeadBudget.from_dict({"pattern": "topk", "sink_blocks": 1, "window_blocks": 0, "fraction": 0.1,
                                  "min_blocks": 2})]


def test_shares_count_the_prompts_tail_once():
    """The sparse heads' pair shares are HeadBudget.block_pairs (the prompt's last query block over every key,
    the server's dense tail since it is computed in the last chunk only); one dense head of eight: D = 1/8."""
    n = 65536
    budgets = [[HeadBudget.dense()] + _heads() * 3 + [_heads()[1]]]
    d, s = tb.shares(budgets, n)
    full = HeadBudget.dense().block_pairs(n)
    assert d == pytest.approx(1 / 8)
    assert s == pytest.approx(sum(h.block_pairs(n) for h in budgets[0][1:]) / full / 8)
    nb = n // 64
    tail_free = sum(int(h.blocks_for_query_blocks(np.arange(nb), nb).sum()) for h in budgets[0][1:])
    assert 0 < s * 8 * full - tail_free <= 7 * nb                    # one tail row per sparse head


def test_fit_recovers_a_known_curve():
    c, a, b = 0.01, 2e-5, 6e-6
    ns = [2048, 8192, 32768, 131072]
    ts = [c + a * n + b * tb.DENSE.block_pairs(n) for n in ns]
    got = tb.fit(ns, ts)
    assert np.allclose(got, (c, a, b), rtol=1e-6)
    _, a2, b2 = tb.fit(ns[-2:], ts[-2:])         # two lengths: c = 0, the rest absorbs it
    assert b2 == pytest.approx(b, rel=0.01) and a2 > a


def test_bound_rows_price_the_goal():
    """Sparse heads at the dense efficiency give the e = 1 bound; a goal above the free-sparse bound needs no e."""
    ns = [16384, 32768, 65536, 131072]
    c, a, b, chunk = 0.0, 2e-5, 6e-6, 8192
    fi = [{"length": n, "batch": 1, "ttft_s": c + a * n + b * tb.DENSE.block_pairs(n)} for n in ns]
    budgets = [[HeadBudget.dense()] + _heads() * 3 + [_heads()[1]]]          # 1 dense of 8
    ours = [{"length": n, "batch": 1, "ttft_s": r["ttft_s"] / 2} for n, r in zip(ns, fi)]
    doc = {"runs": [{"server": "flashinfer", "cmd": f"x --chunked-prefill-size {chunk}", "cells": fi},
                    {"server": "shplb", "cmd": "y", "cells": ours}]}
    res = tb.bound_rows(doc, budgets, {65536: 2.0, 131072: 100.0}, 32768)
    rows = {r["length"]: r for r in res["rows"]}
    assert sorted(rows) == [32768, 65536, 131072]
    r = rows[65536]
    assert r["dense_share"] == pytest.approx(1 / 8)
    assert r["bound_free_s"] < r["bound_e1_s"] < r["flashinfer_s"]
    # the goal 2x is the measured 2x: the e it needs is the e the measurement implies
    assert r["goal_e"] == pytest.approx(r["implied_e"])
    assert rows[131072]["goal_e"] is None                          # 100x: not even with free sparse heads
