"""bench/decode_bound.py: the decode step fit, the page share of a KV group, and the bound's arithmetic."""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import decode_bound as db  # noqa: E402

from sglang_shplb.core.patterns import DECODE_MIN_PAGES, HeadBudget  # noqa: E402


def test_fit_recovers_a_linear_step():
    c, a = 5e-3, 3e-8
    ns = [4096, 16384, 65536]
    assert np.allclose(db.fit(ns, [c + a * n for n in ns]), (c, a), rtol=1e-9)
    with pytest.raises(SystemExit):
        db.fit([4096], [c])


def test_page_share_of_a_group_lies_between_its_widest_head_and_the_sum():
    n = 65536
    pages = n // 64
    dense, stream = HeadBudget.dense(), HeadBudget.streaming(128, 2048)   # 2 sink + 33 window pages at decode
    assert db.page_share([[dense, stream]], n, 1) == (1.0, 1.0)
    lo, hi = db.page_share([[stream, stream]], n, 1)
    assert lo == pytest.approx(35 / pages) and hi == pytest.approx(70 / pages)
    # a streaming head below the decode floor reads the floor's pages (decode_budget), not its window
    lo, _ = db.page_share([[HeadBudget.streaming(64, 64)]], n, 1)
    assert lo == pytest.approx(DECODE_MIN_PAGES / pages)
    # groups average: one dense group of two
    assert db.page_share([[dense, stream, stream, stream]], n, 2)[0] == pytest.approx((1 + 35 / pages) / 2)


def test_bound_rows():
    """A FlashInfer curve c + a n: attention-free bound t / c; the plan bound from the widest heads' share; the
    goal is reachable only below the attention-free bound; shplb's measured ratio as rate over rate."""
    c, a = 5e-3, 3e-8
    ns = [16384, 65536]
    fi = [{"length": n, "batch": 1, "decode_tok_s": 1 / (c + a * n)} for n in ns]
    ours = [{"length": n, "batch": 1, "decode_tok_s": 1.2 / (c + a * n)} for n in ns]
    doc = {"runs": [{"server": "flashinfer", "cells": fi}, {"server": "shplb", "cells": ours}]}
    budgets = [[HeadBudget.dense(), HeadBudget.streaming(128, 2048)]]
    res = db.bound_rows(doc, budgets, 2, {16384: 1.0, 65536: 10.0})
    rows = {r["length"]: r for r in res["rows"]}
    for n in ns:
        step = c + a * n
        assert rows[n]["ratio_bound_free"] == pytest.approx(step / c)
        share = rows[n]["page_share_widest"]
        assert share == pytest.approx((1 + 35 / (n // 64)) / 2)
        assert rows[n]["ratio_bound_plan"] == pytest.approx(step / (c + a * n * share))
        assert rows[n]["ratio_measured"] == pytest.approx(1.2)
    assert rows[16384]["goal_reachable"] and not rows[65536]["goal_reachable"]
    assert "| 16,384 |" in db.table(res) and "10 (no)" in db.table(res)
