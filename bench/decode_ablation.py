"""Which heads' sparse decode changes the answers (report, never assert): one plan's sparse prefill, its decode
rule applied to some head classes only, in-process (transformers + the serving reference path of decode,
:func:`~sglang_shplb.planning.quality.register_sparse_attention` as refine uses it),
greedy, against dense on the same eval prompts. CPU float32 (or CUDA bf16 with ``--device cuda``).

Variants (prefill always follows the plan):

* ``stock``: every head dense at decode (``place --stock-decode``);
* ``sparse``: the server's decode rule (``core.patterns.decode_budgets``: streaming heads below the decode floor
  read Quest pages);
* ``stream_window``: the rule before that: every streaming head reads its sinks and decode window only;
* ``stream_dense``: streaming heads dense at decode, the rest as the plan;
* ``sel_dense``: top-k / vertical-slash heads dense at decode, the rest as the plan;
* ``stream_quest16``: every streaming head picks 16 pages at decode by Quest scores (page 0 and the current one
  forced), like a top-k head at its decode floor, instead of its sink + window, whatever its window;
* ``stream_questw``: every streaming head picks as many pages by Quest scores as its sinks and decode window
  hold (at least 16; page 0 and the current one forced): the window's token budget, placed by content;
* ``stream_short_dense``: streaming heads whose sinks and window hold fewer than ``DECODE_MIN_PAGES`` pages (those
  the rule sends to Quest pages) dense at decode, the rest by the rule;
* ``stream_long_dense``: the other streaming heads (sinks and window of ``DECODE_MIN_PAGES`` pages or more, which the
  rule leaves on their window) dense at decode, the rest by the rule;
* ``stream_dense@A-B``: streaming heads of layers ``A``..``B`` (inclusive) dense at decode, the rest by the rule;
* ``floor32``: the plan with ``DECODE_MIN_PAGES`` 32 instead of 16;
* ``sparse_everyN``: the plan's decode rule with page selections kept for ``N`` steps (``sparse`` keeps them for
  ``DECODE_RESELECT_EVERY``, the server's default; ``sparse_every1`` selects at every step).

    python bench/decode_ablation.py --plan bench/results/eval_h200_round5/plans/refined5_d30 --task passkey \
        --length 2048 --per-task 20 --variants stock,sparse,stream_dense,sel_dense --out bench/results/eval_cpu
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sglang_shplb.core import patterns  # noqa: E402
from sglang_shplb.core.patterns import BLOCK, HeadBudget, Pattern  # noqa: E402
from sglang_shplb.core.plan import load_plan  # noqa: E402
from sglang_shplb.evaluation.scoring import score  # noqa: E402
from sglang_shplb.evaluation.summary import paired_interval  # noqa: E402
from sglang_shplb.evaluation.tasks import TASKS, eval_prompts  # noqa: E402
from sglang_shplb.planning.model_store import load_model, resolve_model  # noqa: E402
from sglang_shplb.planning.quality import ATTN_NAME, register_sparse_attention  # noqa: E402
from sglang_shplb.planning.refine import generate_greedy  # noqa: E402

DENSE = HeadBudget.dense()
REF_LENGTH = 8192   # the length the density goals are stated at


def decode_density(at_decode: list[list[HeadBudget]], length: int) -> float:
    """Mean over heads of the share of a ``length``-token context's pages one decode step reads."""
    pages = -(-length // BLOCK)
    heads = [h for layer in at_decode for h in layer]
    return sum(h.decode_pages(pages) for h in heads) / (len(heads) * pages)


def decode_budgets(variant: str, plan: list[list[HeadBudget]]) -> list[list[HeadBudget]]:
    at_decode = patterns.decode_budget
    layers = range(len(plan))
    if variant.startswith("stream_dense@"):
        first, last = (int(x) for x in variant.split("@")[1].split("-"))
        layers, variant = range(first, last + 1), "stream_dense"
    short = lambda h: at_decode(h).pattern is not Pattern.STREAMING  # noqa: E731  (the rule sends it to Quest pages)
    swap = {"stock": lambda h: DENSE,
            "stream_window": lambda h: h,
            "stream_dense": lambda h: DENSE if h.pattern is Pattern.STREAMING else at_decode(h),
            "stream_short_dense": lambda h: DENSE if h.pattern is Pattern.STREAMING and short(h) else at_decode(h),
            "stream_long_dense": lambda h: DENSE if h.pattern is Pattern.STREAMING and not short(h) else at_decode(h),
            "sel_dense": lambda h: DENSE if h.pattern in (Pattern.TOPK, Pattern.VSLASH) else at_decode(h),
            "stream_quest16": lambda h: patterns.STREAMING_AT_DECODE if h.pattern is Pattern.STREAMING else h,
            "stream_questw": lambda h: HeadBudget.topk(1 / 1024, min_blocks=h.sink_blocks + h.decode_window_blocks)
            if h.pattern is Pattern.STREAMING else h,
            }.get(variant, at_decode)
    return [[swap(h) if i in layers else at_decode(h) for h in layer] for i, layer in enumerate(plan)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plan", required=True)
    ap.add_argument("--task", default="passkey", choices=sorted(TASKS))
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--per-task", type=int, default=20)
    ap.add_argument("--variants", default="stock,sparse,stream_dense,sel_dense")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the embedded SmolLM2)")
    ap.add_argument("--out", default=None, help="folder for decode_ablation_<task>_<length>.json")
    a = ap.parse_args()
    plan = load_plan(a.plan)
    prefill = [plan.layer_budgets(layer) for layer in range(plan.model.num_layers)]
    model, tok = load_model(resolve_model(a.model), a.device)
    prompts = eval_prompts(tok, [a.task], [a.length], a.per_task)
    max_new = TASKS[a.task].max_new_tokens

    def answers() -> list[str]:
        return [tok.decode(generate_greedy(model, p.input_ids, max_new), skip_special_tokens=True).strip() for p in prompts]

    def scores(got: list[str]) -> list[float]:
        return [score(x, p.refs, TASKS[a.task].scoring) for x, p in zip(got, prompts)]

    model.set_attn_implementation("sdpa")
    dense = answers()
    base = scores(dense)
    rows = {"dense": {"answers": dense, "scores": base, "acc": sum(base) / len(base)}}
    print(f"dense          acc {rows['dense']['acc']:.3f}  (n {len(prompts)}, {a.task} at {a.length})", flush=True)
    floor = patterns.DECODE_MIN_PAGES
    for v in a.variants.split(","):
        t = time.time()
        patterns.DECODE_MIN_PAGES = 32 if v == "floor32" else floor
        every = int(v[len("sparse_every"):]) if v.startswith("sparse_every") else patterns.DECODE_RESELECT_EVERY
        at_decode = decode_budgets(v, prefill)
        register_sparse_attention(prefill, at_decode, reselect_every=every)
        model.set_attn_implementation(ATTN_NAME)
        got = answers()
        sc = scores(got)
        acc = sum(sc) / len(sc)
        lo, hi = paired_interval(base, sc)
        same = sum(x == y for x, y in zip(got, dense))
        density = {n: decode_density(at_decode, n) for n in sorted({a.length, REF_LENGTH})}
        rows[v] = {"answers": got, "scores": sc, "acc": acc, "diff_interval": [lo, hi], "identical_to_dense": same,
                   "reselect_every": every, "decode_density": density}
        print(f"{v:14s} acc {acc:.3f}  − dense {100 * (acc - rows['dense']['acc']):+.1f} points "
              f"[{100 * lo:+.1f}, {100 * hi:+.1f}], identical {same}/{len(prompts)}, decode density "
              + " / ".join(f"{d:.3f} at {n}" for n, d in density.items()) + f"  ({time.time() - t:.0f} s)", flush=True)
    patterns.DECODE_MIN_PAGES = floor
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        path = os.path.join(a.out, f"decode_ablation_{a.task}_{a.length}.json")
        with open(path, "w") as f:
            json.dump({"plan": a.plan, "task": a.task, "length": a.length, "per_task": a.per_task,
                       "device": a.device, "dtype": str(next(model.parameters()).dtype),
                       "date": _dt.date.today().isoformat(), "rows": rows}, f, indent=1)
        print("wrote", path)


if __name__ == "__main__":
    main()
