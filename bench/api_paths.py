"""What does ``SparsePrefill.run`` gain by routing heads (dense heads → SDPA, dense/streaming → the 128-row
rule kernel, top-k → the index kernel) over round 1's single path (every head through the 64-row index
kernel)? Round 2, against SDPA, on a Llama-3-8B-shaped layer at 16K/32K/64K, on i.i.d. random inputs and on
heavy-hitter inputs (adjacent query blocks pick similar lists, as in real prefills). Writes
``kernels_round2_{gpu}.{json,log}``.

    PYTHONUNBUFFERED=1 python bench/api_paths.py --out $OUT      # GPU
    python bench/api_paths.py --cpu-smoke --out /tmp/smoke        # logic check, Triton interpreter
"""
from __future__ import annotations

import math

from prefill_setup import PrefillRun, attended_pairs_tokens, check_batch, layer_sets, parser, start_run, time_sdpa  # noqa: I001

import torch

from sglang_shplb.core.patterns import BLOCK, HeadBudget
from sglang_shplb.kernels import SparsePrefill, sparse_prefill
from sglang_shplb.kernels.reference import reference_sparse_prefill, relative_error
from sglang_shplb.kernels.triton_prefill import RULE_DENSE_WINDOW, rule_prefill

from timing import bench, log

SETS = ("dense", "topk0.1", "1dense+topk0.1", "stream+topk0.1", "stream(128+2048)")
CORRELATED_SETS = ("topk0.1", "stream+topk0.1")


def main():
    args = parser(__doc__, "16384,32768,65536").parse_args()
    run = start_run(args, "api_paths.py", "kernels_round2", [256, 320])
    check(run)
    run.dump()
    sets = {k: v for k, v in layer_sets(run.hq).items() if k in SETS}
    for n, data in [(n, "iid") for n in run.ctxs] + [(n, "corr") for n in run.ctxs]:
        if run.elapsed() > args.budget_s:
            log(f"time budget reached: skipping ctx {n} ({data})")
            continue
        q, k, v = inputs(run, n, correlated=data == "corr")
        cu = torch.tensor([0, n], dtype=torch.int32, device=run.dev)
        kvl = torch.tensor([n], dtype=torch.int32, device=run.dev)
        causal_tok = n * (n + 1) // 2
        dense_flops = 4 * run.d * causal_tok * run.hq
        t_sdpa = time_sdpa(q, k, v, run.smoke) if not run.smoke else {"none": 1.0}
        sdpa = min(t_sdpa.values())
        row = {"ctx": n, "data": data, "configs": [], "sdpa_ms": t_sdpa, "sdpa_best_ms": sdpa,
               "sdpa_tflops": dense_flops / (sdpa * 1e-3) / 1e12}
        log(f"\n## ctx {n}: SDPA {', '.join(f'{a} {b:.3f} ms' for a, b in t_sdpa.items())} "
            f"({row['sdpa_tflops']:.0f} TFLOP/s)")
        if data == "iid":
            rule_dense(run, row, q, k, v, cu, kvl, n, sdpa, dense_flops)
        for name in (SETS if data == "iid" else CORRELATED_SETS):
            time_config(run, row, name + ("" if data == "iid" else " corr"), sets[name], q, k, v, cu, kvl, n, sdpa,
                        causal_tok)
        run.res["prefill"].append(row)
        del q, k, v
        run.dump()
    run.res["wall_s"] = run.elapsed()
    run.dump()


def check(run: PrefillRun) -> None:
    """``SparsePrefill.run`` on mixed heads against the torch reference: contiguous, and paged chunked varlen."""
    mix = ([HeadBudget.dense(), HeadBudget.streaming(128, 512), HeadBudget.topk(0.2, 2), HeadBudget.vslash(0.2, 2)]
           * (run.hq // 4))
    for paged in (False, True):
        q, kb, vb, cu, kvl, lens, q_lens, kw = check_batch(paged, 3 + paged, run.smoke, run.hq, run.hkv, run.d,
                                                           run.dev, run.dtype)
        sp = SparsePrefill(mix, run.hkv, run.d).plan(cu, kvl, max(q_lens), max(lens), q_lens_cpu=q_lens,
                                                     kv_lens_cpu=lens, **kw)
        o = torch.full_like(q, float("nan"))
        sp.run(q, kb, vb, out=o)
        idx = sp.index(q, kb)
        masks = [idx.masks(b, math.ceil(n / BLOCK)).to(run.dev) for b, n in enumerate(lens)]
        err = relative_error(o, reference_sparse_prefill(q, kb, vb, masks, cu, kvl, **kw))
        log(f"check SparsePrefill.run (mixed heads, {'paged, chunked' if paged else 'contiguous'}, lens {lens}, "
            f"q_lens {q_lens}) vs reference: rel err {err:.2e}, all written {bool(torch.isfinite(o).all())}")
        run.res["checks"].append({"what": f"SparsePrefill.run mixed, paged={paged}", "rel_err": err})


def inputs(run: PrefillRun, n: int, correlated: bool):
    """Random ``q, k, v`` of one sequence; ``correlated``: heavy-hitter data, a per-head query direction and a
    per-KV-block key offset, so every query block ranks KV blocks alike."""
    q = torch.randn(n, run.hq, run.d, device=run.dev, dtype=run.dtype)
    k = torch.randn(n, run.hkv, run.d, device=run.dev, dtype=run.dtype)
    if correlated:
        nbk = math.ceil(n / BLOCK)
        q += 2.0 * torch.randn(1, run.hq, run.d, device=run.dev, dtype=run.dtype)
        k += (torch.randn(nbk, 1, run.hkv, run.d, device=run.dev, dtype=run.dtype)
              .expand(nbk, BLOCK, run.hkv, run.d).reshape(-1, run.hkv, run.d)[:n])
    return q, k, torch.randn(n, run.hkv, run.d, device=run.dev, dtype=run.dtype)


def rule_dense(run: PrefillRun, row: dict, q, k, v, cu, kvl, n: int, sdpa: float, dense_flops: float) -> None:
    """The 128-row rule kernel on all heads dense, no SDPA (what a prefix / paged-without-host-lengths gets)."""
    hq, dev = run.hq, run.dev
    allh = torch.arange(hq, dtype=torch.int32, device=dev)
    z = torch.zeros(hq, dtype=torch.int32, device=dev)
    wdense = torch.full((hq,), RULE_DENSE_WINDOW, dtype=torch.int32, device=dev)
    o = torch.full_like(q, float("nan"))
    f = lambda: rule_prefill(q, k, v, allh, z, wdense, cu, kvl, n, cu_seqlens_k=cu, out=o)  # noqa: E731
    f()
    ok = bool(torch.isfinite(o).all())
    t = bench(f, run.smoke)
    row["rule_dense_ms"] = t
    log(f"rule kernel (128-row tiles), all heads dense: {t:.3f} ms ({dense_flops / (t * 1e-3) / 1e12:.0f} TFLOP/s, "
        f"eff {sdpa / t:.2f}), all written {ok}")
    if run.smoke:
        return
    for nw, ns in ((8, 2), (8, 3), (4, 2)):
        try:
            tt = bench(lambda: rule_prefill(q, k, v, allh, z, wdense, cu, kvl, n, cu_seqlens_k=cu, out=o,
                                            num_warps=nw, num_stages=ns), run.smoke)
            row[f"rule_dense_ms_w{nw}s{ns}"] = tt
            log(f"  rule dense warps={nw} stages={ns}: {tt:.3f} ms (eff {sdpa / tt:.2f})")
        except Exception as e:  # noqa: BLE001
            log(f"  rule dense warps={nw} stages={ns} failed: {type(e).__name__}: {str(e)[:150]}")


def time_config(run: PrefillRun, row: dict, name: str, budgets, q, k, v, cu, kvl, n: int, sdpa: float,
                causal_tok: int) -> None:
    """``SparsePrefill.run`` (index + routed kernels) vs round 1's 64-row index kernel on every head."""
    smoke = run.smoke
    try:
        sp = SparsePrefill(budgets, run.hkv, run.d).plan(cu, kvl, n, n, cu_seqlens_k=cu)
        idx = sp.index(q, k)
        t_idx = bench(lambda: sp.index(q, k), smoke, 100)
        dens = sum(attended_pairs_tokens(idx, n)) / (causal_tok * run.hq)
        o = torch.full_like(q, float("nan"))
        sp.run(q, k, v, out=o)
        ok = bool(torch.isfinite(o).all())
        o1 = torch.full_like(q, float("nan"))
        sparse_prefill(q, k, v, idx.block_idx, idx.block_cnt, idx.head_dense, cu, kvl, n, cu_seqlens_k=cu,
                       out=o1)
        err = relative_error(o, o1.float())
        t_api = bench(lambda: sp.run(q, k, v, out=o), smoke)                   # index + kernels
        t_r1 = bench(lambda: sparse_prefill(q, k, v, idx.block_idx, idx.block_cnt, idx.head_dense, cu, kvl, n,
                                            cu_seqlens_k=cu, out=o1), smoke)   # round-1 kernel path
        t_api_k = t_api - (t_idx if sp.heads.selected else 0.0)
    except Exception as e:  # noqa: BLE001
        log(f"{name}: failed: {type(e).__name__}: {str(e)[:300]}")
        return
    ent = {"name": name, "density": dens, "index_ms": t_idx, "api_ms": t_api, "api_kernels_ms": t_api_k,
           "round1_kernel_ms": t_r1, "eff_api_kernels": dens * sdpa / t_api_k, "eff_round1": dens * sdpa / t_r1,
           "eff_api_with_index": dens * sdpa / t_api, "api_vs_round1_rel_err": err, "all_written": ok}
    log(f"{name:18s} density {dens:.3f}: run() {t_api:8.3f} ms = index {t_idx:.3f} + kernels {t_api_k:8.3f} "
        f"(eff {ent['eff_api_kernels']:.2f}; with index {ent['eff_api_with_index']:.2f}) | round-1 64-row kernel "
        f"{t_r1:8.3f} ms (eff {ent['eff_round1']:.2f}) | err vs round-1 {err:.1e}, written {ok}")
    row["configs"].append(ent)
    del sp, idx, o, o1
    if not smoke:
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
