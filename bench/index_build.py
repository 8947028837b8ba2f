"""Benchmark: top-k and vertical-slash block index, torch ``build_block_index(builder="torch")`` vs the fused
Triton builders (``builder="triton"``: ``build_topk_index``, ``build_vslash_index``).

One process, side by side, on a Llama-3-8B-shaped layer (32 q heads, 8 KV heads, d=128, bf16), one sequence
of 16K/32K/64K/128K tokens (full prefill), KV contiguous (``cu_seqlens_k``) and paged (scattered pages
through ``req_to_token``), head mixes: all 32 heads top-k 0.1, 8 dense + 24 top-k 0.1 (every 4th head
dense), one vertical-slash head 0.1 + 31 streaming (a TP rank of the profiled plan), all 32 vertical-slash.
Checks that the selected heads' rows agree (fraction of identical index entries position by position, and
of identical (query block, KV block) pairs as sets; exact counts) and writes JSON + log to ``--out``.

    PYTHONUNBUFFERED=1 python bench/index_build.py --out $OUT                        # GPU
    TRITON_INTERPRET=1 python bench/index_build.py --cpu-smoke --out /tmp/ib         # logic check (CPU)

Timing: triton.testing.do_bench (CUDA events, L2 flushed before each run, median of ``--rep`` ms).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import sys

if "--cpu-smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from sglang_shplb.kernels import build_block_index  # noqa: E402
from sglang_shplb.kernels.triton_index import build_topk_index  # noqa: E402
from sglang_shplb.core.patterns import BLOCK, HeadBudget, Pattern  # noqa: E402

from timing import LOG, bench, log  # noqa: E402  (bench/timing.py)


def agreement(budgets, ref, got, n: int) -> dict:
    """Top-k and vertical-slash heads, query blocks of the sequence: identical entries (positional), identical
    pairs (sets)."""
    th = torch.tensor([h for h, b in enumerate(budgets) if b.pattern in (Pattern.TOPK, Pattern.VSLASH)],
                      device=ref.block_cnt.device)
    nbb = math.ceil(n / BLOCK)
    ri, gi = ref.block_idx[0, th, :nbb].long(), got.block_idx[0, th, :nbb].long()
    rc, gc = ref.block_cnt[0, th, :nbb].long(), got.block_cnt[0, th, :nbb].long()
    valid = torch.arange(ri.shape[-1], device=ri.device) < rc[..., None]
    same_pos = ((ri == gi) & valid).sum().item() / max(1, valid.sum().item())
    nb = ref.block_cnt.shape[-1]
    mr = torch.zeros(*ri.shape[:2], nb + 1, dtype=torch.bool, device=ri.device)
    mg = torch.zeros_like(mr)
    mr.scatter_(-1, torch.where(valid, ri, nb), True)
    mg.scatter_(-1, torch.where(torch.arange(gi.shape[-1], device=gi.device) < gc[..., None], gi, nb), True)
    mr, mg = mr[..., :nb], mg[..., :nb]
    same_set = (mr & mg).sum().item() / max(1, mr.sum().item())
    return {"identical_entries": same_pos, "identical_pairs": same_set, "counts_equal": bool(torch.equal(rc, gc))}


def make_inputs(n, hq, hkv, d, dtype, dev, paged, g):
    q = torch.randn(n, hq, d, generator=g, device=dev, dtype=torch.float32).to(dtype)
    cu_q = torch.tensor([0, n], dtype=torch.int32, device=dev)
    kvl = torch.tensor([n], dtype=torch.int32, device=dev)
    if paged:
        pool = n + 4096
        k = torch.randn(pool, hkv, d, generator=g, device=dev, dtype=torch.float32).to(dtype)
        r2t = torch.randperm(pool, generator=g, device=dev)[:n].int().view(1, n)
        kw = dict(req_to_token=r2t, req_pool_indices=torch.zeros(1, dtype=torch.int32, device=dev))
    else:
        k = torch.randn(n, hkv, d, generator=g, device=dev, dtype=torch.float32).to(dtype)
        kw = dict(cu_seqlens_k=torch.tensor([0, n], dtype=torch.int32, device=dev))
    return q, k, cu_q, kvl, kw


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results", help="directory (or a .json path)")
    ap.add_argument("--cpu-smoke", action="store_true")
    ap.add_argument("--ctx", default="16384,32768,65536,131072")
    ap.add_argument("--layouts", default="contiguous,paged")
    ap.add_argument("--rep", type=int, default=200, help="do_bench rep (ms)")
    ap.add_argument("--warps", default="auto", help="top-k selection-kernel num_warps variants to time, e.g. auto,8,16")
    ap.add_argument("--mixes", default=None, help="comma-separated subset of the head mixes")
    args = ap.parse_args()
    smoke = args.cpu_smoke
    if smoke:
        dev, hq, hkv, d, dtype = "cpu", 8, 2, 64, torch.bfloat16
        ctxs = [300, 1100]
    else:
        dev, hq, hkv, d, dtype = "cuda", 32, 8, 128, torch.bfloat16
        ctxs = [int(x) for x in args.ctx.split(",")]
    out_json = args.out if args.out.endswith(".json") else os.path.join(args.out, "index_build.json")
    os.makedirs(os.path.dirname(os.path.abspath(out_json)), exist_ok=True)
    device_name = "cpu (Triton interpreter)" if smoke else torch.cuda.get_device_name()
    import triton
    log(f"# bench/index_build.py  device={device_name}  date={_dt.date.today().isoformat()}  "
        f"torch={torch.__version__}  triton={triton.__version__}  hq={hq} hkv={hkv} d={d} {dtype}")
    mixes = {
        "topk0.1_all": [HeadBudget.topk(0.1)] * hq,
        "dense_every4th+topk0.1": [HeadBudget.dense() if h % 4 == 0 else HeadBudget.topk(0.1) for h in range(hq)],
        "vslash0.1_one+stream": [HeadBudget.vslash(0.1, 4)] + [HeadBudget.streaming(64, 2048)] * (hq - 1),
        "vslash0.1_all": [HeadBudget.vslash(0.1, 4)] * hq,
    }
    if args.mixes:
        mixes = {k: v for k, v in mixes.items() if k in args.mixes.split(",")}
    rows = []
    g = torch.Generator(device=dev).manual_seed(0)
    log(f"{'ctx':>7} {'layout':>10} {'mix':>24} {'torch ms':>9} {'triton ms':>9} {'speedup':>8} "
        f"{'same entries':>12} {'same pairs':>10} counts")
    for n in ctxs:
        for layout in args.layouts.split(","):
            q, k, cu_q, kvl, kw = make_inputs(n, hq, hkv, d, dtype, dev, layout == "paged", g)
            for name, budgets in mixes.items():
                f_ref = lambda: build_block_index(budgets, q, k, cu_q, kvl, n, builder="torch", **kw)  # noqa: E731
                f_new = lambda: build_block_index(budgets, q, k, cu_q, kvl, n, builder="triton", **kw)  # noqa: E731
                ref, got = f_ref(), f_new()             # also compiles / warms up
                agr = agreement(budgets, ref, got, n)
                del ref, got
                t_ref = bench(f_ref, smoke, args.rep)
                t_new = bench(f_new, smoke, args.rep)
                rec = {"ctx": n, "layout": layout, "mix": name, "torch_ms": t_ref, "triton_ms": t_new,
                       "speedup": t_ref / t_new, **agr}
                for w in [x for x in args.warps.split(",") if x != "auto" and "topk" in name]:
                    f_w = lambda w=int(w): build_topk_index(budgets, q, k, cu_q, kvl, n, num_warps=w, **kw)  # noqa: E731
                    f_w()
                    rec[f"triton_ms_warps{w}"] = bench(f_w, smoke, args.rep)
                rows.append(rec)
                extra = " ".join(f"{kk[10:]}={vv:.3f}" for kk, vv in rec.items() if kk.startswith("triton_ms_"))
                log(f"{n:>7} {layout:>10} {name:>24} {t_ref:>9.3f} {t_new:>9.3f} {t_ref / t_new:>7.2f}x "
                    f"{agr['identical_entries']:>12.5f} {agr['identical_pairs']:>10.5f} {agr['counts_equal']} {extra}")
            del q, k, kw
            if dev == "cuda":
                torch.cuda.empty_cache()
    res = {"device": device_name, "date": _dt.date.today().isoformat(), "torch": torch.__version__,
           "triton": triton.__version__, "shape": {"hq": hq, "hkv": hkv, "d": d, "dtype": str(dtype)},
           "timing": "cpu wall, one call (smoke)" if smoke else f"triton.testing.do_bench median, rep={args.rep} ms",
           "results": rows}
    with open(out_json, "w") as f:
        json.dump(res, f, indent=1)
    with open(out_json[:-5] + ".log", "w") as f:
        f.write("\n".join(LOG) + "\n")
    log(f"wrote {out_json}")
    bad = [r for r in rows if not r["counts_equal"] or r["identical_pairs"] < 0.99]
    if bad:
        log(f"DISAGREEMENT in {len(bad)} rows")
        sys.exit(1)


if __name__ == "__main__":
    main()
