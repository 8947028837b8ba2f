"""How much faster than FlashInfer can a plan make the time to first token at most? An Amdahl bound from
FlashInfer's own batch-1 TTFT curve in a ``bench/serve_gpu.py`` result, with the plan's densities.

* **Fit.** FlashInfer's TTFT over the lengths is ``t(n) = c + a n + b P(n)``: ``P(n)`` the causal (query block,
  key block) pairs of a prefill of ``n`` tokens (chunked or not: each chunk attends to the whole prefix), ``b P(n)``
  the attention, ``c + a n`` the rest of the forward (GEMMs, norms, sampling), which no
  attention backend changes. Least squares over the cells.
* **Plan.** Head ``h``'s pairs ``P_h(n)``: :meth:`HeadBudget.block_pairs`, its pattern's blocks per query block
  and the prompt's last query block over all keys (the server's dense tail, in the chunk that ends the prompt;
  until 2026-12-07 every chunk had one, which this bound counted then), dense heads ``P(n)``. At a per-pair
  efficiency ``e`` of sparse heads relative to dense ones (dense heads run at FlashInfer's: cuDNN, measured at
  1.00 of SDPA), the plan's TTFT is
  ``c + a n + b P(n) (D + S / e) / H``, ``D`` the dense heads' share and ``S`` the sparse heads' summed pair shares.
* **Printed, per length:** FlashInfer's TTFT and the fit, the plan's measured TTFT, the bound at ``e = 1`` (sparse
  work as efficient as dense) and with sparse heads free (``e = ∞``), the efficiency the measured TTFT implies,
  and the ``e`` a goal ratio needs (``--goal 65536:2.3 --goal 131072:3``; "—" where even free sparse heads miss it).

    python bench/ttft_bound.py bench/results/serve_h200/2026-12-04/serve_llama8b_h200.json \\
        bench/results/serve_h200/2026-12-04/plan_shplb_llama8b.json --out bench/results/ttft_bound
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from sglang_shplb.core.patterns import HeadBudget, Pattern

DENSE = HeadBudget.dense()


def fit(ns: list[int], ts: list[float]) -> tuple[float, float, float]:
    """``(c, a, b)`` of ``t = c + a n + b P(n)`` by least squares; with two lengths only, ``c = 0``."""
    if len(ns) < 2:
        raise SystemExit(f"FlashInfer ran {len(ns)} length(s) at batch 1: the fit needs two or more")
    x = np.array([[1.0, n, DENSE.block_pairs(n)] for n in ns])[:, (0 if len(ns) > 2 else 1):]
    coef = np.linalg.lstsq(x, np.array(ts), rcond=None)[0]
    c, a, b = ([0.0] * (3 - len(coef))) + [float(v) for v in coef]
    return c, a, b


def shares(budgets: list[list[HeadBudget]], n: int) -> tuple[float, float]:
    """``(D, S)``: the dense heads' share of all heads and the sparse heads' summed pair shares, per head."""
    full = DENSE.block_pairs(n)
    flat = [b for layer in budgets for b in layer]
    dense = sum(b.pattern is Pattern.DENSE for b in flat)
    sparse = sum(b.block_pairs(n) / full for b in flat if b.pattern is not Pattern.DENSE)
    return dense / len(flat), sparse / len(flat)


def cells(doc: dict, server: str) -> dict[int, float]:
    run = next((r for r in doc["runs"] if r["server"] == server), None)
    if run is None:
        raise SystemExit(f"no {server!r} run in the result (servers: {[r['server'] for r in doc['runs']]})")
    return {c["length"]: c["ttft_s"] for c in run["cells"] if c["batch"] == 1 and c.get("ttft_s")}


def chunk_size(doc: dict) -> int:
    cmd = next(r["cmd"] for r in doc["runs"] if r["server"] == "flashinfer").split()
    return int(cmd[cmd.index("--chunked-prefill-size") + 1])


def bound_rows(doc: dict, budgets: list[list[HeadBudget]], goals: dict[int, float], show_from: int) -> dict:
    chunk = chunk_size(doc)
    fi, ours = cells(doc, "flashinfer"), cells(doc, "shplb")
    ns = sorted(fi)
    c, a, b = fit(ns, [fi[n] for n in ns])
    rows = []
    for n in sorted(set(fi) | set(ours)):
        if n < show_from:
            continue
        rest, attn = c + a * n, b * DENSE.block_pairs(n)
        d, s = shares(budgets, n)
        row = {"length": n, "flashinfer_s": fi.get(n), "fit_s": rest + attn, "rest_s": rest, "attention_s": attn,
               "dense_share": d, "sparse_pair_share": s, "bound_e1_s": rest + attn * (d + s),
               "bound_free_s": rest + attn * d, "shplb_s": ours.get(n)}
        base = fi.get(n, rest + attn)
        row["ratio_bound_e1"], row["ratio_bound_free"] = base / row["bound_e1_s"], base / row["bound_free_s"]
        if n in ours:
            sparse_t = ours[n] - rest - attn * d    # what the sparse heads took, if the rest is as FlashInfer's
            row["ratio_measured"] = base / ours[n]
            row["implied_e"] = attn * s / sparse_t if sparse_t > 0 else None
        if n in goals:
            budget = base / goals[n] - rest - attn * d   # time left for the sparse heads at the goal
            row["goal"], row["goal_e"] = goals[n], (attn * s / budget if budget > 0 else None)
        rows.append(row)
    return {"fit": {"c_s": c, "a_s_per_token": a, "b_s_per_pair": b, "chunk": chunk, "lengths": ns}, "rows": rows}


def _f(x, fmt="{:.3f}") -> str:
    return "—" if x is None else fmt.format(x)


def table(res: dict) -> str:
    f = res["fit"]
    out = [f"FlashInfer fit over {f['lengths']}: t = {f['c_s'] * 1e3:.1f} ms + {f['a_s_per_token'] * 1e6:.2f} µs/token "
           f"+ {f['b_s_per_pair'] * 1e9:.3f} ns/(block pair, all heads), chunks of {f['chunk']}",
           "| length | FlashInfer s (fit) | rest s | attention s | dense heads | sparse pairs | bound e=1 s (×) "
           "| bound, sparse free s (×) | shplb s (×) | implied e | goal × → e needed |",
           "|---:|---|---:|---:|---:|---:|---|---|---|---:|---|"]
    for r in res["rows"]:
        goal = f"{r['goal']:g} → {_f(r['goal_e'], '{:.2f}')}" if "goal" in r else ""
        ours = f"{r['shplb_s']:.3f} ({r['ratio_measured']:.2f})" if r["shplb_s"] else "—"
        out.append(f"| {r['length']:,} | {_f(r['flashinfer_s'])} ({r['fit_s']:.3f}) | {r['rest_s']:.3f} | "
                   f"{r['attention_s']:.3f} | {r['dense_share']:.3f} | {r['sparse_pair_share']:.3f} | "
                   f"{r['bound_e1_s']:.3f} ({r['ratio_bound_e1']:.2f}) | {r['bound_free_s']:.3f} "
                   f"({r['ratio_bound_free']:.2f}) | {ours} | {_f(r.get('implied_e'), '{:.2f}')} | {goal} |")
    return "\n".join(out)


def bound_parser(description: str, goal_help: str, out_prefix: str) -> argparse.ArgumentParser:
    """The arguments the bound scripts share: a ``bench/serve_gpu.py`` result, the plan its ``shplb`` server
    ran, goals (``--goal LENGTH:RATIO``, repeatable) and ``--out``."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("serve_json", type=Path, help="a bench/serve_gpu.py result with a flashinfer run (batch 1)")
    ap.add_argument("plan_json", type=Path, help="the plan.json the shplb server ran (its budgets)")
    ap.add_argument("--goal", action="append", default=[], metavar="LENGTH:RATIO", help=goal_help)
    ap.add_argument("--out", type=Path, default=None, help=f"folder for {out_prefix}_<stem>.json and .md")
    return ap


def goals_of(given: list[str], default: list[str]) -> dict[int, float]:
    """``["65536:2.3", ...]`` → ``{65536: 2.3, ...}`` (``default`` when none is given)."""
    return dict((int(n), float(r)) for n, r in (g.split(":") for g in given or default))


def write_bound(res: dict, text: str, a: argparse.Namespace, doc: dict, out_prefix: str) -> None:
    """Print the table; with ``--out``, write ``<out_prefix>_<stem>.json`` (the rows and their sources) and
    ``.md`` (the table)."""
    res.update(serve_json=str(a.serve_json), plan_json=str(a.plan_json), date=doc.get("date"))
    print(text)
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        stem = a.serve_json.stem
        (a.out / f"{out_prefix}_{stem}.json").write_text(json.dumps(res, indent=1))
        (a.out / f"{out_prefix}_{stem}.md").write_text(text + "\n")


def main() -> None:
    ap = bound_parser(__doc__.split("\n\n")[0], "a TTFT ratio over FlashInfer to price (default 65536:2.3 and "
                      "131072:3, issue 15's)", "bound")
    ap.add_argument("--show-from", type=int, default=32768,
                    help="lengths shown, from (default %(default)d: the benchmark's plan runs stock prefill to 16K); "
                         "every FlashInfer length is fitted")
    a = ap.parse_args()
    doc = json.loads(a.serve_json.read_text())
    budgets = [[HeadBudget.from_dict(b) for b in layer] for layer in json.loads(a.plan_json.read_text())["budgets"]]
    res = bound_rows(doc, budgets, goals_of(a.goal, ["65536:2.3", "131072:3"]), a.show_from)
    write_bound(res, table(res), a, doc, "bound")


if __name__ == "__main__":
    main()
