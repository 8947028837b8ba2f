"""Where does a rank's home call spend its time, and what does the cost model miss? Each rank's home heads of
the head-parallel benchmark's plans (``head_parallel.plan_budgets``, contiguous placement) timed whole and
by part, next to the cost model's prediction of each part.

Per rank: ``home`` (the executor's call: :func:`~sglang_shplb.kernels.head_parallel.attend_heads` over all
its heads), ``dense`` (its dense heads alone, cuDNN), ``sparse`` (its other heads alone: index build +
kernels), ``index`` (the block-index build alone), and one call per sparse budget present (its heads of that
budget alone). Then, per distinct sparse budget of the cell, calls of 1 and 2 heads of it alone (a
per-call cost shows as ``t(1) > t(2) / 2``; the rank's other heads run at the executor's ``CHEAP`` budget, as
heads moved away do, which adds a little). Predicted ms: the sum of the cost model's ``head_time`` of
the part's heads times the move calibration's compute scale. The run ends with the home call's miss by kind of
rank (:func:`by_class`: whether it holds top-k and vertical-slash heads, whose index it builds).

  python bench/home_calls.py --out $OUT                                        # GPU, ~2 min
  python bench/home_calls.py --shapes llama8b --ctx 65536 --kernels --out $OUT # + device time by kernel
  TRITON_INTERPRET=1 python bench/home_calls.py --cpu-smoke --out /tmp/hc      # logic check
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from head_parallel import H100_REFIT, SHAPES, layer_qkv, plan_budgets, rank_qkv, run_grid  # noqa: E402
from timing import bench, device_gaps, device_name, device_tag, host_syncs, kernel_ms, log, results_writer  # noqa: E402

from sglang_shplb.core.head_map import rank_heads  # noqa: E402
from sglang_shplb.core.patterns import Pattern  # noqa: E402
from sglang_shplb.kernels.head_parallel import KVRows, attend_heads  # noqa: E402
from sglang_shplb.kernels.index import build_block_index  # noqa: E402
from sglang_shplb.planning.cost_model import load_cost_model  # noqa: E402

def parts(budgets) -> dict[str, list[int]]:
    """The rank's heads by part: ``dense``, ``sparse`` and one entry per distinct sparse budget."""
    out = {"home": list(range(len(budgets))),
           "dense": [h for h, b in enumerate(budgets) if b.pattern is Pattern.DENSE],
           "sparse": [h for h, b in enumerate(budgets) if b.pattern is not Pattern.DENSE]}
    for b in sorted({b for b in budgets if b.pattern is not Pattern.DENSE}, key=lambda b: b.describe()):
        out[b.describe()] = [h for h, x in enumerate(budgets) if x == b]
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="llama8b,llama70b")
    ap.add_argument("--ctx", default="65536,131072")
    ap.add_argument("--tp", default="4,8")
    ap.add_argument("--plans", default="profiled,mixed")
    ap.add_argument("--calibration", default=str(H100_REFIT))
    ap.add_argument("--reps", type=int, default=30, help="milliseconds of repeats per timing")
    ap.add_argument("--out", default="/tmp/out")
    ap.add_argument("--kernels", action="store_true",
                    help="also record each part's device time by kernel (torch.profiler; GPU only), write a cProfile "
                         "of each rank's home call (host time by function) to host_<cell>_r<rank>.txt, and time "
                         "its device span, busy time and idle gaps as do_bench sees it (timing.device_gaps)")
    ap.add_argument("--cpu-smoke", action="store_true")
    a = ap.parse_args(argv)
    smoke, dev, dt, shapes, ctxs, tps = run_grid(a)
    cost = load_cost_model(a.calibration)
    sigma = (cost.move_calibration or {}).get("compute_scale") or 1.0
    name = device_name(smoke)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    res = {"device": name, "date": time.strftime("%Y-%m-%d"), "argv": sys.argv[1:], "calibration": a.calibration,
           "compute_scale": sigma, "cells": []}
    dump = results_writer(res, str(out / f"home_calls_{device_tag(name)}"))
    log(f"home calls on {name}; predictions: {cost!r} x compute scale {sigma:.3f}")
    for shape in shapes:
        hq, hkv, d = SHAPES[shape]
        scale = d ** -0.5
        for n in ctxs:
            q, k, v = layer_qkv(n, hq, hkv, d, dev, dt)
            cu = torch.tensor([0, n], dtype=torch.int32, device=dev)
            kvl = torch.tensor([n], dtype=torch.int32, device=dev)
            rows = KVRows.back_to_back([n])
            for plan in a.plans.split(","):
                budgets = plan_budgets(plan, hq, hkv, seed=n)
                for tp in tps:
                    cell = {"shape": shape, "n": n, "plan": plan, "tp": tp, "ranks": []}
                    log(f"\n## {shape} n={n} {plan} TP{tp}: part, heads, measured ms, predicted ms, ratio")
                    for r in range(tp):
                        qh = rank_heads(hq, tp, r)
                        qs, ks, vs = rank_qkv(q, k, v, tp, r)
                        local = budgets[qh[0]:qh[-1] + 1]
                        o = torch.zeros_like(qs)
                        rec = {"rank": r, "budgets": [b.describe() for b in local], "parts": {}}
                        for part, hs in parts(local).items():
                            if not hs:
                                continue
                            t = bench(lambda hs=hs: attend_heads(qs, ks, vs, rows, [n], [n], local, hs, scale, o),
                                      smoke, a.reps)
                            p = sum(cost.head_time(local[h], n, d, hq // hkv) for h in hs) * sigma * 1e3
                            rec["parts"][part] = {"heads": len(hs), "ms": t, "pred_ms": p}
                            log(f"rank {r} {part:28s} {len(hs):2d} {t:8.3f} {p:8.3f} {t / p:6.2f}")
                            if a.kernels and not smoke and part in ("home", "sparse"):
                                call = (lambda hs=hs: attend_heads(qs, ks, vs, rows, [n], [n], local, hs, scale, o))
                                rec["parts"][part]["kernel_ms"] = rank_kernels(call)
                                if part == "home":
                                    rec["parts"][part]["host_ms"] = host_profile(
                                        call, out / f"host_{shape}_{n}_{plan}_tp{tp}_r{r}.txt")
                                    try:     # a diagnostic: a profiler that cannot tell is reported, not fatal
                                        g = rec["parts"][part]["device_gaps"] = device_gaps(call)
                                        log(f"    device timeline (host ahead, L2 flushed): span {g['span_ms']:.3f} "
                                            f"ms, busy {g['busy_ms']:.3f}, gaps {g['gaps_ms']:.3f}")
                                    except Exception as e:  # noqa: BLE001
                                        rec["parts"][part]["device_gaps"] = {"error": repr(e)[:300]}
                                        log(f"    device timeline: {e!r}")
                        if rec["parts"].get("sparse"):
                            t = bench(lambda: build_block_index(local, qs, ks, cu, kvl, n, cu_seqlens_k=cu), smoke,
                                      a.reps)
                            syncs = {} if smoke else host_syncs(
                                lambda: build_block_index(local, qs, ks, cu, kvl, n, cu_seqlens_k=cu))
                            rec["parts"]["index"] = {"ms": t, "host_syncs": syncs}
                            log(f"rank {r} {'index':28s}    {t:8.3f}" + (f"  host syncs {syncs}" if syncs else ""))
                        cell["ranks"].append(rec)
                    cell["alone"] = alone(budgets, q, k, v, tp, rows, scale, cost, sigma, smoke, a.reps)
                    res["cells"].append(cell)
                    dump()
            del q, k, v
    res["by_class"] = by_class(res["cells"])
    dump()


def rank_kernels(fn) -> dict[str, float]:
    """:func:`timing.kernel_ms` of ``fn``, logged: which launch a rank's miss sits in."""
    out = kernel_ms(fn)
    log("    kernels (ms per call): " + ", ".join(f"{k} {v:.3f}" for k, v in list(out.items())[:8]))
    return out


def host_profile(fn, path: Path, calls: int = 50) -> float:
    """Host milliseconds per call of ``fn`` (the GPU left to run behind it; synchronised once at the end), and
    a cProfile of those calls by function, written to ``path``: where a host-bound rank's time goes."""
    import cProfile
    import io
    import pstats
    fn()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    host = (time.perf_counter() - t) / calls * 1e3
    torch.cuda.synchronize()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(40)
    path.write_text(f"host ms per call (under cProfile): {host:.3f}\n" + buf.getvalue())
    log(f"    host ms per call (under cProfile) {host:.3f} -> {path.name}")
    return host


def rank_class(budgets: list[str]) -> str:
    """A rank's kind of home call: which indexed patterns (top-k, vertical-slash) its heads include."""
    kinds = [k for k in ("topk", "vslash") if any(b.startswith(k) for b in budgets)]
    return "+".join(kinds) or "no index"


def by_class(cells: list[dict]) -> dict:
    """The home call's measured minus predicted ms over every rank of every cell, per :func:`rank_class`
    (median and measured / predicted ratio): where the cost model misses, by kind of rank."""
    groups: dict[str, list[tuple[float, float]]] = {}
    for c in cells:
        for r in c["ranks"]:
            h = r["parts"]["home"]
            groups.setdefault(rank_class(r["budgets"]), []).append((h["ms"], h["pred_ms"]))
    out = {}
    log("\n## home call minus prediction, by kind of rank: n, median ms, median measured / predicted")
    for k, v in sorted(groups.items()):
        m = np.array(v)
        out[k] = {"n": len(v), "median_residual_ms": float(np.median(m[:, 0] - m[:, 1])),
                  "median_ratio": float(np.median(m[:, 0] / m[:, 1]))}
        log(f"{k:12s} {len(v):3d} {out[k]['median_residual_ms']:+8.3f} {out[k]['median_ratio']:6.2f}")
    return out


def alone(budgets, q, k, v, tp, rows, scale, cost, sigma, smoke, reps) -> dict:
    """Each distinct sparse budget of the layer in a rank's layout, 1 and 2 heads of it, the others idle."""
    n, hq, d = q.shape
    qs, ks, vs = rank_qkv(q, k, v, tp, 0)
    o = torch.zeros_like(qs)
    out = {}
    for b in sorted({b for b in budgets if b.pattern is not Pattern.DENSE}, key=lambda b: b.describe()):
        local = [b] * qs.shape[1]
        row = {}
        for m in (1, 2):
            t = bench(lambda m=m: attend_heads(qs, ks, vs, rows, [n], [n], local, list(range(m)), scale, o),
                      smoke, reps)
            row[m] = {"ms": t, "pred_ms": m * cost.head_time(b, n, d, hq // k.shape[1]) * sigma * 1e3}
        out[b.describe()] = row
        log(f"alone {b.describe():28s} 1 head {row[1]['ms']:8.3f} (pred {row[1]['pred_ms']:.3f})  "
            f"2 heads {row[2]['ms']:8.3f} (pred {row[2]['pred_ms']:.3f})")
    return out


if __name__ == "__main__":
    main()
