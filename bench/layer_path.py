"""Attention of a whole forward pass, every layer at its plan's budgets, on the backend's kernel path
(:class:`sglang_shplb.kernels.paged_layer.LayerKernels`) vs dense competitors, side by side in one process.

Prefill (one sequence of n tokens, no prefix): per layer, the kernel path (dense heads on SDPA/cuDNN,
streaming on the rule kernel, top-k on the index kernel, index built on the GPU, decode page summaries
built) or, for an all-dense layer, SDPA (as the server's stock backend would); vs dense cuDNN SDPA for
every layer, and FlashInfer's dense ragged prefill for every layer. Host time included (wall clock, the
way the server pays it), median of repeats.

Decode (batch B, each at context n): every layer's decode step captured in one CUDA graph (update of the
page summaries, page selection, the paged sparse kernel), vs the same graph with all heads dense (our
paged kernel), vs FlashInfer's dense paged decode per layer (eager loop).

KV pool: SGLang's token pool with ``--page-size 64`` (what the kernel path needs: the decode page summaries
are indexed by 64-slot pool page), each request's 64-token pages whole pool pages handed out in shuffled
order, pool page 0 unused; the pool holds every page of every request slot. Decode reads it one index per page
(``pool_page_size=64``).

  python bench/layer_path.py smollm2 --out $OUT        # SmolLM2 shape, the profiled plan
  python bench/layer_path.py llama8b --out $OUT        # Llama-3-8B shape, the serving bench's mixed plan
  TRITON_INTERPRET=1 python bench/layer_path.py smollm2 --cpu-smoke --out /tmp/lp   # logic check on the CPU
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

from timing import host_syncs  # noqa: E402

from sglang_shplb.core.patterns import BLOCK, DECODE_RESELECT_EVERY, HeadBudget, Pattern, decode_budgets  # noqa: E402
from sglang_shplb.kernels.paged_layer import (DecodeWorkspace, ExtendBatch, LayerKernels,  # noqa: E402
                                              layer_max_selected, selected_heads)

SHAPES = {"smollm2": dict(layers=30, hq=9, hkv=3, d=64), "llama8b": dict(layers=32, hq=32, hkv=8, d=128)}


def plan_budgets(which: str, topk_tile: int = BLOCK) -> list[list[HeadBudget]]:
    """The default plan's budgets (SmolLM2), or the serving benchmark's mixed plan (``topk_tile``: its top-k
    heads' selection tile)."""
    if which == "smollm2":
        data = json.loads((HERE / "results" / "default_plan" / "plan.json").read_text())
        return [[HeadBudget.from_dict(b) for b in layer] for layer in data["budgets"]]
    from sglang_shplb.core.model_spec import ModelSpec
    from sglang_shplb.planning.synthetic_plans import serving_bench_budget
    s = SHAPES[which]
    spec = ModelSpec("LlamaForCausalLM", s["layers"], s["hq"], s["hkv"], s["d"], 131072, "bench")
    f = serving_bench_budget(topk_tile)
    return [[f(li, h, spec) for h in range(s["hq"])] for li in range(s["layers"])]


def paged_pool(slots: int, max_ctx: int, dev, seed: int = 0) -> tuple[torch.Tensor, int]:
    """``req_to_token [slots, max_ctx]`` and the pool's token count, as SGLang's pool lays it out with
    ``--page-size 64``: positions ``64j .. 64j+63`` of a request are the 64 slots of one pool page, the pages
    of all requests handed out in shuffled order (pool page 0 unused, as SGLang reserves slot 0)."""
    pages = math.ceil(max_ctx / BLOCK)
    perm = torch.randperm(slots * pages, generator=torch.Generator().manual_seed(seed)).to(dev) + 1
    r2t = (perm.view(slots, pages, 1) * BLOCK + torch.arange(BLOCK, device=dev)).view(slots, -1)[:, :max_ctx]
    return r2t.int().contiguous(), (slots * pages + 1) * BLOCK


def show(kind: str, row: dict) -> None:
    print(kind, json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def wall_ms(fn, reps: int) -> float:
    fn()
    sync()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts)


def graph_ms(fn, reps: int) -> float:
    """Replay time of ``fn`` captured in a CUDA graph (eager on the CPU smoke run)."""
    fn()   # eager warm-up: compiles, builds cached constants
    if not torch.cuda.is_available():
        return wall_ms(fn, reps)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return wall_ms(g.replay, reps)


def sdpa(q, k, v, scale):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    if not q.is_cuda:
        return torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], is_causal=True,
            scale=scale, enable_gqa=True)[0].transpose(0, 1)
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION], set_priority=True):
        return torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], is_causal=True,
            scale=scale, enable_gqa=True)[0].transpose(0, 1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("which", choices=sorted(SHAPES))
    ap.add_argument("--ctx", default=None)
    ap.add_argument("--batch", default="1,4")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default="/tmp/out")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny contexts on the CPU (Triton interpreter)")
    a = ap.parse_args()
    s = SHAPES[a.which]
    L, hq, hkv, d = s["layers"], s["hq"], s["hkv"], s["d"]
    ctxs = [int(x) for x in (a.ctx or ("2048,4096,8192" if a.which == "smollm2" else "16384,32768,65536")).split(",")]
    budgets = plan_budgets(a.which)
    assert len(budgets) == L and all(len(b) == hq for b in budgets)
    dev, dt, scale = "cuda", torch.bfloat16, d ** -0.5
    if a.cpu_smoke:
        L, budgets, ctxs, a.reps = 3, budgets[:3], [200], 1
        dev, dt = "cpu", torch.float32
    max_ctx = max(ctxs) + 64
    bss = [int(x) for x in a.batch.split(",")]
    slots = max(bss) + 1
    sparse_layers = [li for li in range(L) if any(b.pattern is not Pattern.DENSE for b in budgets[li])]
    r2t, pool = paged_pool(slots, max_ctx, dev)
    # decode follows the server's decode budgets (short-window streaming heads on Quest pages)
    lks = {li: LayerKernels(budgets[li], hkv, d, max_ctx, dt, dev, pool_tokens=pool, pool_page_size=BLOCK,
                            decode_budgets=decode_budgets(budgets[li])) for li in sparse_layers}
    # the server's kept page selections (DECODE_RESELECT_EVERY steps): timed as a step that keeps its selection
    kept_lks = {li: LayerKernels(budgets[li], hkv, d, max_ctx, dt, dev, pool_tokens=pool, pool_page_size=BLOCK,
                                 request_slots=slots, decode_budgets=decode_budgets(budgets[li]))
                for li in sparse_layers}
    dense_lk = LayerKernels([HeadBudget.dense()] * hq, hkv, d, max_ctx, dt, dev, pool_tokens=pool,
                            pool_page_size=BLOCK)
    try:
        import flashinfer
    except Exception as e:  # noqa: BLE001
        flashinfer = None
        print("flashinfer not importable:", e)
    if dev == "cpu":
        flashinfer = None
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu (smoke)"
    res = {"which": a.which, "device": name, "date": time.strftime("%Y-%m-%d"),
           "layers": L, "sparse_layers": len(sparse_layers), "prefill": [], "decode": []}
    print(f"{a.which}: {L} layers, {len(sparse_layers)} with sparse heads; {name}")
    for n in ctxs:
        torch.manual_seed(n)
        q = torch.randn(n, hq, d, device=dev, dtype=dt)
        k = torch.randn(n, hkv, d, device=dev, dtype=dt)
        v = torch.randn(n, hkv, d, device=dev, dtype=dt)
        kb = torch.randn(pool, hkv, d, device=dev, dtype=dt)
        vb = torch.randn(pool, hkv, d, device=dev, dtype=dt)
        kb[r2t[0, :n].long()] = k
        vb[r2t[0, :n].long()] = v
        batch = ExtendBatch.build(r2t, torch.tensor([0], device=dev), [n], [n])
        out = torch.empty_like(q)

        def ours():
            for li in range(L):
                if li in lks:
                    lks[li].extend(q, k, v, kb, vb, batch, scale, out)
                else:
                    out.copy_(sdpa(q, k, v, scale))

        def dense():
            for _ in range(L):
                sdpa(q, k, v, scale)

        row = {"n": n, "shplb_ms": wall_ms(ours, a.reps), "sdpa_dense_ms": wall_ms(dense, a.reps)}
        if dev == "cuda":   # where a forward's attention waits for the GPU (after the warm-up above)
            row["host_syncs"] = host_syncs(ours)
        if flashinfer is not None:
            ws = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
            w = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(ws, "NHD")
            cu = torch.tensor([0, n], dtype=torch.int32, device=dev)
            w.plan(cu, cu, hq, hkv, d, causal=True, q_data_type=dt)

            def fi():
                for _ in range(L):
                    w.run(q, k, v)
            row["flashinfer_dense_ms"] = wall_ms(fi, a.reps)
        # quality of the whole path vs dense on one layer with sparse heads (same inputs)
        if sparse_layers:
            lks[sparse_layers[0]].extend(q, k, v, kb, vb, batch, scale, out)
            ref = sdpa(q, k, v, scale)
            dh = [h for h, b in enumerate(budgets[sparse_layers[0]]) if b.pattern is Pattern.DENSE]
            if dh:
                row["dense_heads_max_abs_diff_vs_sdpa"] = float((out[:, dh].float() - ref[:, dh].float()).abs().max())
        row["speedup_vs_sdpa"] = row["sdpa_dense_ms"] / row["shplb_ms"]
        if "flashinfer_dense_ms" in row:
            row["speedup_vs_flashinfer"] = row["flashinfer_dense_ms"] / row["shplb_ms"]
        res["prefill"].append(row)
        show("prefill", row)

        for bs in bss:
            rpi = torch.arange(bs, device=dev, dtype=torch.int64)
            for b in range(1, bs):
                kb[r2t[b, :n].long()] = k
                vb[r2t[b, :n].long()] = v
            seq = torch.full((bs,), n, device=dev, dtype=torch.int64)
            for lk in [*lks.values(), *kept_lks.values()]:
                if lk.kmin is not None:
                    from sglang_shplb.kernels.triton_decode import build_page_summaries
                    build_page_summaries(kb, r2t, rpi, seq - 1, lk.kmin, lk.kmax)
            qd = torch.randn(bs, hq, d, device=dev, dtype=dt)
            od = torch.empty_like(qd)
            wsd = DecodeWorkspace(hq, hkv, d, math.ceil(max_ctx / BLOCK),
                                  max(layer_max_selected(lk.decode_budgets, max_ctx) for lk in [dense_lk, *lks.values()]), dev,
                                  max(selected_heads(lk.decode_budgets) for lk in [dense_lk, *lks.values()]))
            wsd.ensure(bs)

            def step_ours():
                for li in range(L):
                    (lks.get(li) or dense_lk).decode(qd, kb, vb, r2t, rpi, seq, wsd, scale, od)

            def step_kept():
                for li in range(L):
                    (kept_lks.get(li) or dense_lk).decode(qd, kb, vb, r2t, rpi, seq, wsd, scale, od)

            def step_dense():
                for _ in range(L):
                    dense_lk.decode(qd, kb, vb, r2t, rpi, seq, wsd, scale, od)

            drow = {"n": n, "batch": bs}
            for key, fn in (("shplb", step_ours), ("ours_dense", step_dense), ("shplb_kept", step_kept)):
                drow[f"{key}_graph_ms"] = graph_ms(fn, a.reps * 5)   # shplb_kept: every replay keeps the selection
            R = DECODE_RESELECT_EVERY
            drow["shplb_amortized_ms"] = (drow["shplb_graph_ms"] + (R - 1) * drow["shplb_kept_graph_ms"]) / R
            drow["reselect_every"] = R
            drow["amortized_speedup_vs_ours_dense"] = drow["ours_dense_graph_ms"] / drow["shplb_amortized_ms"]
            if flashinfer is not None:
                wsf = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
                wd = flashinfer.BatchDecodeWithPagedKVCacheWrapper(wsf, "NHD")
                indptr = torch.arange(bs + 1, device=dev, dtype=torch.int32) * n
                indices = r2t[:bs, :n].reshape(-1).contiguous()
                last = torch.ones(bs, device=dev, dtype=torch.int32)
                wd.plan(indptr, indices, last, hq, hkv, d, 1, q_data_type=dt)
                kv = (kb[:, None], vb[:, None])

                def fi_dec():
                    for _ in range(L):
                        wd.run(qd, kv)
                drow["flashinfer_dense_eager_ms"] = wall_ms(fi_dec, a.reps * 5)
            drow["speedup_vs_ours_dense"] = drow["ours_dense_graph_ms"] / drow["shplb_graph_ms"]
            if "flashinfer_dense_eager_ms" in drow:
                drow["speedup_vs_flashinfer"] = drow["flashinfer_dense_eager_ms"] / drow["shplb_graph_ms"]
            res["decode"].append(drow)
            show("decode", drow)
        kb = vb = None   # free the pool before the next context (the closures above hold the names)
        if dev == "cuda":
            torch.cuda.empty_cache()
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"layer_path_{a.which}.json").write_text(json.dumps(res, indent=1))
    print("DONE", out_dir / f"layer_path_{a.which}.json")


if __name__ == "__main__":
    main()
