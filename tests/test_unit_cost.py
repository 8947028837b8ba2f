"""bench/unit_cost.py on the CPU (Triton interpreter): each case computes exactly its piece's rows on the
receiving rank, from what the home packed, and is priced by the cost model."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def test_unit_cost_smoke_computes_each_piece_from_the_packed_buffer(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import unit_cost

    unit_cost.main(["--cpu-smoke", "--out", str(tmp_path)])
    doc = json.loads((tmp_path / "unit_cost_smoke.json").read_text())
    cases = doc["cases"]
    assert {(c["pattern"], c["rows"]) for c in cases} == {(p, r) for p in ("dense", "topk") for r in (64, 128)}
    assert all(c["rows_out"] == c["rows"] and c["ms"] > 0 and c["pred_ms"] > 0 for c in cases)
    assert all((c["unrouted_ms"] or 0) > 0 for c in cases if c["pattern"] == "dense")


def test_prefix_kernel_smoke_equals_across_kernels(tmp_path):
    """bench/prefix_kernel.py on the CPU: each kernel and the package's own route give the same piece."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import prefix_kernel

    prefix_kernel.main(["--cpu-smoke", "--out", str(tmp_path)])
    cases = json.loads((tmp_path / "prefix_kernel_smoke.json").read_text())["cases"]
    assert len(cases) == 2
    for c in cases:
        assert set(c["ms"]) == {"math", "flash", "package"} and all(t > 0 for t in c["ms"].values())
        assert max(c["max_diff"].values()) < 1e-5
