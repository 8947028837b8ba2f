"""How fast is our sparse Triton prefill per head, against dense SDPA, FlashInfer dense and FlashInfer
variable block-sparse? And the cost-model calibration tables the planner reads (round 1).

One process, competitors side by side, on a Llama-3-8B-shaped layer (32 q heads, 8 KV heads, d=128, bf16).
Prefill at 8K..128K for densities 1/0.5/0.2/0.1/0.05 (top-k) and mixes. Writes ``kernels_{gpu}.{json,log,png}``
and the calibration tables ``calibration_{gpu}.json`` (our kernel) and ``calibration_{gpu}_flashinfer.json``
(schema shplb-calibration/1, :func:`sglang_shplb.planning.cost_model.write_calibration`), which
``python -m sglang_shplb place --calibration`` reads.

    PYTHONUNBUFFERED=1 python bench/prefill_sweep.py --out $OUT       # GPU
    python bench/prefill_sweep.py --cpu-smoke --out /tmp/smoke         # logic check, Triton interpreter

Timing: triton.testing.do_bench (CUDA events, L2 flushed before each run, median); fresh random inputs
per context (> L2 at every size), outputs poisoned with NaN before the first run and checked after.
Efficiency per head vs SDPA = density · t_SDPA / t (1.0 = as efficient per attended block as SDPA).
Attended FLOPs = 4 · d · (attended (q, k) token pairs), summed over heads.
"""
from __future__ import annotations

import math
import os

from prefill_setup import (PrefillRun, attended_pairs_tokens, block_pairs_of, layer_sets, one_sequence,  # noqa: I001
                           parser, start_run, time_sdpa)

import torch

from sglang_shplb.core.patterns import BLOCK, HeadBudget
from sglang_shplb.kernels import build_block_index, sparse_prefill
from sglang_shplb.kernels.flashinfer_wrappers import FLASHINFER_VERSION, FlashInferSparsePrefill, index_to_dense_mask
from sglang_shplb.kernels.reference import reference_sparse_prefill, relative_error
from sglang_shplb.planning.cost_model import calibration_record, write_calibration

from timing import bench, flashinfer_or_none, log

KERNEL = "sglang_shplb triton sparse_prefill"
KERNEL_FI = f"flashinfer {FLASHINFER_VERSION} VariableBlockSparseAttentionWrapper"


def main():
    args = parser(__doc__, "8192,16384,32768,65536,131072").parse_args()
    run = start_run(args, "prefill_sweep.py", "kernels", [200, 320])
    smoke, dev, hq, hkv, d, dtype = run.smoke, run.dev, run.hq, run.hkv, run.d, run.dtype
    res = run.res
    fi = flashinfer_or_none(smoke)

    if not smoke:   # the ceiling
        a = torch.randn(8192, 8192, device=dev, dtype=dtype)
        t = bench(lambda: a @ a, smoke)
        res["matmul_tflops"] = mm = 2 * 8192 ** 3 / (t * 1e-3) / 1e12
        del a
        log(f"bf16 matmul {mm:.0f} TFLOP/s")
    cfg = pick_config(run)
    check(run, cfg, fi)

    calib, calib_fi = [], []
    sets = layer_sets(hq)
    for n in run.ctxs:
        if run.elapsed() > args.budget_s:
            log(f"time budget reached: skipping prefill ctx {n}")
            continue
        q, k, v, cu, kvl = one_sequence(n, hq, hkv, d, dev, dtype)
        causal_pairs_tok = n * (n + 1) // 2
        dense_flops = 4 * d * causal_pairs_tok * hq
        row = {"ctx": n}
        # dense SDPA (flash and cuDNN), FlashInfer dense
        t_sdpa = {}
        if not smoke:
            t_sdpa = time_sdpa(q, k, v, smoke)
            if fi is not None:
                try:
                    f = lambda: fi.single_prefill_with_kv_cache(q, k, v, causal=True)  # noqa: E731
                    f()
                    row["flashinfer_dense_ms"] = bench(f, smoke)
                except Exception as e:  # noqa: BLE001
                    log(f"flashinfer dense failed: {type(e).__name__}: {str(e)[:150]}")
        else:
            nb = math.ceil(n / BLOCK)
            causal = [torch.ones(hq, nb, nb, dtype=torch.bool).tril()]
            t_sdpa["torch"] = bench(lambda: reference_sparse_prefill(q, k, v, causal, cu, kvl, cu_seqlens_k=cu), smoke)
        sdpa_best = min(t_sdpa.values())
        row["sdpa_ms"] = t_sdpa
        row["sdpa_best_ms"] = sdpa_best
        row["sdpa_tflops"] = dense_flops / (sdpa_best * 1e-3) / 1e12
        if "flashinfer_dense_ms" in row:
            row["flashinfer_dense_tflops"] = dense_flops / (row["flashinfer_dense_ms"] * 1e-3) / 1e12
        log(f"\n## prefill ctx {n}: SDPA {', '.join(f'{a} {b:.3f} ms' for a, b in t_sdpa.items())} "
            f"({row['sdpa_tflops']:.0f} TFLOP/s)" + (f"; flashinfer dense {row['flashinfer_dense_ms']:.3f} ms "
                                                    f"({row['flashinfer_dense_tflops']:.0f} TFLOP/s)" if "flashinfer_dense_ms" in row else ""))
        row["configs"] = []
        for name, budgets in sets.items():
            if run.elapsed() > args.budget_s + 60:
                log(f"time budget reached: skipping {name} at {n}")
                continue
            ent = {"name": name, "budgets": [b.describe() for b in budgets[:2]]}
            try:
                t_idx = bench(lambda: build_block_index(budgets, q, k, cu, kvl, n, cu_seqlens_k=cu), smoke, 100)
                idx = build_block_index(budgets, q, k, cu, kvl, n, cu_seqlens_k=cu)
                o = torch.full_like(q, float("nan"))
                f = lambda: sparse_prefill(q, k, v, idx.block_idx, idx.block_cnt, idx.head_dense, cu, kvl, n,  # noqa: E731
                                           cu_seqlens_k=cu, out=o, **cfg)
                f()
                ok = bool(torch.isfinite(o).all())
                t = bench(f, smoke)
            except Exception as e:  # noqa: BLE001
                log(f"{name}: ours failed: {type(e).__name__}: {str(e)[:200]}")
                continue
            pairs_tok = attended_pairs_tokens(idx, n)
            bp = sum(block_pairs_of(idx, n))
            dens = sum(pairs_tok) / (causal_pairs_tok * hq)
            flops = 4 * d * sum(pairs_tok)
            eff = dens * sdpa_best / t
            ent.update(density=dens, ours_ms=t, index_ms=t_idx, ours_tflops=flops / (t * 1e-3) / 1e12,
                       eff_vs_sdpa=eff, eff_vs_sdpa_with_index=dens * sdpa_best / (t + t_idx),
                       block_pairs=bp, all_written=ok)
            line = (f"{name:18s} density {dens:.3f}  ours {t:8.3f} ms ({ent['ours_tflops']:4.0f} TFLOP/s, eff {eff:5.2f}; "
                    f"+index {t_idx:.3f} ms → eff {ent['eff_vs_sdpa_with_index']:.2f})")
            one_budget = len(set(budgets)) == 1   # a calibration record: all heads of the call alike
            if one_budget:
                calib.append(calibration_record(budgets[0], n, d, hq // hkv, hq, t, bp, config=name, index_ms=t_idx))
            # FlashInfer variable block-sparse on the same masks
            if fi is not None and bp * BLOCK < 1.2e9:
                try:
                    tf, errf = time_flashinfer(budgets, idx, q, k, v, o, n, hkv, d, dtype, smoke)
                    ent.update(flashinfer_ms=tf, flashinfer_eff_vs_sdpa=dens * sdpa_best / tf,
                               flashinfer_vs_ours_rel_err=errf)
                    line += f"  | flashinfer {tf:8.3f} ms (eff {dens * sdpa_best / tf:4.2f}, err vs ours {errf:.1e})"
                    if one_budget:
                        calib_fi.append(calibration_record(budgets[0], n, d, hq // hkv, hq, tf, bp, config=name))
                except Exception as e:  # noqa: BLE001
                    log(f"{name}: flashinfer sparse failed: {type(e).__name__}: {str(e)[:200]}")
            log(line)
            row["configs"].append(ent)
            del idx, o
            if not smoke:
                torch.cuda.empty_cache()
        res["prefill"].append(row)
        del q, k, v
        if not smoke:
            torch.cuda.empty_cache()
        dump(run, calib, calib_fi)

    res["wall_s"] = run.elapsed()
    summary(res)
    dump(run, calib, calib_fi)
    plot(res, run.path(".png"))


def pick_config(run: PrefillRun) -> dict:
    """The (warps, stages) of the fastest dense 16K prefill on the GPU; none on the smoke run."""
    if run.smoke:
        return dict(num_warps=None, num_stages=None)
    n = 16384
    q, k, v, cu, kvl = one_sequence(n, run.hq, run.hkv, run.d, run.dev, run.dtype)
    idx = build_block_index([HeadBudget.dense()] * run.hq, q, k, cu, kvl, n, cu_seqlens_k=cu)
    best = None
    for nw, ns in [(4, 2), (4, 3), (4, 4), (8, 2), (8, 3)]:
        try:
            t = bench(lambda: sparse_prefill(q, k, v, idx.block_idx, idx.block_cnt, idx.head_dense, cu, kvl, n,
                                             cu_seqlens_k=cu, num_warps=nw, num_stages=ns), run.smoke)
        except Exception as e:  # noqa: BLE001
            log(f"config warps={nw} stages={ns} failed: {type(e).__name__}: {str(e)[:200]}")
            continue
        log(f"config warps={nw} stages={ns}: dense 16K {t:.3f} ms")
        if best is None or t < best[0]:
            best = (t, nw, ns)
    cfg = dict(num_warps=best[1], num_stages=best[2])
    run.res["config"] = cfg
    log(f"chosen config {cfg}")
    return cfg


def check(run: PrefillRun, cfg: dict, fi) -> None:
    """Ours (and FlashInfer's block-sparse) against the torch reference on mixed heads, on the device."""
    hq, hkv, d, dev, dtype = run.hq, run.hkv, run.d, run.dev, run.dtype
    n = 300 if run.smoke else 4096 + 77
    g = torch.Generator(device=dev).manual_seed(1)
    q = torch.randn(n, hq, d, device=dev, dtype=dtype, generator=g)
    k = torch.randn(n, hkv, d, device=dev, dtype=dtype, generator=g)
    v = torch.randn(n, hkv, d, device=dev, dtype=dtype, generator=g)
    cu = torch.tensor([0, n], dtype=torch.int32, device=dev)
    kvl = torch.tensor([n], dtype=torch.int32, device=dev)
    mix = ([HeadBudget.dense(), HeadBudget.streaming(128, 512), HeadBudget.topk(0.2, 2), HeadBudget.vslash(0.2, 2)]
           * (hq // 4))
    idx = build_block_index(mix, q, k, cu, kvl, n, cu_seqlens_k=cu)
    o = torch.full_like(q, float("nan"))
    sparse_prefill(q, k, v, idx.block_idx, idx.block_cnt, idx.head_dense, cu, kvl, n, cu_seqlens_k=cu, out=o, **cfg)
    masks = [idx.masks(0, math.ceil(n / BLOCK)).to(dev)]
    ref = reference_sparse_prefill(q, k, v, masks, cu, kvl, cu_seqlens_k=cu)
    err = relative_error(o, ref)
    log(f"check ours vs reference (mixed heads, n={n}): rel err {err:.2e}")
    run.res["checks"].append({"what": "ours vs torch reference, mixed heads", "n": n, "rel_err": err})
    if fi is not None:
        w = FlashInferSparsePrefill(mix, hkv, d)
        w.plan_masks(masks[0], n, dtype)
        err = relative_error(w.run(q, k, v), ref)
        log(f"check flashinfer block-sparse vs reference: rel err {err:.2e}")
        run.res["checks"].append({"what": "flashinfer VariableBlockSparse vs torch reference", "n": n, "rel_err": err})


def time_flashinfer(budgets, idx, q, k, v, ours, n: int, hkv: int, d: int, dtype, smoke: bool):
    """FlashInfer's variable block-sparse prefill on ``idx``'s blocks: (ms, relative error vs ``ours``)."""
    w = FlashInferSparsePrefill(budgets, hkv, d)
    w.plan_masks(index_to_dense_mask(idx, 0, math.ceil(n / BLOCK)), n, dtype)
    g = q.shape[1] // hkv
    qh = q.transpose(0, 1).contiguous()
    kh = k.transpose(0, 1).repeat_interleave(g, 0).contiguous()
    vh = v.transpose(0, 1).repeat_interleave(g, 0).contiguous()
    err = relative_error(w.wrapper.run(qh, kh, vh).transpose(0, 1), ours.float())
    return bench(lambda: w.wrapper.run(qh, kh, vh), smoke), err


def dump(run: PrefillRun, calib: list[dict], calib_fi: list[dict]) -> None:
    """The results and log, and the calibration tables of the records so far."""
    run.dump()
    for recs, suffix, kernel in ((calib, "", KERNEL), (calib_fi, "_flashinfer", KERNEL_FI)):
        if recs:
            write_calibration(os.path.join(run.out, f"calibration_{run.tag}{suffix}.json"), run.device, run.date,
                              kernel, recs)


def summary(res: dict) -> None:
    log("\n# summary: per-head efficiency vs SDPA (ours kernel / FlashInfer block-sparse)")
    names = [c["name"] for c in res["prefill"][0]["configs"]] if res["prefill"] else []
    log("config".ljust(18) + "".join(f"{r['ctx'] // 1024:>14}K" for r in res["prefill"]))
    for nm in names:
        cells = []
        for r in res["prefill"]:
            c = next((c for c in r["configs"] if c["name"] == nm), None)
            if c is None:
                cells.append(" " * 15)
                continue
            fi = c.get("flashinfer_eff_vs_sdpa")
            cells.append(f"{c['eff_vs_sdpa']:6.2f}/{fi:4.2f}".rjust(15) if fi is not None else f"{c['eff_vs_sdpa']:6.2f}/  - ".rjust(15))
        log(nm.ljust(18) + "".join(cells))


def plot(res: dict, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(1, 1, figsize=(7, 4.5))
    names = sorted({c["name"] for r in res["prefill"] for c in r["configs"]})
    for nm in names:
        xs = [r["ctx"] for r in res["prefill"] for c in r["configs"] if c["name"] == nm]
        ys = [c["eff_vs_sdpa"] for r in res["prefill"] for c in r["configs"] if c["name"] == nm]
        ax.plot(xs, ys, marker="o", label=f"ours {nm}")
        ys2 = [(r["ctx"], c.get("flashinfer_eff_vs_sdpa")) for r in res["prefill"] for c in r["configs"] if c["name"] == nm]
        ys2 = [p for p in ys2 if p[1] is not None]
        if ys2:
            ax.plot([p[0] for p in ys2], [p[1] for p in ys2], ls="--", marker="x", alpha=0.6)
    ax.axhline(0.85, color="k", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context")
    ax.set_ylabel("per-head efficiency vs SDPA (density·t_SDPA/t)")
    ax.set_title("prefill (solid: ours, dashed: FlashInfer block-sparse)")
    ax.legend(fontsize=6)
    fig.suptitle(f"{res['device']} {res['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
