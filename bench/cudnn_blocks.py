"""Sparse prefill heads on cuDNN's block-sparse attention (SM90, 64-token blocks, the cuDNN frontend's CuTe DSL
kernel) against this package's Triton kernels on the same block index, and both against dense cuDNN SDPA per
head (issue 15's goal: sparse heads at >= 0.85 of SDPA's per-head efficiency at >= 32K). Round 26.

Per context and budget (every head of a Llama-3-8B-shaped layer the same budget), on one index:
* ``ours``: the kernel :class:`~sglang_shplb.kernels.SparsePrefill` runs for that budget (the block-index kernel
  for top-k / vertical-slash at 64-token blocks, the rule kernel for streaming);
* ``ours_paged`` / ``cudnn_route_paged``: the same two with the K/V in a pool of 64-slot pages in shuffled order
  (SGLang's ``--page-size 64`` pool, which the server runs), read in place through ``req_to_token``;
* ``ours_tile128``: top-k at 128-token superblocks on the tile kernel (its own index; the package's fastest top-k);
* ``cudnn_route``: :func:`~sglang_shplb.kernels.cudnn_blocks.block_sparse_heads` (cuDNN over the listed blocks but
  the diagonal, then the diagonal merged by :mod:`~sglang_shplb.kernels.triton_diagonal`), and its two parts
  alone (``cudnn_listed``, ``diagonal_merge``); also its host time per call.
Per-head efficiency = density x SDPA time / time. Then the serving benchmark's mixed layer through
``SparsePrefill.run`` with the route off, on and ``auto`` (``SHPLB_CUDNN_BLOCKS``): a full prefill, and a chunk after a
prefix in a pool of 64-slot pages. The checks first: the route against the masked dense reference (a full
prefill, a chunk after an aligned prefix, a length not a multiple of 64).

    PYTHONUNBUFFERED=1 python bench/cudnn_blocks.py --out $OUT        # GPU, cudnn + cutlass-dsl importable
    python bench/cudnn_blocks.py --cpu-smoke --out /tmp/cb              # logic check: Triton interpreter, cuDNN's
                                                                        # call replaced by its torch stand-in
"""
from __future__ import annotations

import math
import os
import time

from prefill_setup import (PrefillRun, attended_pairs_tokens, finish_efficiency_plot, one_sequence, parser,
                           start_run, time_sdpa)  # noqa: I001

import torch

import sglang_shplb.kernels.api as api
import sglang_shplb.kernels.cudnn_blocks as cudnn_blocks
from sglang_shplb.core.model_spec import ModelSpec
from sglang_shplb.core.patterns import BLOCK, HeadBudget
from sglang_shplb.kernels import SparsePrefill, build_block_index, sparse_prefill
from sglang_shplb.kernels.cudnn_blocks import (SWITCH, block_sparse_heads, cudnn_blocks_unavailable,
                                               cudnn_listed_blocks, listed_blocks_reference)
from sglang_shplb.kernels.reference import reference_sparse_prefill, relative_error
from sglang_shplb.kernels.triton_diagonal import diagonal_merge
from sglang_shplb.kernels.triton_prefill import rule_prefill, tile_prefill
from sglang_shplb.planning.synthetic_plans import serving_bench_budget

from timing import bench, log

BUDGETS = {"topk0.1": HeadBudget.topk(0.1, 2), "topk0.2": HeadBudget.topk(0.2, 2),
           "stream(128+2048)": HeadBudget.streaming(128, 2048), "vslash0.1": HeadBudget.vslash(0.1, 2)}
HOST_CALLS = 20


def main(argv: list[str] | None = None):
    args = parser(__doc__, "16384,32768,65536,131072").parse_args(argv)
    run = start_run(args, "cudnn_blocks.py", "cudnn_blocks", [384])
    why = cudnn_blocks_unavailable(torch.empty(1, 1, run.d, device=run.dev, dtype=run.dtype))
    run.res["cudnn"] = why or "available"
    log(f"cuDNN block-sparse: {why or 'available'}")
    if why and not run.smoke:
        run.dump()
        raise SystemExit(f"cuDNN's block-sparse attention cannot run here: {why}")
    listed = listed_blocks_reference if why else cudnn_listed_blocks
    if why:     # the CPU logic check: SparsePrefill's route on cuDNN's stand-in
        api.cudnn_blocks_unavailable = lambda q: None
        cudnn_blocks.cudnn_listed_blocks = listed_blocks_reference
    check(run, listed)
    run.res["layer"] = []
    run.dump()
    for n in run.ctxs:
        if run.elapsed() > args.budget_s:
            log(f"time budget reached: skipping ctx {n}")
            continue
        run.res["prefill"].append(time_context(run, n, listed))
        run.res["layer"].append(time_layer(run, n))
        run.dump()
    summary(run)
    run.res["wall_s"] = run.elapsed()
    run.dump()
    if not run.smoke:
        try:
            plot(run.res, run.path(".png"))
        except ImportError as e:
            log(f"no plot: {e}")


def _index(budgets, q, k, n_kv: int):
    dev = q.device
    cu = torch.tensor([0, q.shape[0]], dtype=torch.int32, device=dev)
    kvl = torch.tensor([n_kv], dtype=torch.int32, device=dev)
    return build_block_index(budgets, q, k, cu, kvl, n_kv, cu_seqlens_k=torch.tensor([0, n_kv], device=dev),
                             max_q_len=q.shape[0]), cu, kvl


def check(run: PrefillRun, listed) -> None:
    """The route against the masked dense reference on its own index, every budget of :data:`BUDGETS` in one
    layer: a full prefill, a chunk after an aligned prefix, and a length not a multiple of 64."""
    hq, hkv, d, dev = run.hq, run.hkv, run.d, run.dev
    mix = (list(BUDGETS.values()) * hq)[:hq]
    heads = torch.arange(hq, dtype=torch.int32, device=dev)
    for n_q, n_kv in ([(384, 384), (128, 320), (300, 300)] if run.smoke else [(4096, 4096), (1024, 4096),
                                                                                (4000, 4000)]):
        g = torch.Generator(device=dev).manual_seed(n_q + n_kv)
        q = torch.randn(n_q, hq, d, device=dev, dtype=run.dtype, generator=g)
        k = torch.randn(n_kv, hkv, d, device=dev, dtype=run.dtype, generator=g)
        v = torch.randn(n_kv, hkv, d, device=dev, dtype=run.dtype, generator=g)
        index, cu, kvl = _index(mix, q, k, n_kv)
        out = torch.full_like(q, float("nan"))
        t0 = time.perf_counter()
        block_sparse_heads(q, k, v, index.block_idx[0], index.block_cnt[0], heads, out, d ** -0.5, listed=listed)
        if dev == "cuda":
            torch.cuda.synchronize()
        if not run.res["checks"]:      # the process's first call: cuDNN's kernel compiles (CuTe DSL), once per
            run.res["first_call_s"] = time.perf_counter() - t0      # dtype, head dim and GQA ratio
            log(f"the route's first call (compiles): {run.res['first_call_s']:.2f} s")
        ref = reference_sparse_prefill(q, k, v, [index.masks(0, math.ceil(n_kv / BLOCK)).to(dev)], cu, kvl,
                                       cu_seqlens_k=torch.tensor([0, n_kv], dtype=torch.int32, device=dev))
        err = relative_error(out, ref)
        what = f"cudnn route, {n_q} rows after {n_kv - n_q}, mixed budgets"
        log(f"check {what} vs masked reference: rel err {err:.2e}")
        run.res["checks"].append({"what": what, "rel_err": err})


def _ours(budget: HeadBudget, q, k, v, index, cu, kvl, n: int, heads, **kv):
    """The kernel the package runs for ``budget`` (every head): the rule kernel for streaming, else the
    block-index kernel; ``kv``: the KV layout keywords."""
    if budget.pattern.value == "streaming":
        hq = q.shape[1]
        sinks = torch.full((hq,), budget.sink_blocks, dtype=torch.int32, device=q.device)
        wins = torch.full((hq,), budget.window_blocks, dtype=torch.int32, device=q.device)
        return lambda o: rule_prefill(q, k, v, heads, sinks, wins, cu, kvl, n, out=o, **kv)
    return lambda o: sparse_prefill(q, k, v, index.block_idx, index.block_cnt, index.head_dense, cu, kvl, n,
                                    out=o, **kv)


def paged_pool(k: torch.Tensor, v: torch.Tensor, seed: int):
    """``k, v`` of one sequence moved into a pool of 64-slot pages in shuffled order, as SGLang's ``--page-size
    64`` pool holds a request: the pool's K, V and the request's ``req_to_token`` table ``[1, n]``."""
    n = k.shape[0]
    npg = -(-n // BLOCK)
    g = torch.Generator(device=k.device).manual_seed(seed)
    pages = torch.randperm(npg + 3, device=k.device, generator=g)[:npg]
    rows = (pages[:, None] * BLOCK + torch.arange(BLOCK, device=k.device)).flatten()[:n]
    pk = k.new_zeros((npg + 3) * BLOCK, *k.shape[1:])
    pv = torch.zeros_like(pk)
    pk[rows], pv[rows] = k, v
    return pk, pv, rows.int()[None]


def _host_ms(fn, smoke: bool) -> float:
    """Host time of one call (the GPU not waited for), the median of :data:`HOST_CALLS`."""
    if smoke:
        return float("nan")
    ts = []
    for _ in range(HOST_CALLS):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e3)
        torch.cuda.synchronize()
    return sorted(ts)[len(ts) // 2]


def time_context(run: PrefillRun, n: int, listed) -> dict:
    hq, d, dev, smoke = run.hq, run.d, run.dev, run.smoke
    q, k, v, cu, kvl = one_sequence(n, hq, run.hkv, d, dev, run.dtype)
    scale = d ** -0.5
    causal_tok = n * (n + 1) // 2
    t_sdpa = time_sdpa(q, k, v, smoke) or {"none": 1.0}
    sdpa = min(t_sdpa.values())
    row = {"ctx": n, "sdpa_ms": t_sdpa, "sdpa_best_ms": sdpa, "configs": []}
    log(f"\n## ctx {n}: SDPA {', '.join(f'{a} {b:.3f} ms' for a, b in t_sdpa.items())}")
    heads = torch.arange(hq, dtype=torch.int32, device=dev)
    for name, budget in BUDGETS.items():
        index, _, _ = _index([budget] * hq, q, k, n)
        dens = sum(attended_pairs_tokens(index, n)) / (causal_tok * hq)
        ent = {"name": name, "density": dens, "variants": {}}
        nqb = n // BLOCK
        counts = (index.block_cnt[:, :, :nqb] - 1).clamp(min=0).int()
        o_p, lse_p = listed(q[None], k[None], v[None], index.block_idx[:, :, :nqb], counts, scale)
        pk, pv, r2t = paged_pool(k, v, n)
        rpi = torch.zeros(1, dtype=torch.int32, device=dev)
        variants = [("ours", _ours(budget, q, k, v, index, cu, kvl, n, heads, cu_seqlens_k=cu)),
                    ("cudnn_route", lambda o: block_sparse_heads(q, k, v, index.block_idx[0], index.block_cnt[0],
                                                                 heads, o, scale, listed=listed)),
                    ("ours_paged", _ours(budget, q, pk, pv, index, cu, kvl, n, heads, req_to_token=r2t,
                                         req_pool_indices=rpi)),
                    ("cudnn_route_paged", lambda o: block_sparse_heads(q, pk, pv, index.block_idx[0],
                                                                       index.block_cnt[0], heads, o, scale,
                                                                       listed=listed, kv_rows=r2t[0], n_kv=n)),
                    ("cudnn_listed", lambda o: listed(q[None], k[None], v[None], index.block_idx[:, :, :nqb],
                                                      counts, scale)),
                    ("diagonal_merge", lambda o: diagonal_merge(q, k, v, o_p, lse_p, heads, o, scale))]
        if budget.pattern.value == "topk":
            tb = HeadBudget.topk(budget.fraction, budget.min_blocks, tile=2 * BLOCK)
            tix, _, _ = _index([tb] * hq, q, k, n)
            variants.append(("ours_tile128", lambda o: tile_prefill(q, k, v, tix.block_idx, tix.block_cnt,
                                                                    tix.head_dense, heads, cu, kvl, n,
                                                                    cu_seqlens_k=cu, out=o)))
        outs = {}
        for vname, fn in variants:
            o = torch.full_like(q, float("nan"))
            try:
                fn(o)
                t = bench(lambda: fn(o), smoke)
            except Exception as e:  # noqa: BLE001
                log(f"  {vname}: failed: {type(e).__name__}: {str(e)[:300]}")
                continue
            outs[vname] = o
            ve = {"ms": t, "eff_vs_sdpa": dens * sdpa / t}
            if vname in ("cudnn_route", "cudnn_route_paged", "ours_paged"):
                ve["max_abs_diff_vs_ours"] = float((o.float() - outs["ours"].float()).abs().max()) \
                    if "ours" in outs else None
                ve["host_ms"] = _host_ms(lambda: fn(o), smoke)
            ent["variants"][vname] = ve
            log(f"  {vname:17s} {t:9.3f} ms  eff {ve['eff_vs_sdpa']:.3f}"
                + (f"  max|diff| vs ours {ve['max_abs_diff_vs_ours']:.1e}  host {ve['host_ms']:.3f} ms"
                   if ve.get("max_abs_diff_vs_ours") is not None else ""))
        vs = ent["variants"]
        if "ours" in vs and "cudnn_route" in vs:
            ent["route_speedup_vs_ours"] = vs["ours"]["ms"] / vs["cudnn_route"]["ms"]
            best = min(vs[x]["ms"] for x in ("ours", "ours_tile128") if x in vs)
            ent["route_speedup_vs_best_ours"] = best / vs["cudnn_route"]["ms"]
            if "ours_paged" in vs and "cudnn_route_paged" in vs:
                ent["paged_route_speedup_vs_ours_paged"] = vs["ours_paged"]["ms"] / vs["cudnn_route_paged"]["ms"]
            log(f"  {name}: density {dens:.3f}; cudnn route {ent['route_speedup_vs_ours']:.2f}x ours, "
                f"{ent['route_speedup_vs_best_ours']:.2f}x our best, paged "
                f"{ent.get('paged_route_speedup_vs_ours_paged', float('nan')):.2f}x ours paged")
        row["configs"].append(ent)
        del outs
        if not smoke:
            torch.cuda.empty_cache()
    return row


def time_layer(run: PrefillRun, n: int) -> dict:
    """The serving benchmark's mixed layer (``planning.synthetic_plans.serving_bench_budget``: KV group 0 dense,
    then streaming 128 + 2048 and top-k 10 % groups in turn) through ``SparsePrefill.run`` with the route off,
    then on, then ``auto`` (``SHPLB_CUDNN_BLOCKS``), back to back: a full prefill (keys contiguous), and the last
    chunk of a chunked prefill (8K rows, or half the context, after the rest) over a pool of 64-slot pages, as
    the server runs it."""
    hq, d, dev, smoke = run.hq, run.d, run.dev, run.smoke
    hkv = hq if smoke else run.hkv            # the smoke shape's one KV group would make every head dense
    f = serving_bench_budget()
    spec = ModelSpec("LlamaForCausalLM", 1, hq, hkv, d, n, "bench")
    budgets = [f(0, h, spec) for h in range(hq)]
    q, k, v, cu, kvl = one_sequence(n, hq, hkv, d, dev, run.dtype)
    c = min(8192, n // 2) // BLOCK * BLOCK
    pk, pv, r2t = paged_pool(k, v, n + 1)
    rpi = torch.zeros(1, dtype=torch.int32, device=dev)
    cu_c = torch.tensor([0, c], dtype=torch.int32, device=dev)
    cases = {"full prefill": (SparsePrefill(budgets, hkv, d).plan(cu, kvl, n, n, cu_seqlens_k=cu, q_lens_cpu=[n],
                                                                  kv_lens_cpu=[n]), q, k, v),
             f"last {c}-row chunk, paged": (SparsePrefill(budgets, hkv, d).plan(
                 cu_c, kvl, c, n, req_to_token=r2t, req_pool_indices=rpi, q_lens_cpu=[c], kv_lens_cpu=[n],
                 kv_page_size=BLOCK), q[n - c:], pk, pv)}
    row = {"ctx": n, "cases": {}}
    for name, (sp, qq, kk, vv) in cases.items():
        ent = {}
        outs = {}
        for sw in ("0", "1", "auto"):
            os.environ[SWITCH] = sw
            o = torch.empty_like(qq)
            sp.run(qq, kk, vv, out=o)
            ent[f"ms_route_{sw}"] = bench(lambda: sp.run(qq, kk, vv, out=o), smoke)
            ent[f"routed_heads_{sw}"] = len(sp._cudnn_heads(qq))
            outs[sw] = o
        os.environ.pop(SWITCH)
        ent["speedup"] = ent["ms_route_0"] / ent["ms_route_1"]
        ent["speedup_auto"] = ent["ms_route_0"] / ent["ms_route_auto"]
        ent["max_abs_diff"] = float((outs["0"].float() - outs["1"].float()).abs().max())
        row["cases"][name] = ent
        log(f"  layer, {name}: route off {ent['ms_route_0']:.3f} ms, on {ent['ms_route_1']:.3f} ms "
            f"({ent['routed_heads_1']} heads routed): {ent['speedup']:.2f}x, max|diff| {ent['max_abs_diff']:.1e}; "
            f"auto {ent['routed_heads_auto']} heads routed, {ent['speedup_auto']:.2f}x")
    return row


def summary(run: PrefillRun) -> None:
    log("\n# summary: per-head efficiency vs SDPA (ours / our best / cudnn route) and the route's speed-up")
    for row in run.res.get("layer", []):
        log(f"{row['ctx']:7d} mixed layer: " + "; ".join(f"{k} {e['speedup']:.2f}x" for k, e in row["cases"].items()))
    for row in run.res["prefill"]:
        for e in row["configs"]:
            vs = e["variants"]
            eff = lambda x: vs[x]["eff_vs_sdpa"] if x in vs else float("nan")  # noqa: E731
            best = max(eff("ours"), eff("ours_tile128") if "ours_tile128" in vs else 0.0)
            log(f"{row['ctx']:7d} {e['name']:17s} eff ours {eff('ours'):.3f}  best ours {best:.3f}  "
                f"cudnn route {eff('cudnn_route'):.3f}  speed-up vs ours {e.get('route_speedup_vs_ours', 0):.2f}x, "
                f"paged {e.get('paged_route_speedup_vs_ours_paged', 0):.2f}x")


def plot(res: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2))
    names = [e["name"] for e in res["prefill"][0]["configs"]] if res["prefill"] else []
    for i, nm in enumerate(names):
        for var, ls in (("ours", "--"), ("cudnn_route", "-")):
            xs, ys = [], []
            for row in res["prefill"]:
                for e in row["configs"]:
                    if e["name"] == nm and var in e["variants"]:
                        xs.append(row["ctx"] // 1024)
                        ys.append(e["variants"][var]["eff_vs_sdpa"])
            ax.plot(xs, ys, marker="o", ls=ls, color=f"C{i}", label=f"{nm} {var}")
    finish_efficiency_plot(fig, ax, f"cuDNN block-sparse vs Triton, {res['device']}, {res['date']}", path)


if __name__ == "__main__":
    main()
