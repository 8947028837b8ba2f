"""Benchmark: one attention layer through a chunked prefill (SGLang's ``--chunked-prefill-size``), the way the
server runs it: every chunk after the first reads its prefix from the paged pool. Side by side in one process:

* ``shplb``: :class:`sglang_shplb.kernels.SparsePrefill` as the server plans it (host lengths given, the pool's
  64-slot pages, so cuDNN's block-sparse route takes the sparse heads where ``SHPLB_CUDNN_BLOCKS`` says): dense
  heads after a prefix as two cuDNN calls merged (:func:`sglang_shplb.kernels.dense_pieces.dense_piece`), the
  top-k index built for the chunk's query rows only;
* ``shplb, dense on Triton``: the same, planned without host lengths, so its dense heads run on the 128-row
  Triton kernel (the route every chunk after the first took before 2026-12-06);
* the top-k index alone, built for the chunk's query rows vs for every row of the prefix (before);
* ``dense cuDNN``: every head dense through the same API (cuDNN SDPA on the first chunk, two cuDNN calls merged
  after it): what the layer costs without sparsity;
* FlashInfer's paged prefill of every head (the stock backend's kernel), where FlashInfer is installed.

Per context: the sum over its chunks of the median time of each call (``triton.testing.do_bench``), ms per
layer, and ratios (each chunk's times kept in the JSON, ``chunk_ms``). Checks: the two ``shplb`` routes agree,
and ``shplb``'s dense heads equal the dense run's.

    PYTHONUNBUFFERED=1 python bench/chunked_prefill.py llama8b --out $OUT            # GPU
    python bench/chunked_prefill.py llama8b --profile --ctx 131072 --out $OUT       # + the last chunk by kernel
    TRITON_INTERPRET=1 python bench/chunked_prefill.py llama8b --cpu-smoke --out /tmp/cp   # logic check (CPU)
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import sys

if "--cpu-smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from layer_path import SHAPES, paged_pool, plan_budgets  # noqa: E402  (bench/layer_path.py)
from timing import bench, device_tag, flashinfer_or_none, kernel_ms, log, results_writer  # noqa: E402  (bench/timing.py)

from sglang_shplb.core.patterns import BLOCK, HeadBudget, Pattern  # noqa: E402
from sglang_shplb.kernels import SparsePrefill, build_block_index  # noqa: E402
from sglang_shplb.kernels.cudnn_blocks import route_mode  # noqa: E402


def chunks(n: int, size: int) -> list[tuple[int, int]]:
    """``(prefix, queries)`` of each chunk of an ``n``-token prefill."""
    return [(p, min(size, n - p)) for p in range(0, n, size)]


def profile_chunk(fn, plan, calls: int = 10) -> dict:
    """One chunk's ``shplb`` call (``plan()`` first: the loop left it planned for another route): wall ms
    (``do_bench``), the device ms of each kernel per call (torch.profiler) and their sum, and host ms per call
    (``calls`` issued back to back, one synchronise at the end): where the chunk's time goes, and whether the
    host keeps the GPU fed."""
    import time
    plan()
    wall = bench(fn, False)
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t) / calls * 1e3
    torch.cuda.synchronize()
    ms = kernel_ms(fn, calls)
    log(f"  last chunk: wall {wall:.3f} ms, kernels {sum(ms.values()):.3f} ms, host "
        f"{host:.3f} ms; " + ", ".join(f"{k} {v:.3f}" for k, v in list(ms.items())[:10]))
    return {"wall_ms": wall, "kernel_ms": ms, "kernels_total_ms": sum(ms.values()), "host_ms": host}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("which", choices=sorted(SHAPES))
    ap.add_argument("--ctx", default="32768,65536,131072")
    ap.add_argument("--chunk", type=int, default=8192, help="SGLang's --chunked-prefill-size")
    ap.add_argument("--layer", type=int, default=0, help="which layer's budgets (the mixed plan's are all alike)")
    ap.add_argument("--topk-tile", type=int, default=64, choices=[64, 128],
                    help="the mixed plan's top-k selection tile (128: query pairs over 128-token superblocks)")
    ap.add_argument("--out", default="/tmp/out")
    ap.add_argument("--profile", action="store_true",
                    help="also profile the last chunk of each context (GPU): device time by kernel, host time")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU (Triton interpreter)")
    a = ap.parse_args()
    s = SHAPES[a.which]
    hq, hkv, d = s["hq"], s["hkv"], s["d"]
    budgets = plan_budgets(a.which, a.topk_tile)[a.layer]
    ctxs = [int(x) for x in a.ctx.split(",")]
    dev, dt = "cuda", torch.bfloat16
    if a.cpu_smoke:
        ctxs, a.chunk, dev, dt = [300], 128, "cpu", torch.float32
    scale = d ** -0.5
    max_ctx = max(ctxs) + 64
    r2t, pool = paged_pool(2, max_ctx, dev)
    rpi = torch.zeros(1, dtype=torch.int32, device=dev)
    fi = flashinfer_or_none(a.cpu_smoke)
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu (smoke)"
    kinds = {k: sum(b.pattern is k for b in budgets) for k in Pattern}
    res = {"which": a.which, "device": name, "date": _dt.date.today().isoformat(), "chunk": a.chunk,
           "torch": torch.__version__, "layer": a.layer, "topk_tile": a.topk_tile,
           "heads": {k.value: n for k, n in kinds.items() if n}, "cudnn_blocks": route_mode(), "rows": []}
    os.makedirs(a.out, exist_ok=True)
    tile = "" if a.topk_tile == 64 else f"_tile{a.topk_tile}"
    dump = results_writer(res, os.path.join(a.out, f"chunked_prefill_{a.which}{tile}_{device_tag(name)}"))
    log(f"# bench/chunked_prefill.py  {a.which}  device={name}  date={res['date']}  chunk={a.chunk}  "
        f"heads {res['heads']}  top-k tile {a.topk_tile}  SHPLB_CUDNN_BLOCKS={res['cudnn_blocks']}  {dt}")
    sparse = SparsePrefill(budgets, hkv, d, sm_scale=scale)
    dense = SparsePrefill([HeadBudget.dense()] * hq, hkv, d, sm_scale=scale)
    dense_heads = [h for h, b in enumerate(budgets) if b.pattern is Pattern.DENSE]
    ws = torch.empty(256 << 20, dtype=torch.uint8, device=dev) if fi is not None else None
    log(f"{'ctx':>7} {'shplb':>9} {'dense Triton':>12} {'x':>6} {'index rows':>10} {'all rows':>9} {'x':>6} "
        f"{'dense cuDNN':>11} {'x':>6} {'FlashInfer':>10} {'x':>6}   (ms per layer, summed over chunks)")
    for n in ctxs:
        g = torch.Generator(device=dev).manual_seed(n)
        kb = torch.randn(pool, hkv, d, device=dev, dtype=dt, generator=g)
        vb = torch.randn(pool, hkv, d, device=dev, dtype=dt, generator=g)
        q_all = torch.randn(n, hq, d, device=dev, dtype=dt, generator=g)
        per = {k: [] for k in ("shplb", "rule_dense", "index_query_rows", "index_all_rows", "dense_cudnn")}
        if fi is not None:
            per["flashinfer"] = []
        diff_routes = diff_dense = 0.0
        for p, m in chunks(n, a.chunk):
            L = p + m
            q = q_all[p:L]
            cu = torch.tensor([0, m], dtype=torch.int32, device=dev)
            kvl = torch.tensor([L], dtype=torch.int32, device=dev)
            paged = dict(req_to_token=r2t, req_pool_indices=rpi)
            host = dict(q_lens_cpu=[m], kv_lens_cpu=[L])
            o1, o2, o3 = (torch.empty_like(q) for _ in range(3))
            sparse.plan(cu, kvl, m, L, **paged, **host, kv_page_size=BLOCK)
            per["shplb"].append(bench(lambda: sparse.run(q, kb, vb, out=o1), a.cpu_smoke))
            sparse.run(q, kb, vb, out=o1)
            dense.plan(cu, kvl, m, L, **paged, **host)
            per["dense_cudnn"].append(bench(lambda: dense.run(q, kb, vb, out=o3), a.cpu_smoke))
            dense.run(q, kb, vb, out=o3)
            sparse.plan(cu, kvl, m, L, **paged)     # no host lengths: dense heads on the Triton rule kernel
            if a.cpu_smoke:
                sparse._host_lens = None             # the CPU derives them from its tensors
            per["rule_dense"].append(bench(lambda: sparse.run(q, kb, vb, out=o2), a.cpu_smoke))
            sparse.run(q, kb, vb, out=o2)
            for key, mq in (("index_query_rows", m), ("index_all_rows", None)):
                per[key].append(bench(lambda: build_block_index(budgets, q, kb, cu, kvl, L, max_q_len=mq, **paged),
                                      a.cpu_smoke))
            diff_routes = max(diff_routes, float((o1.float() - o2.float()).abs().max()))
            diff_dense = max(diff_dense, float((o1[:, dense_heads].float() - o3[:, dense_heads].float()).abs().max()))
            if fi is not None:
                w = fi.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD")
                w.plan(cu, torch.tensor([0, L], dtype=torch.int32, device=dev), r2t[0, :L].contiguous(),
                       torch.ones(1, dtype=torch.int32, device=dev), hq, hkv, d, 1, causal=True,
                       q_data_type=dt, sm_scale=scale)
                per["flashinfer"].append(bench(lambda: w.run(q, (kb[:, None], vb[:, None])), a.cpu_smoke))
        tot = {k: sum(v) for k, v in per.items()}
        row = {"n": n, "chunks": len(chunks(n, a.chunk)), **{k + "_ms": v for k, v in tot.items()},
               "chunk_ms": per,
               **({"last_chunk": profile_chunk(lambda: sparse.run(q, kb, vb, out=o1),
                                               lambda: sparse.plan(cu, kvl, m, L, **paged, **host,
                                                                   kv_page_size=BLOCK))}
                  if a.profile and not a.cpu_smoke else {}),
               "rule_dense_over_shplb": tot["rule_dense"] / tot["shplb"],
               "index_all_over_query_rows": tot["index_all_rows"] / tot["index_query_rows"],
               "dense_cudnn_over_shplb": tot["dense_cudnn"] / tot["shplb"],
               "max_abs_diff_routes": diff_routes, "max_abs_diff_dense_heads_vs_dense_run": diff_dense}
        if fi is not None:
            row["flashinfer_over_shplb"] = tot["flashinfer"] / tot["shplb"]
        res["rows"].append(row)
        fl = (f"{tot['flashinfer']:10.2f} {row['flashinfer_over_shplb']:5.2f}x" if fi is not None
              else f"{'-':>10} {'-':>6}")
        log(f"{n:7d} {tot['shplb']:9.2f} {tot['rule_dense']:12.2f} {row['rule_dense_over_shplb']:5.2f}x "
            f"{tot['index_query_rows']:10.2f} {tot['index_all_rows']:9.2f} {row['index_all_over_query_rows']:5.2f}x "
            f"{tot['dense_cudnn']:11.2f} {row['dense_cudnn_over_shplb']:5.2f}x {fl}   "
            f"max|diff| routes {diff_routes:.3g}, dense heads vs dense run {diff_dense:.3g}")
        dump()
    log("x: the column before over shplb (over 'index rows' for 'all rows'); > 1: shplb's route is faster")
    dump()


if __name__ == "__main__":
    main()
