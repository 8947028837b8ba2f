"""What an eval run means: accuracy per task and length, the paired sparse − dense difference with a
95 % interval, TTFT; the text table and the accuracy-vs-length plot; ``eval.json`` I/O.

The interval is a paired percentile bootstrap over the prompts' score differences (10,000 resamples,
seeded): each resample draws prompts, not answers, so dense and sparse stay paired.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

EVAL_NAME = "eval.json"
PLOT_NAME = "eval.png"
BOOTSTRAP_RESAMPLES = 10_000


@dataclass(frozen=True)
class Cell:
    task: str
    length: int
    n: int
    dense: float        # accuracy in points (mean score x 100)
    sparse: float
    diff: float         # sparse - dense, points
    ci_low: float       # 95 % paired bootstrap interval of diff
    ci_high: float
    identical: int      # prompts whose two answers are the same text
    ttft_dense_s: float  # median
    ttft_sparse_s: float


def paired_interval(dense: list[float], sparse: list[float], level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of mean(sparse - dense), resampling prompts."""
    d = np.asarray(sparse, float) - np.asarray(dense, float)
    if d.size == 0:
        raise ValueError("no prompts to compare")
    means = np.random.default_rng(seed).choice(d, size=(BOOTSTRAP_RESAMPLES, d.size)).mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def summarize(rows: list[dict]) -> list[Cell]:
    """One cell per (task, length) in first-seen order; ``rows`` as ``eval.json`` holds them."""
    cells = []
    for task, length in dict.fromkeys((r["task"], r["length"]) for r in rows):
        sel = [r for r in rows if r["task"] == task and r["length"] == length]
        ds, ss = [r["dense"]["score"] for r in sel], [r["sparse"]["score"] for r in sel]
        lo, hi = paired_interval(ds, ss)
        cells.append(Cell(task, length, len(sel), 100 * float(np.mean(ds)), 100 * float(np.mean(ss)),
                          100 * float(np.mean(ss) - np.mean(ds)), 100 * lo, 100 * hi,
                          sum(r["dense"]["answer"] == r["sparse"]["answer"] for r in sel),
                          float(np.median([r["dense"]["ttft_s"] for r in sel])),
                          float(np.median([r["sparse"]["ttft_s"] for r in sel]))))
    return cells


def summary_doc(rows: list[dict]) -> list[dict]:
    return [asdict(c) for c in summarize(rows)]


def _k(n: int) -> str:
    return f"{n / 1024:g}K" if n >= 1024 else str(n)


def summary_lines(doc: dict) -> list[str]:
    """The eval's text table: accuracy per task x length, paired difference and interval, TTFT."""
    s = doc["settings"]
    card = f" ({s['accelerator']})" if "accelerator" in s else ""   # recorded since 2026-12-05
    lines = [f"eval ({doc['date']}): {s['device']}{card} {s['dtype']}, dense {s['dense_backend']} vs shplb with plan "
             f"{doc['plan']}, same prompts, greedy; accuracy in points (RULER string match), diff = sparse - dense "
             f"with a 95 % paired bootstrap interval",
             "mean density of the plan per length: " + ", ".join(f"{_k(int(n))} {d:.3f}"
                                                                 for n, d in doc["density"].items()),
             f"{'task':>10} {'length':>6} {'n':>4} {'dense':>6} {'sparse':>6} {'diff':>6} {'95% interval':>16} "
             f"{'same':>5} {'TTFT dense':>10} {'sparse':>7}"]
    for c in doc["summary"]:
        lines.append(f"{c['task']:>10} {_k(c['length']):>6} {c['n']:>4} {c['dense']:6.1f} {c['sparse']:6.1f} "
                     f"{c['diff']:+6.1f} [{c['ci_low']:+6.1f}, {c['ci_high']:+6.1f}] {c['identical']:>5} "
                     f"{c['ttft_dense_s']:9.2f}s {c['ttft_sparse_s']:6.2f}s")
    return lines


def save_eval(doc: dict, folder: Path) -> Path:
    path = Path(folder) / EVAL_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1))
    return path


def load_eval(folder) -> dict | None:
    """``folder/eval.json``, or None when there is none."""
    path = Path(folder) / EVAL_NAME
    return json.loads(path.read_text()) if path.exists() else None


def plot_accuracy(doc: dict, path: Path) -> None:
    """Accuracy vs length, dense vs sparse, one panel per task; the plan's density under each length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = doc["summary"]
    tasks = list(dict.fromkeys(c["task"] for c in cells))
    cols = min(3, len(tasks))
    rows = -(-len(tasks) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False, sharey=True)
    for ax, task in zip(axes.flat, tasks):
        sel = [c for c in cells if c["task"] == task]
        x = [c["length"] for c in sel]
        ax.plot(x, [c["dense"] for c in sel], "o-", color="C0", label=f"dense ({doc['settings']['dense_backend']})")
        ax.errorbar(x, [c["sparse"] for c in sel], fmt="s--", color="C3", label="shplb (plan)", capsize=3,
                    yerr=[[max(0.0, c["diff"] - c["ci_low"]) for c in sel],
                          [max(0.0, c["ci_high"] - c["diff"]) for c in sel]])
        ax.set_xscale("log", base=2)
        ax.set_xticks(x)
        ax.set_xticklabels([f"{_k(n)}\nρ {doc['density'][str(n)]:.2f}" for n in x])
        ax.minorticks_off()
        ax.set_ylim(-5, 105)
        ax.set_title(f"{task} (n = {', '.join(str(c['n']) for c in sel)})", fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(tasks):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("accuracy (points)")
    axes.flat[0].legend(fontsize=8, loc="lower left")
    s = doc["settings"]
    fig.suptitle(f"{Path(doc['model']).name}, {s['device']} {s['dtype']}: accuracy vs prompt length "
                 f"(ρ: plan's mean density; sparse bars: 95 % paired interval of the difference, placed on dense)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
