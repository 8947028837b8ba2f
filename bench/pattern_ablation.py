"""Which heads' sparsity loses an eval task? The eval's prompts answered in-process on the CPU (float32, or
bfloat16 with ``--dtype bfloat16``: the GPU servers' dtype on the CPU's bf16 units; the reference path of
``refine``: the plan's block masks in prefill with the dense tail, the server's decode rule) by the dense model
and by variants of a plan: as it is, without the dense tail (the servers before it), its streaming heads dense,
its top-k / vertical-slash heads dense, its decode dense (prefill sparse only), and its top-k heads with a larger
``min_blocks``.

    python bench/pattern_ablation.py PLAN_DIR --task qa --length 2048 --prompts 20 [--min-blocks 16] --out DIR
    python bench/pattern_ablation.py PLAN_DIR --task passkey --dtype bfloat16 --variants plan "plan, no dense tail"
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from sglang_shplb.core.patterns import HeadBudget, Pattern
from sglang_shplb.core.plan import load_plan
from sglang_shplb.evaluation.scoring import score
from sglang_shplb.evaluation.tasks import TASKS, make_prompt
from sglang_shplb.planning.model_store import default_checkpoint, load_model
from sglang_shplb.planning import quality
from sglang_shplb.planning.quality import ATTN_NAME, masked_prefill, register_sparse_attention
from sglang_shplb.planning.refine import generate_greedy

PREFILL_ONLY = "shplb_prefill_only"
NO_TAIL = "plan, no dense tail"
DECODE_DENSE = "plan, decode dense"
ANSWER_TOKENS = 24


def variants(budgets: list[list[HeadBudget]], min_blocks: list[int]) -> dict[str, list[list[HeadBudget]]]:
    dense = HeadBudget.dense()
    out = {"plan": budgets,
           "streaming heads dense": [[dense if b.pattern is Pattern.STREAMING else b for b in l] for l in budgets],
           "top-k / vslash heads dense": [[dense if b.pattern in (Pattern.TOPK, Pattern.VSLASH) else b for b in l]
                                          for l in budgets]}
    for m in min_blocks:
        out[f"top-k min_blocks {m}"] = [[replace(b, min_blocks=max(b.min_blocks, m)) if b.pattern is Pattern.TOPK
                                         else b for b in l] for l in budgets]
    return out


def register_prefill_only(budgets: list[list[HeadBudget]]) -> None:
    """The plan's prefill masks, dense decode steps."""
    def attn(module, query, key, value, attention_mask, **kw):
        if query.shape[2] == 1:
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kw)
        return masked_prefill(budgets[module.layer_idx], query, key, value, kw.get("scaling")).to(query.dtype), None
    AttentionInterface.register(PREFILL_ONLY, attn)


def answers(model, tok, prompts, attn: str, tail: bool = True) -> list[str]:
    """Greedy answers under ``attn``; ``tail=False``: the prompt's last rows keep their sparse masks (the
    reference's dense tail swapped for no rows while it runs)."""
    model.set_attn_implementation(attn)
    keep = quality.dense_tail_rows
    if not tail:
        quality.dense_tail_rows = lambda q, k, v, scaling: q[:0].float()
    try:
        return [tok.decode(generate_greedy(model, p.input_ids, ANSWER_TOKENS), skip_special_tokens=True).strip()
                for p in prompts]
    finally:
        quality.dense_tail_rows = keep
        model.set_attn_implementation("sdpa")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("plan")
    ap.add_argument("--task", default="qa", choices=sorted(TASKS))
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--min-blocks", type=int, nargs="*", default=[16])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--variants", nargs="*", default=None, help="run only these (names as printed)")
    ap.add_argument("--out", default="bench/results")
    a = ap.parse_args()
    ck = default_checkpoint()
    model, tok = load_model(ck, dtype=getattr(torch, a.dtype))
    budgets = load_plan(Path(a.plan) / "plan.json", ck).budgets
    prompts = [make_prompt(tok, a.task, a.length, i) for i in range(a.prompts)]
    scores = lambda ans: [score(x, p.refs, TASKS[a.task].scoring) for x, p in zip(ans, prompts)]  # noqa: E731
    dense = answers(model, tok, prompts, "sdpa")
    rows = {"dense": {"accuracy": 100 * float(np.mean(scores(dense)))}}
    print(f"{a.task} at {a.length}, {a.prompts} prompts, CPU {a.dtype}: dense {rows['dense']['accuracy']:.1f}",
          flush=True)
    runs = [(name, b, ATTN_NAME) for name, b in variants(budgets, a.min_blocks).items()]
    runs += [(NO_TAIL, budgets, ATTN_NAME), (DECODE_DENSE, budgets, PREFILL_ONLY)]
    if a.variants is not None:
        unknown = set(a.variants) - {name for name, _, _ in runs}
        if unknown:
            raise SystemExit(f"unknown variants {sorted(unknown)}; choose from {[name for name, _, _ in runs]}")
        runs = [r for r in runs if r[0] in a.variants]
    for name, b, attn in runs:
        t0 = time.time()
        register_sparse_attention(b) if attn == ATTN_NAME else register_prefill_only(b)
        ans = answers(model, tok, prompts, attn, tail=name != NO_TAIL)
        acc = 100 * float(np.mean(scores(ans)))
        rows[name] = {"accuracy": acc, "diff": acc - rows["dense"]["accuracy"],
                      "identical": sum(x == d for x, d in zip(ans, dense)),
                      "density": {n: float(np.mean([h.density(n) for l in b for h in l])) for n in (2048, 4096, 8000)}}
        print(f"  {name:28s} {acc:5.1f} ({rows[name]['diff']:+.1f}), identical {rows[name]['identical']}/{a.prompts}, "
              f"density 2K/4K/8K {'/'.join(f'{v:.3f}' for v in rows[name]['density'].values())}, "
              f"{time.time() - t0:.0f} s", flush=True)
    out = Path(a.out) / f"pattern_ablation_{a.task}_{a.length}_cpu_{a.dtype}.json"
    out.write_text(json.dumps({"plan": a.plan, "task": a.task, "length": a.length, "prompts": a.prompts,
                               "dtype": a.dtype, "rows": rows}, indent=1))
    print(f"→ {out}")


if __name__ == "__main__":
    main()
