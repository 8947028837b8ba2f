"""What one moved piece costs on the rank that computes it, by kernel: a head's last ``rows`` query rows after a
``prefix`` of the same sequence, shipped from its home (TP 2, rank 0 keeps the head's first part, rank 1 computes
the rest from the received buffer: the executor's ``HeadParallelExtend.compute_units``), against the cost model's
price of that unit.

Round 23's records (``bench/results/head_parallel/round23_refine_h100.json``) put small pieces after long
prefixes at 5-10x their price (a 1,408-row dense piece after 104K tokens: 1.27 ms measured, 0.14 ms priced; a
1,600-row top-k piece after 49K: 0.95 ms against 0.10). This script says which launch holds that time, and
times dense pieces with their prefix on :func:`.dense_pieces.prefix_backend`'s kernel (the default) against
cuDNN however small the grid (:func:`.dense_pieces.unrouted_prefixes`). Round 24 (H100): a unit's wall time was
2-8x the sum of its kernels for pieces under 4K rows.

  python bench/unit_cost.py --out $OUT                       # dense and top-k, prefixes 32K-96K, 1K-16K rows (GPU)
  TRITON_INTERPRET=1 python bench/unit_cost.py --cpu-smoke --out /tmp/uc   # logic check on the CPU
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

from head_parallel import H100_REFIT, layer_qkv  # noqa: E402
from home_calls import host_profile  # noqa: E402
from timing import bench, device_gaps, device_name, device_tag, kernel_ms, log, results_writer  # noqa: E402

from sglang_shplb.core.head_map import layer_work  # noqa: E402
from sglang_shplb.core.patterns import HeadBudget  # noqa: E402
from sglang_shplb.core.placement_types import LayerPlacement, Piece  # noqa: E402
from sglang_shplb.kernels.dense_pieces import unrouted_prefixes  # noqa: E402
from sglang_shplb.kernels.head_parallel import HeadParallelExtend, RankLayout  # noqa: E402
from sglang_shplb.planning.cost_model import load_cost_model  # noqa: E402
from sglang_shplb.planning.move_calibration import rank_predictions  # noqa: E402
from sglang_shplb.scheduler.head_schedule import ExtendShape, layer_schedule  # noqa: E402

PATTERNS = {"dense": HeadBudget.dense(), "topk": HeadBudget.topk(0.1, 16)}


def unit_case(pattern: str, prefix: int, rows: int, d: int, dev, dt, smoke: bool, reps: int, cost,
              out_dir: Path) -> dict:
    """One piece ``[prefix, prefix + rows)`` of head 0 (``pattern``) computed on rank 1 from rank 0's buffer."""
    n, hq, hkv, tp = prefix + rows, 2, 2, 2
    q, k, v = layer_qkv(n, hq, hkv, d, dev, dt)
    budgets = [PATTERNS[pattern], HeadBudget.streaming(64, 64)]
    cut = prefix / n
    lp = LayerPlacement([[Piece(0, 0.0, cut)], [Piece(0, cut, 1.0), Piece(1)]])
    work = layer_work(lp, hq, hkv, tp)
    sched = layer_schedule(work, ExtendShape((0,), (n,)))
    r2t, rpi = torch.arange(n, dtype=torch.int32, device=dev)[None], torch.zeros(1, dtype=torch.long, device=dev)
    hps = [HeadParallelExtend(RankLayout(r, tp, hq, hkv, d), None) for r in range(tp)]
    qs, ks, vs = [q[:, [r]].contiguous() for r in range(tp)], [k[:, [r]].contiguous() for r in range(tp)], \
        [v[:, [r]].contiguous() for r in range(tp)]
    sent = hps[0].pack_inputs(sched, qs[0], ks[0], vs[0], r2t, rpi)
    recv = sent[:sched.input_elems(0, 1, d)]
    scale = d ** -0.5

    def units():
        return hps[1].compute_units(sched, 0, budgets, scale, None, recv=recv)

    got = units()
    ms = bench(units, smoke, reps)
    unrouted_ms = None
    if pattern == "dense":          # the same piece with its prefix on cuDNN however small its grid (before round 24)
        with unrouted_prefixes():
            unrouted_ms = bench(units, smoke, reps)
    pred = rank_predictions(lp, budgets, cost, n, hkv, tp, d, q.element_size())[1]
    pred_ms = sum(u["pred_s"] for u in pred["units"] if u["home"] == 0) * 1e3
    out = {"pattern": pattern, "prefix": prefix, "rows": rows, "ms": ms, "pred_ms": pred_ms,
           "rows_out": int(got.numel() // d), "unrouted_ms": unrouted_ms}
    if not smoke:
        out["kernels"] = kernel_ms(units)
        out["gaps"] = device_gaps(units)      # host ahead and L2 flushed, as do_bench times it
        out["host_ms"] = host_profile(units, out_dir / f"host_{pattern}_{prefix}_{rows}.txt")
    log(f"{pattern:5s} prefix {prefix:6d} rows {rows:6d}: {ms:.3f} ms (priced {pred_ms:.3f}, x{ms / pred_ms:.2f})"
        + (f", prefix on the piece's kernel {unrouted_ms:.3f} ms (routed x{unrouted_ms / ms:.2f})"
           if unrouted_ms else "")
        + ("; " + ", ".join(f"{kk} {vv:.3f}" for kk, vv in list(out.get("kernels", {}).items())[:6])
           if "kernels" in out else "")
        + (", device span {span_ms:.3f} busy {busy_ms:.3f} gaps {gaps_ms:.3f} ms".format(**out["gaps"])
           + f", host {out['host_ms']:.3f} ms" if "gaps" in out else ""))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prefixes", default="32768,65536,98304")
    ap.add_argument("--rows", default="1024,4096,16384")
    ap.add_argument("--patterns", default="dense,topk")
    ap.add_argument("--calibration", default=str(H100_REFIT))
    ap.add_argument("--reps", type=int, default=50, help="milliseconds of repeats per timing")
    ap.add_argument("--out", default="/tmp/out")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU (Triton interpreter)")
    a = ap.parse_args(argv)
    smoke = a.cpu_smoke
    dev, dt, d = ("cpu", torch.float32, 64) if smoke else ("cuda", torch.bfloat16, 128)
    prefixes = [256] if smoke else [int(x) for x in a.prefixes.split(",")]
    rows = [64, 128] if smoke else [int(x) for x in a.rows.split(",")]
    cost = load_cost_model(a.calibration)
    name = device_name(smoke)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    res = {"device": name, "date": time.strftime("%Y-%m-%d"), "argv": sys.argv[1:], "cost_model": cost.to_dict(),
           "cases": []}
    dump = results_writer(res, str(out / f"unit_cost_{device_tag(name)}"))
    log(f"one moved piece on the rank computing it, {name}, priced with {cost!r}")
    for pattern in a.patterns.split(","):
        for p in prefixes:
            for r in rows:
                res["cases"].append(unit_case(pattern, p, r, d, dev, dt, smoke, a.reps, cost, out))
                dump()


if __name__ == "__main__":
    main()
