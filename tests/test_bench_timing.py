"""bench/timing.py: the device timeline's span and busy time from kernel intervals."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from timing import span_and_busy  # noqa: E402


@pytest.mark.parametrize("intervals,span,busy", [
    ([], 0.0, 0.0),
    ([(0.0, 2.0)], 2.0, 2.0),
    ([(0.0, 2.0), (3.0, 4.0)], 4.0, 3.0),                  # a 1 µs gap
    ([(0.0, 2.0), (1.0, 3.0), (5.0, 6.0)], 6.0, 4.0),      # overlap counted once, then a gap of 2
    ([(0.0, 5.0), (1.0, 2.0), (6.0, 7.0)], 7.0, 6.0),      # an interval inside another
])
def test_span_and_busy(intervals, span, busy):
    assert span_and_busy(intervals) == (pytest.approx(span), pytest.approx(busy))
