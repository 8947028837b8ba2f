"""Benchmark: our sparse Triton kernels vs dense SDPA, FlashInfer dense and FlashInfer variable block-sparse.

One process, competitors side by side, on a Llama-3-8B-shaped layer (32 q heads, 8 KV heads, d=128, bf16).
Prefill at 8K..128K for densities 1/0.5/0.2/0.1/0.05 (top-k) and mixes.
Writes JSON + PNG + log and the cost-model calibration tables (schema shplb-calibration/1).

    PYTHONUNBUFFERED=1 python bench/kernels.py --out $OUT            # GPU
    python bench/kernels.py --cpu-smoke --out /tmp/smoke               # logic check, Triton interpreter
    PYTHONUNBUFFERED=1 python bench/kernels.py --quick --out $OUT    # round 2: API paths at 16K/32K/64K
    python bench/kernels.py --quick --cpu-smoke --out /tmp/smoke       # its logic check
    PYTHONUNBUFFERED=1 python bench/kernels.py --topk-variants --out $OUT   # 64- vs 128-wide KV tiles, 16K..64K
    python bench/kernels.py --topk-variants --cpu-smoke --out /tmp/tv      # its logic check
    PYTHONUNBUFFERED=1 python bench/kernels.py --tiles --out $OUT   # round 4: tile-128 top-k, 128x128 TMA kernel
    python bench/kernels.py --tile-calibration TILES_JSON BASE_CALIBRATION --out DIR   # its cost-model records
    python bench/kernels.py --tiles --cpu-smoke --out /tmp/tiles     # its logic check

Paged decode has its own benchmark, bench/decode.py (CUDA-graph timed, bytes vs copy bandwidth, vs FlashInfer's
dense paged decode); round 1's eager decode numbers (kernels_h100.json, kernels.md) came from an earlier version
of this file.

Timing: triton.testing.do_bench (CUDA events, L2 flushed before each run, median); fresh random inputs
per context (> L2 at every size), outputs poisoned with NaN before the first run and checked after.
Efficiency per head vs SDPA = density · t_SDPA / t (1.0 = as efficient per attended block as SDPA).
Attended FLOPs = 4 · d · (attended (q, k) token pairs), summed over heads.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import sys
import time

if "--cpu-smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from sglang_shplb.core.patterns import BLOCK, HeadBudget, Pattern  # noqa: E402
from sglang_shplb.kernels import SparsePrefill, build_block_index, sparse_prefill  # noqa: E402
from sglang_shplb.kernels.triton_prefill import (INDEX_CONFIGS, RULE_DENSE_WINDOW, TILE_CONFIGS, _kernel,  # noqa: E402
                                                 _tile_kernel, rule_prefill, tile_prefill)
from sglang_shplb.kernels.reference import relative_error, reference_sparse_prefill  # noqa: E402

from timing import LOG, bench, log, results_writer  # noqa: E402  (bench/timing.py)


def time_sdpa(q, k, v, smoke: bool) -> dict[str, float]:
    """Causal GQA SDPA times (ms) of ``q [n, Hq, d]``, ``k, v [n, Hkv, d]`` per backend (flash, cuDNN)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qq, kk, vv = (x.transpose(0, 1)[None] for x in (q, k, v))
    t_sdpa = {}
    for name, be in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        try:
            with sdpa_kernel([be]):
                f = lambda: torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, is_causal=True, enable_gqa=True)  # noqa: E731
                f()
                t_sdpa[name] = bench(f, smoke)
        except Exception as e:  # noqa: BLE001
            log(f"sdpa {name} failed: {type(e).__name__}: {str(e)[:150]}")
    return t_sdpa


def one_sequence(n: int, hq: int, hkv: int, d: int, dev, dtype):
    """Fresh random ``q [n, Hq, d]``, ``k, v [n, Hkv, d]`` of one sequence, with its ``cu_seqlens`` and length."""
    return (torch.randn(n, hq, d, device=dev, dtype=dtype), torch.randn(n, hkv, d, device=dev, dtype=dtype),
            torch.randn(n, hkv, d, device=dev, dtype=dtype), torch.tensor([0, n], dtype=torch.int32, device=dev),
            torch.tensor([n], dtype=torch.int32, device=dev))


def attended_pairs_tokens(index, n: int) -> list[int]:
    """Attended (q, k) token pairs per head: full blocks count BLOCK², the diagonal BLOCK(BLOCK+1)/2,
    the last partial row/column counted exactly."""
    nb = math.ceil(n / BLOCK)
    cnt = index.block_cnt[0, :, :nb].long()                   # [H, nb]
    # approximate: every listed pair is a full block except the diagonal (exact when n % BLOCK == 0)
    full = (cnt.sum(1) - nb) * BLOCK * BLOCK
    diag = nb * BLOCK * (BLOCK + 1) // 2
    return (full + diag).tolist()


def block_pairs_of(index, n: int) -> list[int]:
    nb = math.ceil(n / BLOCK)
    return index.block_cnt[0, :, :nb].long().sum(1).tolist()


def layer_sets(hq: int):
    """name → budgets of the prefill configurations."""
    sets = {"dense": [HeadBudget.dense()] * hq}
    for f in (1.0, 0.5, 0.2, 0.1, 0.05):
        sets[f"topk{f:g}"] = [HeadBudget.topk(f, 2)] * hq
    sets["1dense+topk0.1"] = [HeadBudget.dense()] + [HeadBudget.topk(0.1, 2)] * (hq - 1)
    sets["stream+topk0.1"] = [HeadBudget.streaming(128, 2048)] * (hq // 2) + [HeadBudget.topk(0.1, 2)] * (hq // 2)
    sets["stream(128+2048)"] = [HeadBudget.streaming(128, 2048)] * hq
    sets["vslash0.1"] = [HeadBudget.vslash(0.1, 2)] * hq
    return sets


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--cpu-smoke", action="store_true")
    ap.add_argument("--ctx", default="8192,16384,32768,65536,131072")
    ap.add_argument("--budget-s", type=float, default=480.0, help="stop adding contexts past this")
    ap.add_argument("--quick", action="store_true", help="round 2: SparsePrefill API paths, 16K/32K/64K")
    ap.add_argument("--topk-variants", action="store_true",
                    help="index kernel, 64- vs 128-wide KV tiles per launch config, top-k/vslash heads, 16K/32K/64K")
    ap.add_argument("--tiles", action="store_true",
                    help="round 4: top-k at 128-token superblocks on the 128x128 (TMA) kernel vs 64-token top-k, SDPA")
    ap.add_argument("--tile-calibration", nargs=2, metavar=("TILES_JSON", "BASE_CALIBRATION"),
                    help="write --out/calibration_h100_tiles.json: BASE_CALIBRATION's records plus the tile-128 "
                         "top-k records of a --tiles run (no GPU needed)")
    args = ap.parse_args()
    if args.tile_calibration:
        return write_tile_calibration(*args.tile_calibration, args.out)
    if args.tiles:
        return tiles(args)
    if args.quick:
        return quick(args)
    if args.topk_variants:
        return topk_variants(args)
    smoke = args.cpu_smoke
    t_start = time.time()
    os.makedirs(args.out, exist_ok=True)
    dev = "cpu" if smoke else "cuda"
    if smoke:
        hq, hkv, d, dtype = 4, 1, 64, torch.float32
        ctxs = [200, 320]
    else:
        hq, hkv, d, dtype = 32, 8, 128, torch.bfloat16
        ctxs = [int(x) for x in args.ctx.split(",")]
    device_name = "cpu (Triton interpreter)" if smoke else torch.cuda.get_device_name()
    today = _dt.date.today().isoformat()
    log(f"# bench/kernels.py  device={device_name}  date={today}  torch={torch.__version__}")
    try:
        from sglang_shplb.kernels.flashinfer_wrappers import FlashInferSparsePrefill, import_flashinfer
        fi = None if smoke else import_flashinfer()
        if fi is not None:
            log(f"flashinfer {fi.__version__}")
    except ImportError as e:
        fi = None
        log(f"flashinfer unavailable: {e}")
    import triton
    log(f"triton {triton.__version__}")

    # ---- ceilings ----------------------------------------------------------------------------
    res = {"device": device_name, "date": today, "shape": dict(hq=hq, hkv=hkv, d=d, dtype=str(dtype)),
           "prefill": [], "checks": []}
    if not smoke:
        a = torch.randn(8192, 8192, device=dev, dtype=dtype)
        t = bench(lambda: a @ a, smoke)
        mm = 2 * 8192 ** 3 / (t * 1e-3) / 1e12
        del a
        log(f"bf16 matmul {mm:.0f} TFLOP/s")
        res.update(matmul_tflops=mm)

    # ---- pick a kernel config (warps, stages) at a mid size --------------------------------
    cfg = dict(num_warps=None, num_stages=None)
    if not smoke:
        n = 16384
        q, k, v, cu, kvl = one_sequence(n, hq, hkv, d, dev, dtype)
        idx = build_block_index([HeadBudget.dense()] * hq, q, k, cu, kvl, n, cu_seqlens_k=cu)
        best = None
        for nw, ns in [(4, 2), (4, 3), (4, 4), (8, 2), (8, 3)]:
            try:
                t = bench(lambda: sparse_prefill(q, k, v, idx.block_idx, idx.block_cnt, idx.head_dense, cu, kvl, n,
                                                 cu_seqlens_k=cu, num_warps=nw, num_stages=ns), smoke)
            except Exception as e:  # noqa: BLE001
                log(f"config warps={nw} stages={ns} failed: {type(e).__name__}: {str(e)[:200]}")
                continue
            log(f"config warps={nw} stages={ns}: dense 16K {t:.3f} ms")
            if best is None or t < best[0]:
                best = (t, nw, ns)
        cfg = dict(num_warps=best[1], num_stages=best[2])
        res["config"] = cfg
        log(f"chosen config {cfg}")
        del q, k, v

    # ---- correctness on the device ----------------------------------------------------------
    n = 300 if smoke else 4096 + 77
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
    res["checks"].append({"what": "ours vs torch reference, mixed heads", "n": n, "rel_err": err})
    if fi is not None:
        w = FlashInferSparsePrefill(mix, hkv, d)
        w.plan_masks(masks[0], n, dtype)
        of = w.run(q, k, v)
        err = relative_error(of, ref)
        log(f"check flashinfer block-sparse vs reference: rel err {err:.2e}")
        res["checks"].append({"what": "flashinfer VariableBlockSparse vs torch reference", "n": n, "rel_err": err})
    del q, k, v, o, ref

    calib, calib_fi = [], []
    # ---- prefill -----------------------------------------------------------------------------
    sets = layer_sets(hq)
    for n in ctxs:
        if time.time() - t_start > args.budget_s:
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
            t_sdpa["torch"] = bench(lambda: reference_sparse_prefill(q, k, v, [torch.ones(hq, 5, 5, dtype=torch.bool).tril()[:, :math.ceil(n / BLOCK), :math.ceil(n / BLOCK)]], cu, kvl, cu_seqlens_k=cu), smoke)
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
            if time.time() - t_start > args.budget_s + 60:
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
            bp = block_pairs_of(idx, n)
            dens = sum(pairs_tok) / (causal_pairs_tok * hq)
            flops = 4 * d * sum(pairs_tok)
            eff = dens * sdpa_best / t
            ent.update(density=dens, ours_ms=t, index_ms=t_idx, ours_tflops=flops / (t * 1e-3) / 1e12,
                       eff_vs_sdpa=eff, eff_vs_sdpa_with_index=dens * sdpa_best / (t + t_idx),
                       block_pairs=sum(bp), all_written=ok)
            line = (f"{name:18s} density {dens:.3f}  ours {t:8.3f} ms ({ent['ours_tflops']:4.0f} TFLOP/s, eff {eff:5.2f}; "
                    f"+index {t_idx:.3f} ms → eff {ent['eff_vs_sdpa_with_index']:.2f})")
            pats = {b.pattern for b in budgets}
            if len(pats) == 1:
                p = budgets[0].pattern
                dens_rec = budgets[0].density(n) if p is not Pattern.VSLASH else sum(bp) / (hq * math.ceil(n / BLOCK) * (math.ceil(n / BLOCK) + 1) / 2)
                calib.append({"pattern": p.value, "density": round(dens_rec, 6), "ctx_len": n, "head_dim": d,
                              "gqa": hq // hkv, "num_heads": hq, "time_ms": t, "block_pairs": int(sum(bp)),
                              "config": name, "index_ms": t_idx})
            # FlashInfer variable block-sparse on the same masks
            nnz_tok = sum(bp) * BLOCK
            if fi is not None and nnz_tok < 1.2e9:
                try:
                    w = FlashInferSparsePrefill(budgets, hkv, d)
                    nb = math.ceil(n / BLOCK)
                    from sglang_shplb.kernels.flashinfer_wrappers import index_to_dense_mask
                    w.plan_masks(index_to_dense_mask(idx, 0, nb), n, dtype)
                    g_ = hq // hkv
                    qh = q.transpose(0, 1).contiguous()
                    kh = k.transpose(0, 1).repeat_interleave(g_, 0).contiguous()
                    vh = v.transpose(0, 1).repeat_interleave(g_, 0).contiguous()
                    ofi = w.wrapper.run(qh, kh, vh)
                    errf = relative_error(ofi.transpose(0, 1), o.float())
                    tf = bench(lambda: w.wrapper.run(qh, kh, vh), smoke)
                    ent.update(flashinfer_ms=tf, flashinfer_eff_vs_sdpa=dens * sdpa_best / tf,
                               flashinfer_vs_ours_rel_err=errf)
                    line += f"  | flashinfer {tf:8.3f} ms (eff {dens * sdpa_best / tf:4.2f}, err vs ours {errf:.1e})"
                    if len(pats) == 1:
                        r = dict(calib[-1]); r["time_ms"] = tf; r.pop("index_ms", None)
                        calib_fi.append(r)
                    del w, qh, kh, vh, ofi
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
        _dump(res, calib, calib_fi, args.out, device_name, today)

    res["wall_s"] = time.time() - t_start
    _summary(res)
    _dump(res, calib, calib_fi, args.out, device_name, today)
    _plot(res, args.out)


def _dump(res, calib, calib_fi, out, device, today):
    suffix = "_smoke" if device.startswith("cpu") else "_h100"
    with open(os.path.join(out, f"kernels{suffix}.json"), "w") as f:
        json.dump(res, f, indent=1)
    for recs, nm, kern in ((calib, f"calibration{suffix}.json", "sglang_shplb triton sparse_prefill"),
                           (calib_fi, f"calibration{suffix}_flashinfer.json",
                            "flashinfer 0.6.15.post1 VariableBlockSparseAttentionWrapper")):
        with open(os.path.join(out, nm), "w") as f:
            json.dump({"schema": "shplb-calibration/1", "device": device, "date": today, "kernel": kern,
                       "records": recs}, f, indent=1)
    with open(os.path.join(out, f"kernels{suffix}.log"), "w") as f:
        f.write("\n".join(LOG) + "\n")


def _plot(res, out):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(1, 1, figsize=(7, 4.5))
    ax = [ax]
    names = sorted({c["name"] for r in res["prefill"] for c in r["configs"]})
    for nm in names:
        xs = [r["ctx"] for r in res["prefill"] for c in r["configs"] if c["name"] == nm]
        ys = [c["eff_vs_sdpa"] for r in res["prefill"] for c in r["configs"] if c["name"] == nm]
        ax[0].plot(xs, ys, marker="o", label=f"ours {nm}")
        ys2 = [(r["ctx"], c.get("flashinfer_eff_vs_sdpa")) for r in res["prefill"] for c in r["configs"] if c["name"] == nm]
        ys2 = [p for p in ys2 if p[1] is not None]
        if ys2:
            ax[0].plot([p[0] for p in ys2], [p[1] for p in ys2], ls="--", marker="x", alpha=0.6)
    ax[0].axhline(0.85, color="k", lw=0.8)
    ax[0].set_xscale("log", base=2)
    ax[0].set_xlabel("context")
    ax[0].set_ylabel("per-head efficiency vs SDPA (density·t_SDPA/t)")
    ax[0].set_title("prefill (solid: ours, dashed: FlashInfer block-sparse)")
    ax[0].legend(fontsize=6)
    fig.suptitle(f"{res['device']} {res['date']}")
    fig.tight_layout()
    suffix = "_smoke" if res["device"].startswith("cpu") else "_h100"
    fig.savefig(os.path.join(out, f"kernels{suffix}.png"), dpi=110)


def _summary(res):
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


def mode_setup(args, flag: str, stem: str, smoke_ctxs: list[int]):
    """What a ``--quick`` / ``--topk-variants`` run starts with: the layer shape (Llama-3-8B on the GPU, tiny on
    the CPU smoke run), the contexts, the log header, the results dict and ``dump()`` writing it (JSON + log)
    to ``--out/{stem}_{h100|smoke}``."""
    smoke = args.cpu_smoke
    os.makedirs(args.out, exist_ok=True)
    dev = "cpu" if smoke else "cuda"
    if smoke:
        hq, hkv, d, dtype, ctxs = 4, 1, 64, torch.float32, smoke_ctxs
    else:
        hq, hkv, d, dtype, ctxs = 32, 8, 128, torch.bfloat16, [16384, 32768, 65536]
        if args.ctx != "8192,16384,32768,65536,131072":
            ctxs = [int(x) for x in args.ctx.split(",")]
    device_name = "cpu (Triton interpreter)" if smoke else torch.cuda.get_device_name()
    today = _dt.date.today().isoformat()
    import triton
    log(f"# bench/kernels.py {flag}  device={device_name}  date={today}  torch={torch.__version__}  "
        f"triton={triton.__version__}")
    res = {"device": device_name, "date": today, "shape": dict(hq=hq, hkv=hkv, d=d, dtype=str(dtype)),
           "checks": [], "prefill": []}
    path = os.path.join(args.out, f"{stem}{'_smoke' if smoke else '_h100'}")
    return smoke, dev, (hq, hkv, d, dtype), ctxs, res, results_writer(res, path)


def check_batch(paged: bool, seed: int, smoke: bool, hq: int, hkv: int, d: int, dev, dtype):
    """The device checks' two-sequence batch: contiguous varlen, or paged (scattered token pool) with the
    first sequence chunked behind an unaligned 129-token prefix. Returns q, k, v, cu_seqlens_q, kv_lens,
    lens, q_lens and the KV layout keywords."""
    g = torch.Generator(device=dev).manual_seed(seed)
    lens = [300, 200] if smoke else [4096 + 77, 3000]
    q_lens = lens if not paged else [lens[0] - 129, lens[1]]
    q = torch.randn(sum(q_lens), hq, d, device=dev, dtype=dtype, generator=g)
    cu = torch.tensor([0, q_lens[0], sum(q_lens)], dtype=torch.int32, device=dev)
    kvl = torch.tensor(lens, dtype=torch.int32, device=dev)
    rows = 2 * max(lens) + 99 if paged else sum(lens)
    kb = torch.randn(rows, hkv, d, device=dev, dtype=dtype, generator=g)
    vb = torch.randn(rows, hkv, d, device=dev, dtype=dtype, generator=g)
    if paged:
        kw = dict(req_to_token=torch.randperm(rows, device=dev)[:2 * max(lens)].view(2, -1).int(),
                  req_pool_indices=torch.tensor([1, 0], dtype=torch.int32, device=dev))
    else:
        kw = dict(cu_seqlens_k=torch.tensor([0, lens[0], sum(lens)], dtype=torch.int32, device=dev))
    return q, kb, vb, cu, kvl, lens, q_lens, kw


def quick(args):
    """Round 2: the SparsePrefill paths (dense heads → SDPA, dense/streaming → 128-row rule kernel, top-k →
    index kernel) against the round-1 path (every head through the 64-row index kernel) and SDPA."""
    t_start = time.time()
    smoke, dev, (hq, hkv, d, dtype), ctxs, res, dump = mode_setup(args, "--quick", "kernels_round2", [256, 320])

    mix = ([HeadBudget.dense(), HeadBudget.streaming(128, 512), HeadBudget.topk(0.2, 2), HeadBudget.vslash(0.2, 2)]
           * (hq // 4))
    # ---- correctness on the device: API paths, contiguous single sequence and paged chunked varlen ----
    for paged in (False, True):
        q, kb, vb, cu, kvl, lens, q_lens, kw = check_batch(paged, 3 + paged, smoke, hq, hkv, d, dev, dtype)
        sp = SparsePrefill(mix, hkv, d).plan(cu, kvl, max(q_lens), max(lens), q_lens_cpu=q_lens, kv_lens_cpu=lens, **kw)
        o = torch.full_like(q, float("nan"))
        sp.run(q, kb, vb, out=o)
        idx = sp.index(q, kb)
        masks = [idx.masks(b, math.ceil(n / BLOCK)).to(dev) for b, n in enumerate(lens)]
        ref = reference_sparse_prefill(q, kb, vb, masks, cu, kvl, **kw)
        err = relative_error(o, ref)
        log(f"check SparsePrefill.run (mixed heads, {'paged, chunked' if paged else 'contiguous'}, lens {lens}, "
            f"q_lens {q_lens}) vs reference: rel err {err:.2e}, all written {bool(torch.isfinite(o).all())}")
        res["checks"].append({"what": f"SparsePrefill.run mixed, paged={paged}", "rel_err": err})
        del q, kb, vb, o, ref
    dump()

    sets = {"dense": [HeadBudget.dense()] * hq,
            "topk0.1": [HeadBudget.topk(0.1, 2)] * hq,
            "1dense+topk0.1": [HeadBudget.dense()] + [HeadBudget.topk(0.1, 2)] * (hq - 1),
            "stream+topk0.1": [HeadBudget.streaming(128, 2048)] * (hq // 2) + [HeadBudget.topk(0.1, 2)] * (hq // 2),
            "stream(128+2048)": [HeadBudget.streaming(128, 2048)] * hq}
    corr_sets = {"topk0.1 corr": sets["topk0.1"], "stream+topk0.1 corr": sets["stream+topk0.1"]}
    for n, data in [(n, "iid") for n in ctxs] + [(n, "corr") for n in ctxs]:
        if time.time() - t_start > args.budget_s:
            log(f"time budget reached: skipping ctx {n} ({data})")
            continue
        q = torch.randn(n, hq, d, device=dev, dtype=dtype)
        k = torch.randn(n, hkv, d, device=dev, dtype=dtype)
        if data == "corr":
            # heavy-hitter data: a per-head query direction and a per-KV-block key offset, so every query
            # block ranks KV blocks alike (adjacent query blocks pick similar lists, as in real prefills)
            nbk = math.ceil(n / BLOCK)
            q += 2.0 * torch.randn(1, hq, d, device=dev, dtype=dtype)
            k += torch.randn(nbk, 1, hkv, d, device=dev, dtype=dtype).expand(nbk, BLOCK, hkv, d).reshape(-1, hkv, d)[:n]
        v = torch.randn(n, hkv, d, device=dev, dtype=dtype)
        cu = torch.tensor([0, n], dtype=torch.int32, device=dev)
        kvl = torch.tensor([n], dtype=torch.int32, device=dev)
        causal_tok = n * (n + 1) // 2
        dense_flops = 4 * d * causal_tok * hq
        row = {"ctx": n, "data": data, "configs": []}
        if not smoke:
            t_sdpa = time_sdpa(q, k, v, smoke)
            sdpa = min(t_sdpa.values())
        else:
            t_sdpa = {"none": 1.0}
            sdpa = 1.0
        row.update(sdpa_ms=t_sdpa, sdpa_best_ms=sdpa, sdpa_tflops=dense_flops / (sdpa * 1e-3) / 1e12)
        log(f"\n## ctx {n}: SDPA {', '.join(f'{a} {b:.3f} ms' for a, b in t_sdpa.items())} "
            f"({row['sdpa_tflops']:.0f} TFLOP/s)")
        # the 128-row rule kernel on dense heads, no SDPA (what a prefix / paged-without-host-lengths gets)
        if data == "corr":
            for name, budgets in corr_sets.items():
                _quick_config(res, row, name, budgets, q, k, v, cu, kvl, n, hkv, d, sdpa, causal_tok, smoke)
            res["prefill"].append(row)
            del q, k, v
            dump()
            continue
        allh = torch.arange(hq, dtype=torch.int32, device=dev)
        z = torch.zeros(hq, dtype=torch.int32, device=dev)
        wdense = torch.full((hq,), RULE_DENSE_WINDOW, dtype=torch.int32, device=dev)
        o = torch.full_like(q, float("nan"))
        f = lambda: rule_prefill(q, k, v, allh, z, wdense, cu, kvl, n, cu_seqlens_k=cu, out=o)  # noqa: E731
        f()
        ok = bool(torch.isfinite(o).all())
        t = bench(f, smoke)
        row["rule_dense_ms"] = t
        log(f"rule kernel (128-row tiles), all heads dense: {t:.3f} ms ({dense_flops / (t * 1e-3) / 1e12:.0f} TFLOP/s, "
            f"eff {sdpa / t:.2f}), all written {ok}")
        if not smoke:
            for nw, ns in ((8, 2), (8, 3), (4, 2)):
                try:
                    tt = bench(lambda: rule_prefill(q, k, v, allh, z, wdense, cu, kvl, n, cu_seqlens_k=cu, out=o,
                                                    num_warps=nw, num_stages=ns), smoke)
                    row[f"rule_dense_ms_w{nw}s{ns}"] = tt
                    log(f"  rule dense warps={nw} stages={ns}: {tt:.3f} ms (eff {sdpa / tt:.2f})")
                except Exception as e:  # noqa: BLE001
                    log(f"  rule dense warps={nw} stages={ns} failed: {type(e).__name__}: {str(e)[:150]}")
        for name, budgets in sets.items():
            _quick_config(res, row, name, budgets, q, k, v, cu, kvl, n, hkv, d, sdpa, causal_tok, smoke)
        res["prefill"].append(row)
        del q, k, v
        dump()
    res["wall_s"] = time.time() - t_start
    dump()


def _quick_config(res, row, name, budgets, q, k, v, cu, kvl, n, hkv, d, sdpa, causal_tok, smoke):
    hq = q.shape[1]
    ent = {"name": name}
    try:
        sp = SparsePrefill(budgets, hkv, d).plan(cu, kvl, n, n, cu_seqlens_k=cu)
        idx = sp.index(q, k)
        t_idx = bench(lambda: sp.index(q, k), smoke, 100)
        pairs = attended_pairs_tokens(idx, n)
        dens = sum(pairs) / (causal_tok * hq)
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
        t_api_k = t_api - (t_idx if sp.listed_heads else 0.0)
        if sp.listed_heads:
            o2 = torch.full_like(q, float("nan"))
            sp.run(q, k, v, out=o2, union_tiles=True)
            ent["union_rel_err"] = relative_error(o2, o1.float())
            ent["union_written"] = bool(torch.isfinite(o2).all())
            t_u = bench(lambda: sp.run(q, k, v, out=o2, union_tiles=True), smoke) - t_idx
            ent.update(union_kernels_ms=t_u, eff_union=dens * sdpa / t_u)
            del o2
    except Exception as e:  # noqa: BLE001
        log(f"{name}: failed: {type(e).__name__}: {str(e)[:300]}")
        return
    ent.update(density=dens, index_ms=t_idx, api_ms=t_api, api_kernels_ms=t_api_k, round1_kernel_ms=t_r1,
               eff_api_kernels=dens * sdpa / t_api_k, eff_round1=dens * sdpa / t_r1,
               eff_api_with_index=dens * sdpa / t_api, api_vs_round1_rel_err=err, all_written=ok)
    log(f"{name:18s} density {dens:.3f}: run() {t_api:8.3f} ms = index {t_idx:.3f} + kernels {t_api_k:8.3f} "
        f"(eff {ent['eff_api_kernels']:.2f}; with index {ent['eff_api_with_index']:.2f}) | round-1 64-row kernel "
        f"{t_r1:8.3f} ms (eff {ent['eff_round1']:.2f}) | err vs round-1 {err:.1e}, written {ok}"
        + (f" | union 128-row kernels {ent['union_kernels_ms']:8.3f} ms (eff {ent['eff_union']:.2f}, "
           f"err {ent['union_rel_err']:.1e}, written {ent['union_written']})" if "eff_union" in ent else ""))
    row["configs"].append(ent)
    del sp, idx, o, o1
    if not smoke:
        torch.cuda.empty_cache()


def topk_variants(args):
    """The block-index kernel on listed heads: 64-wide KV tiles (one listed block per step) vs 128-wide (two
    blocks gathered per step), each at every config of ``INDEX_CONFIGS`` and autotuned, against SDPA."""
    t_start = time.time()
    smoke, dev, (hq, hkv, d, dtype), ctxs, res, dump = mode_setup(args, "--topk-variants", "topk_variants", [320])
    res["configs"] = [list(c) for c in INDEX_CONFIGS]

    sets = {k: v for k, v in layer_sets(hq).items() if k in ("topk0.1", "topk0.2", "vslash0.1")}
    # (name, kv_tile, launch kwargs): "auto" = no num_warps/num_stages (autotuned on CUDA)
    variants = [(f"w{t}_{'auto' if c is None else f'nw{c[0]}s{c[1]}'}", t,
                 {} if c is None else dict(num_warps=c[0], num_stages=c[1]))
                for t in (64, 128) for c in list(INDEX_CONFIGS) + [None]]
    base = "w64_nw4s2"                                               # the round-1 kernel and launch config

    # ---- correctness vs the torch reference: a small chunked, paged, two-sequence batch ----
    g = torch.Generator(device=dev).manual_seed(5)
    lens = [300, 200] if smoke else [2048 + 77, 1500]
    q_lens = [lens[0] - 129, lens[1]]
    q = torch.randn(sum(q_lens), hq, d, device=dev, dtype=dtype, generator=g)
    cu = torch.tensor([0, q_lens[0], sum(q_lens)], dtype=torch.int32, device=dev)
    kvl = torch.tensor(lens, dtype=torch.int32, device=dev)
    pool = 2 * max(lens) + 99
    kb = torch.randn(pool, hkv, d, device=dev, dtype=dtype, generator=g)
    vb = torch.randn(pool, hkv, d, device=dev, dtype=dtype, generator=g)
    kw = dict(req_to_token=torch.randperm(pool, device=dev)[:2 * max(lens)].view(2, -1).int(),
              req_pool_indices=torch.tensor([1, 0], dtype=torch.int32, device=dev))
    mix = [HeadBudget.topk(0.2, 2), HeadBudget.vslash(0.2, 2), HeadBudget.dense(), HeadBudget.topk(0.1, 2)] * (hq // 4)
    idx = build_block_index(mix, q, kb, cu, kvl, max(lens), **kw)
    ref = reference_sparse_prefill(q, kb, vb, [idx.masks(b, math.ceil(n / BLOCK)).to(dev) for b, n in enumerate(lens)],
                                   cu, kvl, **kw)
    for tile in (64, 128):
        o = torch.full_like(q, float("nan"))
        sparse_prefill(q, kb, vb, idx.block_idx, idx.block_cnt, idx.head_dense, cu, kvl, max(q_lens), out=o,
                       kv_tile=tile, **kw)
        err = relative_error(o, ref)
        log(f"check kv_tile={tile} (mixed heads, paged, chunked, lens {lens}, q_lens {q_lens}) vs reference: "
            f"rel err {err:.2e}")
        res["checks"].append({"what": f"kv_tile={tile} vs torch reference, mixed, paged, chunked", "rel_err": err})
    del q, kb, vb, ref, idx
    dump()

    for n in ctxs:
        if time.time() - t_start > args.budget_s:
            log(f"time budget reached: skipping ctx {n}")
            continue
        q, k, v, cu, kvl = one_sequence(n, hq, hkv, d, dev, dtype)
        causal_tok = n * (n + 1) // 2
        dense_flops = 4 * d * causal_tok * hq
        t_sdpa = time_sdpa(q, k, v, smoke) or {"none": 1.0}
        sdpa = min(t_sdpa.values())
        row = {"ctx": n, "sdpa_ms": t_sdpa, "sdpa_best_ms": sdpa, "sdpa_tflops": dense_flops / (sdpa * 1e-3) / 1e12,
               "configs": []}
        log(f"\n## ctx {n}: SDPA {', '.join(f'{a} {b:.3f} ms' for a, b in t_sdpa.items())} "
            f"({row['sdpa_tflops']:.0f} TFLOP/s)")
        for name, budgets in sets.items():
            idx = build_block_index(budgets, q, k, cu, kvl, n, cu_seqlens_k=cu)
            pairs = attended_pairs_tokens(idx, n)
            nb = math.ceil(n / BLOCK)
            dens = sum(pairs) / (causal_tok * hq)
            ent = {"name": name, "density": dens, "block_density": sum(block_pairs_of(idx, n)) / (hq * nb * (nb + 1) // 2),
                   "variants": {}}
            flops = 4 * d * sum(pairs)
            log(f"{name}: density {dens:.3f} (block pairs {ent['block_density']:.3f})")
            o_base = None
            for vname, tile, cfg in variants:
                o = torch.full_like(q, float("nan"))
                f = lambda: sparse_prefill(q, k, v, idx.block_idx, idx.block_cnt, idx.head_dense, cu, kvl, n,  # noqa: E731
                                           cu_seqlens_k=cu, out=o, kv_tile=tile, **cfg)
                try:
                    f()
                    written = bool(torch.isfinite(o).all())
                    t = bench(f, smoke)
                except Exception as e:  # noqa: BLE001
                    log(f"  {vname}: failed: {type(e).__name__}: {str(e)[:200]}")
                    continue
                if vname == base:
                    o_base = o
                diff = float((o.float() - o_base.float()).abs().max()) if o_base is not None else float("nan")
                ve = {"ms": t, "tflops": flops / (t * 1e-3) / 1e12, "eff_vs_sdpa": dens * sdpa / t,
                      "max_abs_diff_vs_w64": diff, "all_written": written}
                if not cfg and not smoke:
                    best = getattr(_kernel(True), "best_config", None)
                    ve["autotuned"] = str(best) if best is not None else None
                ent["variants"][vname] = ve
                log(f"  {vname:14s} {t:9.3f} ms  {ve['tflops']:5.0f} TFLOP/s  eff {ve['eff_vs_sdpa']:.3f}  "
                    f"x{ent['variants'][base]['ms'] / t if base in ent['variants'] else float('nan'):.2f} vs {base}"
                    f"  max|diff| vs {base} {diff:.1e}  written {written}"
                    + (f"  ({ve['autotuned']})" if ve.get("autotuned") else ""))
                if o is not o_base:
                    del o
            row["configs"].append(ent)
            del idx, o_base
            if not smoke:
                torch.cuda.empty_cache()
        res["prefill"].append(row)
        del q, k, v
        dump()
    log("\n# summary: per-head efficiency vs SDPA (best config of each tile)")
    for row in res["prefill"]:
        for ent in row["configs"]:
            cells = []
            for tile in (64, 128):
                vs = {a: b for a, b in ent["variants"].items() if a.startswith(f"w{tile}_")}
                if vs:
                    a, b = max(vs.items(), key=lambda x: x[1]["eff_vs_sdpa"])
                    cells.append(f"{a} {b['eff_vs_sdpa']:.3f}")
            log(f"{row['ctx']:6d} {ent['name']:10s} " + " | ".join(cells))
    res["wall_s"] = time.time() - t_start
    dump()


def tiles(args):
    """Round 4. Top-k heads at 128-token superblocks (``HeadBudget(tile=128)``) through the 128 x 128 tile
    kernel (TMA loads; autotuned, each fixed config of ``TILE_CONFIGS``, and pointer loads), against top-k at
    64-token blocks through the 64-row index kernel (autotuned), dense heads through the tile kernel and the
    rule kernel, and SDPA (flash, cuDNN). Also the index build (64 vs 128) and ``SparsePrefill.run`` totals."""
    t_start = time.time()
    smoke, dev, (hq, hkv, d, dtype), ctxs, res, dump = mode_setup(args, "--tiles", "tiles", [384])
    if not smoke and args.ctx == "8192,16384,32768,65536,131072":
        ctxs = [16384, 32768, 65536, 131072]
    res["tile_configs"] = [list(c) for c in TILE_CONFIGS]
    T = 2 * BLOCK

    # ---- correctness on the device: mixed tile-128 / 64 top-k + dense + streaming, chunked paged and contiguous ----
    mix = [HeadBudget.topk(0.2, 2, tile=T), HeadBudget.dense(), HeadBudget.topk(0.1, 2, tile=T),
           HeadBudget.topk(0.1, 2), HeadBudget.streaming(128, 512), HeadBudget.topk(0.05, 2, tile=T),
           HeadBudget.vslash(0.2, 2), HeadBudget.topk(0.5, 2, tile=T)] * (hq // 8 if hq >= 8 else 1)
    mix = mix[:hq]
    for paged in (False, True):
        q, kb, vb, cu, kvl, lens, q_lens, kw = check_batch(paged, 11 + paged, smoke, hq, hkv, d, dev, dtype)
        sp = SparsePrefill(mix, hkv, d).plan(cu, kvl, max(q_lens), max(lens), **kw)
        o = torch.full_like(q, float("nan"))
        sp.run(q, kb, vb, out=o)
        idx = sp.last_index
        ref = reference_sparse_prefill(q, kb, vb, [idx.masks(b, math.ceil(n / BLOCK)).to(dev) for b, n in enumerate(lens)],
                                       cu, kvl, **kw)
        err = relative_error(o, ref)
        it = build_block_index(mix, q, kb, cu, kvl, max(lens), topk_builder="torch", **kw)
        nbs = [math.ceil(n / BLOCK) for n in lens]
        same = sum(int((idx.block_idx[b, :, :nb] == it.block_idx[b, :, :nb]).sum()) for b, nb in enumerate(nbs))
        tot = sum(idx.block_idx[b, :, :nb].numel() for b, nb in enumerate(nbs))
        what = f"SparsePrefill.run, tile-128 top-k + others, {'paged chunked' if paged else 'contiguous varlen'}"
        log(f"check {what} vs reference: rel err {err:.2e}; Triton vs torch index entries equal {same / tot:.4%}, "
            f"counts equal {bool(torch.equal(idx.block_cnt, it.block_cnt))}")
        res["checks"].append({"what": what, "rel_err": err, "index_entries_equal": same / tot,
                              "counts_equal": bool(torch.equal(idx.block_cnt, it.block_cnt))})
        del q, kb, vb, ref, idx, it, o
    dump()

    for n in ctxs:
        if time.time() - t_start > args.budget_s:
            log(f"time budget reached: skipping ctx {n}")
            continue
        q, k, v, cu, kvl = one_sequence(n, hq, hkv, d, dev, dtype)
        causal_tok = n * (n + 1) // 2
        t_sdpa = time_sdpa(q, k, v, smoke) or {"none": 1.0}
        sdpa = min(t_sdpa.values())
        row = {"ctx": n, "sdpa_ms": t_sdpa, "sdpa_best_ms": sdpa,
               "sdpa_tflops": 4 * d * causal_tok * hq / (sdpa * 1e-3) / 1e12, "configs": []}
        log(f"\n## ctx {n}: SDPA {', '.join(f'{a} {b:.3f} ms' for a, b in t_sdpa.items())} "
            f"({row['sdpa_tflops']:.0f} TFLOP/s)")
        heads = torch.arange(hq, dtype=torch.int32, device=dev)
        for f in (0.05, 0.1, 0.2, 1.0):
            for tile in (BLOCK, T):
                budgets = [HeadBudget.topk(f, 2, tile=tile)] * hq if f < 1 else [HeadBudget.dense()] * hq
                if f == 1.0 and tile == BLOCK:
                    continue
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
                        variants += [(f"tile_tma_ws_n{bn}w{w}s{st}", mk(block_n=bn, num_warps=w, num_stages=st,
                                                                     warp_specialize=True), None)
                                     for bn, w, st in ((128, 8, 2), (64, 4, 3))]
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
                    if o is not o_first:
                        del o
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
        res["prefill"].append(row)
        del q, k, v
        dump()
    log("\n# summary: per-head efficiency vs SDPA (best variant), and run() speed-up vs SDPA")
    for row in res["prefill"]:
        for ent in row["configs"]:
            a, b = max(ent["variants"].items(), key=lambda x: x[1]["eff_vs_sdpa"]) if ent["variants"] else ("-", {})
            log(f"{row['ctx']:6d} {ent['name']:12s} best {a} eff {b.get('eff_vs_sdpa', float('nan')):.3f}"
                + (f"; run() {ent['run_speedup_vs_sdpa']:.2f}x SDPA" if "run_speedup_vs_sdpa" in ent else ""))
    res["wall_s"] = time.time() - t_start
    dump()
    if not smoke:
        try:
            _plot_tiles(res, args.out)
        except ImportError as e:   # the GPU machine may lack matplotlib: plot from the JSON afterwards
            log(f"no plot: {e}")


def tile_calibration_records(res: dict) -> list[dict]:
    """Cost-model records (schema shplb-calibration/1) of the top-k rows of a ``--tiles`` result, both
    granularities from the same run: 64-token blocks on the autotuned 64-row index kernel, ``tile`` 128 on the
    autotuned 128 x 128 TMA kernel; the time is one call for all heads of the layer."""
    from sglang_shplb.planning.cost_model import block_pairs
    sh = res["shape"]
    recs = []
    for row in res["prefill"]:
        n = row["ctx"]
        for c in row["configs"]:
            if not c["name"].startswith("topk"):
                continue
            frac, tile = c["name"][4:].split("/")
            variant = "index64_auto" if int(tile) == BLOCK else "tile_tma_auto"
            if variant not in c["variants"]:
                continue
            b = HeadBudget.topk(float(frac), 2, tile=int(tile))
            recs.append({"pattern": "topk", "tile": b.tile, "density": round(b.density(n), 6), "ctx_len": n,
                         "head_dim": sh["d"], "gqa": sh["hq"] // sh["hkv"], "num_heads": sh["hq"],
                         "time_ms": c["variants"][variant]["ms"], "block_pairs": block_pairs(b, n) * sh["hq"],
                         "config": c["name"], "index_ms": c["index_ms"]})
    return recs


def write_tile_calibration(tiles_json: str, base_json: str, out: str) -> None:
    """``base_json``'s records with its top-k ones replaced by both granularities of a ``--tiles`` run."""
    res = json.load(open(tiles_json))
    base = json.load(open(base_json))
    recs = tile_calibration_records(res)
    keep = [r for r in base["records"] if r["pattern"] != "topk"]
    doc = dict(base, date=res["date"], records=keep + recs,
               kernel=base["kernel"] + f"; top-k from a --tiles run ({res['date']}): 64-token blocks on the 64-row "
                                       "index kernel, tile 128 on tile_prefill (128x128, TMA)")
    from sglang_shplb.planning.cost_model import CostModel
    cm = CostModel.from_calibration(doc)                  # validates the schema
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "calibration_h100_tiles.json")
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    b64, b128 = HeadBudget.topk(0.1, 2), HeadBudget.topk(0.1, 2, tile=2 * BLOCK)
    for n in (16384, 65536, 131072):
        t64, t128 = (cm.head_time(b, n, res["shape"]["d"], 4) * 1e3 for b in (b64, b128))
        print(f"{n:>6d}: top-k 0.1 per head {t64:.3f} ms at 64-token blocks, {t128:.3f} ms at 128 ({t64 / t128:.2f}x)")
    print(f"wrote {path}: {len(keep)} records kept + {len(recs)} top-k records")


def _plot_tiles(res, out):
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
    ax.axhline(0.85, color="gray", lw=0.8, ls=":")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (K tokens)")
    ax.set_ylabel("per-head efficiency vs SDPA")
    ax.set_title(f"prefill, {res['device']}, {res['date']}")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "tiles_h100.png"), dpi=120)


if __name__ == "__main__":
    main()
