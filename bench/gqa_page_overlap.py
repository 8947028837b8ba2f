"""How many pages does a GQA group's decode read on a real model? The sparse decode loads each KV page once
for the q heads of a KV head (the union of their Quest selections), so its bytes are the union's, between
``f`` (every head of the group picks the same pages) and ``G · f`` (disjoint picks, what random inputs give).

SmolLM2-135M-Instruct (CPU, float32, 9 q / 3 KV heads, G = 3), prompts from the calibration set and a passkey
prompt; for the last ``--queries`` positions of each prompt, every head picks ``HeadBudget.decode_pages - 1`` pages by
the Quest bound over the 64-token pages before the current one (page 0 forced), as the decode kernel does.
Per top-k fraction: the union's pages / the pages of one head (1 = full overlap, G = disjoint), and the
union's share of the dense bytes.

    python bench/gqa_page_overlap.py --out bench/results     # ~1 min on 2 CPU cores
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from sglang_shplb.planning.calibration_data import make_prompt, passkey_prompt  # noqa: E402
from sglang_shplb.kernels.reference import quest_scores  # noqa: E402
from sglang_shplb.planning.model_store import default_checkpoint  # noqa: E402
from sglang_shplb.core.patterns import BLOCK, HeadBudget  # noqa: E402

FRACTIONS = (0.05, 0.1, 0.2)


def page_summaries(k: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``k [Hkv, >=n, d]`` → per-page min / max ``[Hkv, ceil(n/64), d]`` of positions ``0 .. n-1``."""
    npg = math.ceil(n / BLOCK)
    kk = torch.nn.functional.pad(k[:, :n], (0, 0, 0, npg * BLOCK - n), value=float("nan"))
    kk = kk.view(k.shape[0], npg, BLOCK, -1)
    return kk.nan_to_num(float("inf")).amin(2), kk.nan_to_num(float("-inf")).amax(2)


def group_union_stats(q: torch.Tensor, k: torch.Tensor, queries: int) -> dict[float, list[tuple[int, int, int]]]:
    """``q [Hq, n, d]``, ``k [Hkv, n, d]`` (RoPE applied). Per fraction, per (query, KV head):
    (pages one head lists, union pages, pages before the current one)."""
    hq, n, _ = q.shape
    hkv = k.shape[0]
    g = hq // hkv
    out: dict[float, list[tuple[int, int, int]]] = {f: [] for f in FRACTIONS}
    for t in range(n - queries, n):
        lo, hi = page_summaries(k, t + 1)
        npg = lo.shape[1]
        sc = quest_scores(q[:, t], lo, hi)[:, :npg - 1]                     # pages before the current one
        sc[:, 0] = float("inf")
        order = sc.argsort(dim=1, descending=True)
        for f in FRACTIONS:
            cnt = min(npg - 1, HeadBudget.topk(f, 4).decode_pages(npg) - 1)
            for hk in range(hkv):
                picks = order[hk * g:(hk + 1) * g, :cnt]
                out[f].append((cnt, int(torch.unique(picks).numel()), npg - 1))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--length", type=int, default=8000)
    ap.add_argument("--queries", type=int, default=8)
    a = ap.parse_args()
    from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    t0 = time.time()
    path = default_checkpoint()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    g = model.config.num_attention_heads // model.config.num_key_value_heads
    stats: dict[float, list[tuple[int, int, int]]] = {f: [] for f in FRACTIONS}

    def capture(module, query, key, value, attention_mask, **kwargs):
        with torch.no_grad():
            for f, rows in group_union_stats(query[0], key[0], a.queries).items():
                stats[f].extend(rows)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("shplb_overlap", capture)
    model.set_attn_implementation("shplb_overlap")
    prompts = [("calibration A", make_prompt(tok, a.length, "A", 0)), ("passkey", passkey_prompt(tok, a.length, 0))]
    res = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantised, float32, CPU)", "date": _dt.date.today().isoformat(),
           "group": g, "queries_per_prompt": a.queries, "prompts": [], "fractions": {}}
    for name, p in prompts:
        with torch.no_grad():
            model(torch.tensor([p.input_ids]), use_cache=False, logits_to_keep=1)
        res["prompts"].append({"name": name, "tokens": len(p.input_ids)})
        print(f"{name}: {len(p.input_ids)} tokens, {time.time() - t0:.0f} s", flush=True)
    print(f"{'fraction':>8s} {'union / one head':>17s} {'(1 = same pages, G = ' + str(g) + ' = disjoint)':30s} "
          f"{'union / dense':>13s} {'random-input union / dense':>27s}")
    for f, rows in stats.items():
        r = torch.tensor(rows, dtype=torch.float64)
        ratio = (r[:, 1] / r[:, 0]).mean().item()
        share = (r[:, 1] / r[:, 2]).mean().item()
        one = (r[:, 0] / r[:, 2]).mean().item()
        rand = 1 - (1 - one) ** g                  # expected union share of G independent uniform picks
        res["fractions"][str(f)] = {"union_over_one_head": ratio, "union_over_dense": share,
                                    "one_head_over_dense": one, "independent_picks_union_over_dense": rand,
                                    "p90_union_over_one_head": r[:, 1].div(r[:, 0]).quantile(0.9).item(),
                                    "samples": len(rows)}
        print(f"{f:8.2f} {ratio:17.2f} {'':30s} {share:13.3f} {rand:27.3f}")
    res["wall_s"] = time.time() - t0
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "gqa_page_overlap.json"), "w") as fh:
        json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
