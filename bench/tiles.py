"""Is top-k at 128-token superblocks (``HeadBudget(tile=128)``) on the 128 x 128 tile kernel faster per head
than top-k at 64-token blocks on the 64-row index kernel? Round 4.

The tile kernel with TMA loads (autotuned, and each fixed config of ``TILE_CONFIGS``) and with pointer loads,
against top-k at 64-token blocks (index kernel, autotuned), dense heads through the tile kernel and the rule
kernel, and SDPA (flash, cuDNN); also the index build (64 vs 128) and ``SparsePrefill.run`` totals, on a
Llama-3-8B-shaped layer at 16K..128K. Writes ``tiles_{gpu}.{json,log,png}``; ``bench/tile_calibration.py``
turns its top-k rows into cost-model records.

    PYTHONUNBUFFERED=1 python bench/tiles.py --out $OUT        # GPU
    python bench/tiles.py --cpu-smoke --out /tmp/tiles          # logic check, Triton interpreter
"""
from __future__ import annotations

import math

from prefill_setup import (PrefillRun, attended_pairs_tokens, finish_efficiency_plot, check_batch,
                           one_sequence, parser, start_run, time_sdpa)  # noqa: I001

import torch

from sglang_shplb.core.patterns import BLOCK, HeadBudget
from sglang_shplb.kernels import SparsePrefill, build_block_index, sparse_prefill
from sglang_shplb.kernels.reference import reference_sparse_prefill, relative_error
# the autotuned kernels themselves, for the config the autotuner chose
from sglang_shplb.kernels.triton_prefill import (RULE_DENSE_WINDOW, TILE_CONFIGS, _kernel, _tile_kernel,
                                                 rule_prefill, tile_prefill)

from timing import bench, log

T = 2 * BLOCK


def main():
    args = parser(__doc__, "16384,32768,65536,131072").parse_args()
    run = start_run(args, "tiles.py", "tiles", [384])
    run.res["tile_configs"] = [list(c) for c in TILE_CONFIGS]
    check(run)
    run.dump()
    for n in run.ctxs:
        if run.elapsed() > args.budget_s:
            log(f"time budget reached: skipping ctx {n}")
            continue
        run.res["prefill"].append(time_context(run, n))
        run.dump()
    log("\n# summary: per-head efficiency vs SDPA (best variant), and run() speed-up vs SDPA")
    for row in run.res["prefill"]:
        for ent in row["configs"]:
            a, b = max(ent["variants"].items(), key=lambda x: x[1]["eff_vs_sdpa"]) if ent["variants"] else ("-", {})
            log(f"{row['ctx']:6d} {ent['name']:12s} best {a} eff {b.get('eff_vs_sdpa', float('nan')):.3f}"
                + (f"; run() {ent['run_speedup_vs_sdpa']:.2f}x SDPA" if "run_speedup_vs_sdpa" in ent else ""))
    run.res["wall_s"] = run.elapsed()
    run.dump()
    if not run.smoke:
        try:
            plot(run.res, run.path(".png"))
        except ImportError as e:   # the GPU machine may lack matplotlib: plot from the JSON afterwards
            log(f"no plot: {e}")


def check(run: PrefillRun) -> None:
    """Mixed tile-128 / 64 top-k + dense + streaming heads through ``SparsePrefill.run`` against the torch
    reference, chunked paged and contiguous; the Triton index builder against the torch one."""
    hq = run.hq
    mix = [HeadBudget.topk(0.2, 2, tile=T), HeadBudget.dense(), HeadBudget.topk(0.1, 2, tile=T),
           HeadBudget.topk(0.1, 2), HeadBudget.streaming(128, 512), HeadBudget.topk(0.05, 2, tile=T),
           HeadBudget.vslash(0.2, 2), HeadBudget.topk(0.5, 2, tile=T)] * (hq // 8 if hq >= 8 else 1)
    mix = mix[:hq]
    for paged in (False, True):
        q, kb, vb, cu, kvl, lens, q_lens, kw = check_batch(paged, 11 + paged, run.smoke, hq, run.hkv, run.d,
                                                           run.dev, run.dtype)
        sp = SparsePrefill(mix, run.hkv, run.d).plan(cu, kvl, max(q_lens), max(lens), **kw)
        o = torch.full_like(q, float("nan"))
        sp.run(q, kb, vb, out=o)
        idx = sp.last_index
        masks = [idx.masks(b, math.ceil(n / BLOCK)).to(run.dev) for b, n in enumerate(lens)]
        err = relative_error(o, reference_sparse_prefill(q, kb, vb, masks, cu, kvl, **kw))
        it = build_block_index(mix, q, kb, cu, kvl, max(lens), builder="torch", **kw)
        nbs = [math.ceil(n / BLOCK) for n in lens]
        same = sum(int((idx.block_idx[b, :, :nb] == it.block_idx[b, :, :nb]).sum()) for b, nb in enumerate(nbs))
        tot = sum(idx.block_idx[b, :, :nb].numel() for b, nb in enumerate(nbs))
        counts_equal = bool(torch.equal(idx.block_cnt, it.block_cnt))
        what = f"SparsePrefill.run, tile-128 top-k + others, {'paged chunked' if paged else 'contiguous varlen'}"
        log(f"check {what} vs reference: rel err {err:.2e}; Triton vs torch index entries equal {same / tot:.4%}, "
            f"counts equal {counts_equal}")
        run.res["checks"].append({"what": what, "rel_err": err, "index_entries_equal": same / tot,
                                  "counts_equal": counts_equal})


def time_context(run: PrefillRun, n: int) -> dict:
    """The row of one context: SDPA, then every (fraction, tile) and dense through each kernel variant."""
    hq, hkv, d, dev, smoke = run.hq, run.hkv, run.d, run.dev, run.smoke
    q, k, v, cu, kvl = one_sequence(n, hq, hkv, d, dev, run.dtype)
    causal_tok = n * (n + 1) // 2
    t_sdpa = time_sdpa(q, k, v, smoke) or {"none": 1.0}
    sdpa = min(t_sdpa.values())
    row = {"ctx": n, "sdpa_ms": t_sdpa, "sdpa_best_ms": sdpa,
           "sdpa_tflops": 4 * d * causal_tok * hq / (sdpa * 1e-3) / 1e12, "configs": []}
    log(f"\n## ctx {n}: SDPA {', '.join(f'{a} {b:.3f} ms' for a, b in t_sdpa.items())} "
        f"({row['sdpa_tflops']:.0f} TFLOP/s)")
    heads = torch.arange(hq, dtype=torch.int32, device=dev)
    for f, tile in [(f, tile) for f in (0.05, 0.1, 0.2) for tile in (BLOCK, T)] + [(1.0, T)]:
        budgets = [HeadBudget.topk(f, 2, tile=tile)] * hq if f < 1 else [HeadBudget.dense()] * hq
        name = f"topk{f:g}/{tile}" if f < 1 else "dense"
        t_idx = bench(lambda: build_block_index(budgets, q, k, cu, kvl, n, cu_seqlens_k=cu), smoke)
        idx = build_block_index(budgets, q, k, cu, kvl, n, cu_seqlens_k=cu)
        pairs = attended_pairs_tokens(idx, n) if f < 1 else [causal_tok] * hq
        dens = sum(pairs) / (causal_tok * hq)
        flops = 4 * d * sum(pairs)
        ent = {"name": name, "density": dens, "index_ms": t_idx, "variants": {}}
        log(f"{name}: density {dens:.3f}, index build {t_idx:.3f} ms")
        if tile == BLOCK:
            variants = [("index64_auto", lambda o: sparse_prefill(q, k, v, idx.block_idx, idx.block_cnt,
                         idx.head_dense, cu, kvl, n, cu_seqlens_k=cu, out=o), _kernel(True))]
        else:
            mk = lambda **kw: (lambda o: tile_prefill(q, k, v, idx.block_idx, idx.block_cnt,  # noqa: E731
                               idx.head_dense, heads, cu, kvl, n, cu_seqlens_k=cu, out=o, **kw))
            variants = [("tile_tma_auto", mk(), _tile_kernel(True)),
                        ("tile_ptr_auto", mk(tma=False), _tile_kernel(True))]
            if not smoke:
                variants += [(f"tile_tma_n{bn}w{w}s{st}", mk(block_n=bn, num_warps=w, num_stages=st), None)
                             for bn, w, st in TILE_CONFIGS]
            if f == 1.0:
                rt = torch.zeros(hq, dtype=torch.int32, device=dev)
                wt = torch.full((hq,), RULE_DENSE_WINDOW, dtype=torch.int32, device=dev)
                variants.append(("rule128_auto", lambda o: rule_prefill(q, k, v, heads, rt, wt, cu, kvl, n,
                                                                        cu_seqlens_k=cu, out=o), None))
        o_first = None
        for vname, fn, kern in variants:
            o = torch.full_like(q, float("nan"))
            try:
                fn(o)
                written = bool(torch.isfinite(o).all())
                t = bench(lambda: fn(o), smoke)
            except Exception as e:  # noqa: BLE001
                log(f"  {vname}: failed: {type(e).__name__}: {str(e)[:300]}")
                continue
            o_first = o if o_first is None else o_first
            diff = float((o.float() - o_first.float()).abs().max())
            ve = {"ms": t, "tflops": flops / (t * 1e-3) / 1e12, "eff_vs_sdpa": dens * sdpa / t,
                  "max_abs_diff_vs_first": diff, "all_written": written}
            best = getattr(kern, "best_config", None) if (kern is not None and not smoke) else None
            if best is not None:
                ve["autotuned"] = str(best)
            ent["variants"][vname] = ve
            log(f"  {vname:22s} {t:9.3f} ms  {ve['tflops']:5.0f} TFLOP/s  eff {ve['eff_vs_sdpa']:.3f}  "
                f"max|diff| {diff:.1e}  written {written}" + (f"  ({best})" if best is not None else ""))
        if f < 1:   # the API: index build + kernels (what a prefill pays), vs SDPA
            sp = SparsePrefill(budgets, hkv, d).plan(cu, kvl, n, n, cu_seqlens_k=cu)
            t_run = bench(lambda: sp.run(q, k, v, out=o_first), smoke)
            ent["run_ms"] = t_run
            ent["run_speedup_vs_sdpa"] = sdpa / t_run
            log(f"  SparsePrefill.run (index + kernel) {t_run:.3f} ms = {sdpa / t_run:.2f}x faster than SDPA")
        row["configs"].append(ent)
        del idx, o_first
        if not smoke:
            torch.cuda.empty_cache()
    return row


def plot(res: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2))
    names = [e["name"] for e in res["prefill"][0]["configs"]] if res["prefill"] else []
    for nm in names:
        xs, ys = [], []
        for row in res["prefill"]:
            for e in row["configs"]:
                if e["name"] == nm and e["variants"]:
                    xs.append(row["ctx"] // 1024)
                    ys.append(max(v["eff_vs_sdpa"] for v in e["variants"].values()))
        ax.plot(xs, ys, marker="o", ls="-" if nm.endswith("/128") or nm == "dense" else "--", label=nm)
    finish_efficiency_plot(fig, ax, f"prefill, {res['device']}, {res['date']}", path)


if __name__ == "__main__":
    main()
