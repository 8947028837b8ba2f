"""Cold start of a server on a GPU: stock SGLang (FlashInfer) vs ``shplb`` with and without the shipped tuned
launch configs (``sglang_shplb/kernels/tuned/``), each with an empty Triton cache.

    python bench/cold_start.py --model /tmp/smollm2 --plan PLAN_DIR [--lengths 2048 4096 8000] [--out DIR]

Per server: seconds to healthy (``/health_generate``), then the first request at each length (short to long,
as a new server meets them: Triton compiles and autotunes there) and a second one (warm). "cold" is startup
plus the first requests' TTFT beyond the warm ones (``serve_gpu.cold_start_s``). FlashInfer's own JIT cache is
left as it is (warm after one start on the machine): this measures what our kernels add. Report only.
``serve_gpu.py --fresh-caches`` measures the whole cold start of any servers, FlashInfer's JIT included.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from serve_gpu import cold_start_s  # noqa: E402  (bench/serve_gpu.py)
from sglang_shplb.evaluation.servers import Server, server_specs  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--plan", required=True)
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8000])
    ap.add_argument("--out", default="bench/results/tuned")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    dense, (sparse,) = server_specs(Path(a.model), [Path(a.plan) / "plan.json"], "cuda", "bfloat16",
                                    max(a.lengths) + 64, extra=("--mem-fraction-static", "0.5"))
    sides = [("stock flashinfer", dense, {}), ("shplb, autotuned", sparse, {"SHPLB_TUNED_CONFIGS": "0"}),
             ("shplb, shipped configs", sparse, {"SHPLB_TUNED_CONFIGS": "1"})]
    rows = []
    for name, spec, env in sides:
        with tempfile.TemporaryDirectory() as cache:
            spec = dataclasses.replace(spec, env={**spec.env, **env, "TRITON_CACHE_DIR": cache})
            with Server(spec, out / f"cold_{name.split(',')[0].split()[0]}_{len(rows)}.log") as s:
                row = dict(server=name, startup_s=s.startup_s, requests=[])
                for n in a.lengths:
                    ids = [(7 * i + 13) % 40000 + 100 for i in range(n)]
                    first = s.generate(ids, 8).ttft_s
                    warm = s.generate(ids, 8).ttft_s
                    row["requests"].append(dict(tokens=n, first_ttft_s=first, warm_ttft_s=warm))
        row["cold_s"] = cold_start_s(row["startup_s"], [(r["first_ttft_s"], r["warm_ttft_s"]) for r in row["requests"]])
        row["first_extra_s"] = row["cold_s"] - row["startup_s"]
        rows.append(row)
        per_length = ", ".join(f"{r['tokens']}: {r['first_ttft_s']:.2f}/{r['warm_ttft_s']:.3f} s" for r in row["requests"])
        print(f"{name:24s} startup {row['startup_s']:6.1f} s  first requests +{row['first_extra_s']:6.1f} s  "
              f"cold {row['cold_s']:6.1f} s  ({per_length})", flush=True)
    base = rows[0]["cold_s"]
    for r in rows[1:]:
        print(f"{r['server']:24s} cold start {r['cold_s'] / base:.2f}x stock's", flush=True)
    (out / "cold_start.json").write_text(json.dumps(dict(lengths=a.lengths, rows=rows), indent=1))


if __name__ == "__main__":
    main()
