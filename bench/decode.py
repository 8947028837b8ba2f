"""Benchmark: sparse paged decode (the serving path, ``LayerKernels.decode``) vs FlashInfer's dense paged decode
and our dense decode, side by side in one process, with bytes read and achieved bandwidth vs copy bandwidth.

Llama-3-8B-shaped layer (32 q / 8 KV heads, d=128, bf16), batch B of requests at context n, SGLang's token
pool with ``--page-size 64`` (what the kernel path needs: its decode page summaries are indexed by 64-slot
pool page): each request's 64-token pages are whole pool pages handed out in random order (pool page 0
unused); our kernel reads one index per page (``pool_page_size=64``, as the server does at ``--page-size 64``).
FlashInfer reads the same pool through per-token indices (page size 1 in its wrapper, as SGLang runs it).
``L`` layers, each with its own K/V buffers (as many as fit in ~24 GB, at most 8), are captured in one CUDA
graph; the time per layer is replay / L, with L2 flushed between replays
(``triton.testing.do_bench``, median). Two times per budget set:

* **step**: what a decode step costs in the server: fold the new key into the page summaries, choose the
  pages of top-k heads (fused Triton selector), build the union lists, the group kernel (split-K combine in it);
* **kept**: a step whose selection is kept from an earlier step (the server's ``--shplb-decode-reselect-every``):
  the selector launch folds the key and rebuilds the union lists from the kept pages, without scoring or
  bisecting; **amortized** = (step + (R - 1) · kept) / R, a step in R selecting (R = ``--reselect-every``; a
  page boundary also selects, once every 64 steps, not counted);
* **reuse**: the group kernel alone on the last selection (no selector launch; a lower bound);
* **routed dense**: the same launches with the layer's route flag set (``LayerKernels.route``: how a decode CUDA
  graph shared by every bucket runs a bucket the plan marks stock), every head on every page.

Bytes are the unique K/V bytes the kernel must read: per request and KV head, the pages of the union of its
q heads' page sets (64 tokens · d · 2 B · K and V). Efficiency = (bytes / time) / copy bandwidth, the copy
bandwidth being a 1 GiB device-to-device copy's (read + write) / time.

    PYTHONUNBUFFERED=1 python bench/decode.py --out $OUT        # GPU
    python bench/decode.py --cpu-smoke --out /tmp/dec             # logic check (Triton interpreter)
"""
from __future__ import annotations

import argparse
import datetime as _dt
import math
import os
import sys
import time

if "--cpu-smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from sglang_shplb.kernels.paged_layer import (DecodeWorkspace, LayerKernels, layer_max_selected,  # noqa: E402
                                              selected_heads)
from sglang_shplb.kernels.reference import (reference_decode_pages, reference_sparse_decode,  # noqa: E402
                                            relative_error)
from sglang_shplb.kernels.triton_decode import DecodeScratch, build_page_summaries, group_decode  # noqa: E402
from sglang_shplb.core.patterns import BLOCK, DECODE_RESELECT_EVERY, HeadBudget  # noqa: E402

from timing import bench, device_tag, log, results_writer  # noqa: E402  (bench/timing.py)


SWEPT = ("dense", "stream(128+2048)", "topk0.1", "plan: 1 dense, 4 stream, 3 topk0.1 groups")


def budget_sets(hq: int, g: int) -> dict[str, list[HeadBudget]]:
    """Uniform sets, sets whose KV groups mix budgets (the union-list path), and the serving bench's plan."""
    st, t1, t05, t2 = (HeadBudget.streaming(128, 2048), HeadBudget.topk(0.1, 4), HeadBudget.topk(0.05, 4),
                       HeadBudget.topk(0.2, 4))
    hkv = hq // g
    return {
        "dense": [HeadBudget.dense()] * hq,
        "stream(128+2048)": [st] * hq,
        "topk0.1": [t1] * hq,
        "topk0.05": [t05] * hq,
        "topk 0.05/0.1/0.2 in a group": [(t05, t1, t2, t1)[r % 4] for r in range(hq)],
        "stream+topk0.1 in a group": [(st, t1)[(r % g) * 2 // g] for r in range(hq)],
        # the serving bench's plan (synthetic_plans.serving_bench_budget()): KV group 0 dense,
        # even groups streaming, odd groups top-k 0.1
        "plan: 1 dense, 4 stream, 3 topk0.1 groups": [
            HeadBudget.dense() if h // g == 0 else (st if (h // g) % 2 == 0 else HeadBudget.topk(0.1, 2))
            for h in range(hkv * g)],
    }


def scattered_pool(bsz: int, max_ctx: int, dev) -> tuple[torch.Tensor, int]:
    """``req_to_token [bsz, max_ctx]`` and the pool's token count: SGLang's pool with ``--page-size 64``, each
    request's page ``j`` (positions ``64j .. 64j+63``) one whole 64-slot pool page, the pages handed out in
    random order (scattered and shuffled across requests, pool page 0 unused, as SGLang reserves slot 0).
    The pool holds every page of every request: ``(bsz * ceil(max_ctx / 64) + 1) * 64`` slots."""
    pages = math.ceil(max_ctx / BLOCK)
    perm = torch.randperm(bsz * pages, device=dev) + 1
    r2t = (perm.view(bsz, pages, 1) * BLOCK + torch.arange(BLOCK, device=dev)).view(bsz, -1)[:, :max_ctx].int()
    return r2t, (bsz * pages + 1) * BLOCK


def unique_pages(lk: LayerKernels, ws: DecodeWorkspace, seq_lens: torch.Tensor) -> int:
    """Pages the last decode of ``lk`` read, summed over requests and KV heads (ranges counted from the budgets,
    union lists from the workspace's counts)."""
    bsz = seq_lens.shape[0]
    gm, gs, gw = (x.tolist() for x in (lk.page_rules.gmode, lk.page_rules.gsink, lk.page_rules.gwindow))
    ucnt = ws.scratch.ucnt[:bsz].tolist()
    total = 0
    for b, n in enumerate(seq_lens.tolist()):
        npg = math.ceil(n / BLOCK)
        for hk, m in enumerate(gm):
            w = min(gw[hk], npg)
            total += npg if m == 0 else (min(gs[hk], npg - w) + w if m == 1 else ucnt[b][hk])
    return total


def device_check(hq: int, hkv: int, d: int, dev, dtype, smoke: bool) -> dict:
    """``LayerKernels.decode`` (fused selector + union + group kernel) vs the reference on a mixed plan."""
    g = hq // hkv
    lens = [300, 130] if smoke else [4096 + 77, 3000]
    max_ctx = max(lens) + 64
    r2t, pool = scattered_pool(2, max_ctx, dev)
    gen = torch.Generator(device=dev).manual_seed(7)
    kb = torch.randn(pool, hkv, d, device=dev, dtype=dtype, generator=gen)
    vb = torch.randn(pool, hkv, d, device=dev, dtype=dtype, generator=gen)
    q = torch.randn(2, hq, d, device=dev, dtype=dtype, generator=gen)
    budgets = budget_sets(hq, g)["stream+topk0.1 in a group"]
    budgets[0] = HeadBudget.dense()
    budgets[1] = HeadBudget.vslash(0.1, 2)
    lk = LayerKernels(budgets, hkv, d, max_ctx, dtype, dev, pool_tokens=pool, pool_page_size=BLOCK)
    ws = DecodeWorkspace(hq, hkv, d, math.ceil(max_ctx / BLOCK), layer_max_selected(budgets, max_ctx), dev,
                         selected_heads(budgets))
    ws.ensure(2)
    rpi = torch.tensor([1, 0], dtype=torch.int32, device=dev)     # request b lives in slot rpi[b]
    seq = torch.tensor(lens, dtype=torch.int64, device=dev)                # int64, as SGLang's seq_lens
    build_page_summaries(kb, r2t, rpi, seq - 1, lk.kmin, lk.kmax)
    out = torch.full_like(q, float("nan"))
    lk.decode(q, kb, vb, r2t, rpi, seq, ws, 1 / math.sqrt(d), out)
    sets = [reference_decode_pages(budgets, q[b].float(), kb.float(), r2t, int(rpi[b]), lens[b])[0] for b in range(2)]
    ref = reference_sparse_decode(q, kb, vb, r2t, rpi, seq, sets, 1 / math.sqrt(d))
    err = relative_error(out, ref)
    written = bool(torch.isfinite(out).all())
    log(f"check LayerKernels.decode (mixed groups: dense, vertical-slash, streaming, top-k) vs reference, "
        f"lens {lens}: rel err {err:.2e}, all written {written}")
    return {"what": "LayerKernels.decode vs reference (mixed groups)", "lens": lens, "rel_err": err,
            "all_written": written}


def flashinfer_dense(fi, q_l, kb_l, vb_l, r2t, n: int, hq: int, hkv: int, d: int, dtype, dev):
    """FlashInfer's paged decode (page size 1, as SGLang runs it) over the same L layers: (ms per layer, how)."""
    bsz = q_l[0].shape[0]
    indptr = torch.arange(0, bsz + 1, device=dev, dtype=torch.int32) * n
    indices = r2t[:, :n].reshape(-1).contiguous()
    last = torch.ones(bsz, dtype=torch.int32, device=dev)
    ws = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
    try:
        w = fi.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_cuda_graph=True, paged_kv_indptr_buffer=indptr,
                                                  paged_kv_indices_buffer=indices, paged_kv_last_page_len_buffer=last)
        how = "cuda graph"
    except TypeError:
        w, how = fi.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD"), "eager"
    w.plan(indptr, indices, last, hq, hkv, d, 1, q_data_type=dtype, kv_data_type=dtype)
    outs = [torch.empty_like(q) for q in q_l]
    caches = [(k.view(k.shape[0], 1, hkv, d), v.view(v.shape[0], 1, hkv, d)) for k, v in zip(kb_l, vb_l)]

    def step():
        for q, c, o in zip(q_l, caches, outs):
            w.run(q, c, out=o)
    if how == "eager":
        return bench(step, False) / len(q_l), how, outs
    return graph_ms(step, False) / len(q_l), how, outs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--cpu-smoke", action="store_true")
    ap.add_argument("--ctx", default="32768,65536,131072")
    ap.add_argument("--batch", default="1,4,16")
    ap.add_argument("--max-layers", type=int, default=8)
    ap.add_argument("--kv-gb", type=float, default=24.0, help="K/V memory of the L layers at most")
    ap.add_argument("--budget-s", type=float, default=480.0, help="stop adding (ctx, batch) points past this")
    ap.add_argument("--splits", default="", help="also time the reuse path of a few sets at these split counts")
    ap.add_argument("--server-ctx", type=int, default=0,
                    help="size the layer's decode (pages, selection width, splits) for a server of this context "
                         "length, as `--context-length` does in SGLang (default: each point's n + 64)")
    ap.add_argument("--profile", action="store_true", help="also print each kernel's device time (torch.profiler)")
    ap.add_argument("--reselect-every", type=int, default=DECODE_RESELECT_EVERY,
                    help="R of the kept / amortized times (default %(default)s, the server's)")
    args = ap.parse_args()
    smoke = args.cpu_smoke
    t_start = time.time()
    os.makedirs(args.out, exist_ok=True)
    dev = "cpu" if smoke else "cuda"
    if smoke:
        hq, hkv, d, dtype, ctxs, batches = 8, 2, 64, torch.float32, [320], [1, 2]
    else:
        hq, hkv, d, dtype = 32, 8, 128, torch.bfloat16
        ctxs = [int(x) for x in args.ctx.split(",")]
        batches = [int(x) for x in args.batch.split(",")]
    device_name = "cpu (Triton interpreter)" if smoke else torch.cuda.get_device_name()
    today = _dt.date.today().isoformat()
    import triton
    log(f"# bench/decode.py  device={device_name}  date={today}  torch={torch.__version__}  triton={triton.__version__}")
    fi = None
    if not smoke:
        try:
            from sglang_shplb.kernels.flashinfer_wrappers import import_flashinfer
            fi = import_flashinfer()
            log(f"flashinfer {fi.__version__}")
        except ImportError as e:
            log(f"flashinfer unavailable: {e}")
    res = {"device": device_name, "date": today, "shape": dict(hq=hq, hkv=hkv, d=d, dtype=str(dtype)),
           "checks": [], "decode": []}
    path = os.path.join(args.out, f"decode_{device_tag(device_name)}")
    dump = results_writer(res, path)

    if smoke:
        copy_bw = 1.0
    else:
        x = torch.empty(1 << 30, dtype=torch.uint8, device=dev).random_()
        y = torch.empty_like(x)
        copy_bw = 2 * x.numel() / (bench(lambda: y.copy_(x), False) * 1e-3) / 1e9
        del x, y
        log(f"copy bandwidth (read + write) {copy_bw:.0f} GB/s")
        res["copy_bw_gbs"] = copy_bw
    res["checks"].append(device_check(hq, hkv, d, dev, dtype, smoke))
    dump()

    sets = budget_sets(hq, hq // hkv)
    splits = [int(x) for x in args.splits.split(",") if x]
    scale = 1 / math.sqrt(d)
    for n in ctxs:
        for bsz in batches:
            if time.time() - t_start > args.budget_s:
                log(f"time budget reached: skipping ctx {n} batch {bsz}")
                continue
            max_ctx = max(n + BLOCK, args.server_ctx)
            kv_layer = bsz * n * hkv * d * 2 * 2
            L = 1 if smoke else max(1, min(args.max_layers, int(args.kv_gb * 1e9 // kv_layer)))
            r2t, pool = scattered_pool(bsz, max_ctx, dev)
            kb_l = [torch.randn(pool, hkv, d, device=dev, dtype=dtype) for _ in range(L)]
            vb_l = [torch.randn(pool, hkv, d, device=dev, dtype=dtype) for _ in range(L)]
            q_l = [torch.randn(bsz, hq, d, device=dev, dtype=dtype) for _ in range(L)]
            rpi = torch.arange(bsz, dtype=torch.int32, device=dev)
            seq = torch.full((bsz,), n, dtype=torch.int32, device=dev)
            row = {"ctx": n, "max_ctx": max_ctx, "batch": bsz, "layers": L, "dense_kv_bytes": kv_layer, "configs": []}
            log(f"\n## decode ctx {n} batch {bsz}, sized for {max_ctx} tokens ({L} layers in the graph, {kv_layer / 1e6:.0f} MB dense K/V per layer)")
            if fi is not None:
                try:
                    t, how, _ = flashinfer_dense(fi, q_l, kb_l, vb_l, r2t, n, hq, hkv, d, dtype, dev)
                    row.update(flashinfer_dense_ms=t, flashinfer_how=how,
                               flashinfer_frac_copy_bw=kv_layer / (t * 1e-3) / 1e9 / copy_bw)
                    log(f"flashinfer dense (page 1, {how}) {t:.4f} ms/layer, {row['flashinfer_frac_copy_bw']:.2f} of copy bw")
                except Exception as e:  # noqa: BLE001
                    log(f"flashinfer decode failed: {type(e).__name__}: {str(e)[:200]}")
            ws = DecodeWorkspace(hq, hkv, d, math.ceil(max_ctx / BLOCK),
                                 max(layer_max_selected(b, max_ctx) for b in sets.values()), dev,
                                 max(selected_heads(b) for b in sets.values()))
            ws.ensure(bsz)
            for name, budgets in sets.items():
                try:
                    ent = one_config(name, budgets, q_l, kb_l, vb_l, r2t, rpi, seq, ws, scale, hkv, d, max_ctx, dtype,
                                     dev, smoke, splits if name in SWEPT else [], args.profile, args.reselect_every)
                except Exception as e:  # noqa: BLE001
                    log(f"{name}: failed: {type(e).__name__}: {str(e)[:300]}")
                    continue
                gbs = ent["bytes"] / (ent["reuse_ms"] * 1e-3) / 1e9
                ent.update(reuse_gbs=gbs, frac_copy_bw=gbs / copy_bw,
                           step_frac_copy_bw=ent["bytes"] / (ent["step_ms"] * 1e-3) / 1e9 / copy_bw)
                line = (f"{name:42s} {ent['bytes'] / 1e6:8.1f} MB  reuse {ent['reuse_ms']:.4f} ms ({ent['frac_copy_bw']:.2f} bw)"
                        f"  step {ent['step_ms']:.4f} ms ({ent['step_frac_copy_bw']:.2f} bw)  eager reuse {ent['eager_reuse_ms']:.4f} ms")
                if "flashinfer_dense_ms" in row:
                    ent["step_speedup_vs_flashinfer_dense"] = row["flashinfer_dense_ms"] / ent["step_ms"]
                    line += f"  | step vs flashinfer dense {ent['step_speedup_vs_flashinfer_dense']:.2f}x"
                if row["configs"] and row["configs"][0]["name"] == "dense":
                    ent["step_speedup_vs_ours_dense"] = row["configs"][0]["step_ms"] / ent["step_ms"]
                    line += f", vs our dense {ent['step_speedup_vs_ours_dense']:.2f}x"
                line += f"\n{'':42s} routed dense {ent['routed_dense_ms']:.4f} ms"
                if row["configs"] and row["configs"][0]["name"] == "dense":
                    ent["routed_dense_vs_ours_dense"] = row["configs"][0]["step_ms"] / ent["routed_dense_ms"]
                    line += f" ({ent['routed_dense_vs_ours_dense']:.2f}x our dense)"
                if "kept_ms" in ent:
                    line += (f"\n{'':42s} kept {ent['kept_ms']:.4f} ms, amortized over {ent['reselect_every']} steps "
                             f"{ent['amortized_ms']:.4f} ms")
                    if row["configs"] and row["configs"][0]["name"] == "dense":
                        ent["amortized_speedup_vs_ours_dense"] = row["configs"][0]["step_ms"] / ent["amortized_ms"]
                        line += f" ({ent['amortized_speedup_vs_ours_dense']:.2f}x our dense"
                        if "flashinfer_dense_ms" in row:
                            fi_ms = row["flashinfer_dense_ms"]
                            ent["amortized_speedup_vs_flashinfer_dense"] = fi_ms / ent["amortized_ms"]
                            line += f", {ent['amortized_speedup_vs_flashinfer_dense']:.2f}x flashinfer dense"
                        line += ")"
                log(line)
                if "kernel_us" in ent:
                    log(f"    kernels ({ent['launches_per_layer']:.1f} launches, µs per layer): "
                        + ", ".join(f"{k} {v:.1f}" for k, v in ent["kernel_us"].items()))
                if "reuse_ms_by_nsplit" in ent:
                    log("    reuse ms by nsplit: " + ", ".join(f"{x}: {t:.4f}" for x, t in ent["reuse_ms_by_nsplit"].items()))
                row["configs"].append(ent)
            res["decode"].append(row)
            del kb_l, vb_l, q_l, ws
            if not smoke:
                torch.cuda.empty_cache()
            dump()
    res["wall_s"] = time.time() - t_start
    dump()
    if not smoke:
        plot(res, path + ".png")


def one_config(name, budgets, q_l, kb_l, vb_l, r2t, rpi, seq, ws, scale, hkv, d, max_ctx, dtype, dev, smoke,
               splits: list[int], profile: bool = False, reselect_every: int = DECODE_RESELECT_EVERY) -> dict:
    bsz, L = seq.shape[0], len(q_l)
    lks = [LayerKernels(budgets, hkv, d, max_ctx, dtype, dev, pool_tokens=kb_l[0].shape[0], pool_page_size=BLOCK)
           for _ in range(L)]
    for lk, kb in zip(lks, kb_l):
        if lk.kmin is not None:
            build_page_summaries(kb, r2t, rpi, seq - 1, lk.kmin, lk.kmax)
    outs = [torch.full_like(q, float("nan")) for q in q_l]

    def step():
        for lk, q, kb, vb, o in zip(lks, q_l, kb_l, vb_l, outs):
            lk.decode(q, kb, vb, r2t, rpi, seq, ws, scale, o)
    step()
    written = all(bool(torch.isfinite(o).all()) for o in outs)
    # per layer: its selection (kept for the reuse timing) and the pages it read
    sel, pages = [], 0
    for lk, q, kb, vb, o in zip(lks, q_l, kb_l, vb_l, outs):
        lk.decode(q, kb, vb, r2t, rpi, seq, ws, scale, o)
        sel.append((ws.page_idx[:bsz].clone(), ws.page_cnt[:bsz].clone()))
        pages += unique_pages(lk, ws, seq)
    sc, (ns, sp) = ws.scratch, lks[0].splits(bsz)

    def reuse(sc=sc, ns=ns, sp=sp):
        for lk, q, kb, vb, o, (pi, pc) in zip(lks, q_l, kb_l, vb_l, outs, sel):
            group_decode(q, kb, vb, r2t, rpi, seq, lk.page_rules, pi, pc, sc, ns, sp, sm_scale=scale, out=o,
                         pool_page_size=lk.pool_page_size)
    t_step = graph_ms(step, smoke) / L
    t_reuse = graph_ms(reuse, smoke) / L
    lk0, (pi0, pc0) = lks[0], sel[0]
    t_eager = bench(lambda: group_decode(q_l[0], kb_l[0], vb_l[0], r2t, rpi, seq, lk0.page_rules, pi0, pc0, sc, ns, sp,
                                         sm_scale=scale, out=outs[0], pool_page_size=lk0.pool_page_size), smoke)
    ent = {"name": name, "budgets": sorted({b.describe() for b in budgets}), "bytes": pages * BLOCK * d * 2 * 2 // L,
           "pages_per_layer": pages / L, "step_ms": t_step, "reuse_ms": t_reuse, "eager_reuse_ms": t_eager,
           "all_written": written, "nsplit": ns, "split_pages": sp,
           "list_kv_heads": int((lk0.page_rules.gmode == 2).sum())}
    if lks[0].selects and reselect_every > 1:   # the server's kept selections: replays after the first keep them
        kls = [LayerKernels(budgets, hkv, d, max_ctx, dtype, dev, pool_tokens=kb_l[0].shape[0], pool_page_size=BLOCK,
                            request_slots=r2t.shape[0], reselect_every=reselect_every) for _ in range(L)]
        for lk, kb in zip(kls, kb_l):
            build_page_summaries(kb, r2t, rpi, seq - 1, lk.kmin, lk.kmax)
        kouts = [torch.full_like(q, float("nan")) for q in q_l]

        def kept_step():
            for lk, q, kb, vb, o in zip(kls, q_l, kb_l, vb_l, kouts):
                lk.decode(q, kb, vb, r2t, rpi, seq, ws, scale, o)
        kept_step()   # selects and keeps
        same = all(torch.equal(a, b) for a, b in zip(kouts, outs))
        t_kept = graph_ms(kept_step, smoke) / L
        same = same and all(torch.equal(a, b) for a, b in zip(kouts, outs))   # kept pages = the fresh step's
        ent.update(kept_ms=t_kept, reselect_every=reselect_every, kept_equals_step=same,
                   amortized_ms=(t_step + (reselect_every - 1) * t_kept) / reselect_every)
        del kls
    route = torch.ones(1, dtype=torch.int32, device=dev)
    for lk in lks:
        lk.route = route
    ent["routed_dense_ms"] = graph_ms(step, smoke) / L
    for lk in lks:
        lk.route = None
    if profile and not smoke:   # device time of each kernel of a step, per layer
        from torch.profiler import ProfilerActivity
        with torch.profiler.profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                step()
            torch.cuda.synchronize()
        kern = [e for e in prof.key_averages() if e.device_time_total > 0]
        ent["kernel_us"] = {e.key[:40]: e.device_time_total / (10 * L) for e in kern}
        ent["launches_per_layer"] = sum(e.count for e in kern) / (10 * L)
    if splits:   # the reuse time at other split counts
        big = DecodeScratch(bsz, q_l[0].shape[1], hkv, d, ws.max_pages, bsz * q_l[0].shape[1] * max(splits), dev)
        ent["reuse_ms_by_nsplit"] = {x: graph_ms(lambda x=x: reuse(big, x, 1), smoke) / L for x in splits}
    return ent


def graph_ms(fn, smoke: bool) -> float:
    """Replay time of ``fn`` captured in a CUDA graph (L2 flushed between replays, median); one eager call
    on the CPU smoke run."""
    fn()
    if smoke:
        return bench(fn, True)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return bench(g.replay, False)


def plot(res: dict, png: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = res["decode"]
    names = [c["name"] for c in rows[0]["configs"]] if rows else []
    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    xs = [f"{r['ctx'] // 1024}K\nbs{r['batch']}" for r in rows]
    for name in names:
        eff = [next((c["frac_copy_bw"] for c in r["configs"] if c["name"] == name), float("nan")) for r in rows]
        spd = [next((c.get("step_speedup_vs_flashinfer_dense", float("nan")) for c in r["configs"]
                     if c["name"] == name), float("nan")) for r in rows]
        axes[0].plot(xs, eff, marker="o", label=name)
        axes[1].plot(xs, spd, marker="o", label=name)
    axes[0].plot(xs, [r.get("flashinfer_frac_copy_bw", float("nan")) for r in rows], "k--", label="flashinfer dense")
    axes[0].axhline(0.8, color="grey", lw=0.8)
    axes[0].set_title("achieved / copy bandwidth (selection reused)")
    axes[1].set_title("decode step speed-up vs FlashInfer dense (selection included)")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"sparse paged decode, {res['device']}, {res['date']}, Llama-3-8B layer (32/8 heads, d=128, bf16)")
    fig.tight_layout()
    fig.savefig(png, dpi=120)


if __name__ == "__main__":
    main()
