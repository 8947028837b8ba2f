"""S-HPLB at runtime, TP emulated on one GPU: each rank's share of one layer's prefill timed alone with the
real code path (:class:`sglang_shplb.kernels.head_parallel.HeadParallelExtend`), competitors side by side.

Per rank ``r`` of a placement, the time of a layer is
``pack + max(home + local units, link_in) + units shipped here + link_out + scatter``:
``pack`` gathers the q rows and K/V prefixes it ships (real copies), ``home`` runs the heads it keeps whole
(one SparsePrefill call, dense heads on cuDNN), ``units`` runs the pieces shipped to it on their staged
prefixes, ``scatter`` writes returned outputs into its home columns. The links are not real (one GPU): their
time is bytes / ``--link-gbps`` per direction (default 370 GB/s, about what NCCL all-to-all reaches over
H100/H200 NVLink; state it when quoting), the inputs overlapping the home heads as the executor does
(``async_op``), the outputs exposed. The slowest rank is the layer's time.

Placements of the same budgets: ``contiguous`` (SGLang's slicing, nothing moves) and ``shplb`` (the planner's
solver). Dense competitors per rank (its ``Hq / TP`` heads): cuDNN SDPA and FlashInfer's ragged prefill.
One prompt of n tokens, no prefix, bf16; outputs of the emulated ranks are checked against one
single-GPU call of all heads (max abs diff printed).

  python bench/head_parallel.py --out $OUT                     # Llama-3-8B and 70B shapes, 32K-128K, TP 2/4/8
  TRITON_INTERPRET=1 python bench/head_parallel.py --cpu-smoke --out /tmp/hp   # logic check on the CPU
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

from timing import bench, device_name, device_tag, flashinfer_or_none, log, results_writer  # noqa: E402

from sglang_shplb.core.buckets import Buckets  # noqa: E402
from sglang_shplb.core.head_map import layer_work, rank_heads  # noqa: E402
from sglang_shplb.core.model_spec import ModelSpec  # noqa: E402
from sglang_shplb.core.patterns import HeadBudget  # noqa: E402
from sglang_shplb.core.placement_types import LayerPlacement, Piece  # noqa: E402
from sglang_shplb.kernels.head_parallel import HeadParallelExtend, KVRows, RankLayout, attend_heads  # noqa: E402
from sglang_shplb.planning.cost_model import CostModel  # noqa: E402
from sglang_shplb.planning.place import resolve_solve_opts, solve_plan_placements  # noqa: E402
from sglang_shplb.planning.synthetic_plans import mixed_budget  # noqa: E402
from sglang_shplb.scheduler.head_schedule import ExtendShape, layer_schedule  # noqa: E402

SHAPES = {"llama8b": (32, 8, 128), "llama70b": (64, 8, 128), "smoke": (8, 4, 64)}


def plan_budgets(which: str, hq: int, hkv: int, seed: int) -> list[HeadBudget]:
    """One layer's budgets. ``mixed``: the serving benchmark's plan (KV group 0 dense, then streaming 128 +
    2048 and top-k 10 % groups in turn); ``profiled``: heads drawn (seeded) from the committed SmolLM2
    plan's 270 budgets, so the mix of dense / streaming / top-k heads is the profile's."""
    spec = ModelSpec("LlamaForCausalLM", 1, hq, hkv, 128, 131072, "bench")
    if which == "mixed":
        f = mixed_budget(128, 2048, 0.1)
        return [f(0, h, spec) for h in range(hq)]
    data = json.loads((HERE / "results" / "default_plan" / "plan.json").read_text())
    pool = [HeadBudget.from_dict(b) for layer in data["budgets"] for b in layer]
    g = torch.Generator().manual_seed(seed)
    return [pool[int(i)] for i in torch.randint(len(pool), (hq,), generator=g)]


def placements(budgets, hq, hkv, d, tp, n, cost) -> dict[str, LayerPlacement]:
    spec = ModelSpec("LlamaForCausalLM", 1, hq, hkv, d, 131072, "bench")
    edge = 1 << (n - 1).bit_length()
    solved = solve_plan_placements(spec, [budgets], Buckets((edge,)), [tp], cost, "shplb",
                                   **resolve_solve_opts({"max_replicated_kv": "auto"}, tp))
    home = LayerPlacement([[Piece(h) for h in rank_heads(hq, tp, r)] for r in range(tp)])
    return {"contiguous": home, "shplb": solved[tp][0].layers[0]}


def emulate(lp, budgets, q, k, v, tp, scale, smoke, link_gbps, reps) -> dict:
    """Per-rank times (ms) of one layer under placement ``lp`` (see the module docstring)."""
    n, hq, d = q.shape[0], q.shape[1], q.shape[2]
    hkv = k.shape[1]
    dev = q.device
    work = layer_work(lp, hq, hkv, tp)
    shape = ExtendShape((0,), (n,))
    sched = layer_schedule(work, shape)
    r2t, rpi = torch.arange(n, dtype=torch.int32, device=dev)[None], torch.zeros(1, dtype=torch.long, device=dev)
    lays = [RankLayout(r, tp, hq, hkv, d) for r in range(tp)]
    hps = [HeadParallelExtend(lay, None) for lay in lays]
    kvs = [sorted({h // (hq // hkv) for h in rank_heads(hq, tp, r)}) if tp <= hkv else [r * hkv // tp]
           for r in range(tp)]
    qs = [q[:, rank_heads(hq, tp, r)].contiguous() for r in range(tp)]
    ks = [k[:, kv].contiguous() for kv in kvs]
    vs = [v[:, kv].contiguous() for kv in kvs]
    outs = [torch.zeros_like(x) for x in qs]
    sends = [hps[r].pack_inputs(sched, qs[r], ks[r], vs[r], r2t, rpi) for r in range(tp)]

    def recv_from(s: int, r: int) -> torch.Tensor:
        off = sum(sched.input_elems(s, t, d) for t in range(tp) if t < r)
        return sends[s][off:off + sched.input_elems(s, r, d)]

    results = {(s, r): hps[r].compute_units(sched, s, budgets, scale, None, recv=recv_from(s, r))
               for r in range(tp) for s in range(tp) if s != r}
    ranks, bw = [], link_gbps * 1e9
    for r in range(tp):
        lay, hp = lays[r], hps[r]
        whole = [lay.local_q(h) for h in work.whole[r]]
        local = list(budgets[lay.q_base:lay.q_base + lay.hq_local])
        rets = [results[(r, t)] if t != r else q.new_empty(0) for t in range(tp)]
        split = [sched.output_elems(r, t, d) for t in range(tp)]
        ret = torch.cat([x for x in rets if x is not None and x.numel()] or [q.new_empty(0)])

        def home(r=r, whole=whole, local=local):
            attend_heads(qs[r], ks[r], vs[r], KVRows.back_to_back([n]), [n], [n], local, whole, scale, outs[r])

        def local_units(r=r):
            hps[r].compute_units(sched, r, budgets, scale, outs[r], q=qs[r], k_buffer=ks[r], v_buffer=vs[r],
                                 req_to_token=r2t, req_pool_indices=rpi)

        def units(r=r):
            for s in range(tp):
                if s != r:
                    hps[r].compute_units(sched, s, budgets, scale, None, recv=recv_from(s, r))

        home()
        local_units()
        hp.scatter_outputs(sched, ret, split, outs[r])
        t = {"home_ms": bench(home, smoke, reps), "whole_heads": len(whole)}
        if any(u.home == u.target == r for u in work.units):
            t["local_units_ms"] = bench(local_units, smoke, reps)
        moved_in = sum(sched.input_elems(s, r, d) for s in range(tp)) * q.element_size()
        moved_out = sum(sched.input_elems(r, t_, d) for t_ in range(tp)) * q.element_size()
        back_in = sum(sched.output_elems(r, t_, d) for t_ in range(tp)) * q.element_size()
        back_out = sum(sched.output_elems(s, r, d) for s in range(tp)) * q.element_size()
        if sched.exchanges:
            t["pack_ms"] = bench(lambda r=r: hps[r].pack_inputs(sched, qs[r], ks[r], vs[r], r2t, rpi), smoke, reps)
            t["units_ms"] = bench(units, smoke, reps)
            t["scatter_ms"] = bench(lambda: hp.scatter_outputs(sched, ret, split, outs[r]), smoke, reps)
        t["link_in_ms"] = max(moved_in, moved_out) / bw * 1e3
        t["link_out_ms"] = max(back_in, back_out) / bw * 1e3
        t["compute_ms"] = t["home_ms"] + t.get("local_units_ms", 0.0) + t.get("units_ms", 0.0)
        t["total_ms"] = (t.get("pack_ms", 0.0) + max(t["home_ms"] + t.get("local_units_ms", 0.0), t["link_in_ms"])
                         + t.get("units_ms", 0.0)
                         + t["link_out_ms"] + t.get("scatter_ms", 0.0))
        t["bytes_in"], t["bytes_out"] = moved_in + back_in, moved_out + back_out
        ranks.append(t)
    slow = max(x["total_ms"] for x in ranks)
    mean = sum(x["total_ms"] for x in ranks) / tp
    cslow = max(x["compute_ms"] for x in ranks)
    cmean = sum(x["compute_ms"] for x in ranks) / tp
    return {"ranks": ranks, "slowest_ms": slow, "slowest_over_mean": slow / mean,
            "compute_slowest_over_mean": cslow / cmean, "moved_bytes": sched.moved_elems(d, tp) * q.element_size(),
            "units_moved": len(work.moved_units()), "out": torch.cat(outs, 1)}


def decode_balance(budgets, hq, hkv, tp, n) -> dict:
    """Decode stays at home: pages each rank's KV groups read per step at context ``n`` (the group's union of
    its heads' pages lies between its largest head's and the sum, capped at all pages), slowest / mean."""
    from sglang_shplb.kernels.triton_decode import decode_page_budget
    pages = -(-n // 64)
    g = hq // hkv
    lo, hi = [0.0] * tp, [0.0] * tp
    for kv in range(hkv):
        per = [decode_page_budget(budgets[h], pages) for h in range(kv * g, (kv + 1) * g)]
        r = (kv * g) // (hq // tp)
        lo[r] += max(per)
        hi[r] += min(pages, sum(per))
    return {"pages_per_rank_low": lo, "pages_per_rank_high": hi,
            "slowest_over_mean_low": max(lo) / (sum(lo) / tp), "slowest_over_mean_high": max(hi) / (sum(hi) / tp)}


def chunked_reship(lp, hq, hkv, tp, n, chunk, d, elem) -> dict:
    """Bytes a placement moves over a whole prompt, in one extend vs chunked prefill (each chunk re-ships the
    prefix K/V its moved units read)."""
    work = layer_work(lp, hq, hkv, tp)
    one = layer_schedule(work, ExtendShape((0,), (n,))).moved_elems(d, tp) * elem
    total = sum(layer_schedule(work, ExtendShape((p,), (min(chunk, n - p),))).moved_elems(d, tp) * elem
                for p in range(0, n, chunk))
    return {"chunk": chunk, "one_shot_bytes": one, "chunked_bytes": total}


def dense_per_rank(q, k, v, tp, scale, smoke, reps, flashinfer) -> dict:
    """One rank's dense share (Hq / TP heads and their KV heads): cuDNN SDPA, FlashInfer ragged prefill."""
    n, hq, d = q.shape
    hkv = k.shape[1]
    hs = rank_heads(hq, tp, 0)
    kv = sorted({h // (hq // hkv) for h in hs}) if tp <= hkv else [0]
    qq, kk, vv = q[:, hs].contiguous(), k[:, kv].contiguous(), v[:, kv].contiguous()
    sdpa = torch.nn.functional.scaled_dot_product_attention
    row = {"sdpa_ms": bench(lambda: sdpa(qq.transpose(0, 1)[None], kk.transpose(0, 1)[None], vv.transpose(0, 1)[None],
                                         is_causal=True, scale=scale, enable_gqa=True), smoke, reps)}
    if flashinfer is not None:
        ws = torch.empty(256 << 20, dtype=torch.uint8, device=q.device)
        w = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(ws, "NHD")
        cu = torch.tensor([0, n], dtype=torch.int32, device=q.device)
        w.plan(cu, cu, len(hs), len(kv), d, causal=True, q_data_type=q.dtype)
        row["flashinfer_ms"] = bench(lambda: w.run(qq, kk, vv), smoke, reps)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="llama8b,llama70b")
    ap.add_argument("--ctx", default="32768,65536,131072")
    ap.add_argument("--tp", default="2,4,8")
    ap.add_argument("--plans", default="mixed,profiled")
    ap.add_argument("--link-gbps", type=float, default=370.0, help="per-direction link bandwidth (GB/s)")
    ap.add_argument("--calibration", default=str(HERE / "results" / "calibration_h100_tiles.json"),
                    help="cost-model calibration the solver places with")
    ap.add_argument("--reps", type=int, default=60, help="milliseconds of repeats per timing")
    ap.add_argument("--chunk", type=int, default=8192, help="chunked-prefill size for the re-shipping count")
    ap.add_argument("--out", default="/tmp/out")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU (Triton interpreter)")
    a = ap.parse_args()
    smoke = a.cpu_smoke
    dev, dt = ("cpu", torch.float32) if smoke else ("cuda", torch.bfloat16)
    shapes = ["smoke"] if smoke else a.shapes.split(",")
    ctxs = [256] if smoke else [int(x) for x in a.ctx.split(",")]
    tps = [2] if smoke else [int(x) for x in a.tp.split(",")]
    cost = CostModel.from_calibration(a.calibration)
    flashinfer = flashinfer_or_none(smoke)
    name = device_name(smoke)
    tag = device_tag(name)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    res = {"device": name, "date": time.strftime("%Y-%m-%d"), "link_gbps": a.link_gbps, "rows": []}
    dump = results_writer(res, str(out / f"head_parallel_{tag}"))
    log(f"head-parallel emulation on {name}; links at {a.link_gbps} GB/s per direction (assumed)")
    for shape in shapes:
        hq, hkv, d = SHAPES[shape]
        scale = d ** -0.5
        for n in ctxs:
            g = torch.Generator(device=dev).manual_seed(n)
            q = torch.randn(n, hq, d, device=dev, dtype=dt, generator=g)
            k = torch.randn(n, hkv, d, device=dev, dtype=dt, generator=g)
            v = torch.randn(n, hkv, d, device=dev, dtype=dt, generator=g)
            for plan in a.plans.split(","):
                budgets = plan_budgets(plan, hq, hkv, seed=n)
                ref = torch.zeros_like(q)
                attend_heads(q, k, v, KVRows.back_to_back([n]), [n], [n], budgets, range(hq), scale, ref)
                for tp in tps:
                    if hq % tp:
                        continue
                    row = {"shape": shape, "n": n, "plan": plan, "tp": tp}
                    lps = placements(budgets, hq, hkv, d, tp, n, cost)
                    for pname, lp in lps.items():
                        e = emulate(lp, budgets, q, k, v, tp, scale, smoke, a.link_gbps, a.reps)
                        row[f"{pname}_max_abs_diff"] = float((e.pop("out").float() - ref.float()).abs().max())
                        row[pname] = e
                    row.update(dense_per_rank(q, k, v, tp, scale, smoke, a.reps, flashinfer))
                    row["decode"] = decode_balance(budgets, hq, hkv, tp, n)
                    row["chunked_prefill"] = chunked_reship(lps["shplb"], hq, hkv, tp, n, a.chunk, d, q.element_size())
                    s = row["shplb"]["slowest_ms"]
                    row["speedup_vs_contiguous"] = row["contiguous"]["slowest_ms"] / s
                    row["speedup_vs_dense_sdpa"] = row["sdpa_ms"] / s
                    if "flashinfer_ms" in row:
                        row["speedup_vs_flashinfer"] = row["flashinfer_ms"] / s
                    res["rows"].append(row)
                    log(f"{shape} n={n} {plan} TP{tp}: slowest ms contiguous {row['contiguous']['slowest_ms']:.2f} "
                        f"shplb {s:.2f} (slowest/mean {row['shplb']['slowest_over_mean']:.2f}, compute "
                        f"{row['shplb']['compute_slowest_over_mean']:.2f}; contiguous "
                        f"{row['contiguous']['slowest_over_mean']:.2f}), moved {row['shplb']['moved_bytes'] / 2**20:.1f}"
                        f" MiB in {row['shplb']['units_moved']} units; x{row['speedup_vs_contiguous']:.2f} vs "
                        f"contiguous, x{row['speedup_vs_dense_sdpa']:.2f} vs dense SDPA"
                        + (f", x{row['speedup_vs_flashinfer']:.2f} vs FlashInfer" if "flashinfer_ms" in row else "")
                        + f"; max|diff| {row['shplb_max_abs_diff']:.3g}; decode slowest/mean (home) "
                        f"{row['decode']['slowest_over_mean_low']:.2f}-{row['decode']['slowest_over_mean_high']:.2f}; "
                        f"chunked prefill moves {row['chunked_prefill']['chunked_bytes'] / 2**20:.0f} MiB vs "
                        f"{row['chunked_prefill']['one_shot_bytes'] / 2**20:.0f} MiB one-shot")
                    dump()
    plot(res, out / f"head_parallel_{tag}.png")


def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = res["rows"]
    keys = sorted({(r["shape"], r["plan"]) for r in rows})
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False)
    for ax, (shape, plan) in zip(axes[0], keys):
        for tp, m in zip(sorted({r["tp"] for r in rows}), "os^"):
            sel = sorted((r for r in rows if (r["shape"], r["plan"], r["tp"]) == (shape, plan, tp)), key=lambda r: r["n"])
            xs = [r["n"] // 1024 for r in sel]
            ax.plot(xs, [r["speedup_vs_contiguous"] for r in sel], "-" + m, label=f"TP{tp} vs contiguous")
            ax.plot(xs, [r["speedup_vs_dense_sdpa"] for r in sel], "--" + m, label=f"TP{tp} vs dense SDPA")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xticks([32, 64, 128], ["32K", "64K", "128K"])
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("slowest-rank speedup of S-HPLB")
        ax.set_title(f"{shape}, {plan} plan")
        ax.legend(fontsize=7)
    fig.suptitle(f"{res['device']}: TP emulated on one GPU, links at {res['link_gbps']} GB/s (assumed)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
