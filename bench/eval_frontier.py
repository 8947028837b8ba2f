"""The density/quality frontier of several eval runs against one dense run: per task, the paired
sparse − dense difference over all lengths (95 % bootstrap interval) against the plan's mean density at the
longest length, per budget method. Reports, never asserts.

  python bench/eval_frontier.py bench/results/eval_h200/plans --out bench/results/eval_h200
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np

from sglang_shplb.evaluation.summary import load_eval, paired_interval

LOSS_POINTS = 2.0  # the issue's bar: within 2 points of dense


def method_of(plan: str, methods: dict[str, str]) -> str:
    """The budget method a plan belongs to: as named with ``--method PLAN=METHOD``, else the plan's name less a
    ``_d30`` / ``_tau95`` suffix."""
    return methods.get(plan) or re.sub(r"_(tau\d+|d\d+)$", "", plan)


def frontier(runs: dict[str, dict], methods: dict[str, str] | None = None) -> list[dict]:
    """One row per (plan, task): density at the longest length, dense and sparse accuracy over every
    length, the paired difference and its interval, and whether the interval excludes -LOSS_POINTS."""
    rows = []
    for name, doc in runs.items():
        longest = max(doc["density"], key=int)
        for task in dict.fromkeys(r["task"] for r in doc["rows"]):
            sel = [r for r in doc["rows"] if r["task"] == task]
            ds, ss = [r["dense"]["score"] for r in sel], [r["sparse"]["score"] for r in sel]
            lo, hi = paired_interval(ds, ss)
            rows.append({"plan": name, "method": method_of(name, methods or {}), "task": task,
                         "density": doc["density"][longest], "n": len(sel), "dense": 100 * np.mean(ds),
                         "sparse": 100 * np.mean(ss), "diff": 100 * (np.mean(ss) - np.mean(ds)),
                         "ci_low": 100 * lo, "ci_high": 100 * hi,
                         "identical": sum(r["dense"]["answer"] == r["sparse"]["answer"] for r in sel),
                         "loses": 100 * hi < -LOSS_POINTS})
    return rows


def first_loss(rows: list[dict], method: str) -> dict[str, float | None]:
    """Per task, the highest density of ``method``'s plans whose interval lies below -LOSS_POINTS (the
    density where the task first loses more than that, coming down from dense), None if none does."""
    out = {}
    for task in dict.fromkeys(r["task"] for r in rows):
        losing = [r["density"] for r in rows if r["method"] == method and r["task"] == task and r["loses"]]
        out[task] = max(losing) if losing else None
    return out


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 3.4), sharey=True)
    for ax, task in zip(np.atleast_1d(axes), tasks):
        for m, marker in zip(methods, "osd^v"):
            sel = sorted((r for r in rows if r["task"] == task and r["method"] == m), key=lambda r: r["density"])
            x = [r["density"] for r in sel]
            y = [r["diff"] for r in sel]
            err = [[r["diff"] - r["ci_low"] for r in sel], [r["ci_high"] - r["diff"] for r in sel]]
            ax.errorbar(x, y, yerr=err, marker=marker, capsize=3, label=m)
        dense = next(r["dense"] for r in rows if r["task"] == task)
        ax.axhline(0, color="gray", lw=0.8)
        ax.axhline(-LOSS_POINTS, color="gray", lw=0.8, ls=":")
        ax.set_title(f"{task} (dense {dense:.0f} pts)")
        ax.set_xlabel("plan's mean density at the longest length")
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("sparse − dense (points, 95 % CI)")
    np.atleast_1d(axes)[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(title + f"; dotted: −{LOSS_POINTS:g} points", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def card_tag(settings: dict) -> str:
    """``NVIDIA H100 80GB HBM3`` → ``h100``; an eval without the record: ``h200`` on cuda (every GPU eval before
    2026-12-05 ran on an H200), else the device."""
    if settings["device"] != "cuda":
        return re.sub(r"[^a-z0-9]+", "", settings["device"])
    m = re.search(r"\b([A-Z]\d{2,4})\b", settings.get("accelerator", ""))
    return m.group(1).lower() if m else "h200"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("plans", type=Path, help="folder of plan folders, each with an eval.json")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--card", help="the card's short name for the PNG (h100, h200); default: from the eval's "
                                   "recorded accelerator (evals before 2026-12-05 recorded none: h200 for cuda)")
    ap.add_argument("--method", action="append", default=[], metavar="PLAN=METHOD",
                    help="count PLAN as one point of METHOD (plans made the same way at other densities)")
    a = ap.parse_args()
    methods = dict(m.split("=", 1) for m in a.method)
    runs = {p.name: doc for p in sorted(a.plans.iterdir()) if (doc := load_eval(p)) is not None}
    if not runs:
        raise SystemExit(f"no eval.json under {a.plans}")
    rows = frontier(runs, methods)
    s = next(iter(runs.values()))["settings"]
    lines = [f"| plan | task | density | n | dense | sparse | diff [95 % CI] | identical |", "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["task"], r["method"], -r["density"])):
        lines.append(f"| {r['plan']} | {r['task']} | {r['density']:.2f} | {r['n']} | {r['dense']:.1f} | {r['sparse']:.1f} "
                     f"| {r['diff']:+.1f} [{r['ci_low']:+.1f}, {r['ci_high']:+.1f}] | {r['identical']} |")
    for m in dict.fromkeys(r["method"] for r in rows):
        fl = first_loss(rows, m)
        lines.append(f"\nmethod {m}: the highest density at which the task loses more than {LOSS_POINTS:g} "
                     f"points (95 % interval below): "
                     + ", ".join(f"{t} {'none of the measured plans' if d is None else f'{d:.2f}'}" for t, d in fl.items()))
    text = "\n".join(lines)
    print(text)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "frontier.md").write_text(text + "\n")
    plot(rows, a.out / f"frontier_{a.card or card_tag(s)}.png",
         f"SmolLM2, {s.get('accelerator', s['device'])} {s['dtype']}, dense {s['dense_backend']} vs shplb, "
         "all lengths pooled")


if __name__ == "__main__":
    main()
