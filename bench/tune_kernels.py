"""Tune the autotuned prefill kernels ahead of time on this GPU and measure what it saves a cold start.

    python bench/tune_kernels.py --out DIR [--install]      # writes DIR/<gpu>.json (sglang_shplb/kernels/tuned/)
    python bench/tune_kernels.py --cold --out DIR           # first calls with an empty Triton cache: tables off / on

Tuning runs the server's prefill path (:class:`SparsePrefill`: streaming / dense heads on the rule kernel,
top-k on the block-index and tile kernels) with Triton's autotuner at the per-rank head layouts of SmolLM2
(9 q / 3 KV, d 64), Llama-3-8B (32 / 8, d 128) and a 70B rank at TP 8 (8 / 1, d 128), paged and contiguous KV,
bf16, one sequence of 16K down to 64 tokens (every query-length bucket), and writes the configs the autotuner
chose (:func:`sglang_shplb.kernels.tuned.table_from_autotuners`). ``--cold`` runs, in fresh processes with an
empty ``TRITON_CACHE_DIR``, the first call at every length of one shape the way a new server meets them
(short to long) with the shipped tables off and on, and prints the first-call seconds and their ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

SHAPES = {"smollm2": (9, 3, 64), "llama8b": (32, 8, 128), "llama70b_tp8": (8, 1, 128)}   # q heads, KV heads, d
LENGTHS = [64 << i for i in range(9)]                                                    # 64 .. 16384


def _budgets(hq: int):
    from sglang_shplb.core.patterns import HeadBudget
    kinds = [HeadBudget.streaming(128, 2048), HeadBudget.topk(0.1, 2), HeadBudget.topk(0.1, 2, tile=128),
             HeadBudget.vslash(0.1, 2), HeadBudget.dense()]
    return [kinds[h % len(kinds)] for h in range(hq)]


def _call(shape: str, n: int, paged: bool):
    """One prefill of ``n`` tokens through :class:`SparsePrefill` at ``shape``; returns a runner (plan + run)."""
    import torch
    from sglang_shplb.kernels.api import SparsePrefill

    hq, hkv, d = SHAPES[shape]
    dev, dt = "cuda", torch.bfloat16
    q = torch.randn(n, hq, d, device=dev, dtype=dt)
    k = torch.randn(n, hkv, d, device=dev, dtype=dt)
    v = torch.randn(n, hkv, d, device=dev, dtype=dt)
    cu = torch.tensor([0, n], dtype=torch.int32, device=dev)
    kvl = torch.tensor([n], dtype=torch.int32, device=dev)
    sp = SparsePrefill(_budgets(hq), hkv, d)
    if paged:
        kw = dict(req_to_token=torch.randperm(n, device=dev).int()[None], req_pool_indices=torch.zeros(1, dtype=torch.int32, device=dev))
    else:
        kw = dict(cu_seqlens_k=cu)

    def run():
        sp.plan(cu, kvl, n, n, q_lens_cpu=[n], kv_lens_cpu=[n], **kw)
        sp.run(q, k, v)
        torch.cuda.synchronize()
    return run


def merged(table: dict, folder: str) -> dict:
    """``table`` with the configs of the table already in ``folder`` for this GPU (same schema, GPU and key
    layout) whose keys it lacks: tuning some shapes keeps the shapes tuned before."""
    from sglang_shplb.kernels.tuned import gpu_slug
    path = os.path.join(folder, f"{gpu_slug(table['gpu'])}.json")
    if not os.path.exists(path):
        return table
    with open(path) as f:
        old = json.load(f)
    if old.get("version") != table["version"] or old.get("gpu") != table["gpu"]:
        return table
    for kernel, entry in old["kernels"].items():
        new = table["kernels"].setdefault(kernel, {"key": entry["key"], "configs": {}})
        if new["key"] == entry["key"]:
            new["configs"] = {**entry["configs"], **new["configs"]}
    return table


def tune(out: str, install: bool, shapes: list[str]) -> None:
    os.environ["SHPLB_TUNED_CONFIGS"] = "0"
    import torch
    import triton
    from sglang_shplb.kernels.triton_prefill import _kernel, _rule_kernel, _tile_kernel
    from sglang_shplb.kernels.tuned import TUNED_DIR, device_identity, gpu_slug, table_from_autotuners

    gpu, capability = device_identity(torch.cuda.current_device())
    t0 = time.time()
    for shape in shapes:
        for paged in (True, False):
            for n in reversed(LENGTHS):   # long first: the rule kernel's key has no length, tune it on long work
                t = time.time()
                _call(shape, n, paged)()
                print(f"tuned {shape:13s} {'paged' if paged else 'contig':6s} n={n:6d}  {time.time() - t:6.2f} s", flush=True)
        # written after each shape, so a run stopped midway leaves the shapes it finished
        table = table_from_autotuners({"index": _kernel(True), "rule": _rule_kernel(True), "tile": _tile_kernel(True)},
                                      gpu, {"triton": triton.__version__, "torch": torch.__version__},
                                      capability=capability)
        n_cfg = {k: len(v["configs"]) for k, v in table["kernels"].items()}
        print(f"{gpu}: {n_cfg} configs tuned in {time.time() - t0:.0f} s", flush=True)
        if install:
            table = merged(table, str(TUNED_DIR))
        text = json.dumps(table, indent=1, sort_keys=True) + "\n"
        for folder in [out] + ([str(TUNED_DIR)] if install else []):
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, f"{gpu_slug(gpu)}.json"), "w") as f:
                f.write(text)


def first_calls(shape: str) -> None:
    """Child of ``--cold``: the first and second call at every length (short to long), as JSON on stdout."""
    import torch
    from sglang_shplb.kernels.tuned import TUNED_DIR, device_identity, load_table, tables_enabled
    gpu, capability = device_identity(torch.cuda.current_device())
    rows = []
    for paged in (True, False):
        for n in LENGTHS:
            run = _call(shape, n, paged)
            t = time.time()
            run()
            first = time.time() - t
            t = time.time()
            run()
            rows.append(dict(paged=paged, n=n, first_s=first, warm_s=time.time() - t))
    table = load_table(gpu, TUNED_DIR, capability) if tables_enabled() else {}
    print(json.dumps(dict(gpu=gpu, shape=shape, tables=bool(table), rows=rows)))


def cold(out: str, shapes: list[str]) -> None:
    res = []
    for shape in shapes:
        for tables in ("0", "1"):
            with tempfile.TemporaryDirectory() as cache:
                env = dict(os.environ, TRITON_CACHE_DIR=cache, SHPLB_TUNED_CONFIGS=tables)
                t = time.time()
                p = subprocess.run([sys.executable, __file__, "--first-calls", shape], env=env, capture_output=True, text=True)
                wall = time.time() - t
            if p.returncode != 0:
                print(p.stderr[-3000:])
                raise SystemExit(f"--first-calls {shape} failed")
            r = json.loads(p.stdout.strip().splitlines()[-1])
            r["process_s"] = wall
            r["first_total_s"] = sum(x["first_s"] for x in r["rows"])
            r["warm_total_s"] = sum(x["warm_s"] for x in r["rows"])
            res.append(r)
            print(f"{shape:13s} tables {'on ' if r['tables'] else 'off'}: first calls {r['first_total_s']:7.2f} s "
                  f"(warm {r['warm_total_s']:.3f} s), process {wall:6.1f} s", flush=True)
        off, on = res[-2], res[-1]
        print(f"{shape:13s} first calls with tables / without: {on['first_total_s'] / off['first_total_s']:.3f} "
              f"({off['first_total_s'] / on['first_total_s']:.2f}x faster)", flush=True)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "cold_first_calls.json"), "w") as f:
        json.dump(res, f, indent=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results/tuned")
    ap.add_argument("--install", action="store_true", help="also write the table into sglang_shplb/kernels/tuned/")
    ap.add_argument("--cold", action="store_true", help="measure first calls with an empty Triton cache, tables off / on")
    ap.add_argument("--shapes", default=None, help=f"shapes to tune (default all: {','.join(SHAPES)}) or, with --cold, "
                    "to measure (default smollm2,llama8b)")
    ap.add_argument("--first-calls", metavar="SHAPE", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.first_calls:
        first_calls(a.first_calls)
    elif a.cold:
        cold(a.out, (a.shapes or "smollm2,llama8b").split(","))
    else:
        shapes = a.shapes.split(",") if a.shapes else list(SHAPES)
        unknown = sorted(set(shapes) - set(SHAPES))
        if unknown:
            raise SystemExit(f"unknown shapes {unknown}; known: {sorted(SHAPES)}")
        tune(a.out, a.install, shapes)


if __name__ == "__main__":
    main()
