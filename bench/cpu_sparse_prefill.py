"""The CPU path of a sparse layer's prefill (reports, never asserts): what the CPU server pays per layer.

One SmolLM2-shaped layer (9 q / 3 KV heads, d 64) at the SmolLM2 profile's kinds of budgets (two dense heads
on the stock backend, streaming, top-k, vertical-slash), one sequence of n tokens in a token pool, float32,
side by side in one process:

* ``gathered``: :func:`sglang_shplb.kernels.layer_reference.sparse_attention` (each query block attends its
  gathered KV blocks: the path the CPU server runs);
* ``masked``: the masked dense reference (:func:`sglang_shplb.kernels.reference.masked_attention` under the
  heads' block masks, :func:`sglang_shplb.core.block_masks.build_block_masks`: the path the CPU server ran
  before, which turned the index into those masks);
* ``sdpa``: torch SDPA over all heads, dense (what the stock ``torch_native`` backend computes).

Prints milliseconds (median of ``--reps``), the ratios, and the largest difference between the two sparse
paths; writes ``cpu_sparse_prefill.json``.
Usage: ``python bench/cpu_sparse_prefill.py [--ctx 1024,2048,4096,8192] [--threads 2] [--out bench/results]``
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

from sglang_shplb.core.block_masks import build_block_masks  # noqa: E402
from sglang_shplb.core.patterns import HeadBudget  # noqa: E402
from sglang_shplb.kernels.layer_heads import LayerHeads  # noqa: E402
from sglang_shplb.kernels.layer_reference import sparse_attention  # noqa: E402
from sglang_shplb.kernels.reference import masked_attention  # noqa: E402

HQ, HKV, D = 9, 3, 64
BUDGETS = [HeadBudget.topk(0.1, 4), HeadBudget.streaming(64, 256), HeadBudget.dense(), HeadBudget.topk(0.2, 4),
           HeadBudget.vslash(0.1), HeadBudget.streaming(64, 512), HeadBudget.topk(0.05, 4), HeadBudget.dense(),
           HeadBudget.topk(0.1, 4)]


def median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def masked(q, k, v, heads, scale):
    """The old CPU path: the heads' block masks as an n x n token mask, masked dense attention."""
    kv = [h // (HQ // HKV) for h in heads]
    masks = build_block_masks(BUDGETS, q.transpose(0, 1), k.transpose(0, 1))[heads]
    return masked_attention(q[:, heads], k[:, kv], v[:, kv], masks, scale)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ctx", default="1024,2048,4096,8192")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=str(HERE / "results"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    heads = list(LayerHeads.of(BUDGETS).sparse)
    scale = D ** -0.5
    rows = []
    print(f"CPU sparse prefill, one SmolLM2-shaped layer, float32, {a.threads} threads, {platform.machine()}")
    print("n | gathered ms | masked ms | sdpa ms | masked / gathered | sdpa / gathered | max |diff|")
    for n in (int(x) for x in a.ctx.split(",")):
        g = torch.Generator().manual_seed(n)
        q, k, v = (torch.randn(n, h, D, generator=g) for h in (HQ, HKV, HKV))
        r2t, rpi = torch.arange(n, dtype=torch.int32)[None], torch.zeros(1, dtype=torch.long)
        out = torch.zeros_like(q)

        def gathered():
            sparse_attention(q, k, v, r2t, rpi, torch.tensor([n]), torch.tensor([n]), BUDGETS, scale, out)

        def sdpa():
            torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                                             v.transpose(0, 1)[None], is_causal=True, enable_gqa=True)
        row = {"n": n, "gathered_ms": median_ms(gathered, a.reps), "sdpa_ms": median_ms(sdpa, a.reps)}
        row["masked_ms"] = median_ms(lambda: masked(q, k, v, heads, scale), max(1, a.reps // 2))
        gathered()
        row["max_abs_diff"] = float((out[:, heads] - masked(q, k, v, heads, scale)).abs().max())
        row["masked_over_gathered"] = row["masked_ms"] / row["gathered_ms"]
        row["sdpa_over_gathered"] = row["sdpa_ms"] / row["gathered_ms"]
        rows.append(row)
        print(f"{n} | {row['gathered_ms']:.1f} | {row['masked_ms']:.1f} | {row['sdpa_ms']:.1f} | "
              f"{row['masked_over_gathered']:.2f} | {row['sdpa_over_gathered']:.2f} | {row['max_abs_diff']:.1e}")
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "cpu_sparse_prefill.json"
    path.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, "
                                f"{torch.get_num_threads()} threads, torch {torch.__version__}",
                                "budgets": [repr(b) for b in BUDGETS], "rows": rows}, indent=1))
    print("wrote", path)


if __name__ == "__main__":
    main()
