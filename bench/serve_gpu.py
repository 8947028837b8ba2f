"""End-to-end serving, stock SGLang 0.5.17 against ``python -m sglang_shplb.launch_server``, over a grid of prompt
lengths and batch sizes: TTFT and decode tokens/s as a client sees them, with the ratios (report, never assert).

    python bench/serve_gpu.py llama8b --servers flashinfer,shplb_sparse,shplb --out $OUT   # Llama-3-8B shape, dummy
    python bench/serve_gpu.py smollm2 --servers flashinfer,shplb --out $OUT                # SmolLM2, pass-key prompts
    python bench/serve_gpu.py smollm2 --cpu-smoke --out /tmp/smoke                          # the logic, on this CPU
    python bench/serve_gpu.py smollm2 --servers flashinfer,shplb_always --interleave --out $OUT   # side by side
    python bench/serve_gpu.py --plot RUN.json [RUN.json ...] --out DIR                     # table + PNG from results

Servers (one at a time, or with ``--interleave`` all up at once with their passes taking turns,
:func:`serve_interleaved`; the same flags but the backend):

* ``flashinfer``: ``sglang.launch_server --attention-backend flashinfer`` (``torch_native`` with ``--cpu-smoke``);
* ``shplb``: the plan as ``place`` ships it, layers marked stock per phase and bucket where the cost model does
  not predict sparse to win (``planning/stock_decision.py``; the server runs the stock backend there);
* ``shplb_sparse``: the same budgets, every layer with sparse heads sparse in every bucket (where sparse loses);
* ``shplb_tile128`` (Llama-3-8B only): ``shplb`` with its top-k heads selecting per 128-row query pair among
  128-token superblocks (``HeadBudget.topk(..., tile=128)``, the 128 x 128 tile kernel) instead of 64-token blocks;
* ``shplb_triton``: ``shplb`` with the sparse heads on the Triton kernels only (``SHPLB_CUDNN_BLOCKS=0``: no cuDNN
  block-sparse route, :mod:`sglang_shplb.kernels.cudnn_blocks`), what ``shplb`` was before round 26;
* ``shplb_routed`` (Llama-3-8B only): the same budgets with the stock decision's earlier decode fit (18 us per
  layer, 3 TB/s), which decodes stock up to the 16K bucket and sparse from the 32K one: every layer's decode route
  follows the bucket inside the decode CUDA graphs by a route flag (our dense Triton decode where stock), so its
  stock buckets show what the flag costs against FlashInfer's own graph, its sparse ones the sparse decode.

Plans. Llama-3-8B shape (dummy weights, nothing to profile): per layer KV group 0 dense (4 of 32 query heads),
odd KV groups top-k at 10 % of the blocks, even ones streaming sink 128 + window 2048 tokens. SmolLM2 (8K
context): the budgets of ``python -m sglang_shplb plan`` with no flags (``bench/results/default_plan``, density
0.25, measured on answers in ``bench/results/eval_h100_round13``), placed for TP 1. (Until 2026-12-06 the round-5
plan at 0.30, ``eval_h200_round5/plans/refined5_d30``, which the GPU runs' slimmed tree no longer carries.)

Method: per (length, batch) cell, ``batch`` requests of ``length`` prompt tokens sent at once, greedy,
``ignore_eos``, ``--new-tokens`` tokens each, radix cache off; one warm-up pass over the whole grid first (its
TTFTs are kept: the first request of a shape pays Triton compiles and FlashInfer plans), then the measured pass.
TTFT: mean over the batch of send → first streamed chunk. ``--fresh-lengths K``: per cell K more requests,
each at a length no earlier request had (the prompt cut from the front), each timed once: a shape's first
request is what real traffic pays, where lengths rarely repeat. Decode tokens/s: one request's rate while the whole
batch decodes (``run_cell``: the window between the last first chunk and the first end; SGLang interleaves the
other requests' prefill chunks with the first ones' decode before it; where no such window exists, each request's
rate after the last first chunk). Cells with
``length * batch`` above ``--max-batch-tokens`` are skipped (KV memory). ``startup_s``: launch to healthy.
``--fresh-caches``: each server starts with empty Triton and FlashInfer JIT caches (new ``TRITON_CACHE_DIR``
and ``FLASHINFER_WORKSPACE_BASE``), as on a fresh machine; the report's cold start is ``startup_s`` plus what
the warm-up pass's first requests took over the measured ones (:func:`cold_start_s`).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from sglang_shplb.core.patterns import BLOCK  # noqa: E402
from sglang_shplb.core.plan import load_plan  # noqa: E402
from sglang_shplb.evaluation.servers import Server, ServerSpec, server_specs  # noqa: E402
from sglang_shplb.serving.config import BACKEND_NAME, ENV_PLAN, OUTRIGHT_MARK  # noqa: E402
from sglang_shplb.planning.calibration_data import passkey_prompt  # noqa: E402

DEFAULT_BUDGETS = HERE / "results" / "default_plan"
LLAMA8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
           "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
           "head_dim": 128, "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "vocab_size": 128256,
           "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
           "torch_dtype": "bfloat16"}


def cells(lengths: list[int], batches: list[int], max_batch_tokens: int) -> list[tuple[int, int]]:
    return [(n, b) for b in batches for n in lengths if n * b <= max_batch_tokens]


def tokens_by(g, t: float) -> int:
    """Tokens request ``g`` had streamed by absolute time ``t`` (perf_counter)."""
    return max((n for dt, n in g.chunks if g.sent_at + dt <= t), default=0)


def batch_decode_rate(gens) -> tuple[str, float]:
    """``(decode_window, decode_tok_s)`` of requests sent at once: one request's rate while the whole batch
    decodes, i.e. the tokens all requests streamed between the last first-chunk and the first end, over that
    window, divided by the batch (at batch 1, ``(tokens - 1) / (end - first chunk)``; window "batch"). Without
    such a window (a request ended before the last one began), each request still streaming after the last
    first-chunk counts its own rate from then to its end, averaged (window "tail": no prefill chunk runs then,
    but fewer than the batch may decode); NaN if none is."""
    start = max(g.sent_at + g.chunks[0][0] for g in gens)
    ends = [g.sent_at + g.chunks[-1][0] for g in gens]
    end = min(ends)
    together = sum(tokens_by(g, end) - tokens_by(g, start) for g in gens)
    if end > start and together:
        return "batch", together / (end - start) / len(gens)
    tail = [(g.output_tokens - tokens_by(g, start)) / (e - start) for g, e in zip(gens, ends)
            if e > start and g.output_tokens > tokens_by(g, start)]
    return "tail", sum(tail) / len(tail) if tail else float("nan")


def run_cell(server: Server, prompts: list[list[int]], new_tokens: int) -> dict:
    """``len(prompts)`` requests sent at once: TTFT, :func:`batch_decode_rate`, and ``decode_client_tok_s``: each
    request's ``(tokens - 1) / (end - first chunk)``, averaged: what a client sees, other requests' prefill chunks
    included."""
    with ThreadPoolExecutor(len(prompts)) as pool:
        gens = list(pool.map(lambda ids: server.generate(ids, new_tokens, ignore_eos=True), prompts))
    window, decode = batch_decode_rate(gens)
    rates = [(g.output_tokens - 1) / (g.latency_s - g.ttft_s) for g in gens
             if g.output_tokens > 1 and g.latency_s > g.ttft_s]
    return {"ttft_s": sum(g.ttft_s for g in gens) / len(gens), "ttft_max_s": max(g.ttft_s for g in gens),
            "decode_tok_s": decode, "decode_window": window,
            "decode_client_tok_s": sum(rates) / len(rates) if rates else float("nan"),
            "tokens": [g.output_tokens for g in gens], "texts": [g.text[:120] for g in gens]}


def stock_layers_by_phase(plan, prompt_tokens: int, new_tokens: int) -> dict[str, int]:
    """How many layers the plan runs on the stock backend for a prompt of ``prompt_tokens``: in prefill (the
    prompt's bucket) and in decode (the bucket of its last token), so a table says which route a cell measured."""
    return {"prefill": len(plan.stock_layers("prefill", plan.buckets.index(prompt_tokens))),
            "decode": len(plan.stock_layers("decode", plan.buckets.index(prompt_tokens + new_tokens))),
            "layers": plan.model.num_layers}


def median_cell(passes: list[dict]) -> dict:
    """One cell over ``repeats`` measured passes: the last pass's record with ``ttft_s`` and ``decode_tok_s``
    replaced by their medians over the passes (NaN rates left out), and every pass's values kept
    (``ttft_all_s``, ``decode_all_tok_s``)."""
    ttft = [p["ttft_s"] for p in passes]
    rates = [p["decode_tok_s"] for p in passes if p["decode_tok_s"] == p["decode_tok_s"]]
    return {**passes[-1], "ttft_s": statistics.median(ttft),
            "decode_tok_s": statistics.median(rates) if rates else float("nan"),
            "ttft_all_s": ttft, "decode_all_tok_s": [p["decode_tok_s"] for p in passes]}


def fresh_offsets(n: int, k: int) -> list[int]:
    """Tokens to cut from the front of a cell's prompts for ``k`` lengths no cell of the grid uses: ``61 + j
    step`` with ``step`` a multiple of 64 (``n / 16`` rounded), so every length is 61 short of a multiple of 64
    (never a whole pool page, block or chunk), none below half of ``n``."""
    step = 64 * max(1, n // 1024)
    return [o for o in (61 + step * j for j in range(k)) if o < n // 2]


def file_stem(name: str) -> str:
    """A server's name as its files name it (``flashinfer#2`` → ``flashinfer_2``)."""
    return name.replace("#", "_")


def server_log(out: Path, name: str) -> Path:
    """Where a server's log goes (``flashinfer#2`` → ``server_flashinfer_2.log``)."""
    return out / f"server_{file_stem(name)}.log"


def error_text(e: Exception) -> str:
    """A failed server's or pass's error as its record keeps it (the tail of a long message)."""
    return f"{type(e).__name__}: {e}"[-3000:]


def started(name: str, server: Server, plan):
    """A healthy server's run record, and the plan whose stock layers its cells record: None where the launcher or the
    backend factory served the stock backend outright (its log says so; the record's ``stock_outright``)."""
    res = {"server": name, "cmd": " ".join(server.spec.command(0)), "startup_s": round(server.startup_s, 1),
           "cells": []}
    if plan is not None and OUTRIGHT_MARK in server.log.read_text(errors="replace"):
        res["stock_outright"], plan = True, None
    print(f"{name}: healthy after {server.startup_s:.0f} s"
          + (" (the stock backend served outright)" if res.get("stock_outright") else ""), flush=True)
    return res, plan


def grid_pass(server: Server, grid: dict, new_tokens: int) -> dict:
    """One pass over the grid: (length, batch) → :func:`run_cell`."""
    return {key: run_cell(server, c["prompts"], new_tokens) for key, c in grid.items()}


def grid_cell(name: str, key: tuple[int, int], c: dict, warm_ttft: float, passes: list[dict], plan,
              new_tokens: int) -> dict:
    """A cell's record over its measured passes (:func:`median_cell`), with the warm-up's TTFT, the plan's stock
    layers and, on pass-key prompts, which keys the answers hold."""
    n, b = key
    cell = {"length": n, "batch": b, "prompt_tokens": len(c["prompts"][0]), "first_ttft_s": warm_ttft,
            **median_cell(passes)}
    if plan is not None:
        cell["stock_layers"] = stock_layers_by_phase(plan, n, new_tokens)
    if c["keys"]:
        cell["passkey_found"] = [str(k) in t for k, t in zip(c["keys"], cell["texts"])]
    print(f"{name} n={n:>6} b={b:>2}: ttft {cell['ttft_s']:.4f} s (first {cell['first_ttft_s']:.3f}), "
          f"decode {cell['decode_tok_s']:.1f} tok/s", flush=True)
    return cell


def serve_grid(name: str, spec, grid: dict, new_tokens: int, out: Path, plan_dir: Path | None = None,
               repeats: int = 1, fresh: int = 0) -> dict:
    """One server over the grid: warm-up pass, ``repeats`` measured passes (each over the whole grid; per cell
    the medians, :func:`median_cell`), then, with ``fresh``, per cell that many requests at lengths the server
    has not served (:func:`fresh_offsets`), each timed once (``fresh_ttft_s``: what a shape's first request
    pays, as in real traffic whose lengths rarely repeat). Errors are recorded, not raised. ``plan_dir`` (shplb
    servers): each cell records its stock layers per phase (:func:`stock_layers_by_phase`), unless the launcher
    served the stock backend outright (:func:`started`)."""
    res = {"server": name, "cmd": " ".join(spec.command(0)), "cells": []}
    plan = load_plan(plan_dir) if plan_dir is not None else None
    t0 = time.time()
    try:
        with Server(spec, server_log(out, name), timeout_s=900) as s:
            res, plan = started(name, s, plan)
            warm = {key: run_cell(s, c["prompts"], new_tokens)["ttft_s"] for key, c in grid.items()}
            passes = [grid_pass(s, grid, new_tokens) for _ in range(repeats)]
            for key, c in grid.items():
                cell = grid_cell(name, key, c, warm[key], [p[key] for p in passes], plan, new_tokens)
                if fresh:
                    offs = fresh_offsets(key[0], fresh)
                    cell["fresh_lengths"] = [key[0] - o for o in offs]
                    cell["fresh_ttft_s"] = [run_cell(s, [p[o:] for p in c["prompts"]], new_tokens)["ttft_s"]
                                            for o in offs]
                    print(f"{name} n={key[0]:>6} b={key[1]:>2}: fresh lengths ttft "
                          f"{', '.join(f'{t:.3f}' for t in cell['fresh_ttft_s'])} s", flush=True)
                res["cells"].append(cell)
    except Exception as e:   # a failed server is a result too; the next one still runs
        res["error"] = error_text(e)
        print(f"{name}: ERROR {res['error']}", flush=True)
    res["wall_s"] = round(time.time() - t0, 1)
    return res


@dataclasses.dataclass
class Live:
    """A server of an interleaved run while it is up: its record, plan, warm-up TTFTs and measured passes."""
    name: str
    server: Server
    res: dict
    plan: object
    warm: dict
    passes: list = dataclasses.field(default_factory=list)


def rotated(items: list, r: int) -> list:
    """``items`` starting from its ``r``-th (modulo its length): round ``r``'s order of an interleaved run."""
    k = r % len(items) if items else 0
    return items[k:] + items[:k]


def profile_cell(server: Server, name: str, key: tuple[int, int], c: dict, new_tokens: int, out: Path) -> dict:
    """One more run of a cell under SGLang's torch profiler (``/start_profile`` .. ``/stop_profile``, CPU and GPU
    activities, no stacks or shapes): the trace under ``out/profile`` and its :func:`trace_summary.summarize` (GPU busy
    against idle, the longest idle gaps, the runtime calls that wait on the device; also up to the cell's last first
    token, its prefill), printed in one line."""
    from trace_summary import load_trace, summarize
    pid = f"{file_stem(name)}_{key[0]}x{key[1]}"
    tdir = out / "profile"
    body = {"output_dir": str(tdir), "activities": ["CPU", "GPU"], "with_stack": False, "record_shapes": False,
            "profile_id": pid}
    server.post("/start_profile", body)
    cell = run_cell(server, c["prompts"], new_tokens)
    server.post("/stop_profile", {})
    trace = next(tdir.glob(f"{pid}*.trace.json*"))
    summary = {"ttft_s": cell["ttft_s"], "ttft_max_s": cell["ttft_max_s"], "trace": trace.name,
               **summarize(load_trace(trace), window_ms=cell["ttft_max_s"] * 1e3)}
    g = summary.get("window", summary["gpu"])
    print(f"{name} profile n={key[0]} b={key[1]}: ttft {cell['ttft_s']:.4f} s (last {cell['ttft_max_s']:.4f}); up to "
          f"the last first token: GPU span {g.get('span_ms')} ms, busy {g.get('busy_ms')} ms, idle {g.get('idle_ms')} "
          f"ms, gaps >= 0.5 ms: {g.get('idle_gaps_over_ms', {}).get('0.5')}; top runtime {summary['runtime'][:3]}",
          flush=True)
    return summary


def serve_interleaved(servers: list[tuple[str, ServerSpec, Path | None]], grid: dict, new_tokens: int, out: Path,
                      repeats: int, profile: list[tuple[int, int]] = ()) -> list[dict]:
    """Every server up at once (started one after another, each healthy before the next starts), a warm-up pass each,
    then ``repeats`` rounds in which every server takes one measured pass over the grid, in an order rotated by one
    each round (:func:`rotated`): the machine's drift over time falls on every server alike (round 31: one server's
    SmolLM2 decode moved 430 → 711 tok/s from pass to pass, more than servers differ). Per cell the medians over the
    passes, as :func:`serve_grid`. A server that fails to start or errors is recorded and left out of later rounds.
    ``profile``: after the rounds, each server runs these cells once more under the profiler (:func:`profile_cell`;
    the record's ``profile``)."""
    records, live = [], []
    t0 = time.time()
    with contextlib.ExitStack() as stack:
        for name, spec, plan_dir in servers:
            try:
                s = stack.enter_context(Server(spec, server_log(out, name), timeout_s=900))
                res, plan = started(name, s, load_plan(plan_dir) if plan_dir is not None else None)
                live.append(Live(name, s, res, plan, grid_pass(s, grid, new_tokens)))
            except Exception as e:
                records.append({"server": name, "cmd": " ".join(spec.command(0)), "cells": [],
                                "error": error_text(e)})
                print(f"{name}: ERROR {records[-1]['error']}", flush=True)
        for r in range(repeats):
            order = rotated([x for x in live if "error" not in x.res], r)
            print(f"interleaved round {r + 1}/{repeats}: {', '.join(x.name for x in order)}", flush=True)
            for x in order:
                try:
                    x.passes.append(grid_pass(x.server, grid, new_tokens))
                except Exception as e:   # recorded; the others go on
                    x.res["error"] = error_text(e)
                    print(f"{x.name}: ERROR {x.res['error']}", flush=True)
        for key in profile:
            for x in [x for x in live if "error" not in x.res]:
                try:
                    x.res.setdefault("profile", {})[f"{key[0]}x{key[1]}"] = profile_cell(
                        x.server, x.name, key, grid[key], new_tokens, out)
                except Exception as e:   # a profile is a diagnosis: its failure is recorded, the results stand
                    x.res.setdefault("profile", {})[f"{key[0]}x{key[1]}"] = {"error": error_text(e)}
                    print(f"{x.name}: profile ERROR {error_text(e)}", flush=True)
    for x in live:
        x.res.update(interleaved=True, rounds=len(x.passes), wall_s=round(time.time() - t0, 1))
        x.res["cells"] = [grid_cell(x.name, key, c, x.warm[key]["ttft_s"], [p[key] for p in x.passes], x.plan,
                                    new_tokens) for key, c in grid.items()] if x.passes else []
        records.append(x.res)
    order = [name for name, _, _ in servers]
    return sorted(records, key=lambda r: order.index(r["server"]))


def share_memory(extra: tuple[str, ...], n: int, k: int) -> tuple[str, ...]:
    """``extra`` for the ``k``-th (from 0) of ``n`` servers started one after another to be up at once, its
    ``--mem-fraction-static`` f giving each about f/n of the card (unchanged without one). SGLang 0.5.17 sizes a
    server's pool from the memory free when it starts, keeping (1 - fraction) of that free memory as slack
    (``kv_cache_configurator._profile_available_bytes``), so the k-th server, which finds about 1 - k f/n of the card
    free, gets (f/n) / (1 - k f/n)."""
    if "--mem-fraction-static" not in extra:
        return extra
    i = extra.index("--mem-fraction-static") + 1
    share = float(extra[i]) / n
    return (*extra[:i], f"{share / (1 - k * share):.3f}", *extra[i + 1:])


def build_grid(which: str, tok, lengths, batches, max_batch_tokens) -> dict:
    """(length, batch) → ``{"prompts", "keys"}``. Llama-3-8B: random token ids (no keys); SmolLM2: the quality
    check's pass-key prompt (``calibration_data.passkey_prompt``), seeds ``0 .. batch-1``: a key per request."""
    rng = random.Random(0)
    grid = {}
    for n, b in cells(lengths, batches, max_batch_tokens):
        if which == "llama8b":
            grid[(n, b)] = {"prompts": [[rng.randint(1000, 40000) for _ in range(n)] for _ in range(b)], "keys": None}
        else:
            ps = [passkey_prompt(tok, n, seed) for seed in range(b)]   # the quality check's prompt, a key each
            grid[(n, b)] = {"prompts": [p.input_ids for p in ps], "keys": [p.answer for p in ps]}
    return grid


def make_plans(which: str, model: Path, out: Path) -> dict[str, Path]:
    """The ``shplb`` (stock where sparse does not pay), ``shplb_sparse`` and (Llama-3-8B) ``shplb_routed`` plans'
    folders."""
    from sglang_shplb.planning.stock_decision import StockOptions
    plans = {}
    if which == "llama8b":
        from sglang_shplb.planning.synthetic_plans import serving_bench_budget, synthetic_plan
        routed = StockOptions(decode_layer_overhead_s=18e-6, hbm_bytes_per_s=3.0e12)   # the fit before 2026-12-03
        for name, stock, tile in (("shplb", StockOptions(), BLOCK), ("shplb_sparse", None, BLOCK),
                                  ("shplb_routed", routed, BLOCK), ("shplb_tile128", StockOptions(), 2 * BLOCK)):
            plans[name] = synthetic_plan(model, serving_bench_budget(tile), out / f"plan_{name}",
                                         stock=stock, meta={"source": f"bench/serve_gpu.py llama8b {name}"}).parent
        return plans
    from sglang_shplb.cli import main as cli
    for name, flags in (("shplb", []), ("shplb_sparse", ["--no-stock-fallback"])):
        cli(["place", "--budgets", str(DEFAULT_BUDGETS), "--tp", "1", "--out", str(out / f"plan_{name}"), *flags])
        plans[name] = out / f"plan_{name}"
    return plans


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("which", nargs="?", choices=["smollm2", "llama8b"])
    ap.add_argument("--model", default="/tmp/smollm2", help="SmolLM2 checkpoint; its tokenizer serves llama8b too")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    ap.add_argument("--lengths", default=None, help="prompt tokens, comma-separated")
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--max-batch-tokens", type=int, default=262144)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--context-length", type=int, default=None,
                    help="llama8b: the servers' context (default: the longest prompt + 2 x new tokens); short prompts "
                         "with the full grid's context measure the stock buckets of the server the full grid runs")
    ap.add_argument("--servers", default="flashinfer,shplb_sparse,shplb")
    ap.add_argument("--repeats", type=int, default=None,
                    help="measured passes per server (medians per cell); default 1 for llama8b, 5 for smollm2, "
                         "whose steps of a few ms vary from pass to pass")
    ap.add_argument("--fresh-lengths", type=int, default=0,
                    help="per cell, this many more requests at lengths never served before, timed once each")
    ap.add_argument("--fresh-caches", action="store_true",
                    help="each server with empty Triton and FlashInfer JIT caches (a fresh machine's cold start)")
    ap.add_argument("--interleave", action="store_true",
                    help="every server up at once, their measured passes taking turns (serve_interleaved): drift of "
                         "the machine falls on all alike; each holds 1/N of the card's --mem-fraction-static "
                         "(share_memory) and, on CUDA, --sleep-on-idle")
    ap.add_argument("--profile", default="",
                    help="with --interleave: cells LENGTHxBATCH (comma-separated) each server runs once more after the "
                         "rounds under SGLang's torch profiler; trace summaries in the record (bench/trace_summary.py)")
    ap.add_argument("--cpu-smoke", action="store_true", help="CPU, float32, torch_native, tiny grid: the logic")
    ap.add_argument("--plot", nargs="+", default=None, help="result JSONs: print the ratio table, write a PNG")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.plot:
        report(merge_results([json.loads(Path(p).read_text()) for p in a.plot]), out)
        return
    if a.which is None:
        ap.error("which model: smollm2 or llama8b")
    from transformers import AutoTokenizer
    if a.cpu_smoke:
        from sglang_shplb.planning.model_store import resolve_model
        a.model = str(resolve_model(None))
    tok = AutoTokenizer.from_pretrained(a.model)
    device = "cpu" if a.cpu_smoke else "cuda"
    default_lengths = {"llama8b": "2048,4096,8192,16384,32768,65536,131072", "smollm2": "2048,4096,8000"}
    lengths = [int(x) for x in (a.lengths or ("256,512" if a.cpu_smoke else default_lengths[a.which])).split(",")]
    batches = [int(x) for x in ("1,2" if a.cpu_smoke else a.batches).split(",")]
    model = Path(a.model)
    extra: tuple[str, ...] = ()
    if a.which == "llama8b":
        model = out / "llama8b_cfg"
        model.mkdir(exist_ok=True)
        ctx = a.context_length or max(lengths) + 2 * a.new_tokens
        (model / "config.json").write_text(json.dumps({**LLAMA8B, "max_position_embeddings": ctx}))
        for f in Path(a.model).iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
                (model / f.name).write_bytes(f.read_bytes())
        extra = ("--load-format", "dummy", "--mem-fraction-static", "0.85", "--chunked-prefill-size", "8192")
    else:
        ctx = 8192
        if not a.cpu_smoke:
            extra = ("--mem-fraction-static", "0.5")
    names = a.servers.split(",")
    if a.interleave:
        if a.fresh_lengths or a.fresh_caches:
            ap.error("--interleave measures servers side by side: without --fresh-lengths / --fresh-caches")
        # idle servers wait on their sockets instead of spinning a core each (a request wakes them at once; the CPU
        # servers of server_specs already do)
        extra = extra + (() if a.cpu_smoke else ("--sleep-on-idle",))
    elif a.profile:
        ap.error("--profile runs with --interleave")
    grid = build_grid(a.which, tok, lengths, batches, a.max_batch_tokens)
    profile = [tuple(int(x) for x in c.split("x")) for c in a.profile.split(",") if c]
    if missing := [c for c in profile if c not in grid]:
        ap.error(f"--profile {missing}: not cells of the grid {sorted(grid)}")
    plans = make_plans(a.which, model, out)
    conc = max(batches)
    result = {"which": a.which, "device": device, "lengths": lengths, "batches": batches,
              "new_tokens": a.new_tokens, "date": time.strftime("%Y-%m-%d %H:%M"), "plans": {k: str(v) for k, v in
                                                                                            plans.items()},
              "runs": []}
    path = out / f"serve_{a.which}{'_cpu_smoke' if a.cpu_smoke else ''}.json"
    specs = []
    for k, name in enumerate(names):
        kind = server_kind(name)
        base, env, flags = VARIANTS.get(kind, (VIA_SGLANG.get(kind, kind), {}, ()))
        if base not in plans and kind != "flashinfer":
            known = ", ".join([*plans, *VARIANTS, *VIA_SGLANG])
            ap.error(f"unknown server {name!r} for {a.which}: flashinfer, {known} "
                     "(a repeat: NAME#2)")
        plan = plans.get(base, plans["shplb"])
        dense, (sparse,) = server_specs(model, [plan], device, "float32" if a.cpu_smoke else "bfloat16", ctx,
                                        concurrency=conc, always_backend=False,
                                        extra=(share_memory(extra, len(names), k) if a.interleave else extra) + flags)
        spec = dense if kind == "flashinfer" else via_sglang(dense, Path(plan)) if kind in VIA_SGLANG else sparse
        if env:
            spec = dataclasses.replace(spec, env={**spec.env, **env})
        specs.append((name, spec, None if kind == "flashinfer" else Path(plan)))
    repeats = a.repeats or (1 if a.which == "llama8b" else 5)
    if a.interleave:
        result["runs"] = serve_interleaved(specs, grid, a.new_tokens, out, repeats, profile)
        path.write_text(json.dumps(result, indent=1))
    else:
        for name, spec, plan in specs:
            with tempfile.TemporaryDirectory() as caches:
                if a.fresh_caches:
                    spec = dataclasses.replace(spec, env={**spec.env, "TRITON_CACHE_DIR": f"{caches}/triton",
                                                          "FLASHINFER_WORKSPACE_BASE": f"{caches}/flashinfer"})
                run = serve_grid(name, spec, grid, a.new_tokens, out, plan, repeats, a.fresh_lengths)
            run["fresh_caches"] = a.fresh_caches
            result["runs"].append(run)
            path.write_text(json.dumps(result, indent=1))
    print("wrote", path, flush=True)
    report([result], out)


#: servers that are another server's plan with environment variables or flags set: name -> (plan, env, flags).
#: With cuDNN's block-sparse route off the launcher leaves SGLang's page size (1) alone; ``shplb`` (the route on
#: ``auto``) gets ``--page-size 64``, so ``shplb_p64_triton`` tells the route from the page size. ``shplb_route1``:
#: the route at every call it can run (against ``auto``'s threshold); ``shplb_bucketed``: torch's cuDNN bucketing
#: switch on, as the launcher set it with its warm-up until round 28 (the launcher keeps a value it is given).
#: ``shplb_always``: through the shplb backend where the launcher would serve the stock one outright (a plan stock
#: in every layer at the server's context, e.g. SmolLM2's default plan at 8K).
VARIANTS = {"shplb_always": ("shplb", {}, ("--shplb-always-backend",)),
            "shplb_triton": ("shplb", {"SHPLB_CUDNN_BLOCKS": "0"}, ()),
            "shplb_p64_triton": ("shplb", {"SHPLB_CUDNN_BLOCKS": "0"}, ("--page-size", "64")),
            "shplb_route1": ("shplb", {"SHPLB_CUDNN_BLOCKS": "1"}, ()),
            "shplb_bucketed": ("shplb", {"TORCH_CUDNN_SDPA_AVOID_RECOMPILE": "1"}, ())}


#: servers that run a plan through SGLang's own launcher, the plugin's path: name -> plan.
VIA_SGLANG = {"shplb_sglang": "shplb"}


def via_sglang(dense: ServerSpec, plan: Path) -> ServerSpec:
    """The stock server's command with ``--attention-backend shplb`` and ``SHPLB_PLAN`` set: ``python -m
    sglang.launch_server`` with our plugin (no ``--page-size``: the plugin's hook on SGLang's default decides)."""
    args = list(dense.args)
    args[args.index("--attention-backend") + 1] = BACKEND_NAME
    return dataclasses.replace(dense, name="sparse", args=tuple(args), env={**dense.env, ENV_PLAN: str(plan)})


def server_kind(name: str) -> str:
    """``flashinfer#2`` → ``flashinfer``: a server run again later in the same process (``--servers
    flashinfer,shplb,flashinfer#2``); the report lists it as a competitor of the first ``flashinfer`` run, so
    its ratios (an A/A comparison) show how far two runs of the same server differ: the noise floor."""
    return name.split("#", 1)[0]


def cold_start_s(startup_s: float, first_and_steady: list[tuple[float, float]]) -> float:
    """A server's cold start: launch to healthy plus what each shape's first request took over its steady TTFT
    (a first request faster than steady adds nothing)."""
    return startup_s + sum(max(0.0, first - steady) for first, steady in first_and_steady)


def run_cold_start_s(run: dict) -> float | None:
    """:func:`cold_start_s` of a server's grid run (first request: the warm-up pass; steady: the measured TTFT);
    None without a startup time (a failed server)."""
    if "startup_s" not in run:
        return None
    return cold_start_s(run["startup_s"], [(c["first_ttft_s"], c["ttft_s"]) for c in run.get("cells", [])])


def merge_results(results: list[dict]) -> list[dict]:
    """Result files of one model (e.g. a run of the stock server and a later run of another shplb server on the same
    machine) merged into one, runs in the order given (a server's first run kept); models kept apart."""
    merged: dict[str, dict] = {}
    for res in results:
        m = merged.setdefault(res["which"], {**res, "runs": []})
        have = {r["server"] for r in m["runs"]}
        m["runs"] += [r for r in res["runs"] if r["server"] not in have]
    return list(merged.values())


def report(results: list[dict], out: Path) -> None:
    """Per (length, batch): each server's TTFT and decode rate (with the layers its plan ran stock, prefill /
    decode, where recorded), and each shplb server's ratios to the stock one (TTFT: stock / shplb; decode:
    shplb / stock; > 1 = shplb faster). A PNG of the ratios per model."""
    for res in results:
        runs = {r["server"]: {(c["length"], c["batch"]): c for c in r.get("cells", [])} for r in res["runs"]}
        stock = runs.get("flashinfer", {})
        outright = {r["server"]: r.get("stock_outright", False) for r in res["runs"]}
        others = [k for k in runs if k != "flashinfer"]
        print(f"\n{res['which']} ({res['device']}, {res['date']}): TTFT s / decode tok/s; ratios > 1 = shplb faster")
        print("| length | batch | flashinfer | " + " | ".join(f"{k} | × TTFT | × decode" for k in others) + " |")
        for key in sorted(stock):
            row = [f"{key[0]}", f"{key[1]}", f"{stock[key]['ttft_s']:.3f} / {stock[key]['decode_tok_s']:.0f}"]
            for k in others:
                c = runs[k].get(key)
                if c is None:
                    row += ["–", "–", "–"]
                    continue
                sl = c.get("stock_layers")
                route = f" (stock layers {sl['prefill']} / {sl['decode']} of {sl['layers']})" if sl else \
                    " (stock outright)" if outright.get(k) else ""
                row += [f"{c['ttft_s']:.3f} / {c['decode_tok_s']:.0f}{route}",
                        f"{stock[key]['ttft_s'] / c['ttft_s']:.2f}", f"{c['decode_tok_s'] / stock[key]['decode_tok_s']:.2f}"]
            print("| " + " | ".join(row) + " |")
        fresh = {k: {key: c["fresh_ttft_s"] for key, c in v.items() if c.get("fresh_ttft_s")} for k, v in runs.items()}
        if any(fresh.values()):
            print("fresh lengths (never served before), median TTFT s; × = flashinfer / shplb")
            for key in sorted(fresh.get("flashinfer", {})):
                st = statistics.median(fresh["flashinfer"][key])
                print(f"| {key[0]} | {key[1]} | flashinfer {st:.3f} | " + " | ".join(
                    f"{k} {statistics.median(fresh[k][key]):.3f} ({st / statistics.median(fresh[k][key]):.2f}×)"
                    for k in others if key in fresh.get(k, {})) + " |")
        stock_cold = next((run_cold_start_s(r) for r in res["runs"] if r["server"] == "flashinfer"), None)
        for r in res["runs"]:
            cold = run_cold_start_s(r)
            cold_txt = "" if cold is None else (
                f", cold start {cold:.1f} s" + (" (empty caches)" if r.get("fresh_caches") else "")
                + (f", {cold / stock_cold:.2f}x flashinfer's" if stock_cold and r["server"] != "flashinfer" else ""))
            print(f"{r['server']}: startup {r.get('startup_s', '–')} s, wall {r.get('wall_s')} s{cold_txt}"
                  + (f", ERROR {r['error'][:200]}" if "error" in r else ""))
        plot(res, runs, out)


def plot(res: dict, runs: dict, out: Path) -> None:
    try:
        import matplotlib
    except ImportError:   # the lent GPU has none: plot here with --plot
        print("no matplotlib: no PNG", flush=True)
        return
    stock = runs.get("flashinfer", {})
    if not stock:
        print("no flashinfer run to compare with: no PNG (merge with one: --plot A.json B.json)", flush=True)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, what, f in ((axes[0], "TTFT speed-up (flashinfer / shplb)", lambda s, c: s["ttft_s"] / c["ttft_s"]),
                        (axes[1], "decode tok/s ratio (shplb / flashinfer)",
                         lambda s, c: c["decode_tok_s"] / s["decode_tok_s"])):
        for k, cells_ in runs.items():
            if k == "flashinfer":
                continue
            for b in sorted({key[1] for key in cells_}):
                keys = sorted(key for key in cells_ if key[1] == b and key in stock)
                ax.plot([key[0] for key in keys], [f(stock[key], cells_[key]) for key in keys], marker="o",
                        linestyle="-" if k == "shplb" else ":" if server_kind(k) == "flashinfer" else "--",
                        label=f"{k}, batch {b}")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt tokens")
        ax.set_title(what, fontsize=10)
        ax.legend(fontsize=7)
    fig.suptitle(f"{res['which']}: shplb vs stock SGLang ({res['device']}, {res['date']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / f"serve_{res['which']}_{res['device']}.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
