"""``bench/one_batch.py``'s bookkeeping: medians over alternating rounds per cell, the ratio table, and what each
backend's run gets (the plan's environment for ``shplb`` only)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from one_batch import SHPLB, backend_env, run_args, summarize, table  # noqa: E402

from sglang_shplb.serving.config import ENV_ALWAYS, ENV_DENSE_BACKEND, ENV_PLAN  # noqa: E402


def row(bs, il, prefill, step):
    return {"batch_size": bs, "input_len": il, "prefill_latency": prefill, "median_decode_latency": step}


def test_cells_take_the_median_over_rounds():
    s = summarize([row(1, 2048, 0.010, 0.0015), row(1, 2048, 0.030, 0.0016), row(1, 2048, 0.011, 0.0030),
                   row(4, 2048, 0.040, 0.0020)])
    assert s[(1, 2048)] == {"prefill_s": pytest.approx(0.011), "decode_step_s": pytest.approx(0.0016), "rounds": 3}
    assert s[(4, 2048)]["rounds"] == 1


def test_table_ratios_are_stock_over_shplb():
    res = {"flashinfer": summarize([row(1, 2048, 0.010, 0.0015)]), SHPLB: summarize([row(1, 2048, 0.020, 0.0010)])}
    line = table("flashinfer", res).splitlines()[-1]
    assert "| 0.500 |" in line and "| 1.500 |" in line          # prefill 2x slower, decode 1.5x faster


def test_only_shplb_runs_get_the_plan(monkeypatch, tmp_path):
    monkeypatch.delenv(ENV_PLAN, raising=False)
    assert ENV_PLAN not in backend_env("flashinfer", tmp_path, "flashinfer")
    env = backend_env(SHPLB, tmp_path, "flashinfer")
    assert env[ENV_PLAN] == str(tmp_path) and env[ENV_DENSE_BACKEND] == "flashinfer" and env[ENV_ALWAYS] == "1"
    cmd = run_args("/m", SHPLB, "cuda", "bfloat16", [1, 4], [2048], 64, tmp_path / "r.jsonl", ["--x"])
    assert cmd[cmd.index("--attention-backend") + 1] == SHPLB and cmd[-1] == "--x"
    assert cmd[cmd.index("--batch-size") + 1:cmd.index("--batch-size") + 3] == ["1", "4"]
