"""``bench/serve_gpu.py``'s decode rate of a batch sent at once, on hand-made stream timings."""
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from serve_gpu import batch_decode_rate  # noqa: E402

from sglang_shplb.evaluation.servers import Generation  # noqa: E402


def gen(sent_at: float, first: float, n: int, step: float) -> Generation:
    """``n`` tokens, the first at ``first`` s after sending, then one every ``step`` s."""
    chunks = tuple((first + i * step, i + 1) for i in range(n))
    return Generation("", first, chunks[-1][0], n, sent_at, chunks)


def test_batch_one_is_tokens_after_the_first_over_the_time():
    window, rate = batch_decode_rate([gen(0.0, 0.5, 11, 0.01)])
    assert window == "batch" and rate == pytest.approx(100.0)


def test_whole_batch_window_counts_every_request():
    # two requests decode at 100 tok/s each from 0.5 s and 0.6 s: together from 0.6 s until the first ends
    window, rate = batch_decode_rate([gen(0.0, 0.5, 51, 0.01), gen(0.0, 0.6, 51, 0.01)])
    assert window == "batch" and rate == pytest.approx(100.0, rel=0.05)


def test_no_common_window_falls_back_to_each_request_after_the_last_prefill():
    # the first request ends (1.0 s) before the second's first token (2.0 s): no window where both decode
    early, late = gen(0.0, 0.5, 6, 0.1), gen(0.0, 2.0, 11, 0.05)
    window, rate = batch_decode_rate([early, late])
    assert window == "tail" and rate == pytest.approx(10 / 0.5)   # the late one alone: 10 tokens in 0.5 s
    window, rate = batch_decode_rate([gen(0.0, 0.5, 1, 0.1), gen(0.0, 2.0, 1, 0.1)])
    assert window == "tail" and math.isnan(rate)                   # nobody decodes after the last first token
