"""The model runner alone, stock backend against ``shplb``: SGLang's own ``sglang.benchmark.one_batch`` (one batch,
prefill then decode steps through ``ModelRunner`` and its decode CUDA graphs, no scheduler, no HTTP), per backend
in its own process, rounds alternating, launched and compared from this one.

    python bench/one_batch.py --model /tmp/smollm2 --out $OUT/one_batch                  # SmolLM2, default plan
    python bench/one_batch.py --model M --plan PLAN_DIR --batches 1,4 --input-lens 2048   # any plan
    python bench/one_batch.py --cpu-smoke --out /tmp/ob                                   # the logic, on this CPU
    python bench/one_batch.py --rounds 2 --batches 1 -- --profile --profile-stage decode --profile-steps 5
        # torch profiler over 5 decode steps per run: traces in OUT/<backend>_round<r>_profile, tables in the logs

The question it answers: a gap between a ``shplb`` server and a stock one on a model whose every layer the plan
runs stock (round 30: SmolLM2 decode 0.94-0.98x, ``bench/results/gpu_round30``) is either in the forward (our
backend class, its metadata, the graphs it captures) or outside it (scheduler, hooks, HTTP). This runs the same
forward without the rest: prefill latency, median decode-step latency, per (batch, input length), medians over the
rounds, and the ratios stock / ``shplb`` (> 1: ``shplb`` faster). Report, never assert.

Each run: ``python -c`` registering our plugin (the ``shplb`` backend and its hooks) and loading SGLang's, then
``one_batch``'s CLI with ``--attention-backend`` the stock backend or ``shplb`` (the plan through
:class:`~sglang_shplb.serving.config.ServingConfig`'s environment, as the launcher passes it), ``--result-filename``
a JSONL this script reads. One-batch runs do no server warm-up: ``one_batch`` runs its own warm-up batch first.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from sglang_shplb.serving.config import ServingConfig  # noqa: E402

# ours registered first (an uninstalled source tree has no entry point), then SGLang's plugins and their hooks applied
RUNNER = ("from sglang_shplb.serving.plugin import register; register(); "
          "from sglang.srt.plugins import load_plugins; load_plugins(); "
          "from sglang.benchmark.one_batch import cli_main; cli_main()")
SHPLB = "shplb"


def run_args(model: str, backend: str, device: str, dtype: str, batches: list[int], input_lens: list[int],
             output_len: int, result: Path, extra: list[str]) -> list[str]:
    """``one_batch``'s command line for one backend."""
    return [sys.executable, "-c", RUNNER, "--model-path", model, "--device", device, "--dtype", dtype,
            "--attention-backend", backend, "--run-name", backend, "--result-filename", str(result),
            "--batch-size", *map(str, batches), "--input-len", *map(str, input_lens), "--output-len", str(output_len),
            *extra]


def backend_env(backend: str, plan: Path, dense_backend: str) -> dict[str, str]:
    """This process's environment, plus the plan's for ``shplb`` (the stock backend the plan's stock layers use),
    through our backend even for a plan stock everywhere (the factory would serve such a plan's stock backend
    outright, and there would be nothing to compare)."""
    env = dict(os.environ)
    if backend == SHPLB:
        env.update(ServingConfig(plan_path=str(plan), dense_fallback=False, dense_backend=dense_backend,
                                 group_prefill_by_bucket=False, bucket_log_every=0, always_backend=True).to_env())
    return env


def read_results(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarize(rows: list[dict]) -> dict[tuple[int, int], dict[str, float]]:
    """Per (batch, input length): the median over rounds of the prefill latency and the median decode step."""
    by: dict[tuple[int, int], list[dict]] = {}
    for r in rows:
        by.setdefault((int(r["batch_size"]), int(r["input_len"])), []).append(r)
    return {k: {"prefill_s": statistics.median(r["prefill_latency"] for r in v),
                "decode_step_s": statistics.median(r["median_decode_latency"] for r in v), "rounds": len(v)}
            for k, v in sorted(by.items())}


def table(stock: str, res: dict[str, dict]) -> str:
    """Markdown: per cell both backends' prefill ms and decode-step µs, with stock / shplb ratios."""
    lines = [f"| batch | input | {stock} prefill ms | shplb prefill ms | × prefill | {stock} decode step µs | "
             f"shplb decode step µs | × decode |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key, s in res[stock].items():
        o = res[SHPLB].get(key)
        if o is None:
            continue
        lines.append(f"| {key[0]} | {key[1]} | {s['prefill_s'] * 1e3:.2f} | {o['prefill_s'] * 1e3:.2f} | "
                     f"{s['prefill_s'] / o['prefill_s']:.3f} | {s['decode_step_s'] * 1e6:.1f} | "
                     f"{o['decode_step_s'] * 1e6:.1f} | {s['decode_step_s'] / o['decode_step_s']:.3f} |")
    return "\n".join(lines)


def default_plan(out: Path) -> Path:
    """The SmolLM2 default plan placed for TP 1 with the stock decision, as ``serve_gpu.py smollm2``'s ``shplb``."""
    from sglang_shplb.cli import main as cli
    plan = out / "plan_shplb"
    cli(["place", "--budgets", str(HERE / "results/default_plan/budgets.json"), "--tp", "1", "--out", str(plan)])
    return plan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="/tmp/smollm2")
    ap.add_argument("--plan", default=None, help="plan folder (default: SmolLM2's default plan, placed here)")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/out") + "/one_batch")
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--input-lens", default="2048,8000")
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="runs per backend, alternating stock / shplb")
    ap.add_argument("--stock", default=None, help="stock backend (default flashinfer; torch_native on CPU)")
    ap.add_argument("--cpu-smoke", action="store_true", help="CPU, float32, tiny sizes: the logic")
    ap.add_argument("extra", nargs="*", help="more one_batch / SGLang flags, after --")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    device, dtype = ("cpu", "float32") if a.cpu_smoke else ("cuda", "bfloat16")
    stock = a.stock or ("torch_native" if a.cpu_smoke else "flashinfer")
    batches = [int(x) for x in ("1,2" if a.cpu_smoke else a.batches).split(",")]
    lens = [int(x) for x in ("128" if a.cpu_smoke else a.input_lens).split(",")]
    output_len = 4 if a.cpu_smoke else a.output_len
    extra = list(a.extra) + (["--max-total-tokens", "4096"] if a.cpu_smoke else [])
    plan = Path(a.plan) if a.plan else default_plan(out)
    rows: dict[str, list[dict]] = {stock: [], SHPLB: []}
    for rnd in range(a.rounds):
        for backend in (stock, SHPLB) if rnd % 2 == 0 else (SHPLB, stock):
            res = out / f"{backend}_round{rnd}.jsonl"
            res.unlink(missing_ok=True)
            log = out / f"{backend}_round{rnd}.log"
            t0 = time.time()
            print(f"round {rnd + 1}/{a.rounds}: {backend} ...", flush=True)
            cmd = run_args(a.model, backend, device, dtype, batches, lens, output_len, res, extra)
            env = backend_env(backend, plan, stock)
            env["SGLANG_TORCH_PROFILER_DIR"] = str(out / f"{backend}_round{rnd}_profile")   # with -- --profile
            with open(log, "w") as f:
                rc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
            if rc != 0 or not res.exists():
                raise SystemExit(f"{backend} round {rnd}: exit {rc}; see {log}:\n" + log.read_text()[-3000:])
            rows[backend] += read_results(res)
            print(f"  done in {time.time() - t0:.0f} s", flush=True)
    summary = {b: summarize(r) for b, r in rows.items()}
    text = table(stock, summary)
    print(text)
    dump = {"device": device, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "model": a.model,
            "plan": str(plan), "stock": stock, "rounds": a.rounds, "output_len": output_len, "runs": rows,
            "summary": {b: {f"{k[0]}x{k[1]}": v for k, v in s.items()} for b, s in summary.items()}}
    (out / "one_batch.json").write_text(json.dumps(dump, indent=1))
    (out / "one_batch.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
