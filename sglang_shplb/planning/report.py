"""Stage 6: the text report and PNG plots of a plan.

Text: per TP size and bucket, contiguous vs LPT vs S-HPLB predicted slowest/mean GPU attention time
(summed over layers; compute + unit overhead + exposed transfer), bubble fraction, predicted speedup over
contiguous, units and bytes moved per layer, replicated KV heads and bytes; the budgets' pattern mix and
density; the stability of the head needs; the eval summary when ``eval.json`` sits beside the plan
(``python -m sglang_shplb eval``).
Plots: budget heatmap (layers × heads), per-GPU stacked loads contiguous vs S-HPLB, elasticity curves
of a few heads, stability scatter, predicted speedup per bucket.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from sglang_shplb.core.buckets import Buckets
from sglang_shplb.core.patterns import HeadBudget, Pattern
from sglang_shplb.core.plan import Plan, load_plan
from sglang_shplb.evaluation.summary import load_eval, summary_lines
from sglang_shplb.planning.budget import BUDGETS_NAME, BudgetResult, Stability, load_budgets
from sglang_shplb.planning.cost_model import CostModel, load_cost_model, plan_cost_model
from sglang_shplb.planning.place import (compare_solvers, evaluate_placement, layer_inputs, piece_load,
                                        resolve_solve_opts, solve_plan_placements)
from sglang_shplb.planning.profile import ProfileResult, load_profile
from sglang_shplb.planning.quality import load_quality


def _fmt_ms(s: float) -> str:
    return f"{s * 1e3:9.3f}"


def comparison_table(rows: list[dict], buckets: Buckets) -> str:
    out = []
    for tp in sorted({r["tp"] for r in rows}):
        out.append(f"\nTP {tp}: predicted attention time per forward, summed over layers (ms), each layer's slowest "
                   f"rank: compute + unit overhead + exposed transfer (of which transfer: exposed); speedup = vs "
                   f"contiguous placement of the same budgets, vs dense = vs all heads dense, contiguous; units and "
                   f"MiB moved per layer: mean (max) over layers")
        out.append(f"{'bucket':>8} {'solver':>11} {'slowest':>9} {'mean':>9} {'exposed':>9} {'bubble':>7} "
                   f"{'speedup':>8} {'vs dense':>8} {'units/layer':>12} {'MiB/layer':>15} {'KV repl.':>8} "
                   f"{'repl. KB/tok':>12}")
        for r in (r for r in rows if r["tp"] == tp):
            kb = r.get("replicated_kv_bytes_per_token", 0.0) / 1024
            units, mib = r["units_per_layer"], [b / 2**20 for b in r["moved_bytes_per_layer"]]
            out.append(f"{_len(buckets.upper(r['bucket'])):>8} {r['solver']:>11} {_fmt_ms(r['slowest_s'])} "
                       f"{_fmt_ms(r['mean_s'])} {_fmt_ms(r['transfer_s'])} {r['bubble']:7.1%} "
                       f"{r['speedup_vs_contiguous']:7.2f}x {r.get('speedup_vs_dense', float('nan')):7.2f}x "
                       f"{np.mean(units):5.1f} ({max(units):4d}) {np.mean(mib):7.1f} ({max(mib):5.0f}) "
                       f"{r['replicated_kv_heads']:8d} {kb:12.2f}")
    return "\n".join(out)


def _len(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 else str(n)


def report_plan(plan_path, out_dir, calibration=None, quality: list[dict] | None = None) -> Path:
    """The report of a plan with what its folder holds beside it (``profile.json``, the stability in
    ``budgets.json``, ``quality.json`` unless ``quality`` is given, ``eval.json``), under the cost model of the
    ``calibration`` table if given, else the one the plan was solved with."""
    plan_path = Path(plan_path)
    plan = load_plan(plan_path)
    folder = plan_path if plan_path.is_dir() else plan_path.parent
    profile = load_profile(folder) if (folder / "profile.json").exists() else None
    stab = load_budgets(folder).stability if (folder / BUDGETS_NAME).exists() else None
    if quality is None:
        quality = load_quality(folder)
    cost = load_cost_model(calibration) if calibration else plan_cost_model(plan.meta)
    return write_report(Path(out_dir), plan, cost, None, profile, stab, quality, plan.meta.get("solve_options", {}),
                        evaluation=load_eval(folder))


def write_report(out_dir: Path, plan: Plan, cost: CostModel, budgets: BudgetResult | None = None,
                 profile: ProfileResult | None = None, stab: Stability | None = None,
                 quality: list[dict] | None = None, solve_opts: dict | None = None, log=print,
                 evaluation: dict | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spec, bk = plan.model, plan.buckets
    tps = plan.tp_sizes

    rows = [r for tp in tps for r in compare_solvers(spec, plan.budgets, bk, [tp], cost, ("contiguous", "lpt", "shplb"),
                                                      kv_dtype_bytes=2, **resolve_solve_opts(solve_opts or {}, tp))]
    # the all-dense model under SGLang's contiguous heads: what serving costs without any of this
    dense = [[HeadBudget.dense()] * spec.num_heads for _ in range(spec.num_layers)]
    dense_slowest = {(r["tp"], r["bucket"]): r["slowest_s"]
                     for r in compare_solvers(spec, dense, bk, tps, cost, ("contiguous",))}
    for r in rows:
        r["speedup_vs_dense"] = dense_slowest[(r["tp"], r["bucket"])] / r["slowest_s"]
    lines = [f"sglang_shplb plan report — {spec.architecture}, {spec.num_layers} layers, {spec.num_heads} q / "
             f"{spec.num_kv_heads} KV heads, head_dim {spec.head_dim}", f"cost model: {cost!r}"]
    counts: dict[str, int] = {}
    for layer in plan.budgets:
        for b in layer:
            counts[b.pattern.value] = counts.get(b.pattern.value, 0) + 1
    lines.append("budgets: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    lines.append("mean density per bucket: " + ", ".join(
        f"{_len(bk.upper(i))} {plan.mean_density(bk.upper(i)):.3f}" for i in range(len(bk))))
    if budgets is not None:
        lines.append(f"budget mode {budgets.mode}: worst head recall {budgets.min_recall:.3f}, mean density "
                     f"{budgets.mean_density:.3f} at {budgets.ref_len} tokens")
    if stab is not None:
        lines.append(f"stability (set A vs set B, tau {stab.tau}): Spearman rho {stab.spearman:.3f} "
                     f"(p {stab.pvalue:.1e}), same pattern family for {stab.same_family:.0%} of heads; needed "
                     f"density quartiles {np.percentile(stab.need_a, [25, 50, 75]).round(3).tolist()}")
    if quality:
        nd, ns = sum(q["dense_correct"] for q in quality), sum(q["sparse_correct"] for q in quality)
        same = sum(q["dense"] == q["sparse"] for q in quality)
        lines.append(f"\nquality, dense vs sparse prefill (plan budgets), same passkey prompts, same device and dtype: "
                     f"passkey found dense {nd}/{len(quality)}, sparse {ns}/{len(quality)}; identical answers "
                     f"{same}/{len(quality)}")
        for q in quality:
            lines.append(f"  {q['tokens']:>5} tokens  passkey {q['answer']}: dense {q['dense']!r:>10}  "
                         f"sparse {q['sparse']!r:>10}  next-token top-1 agree {q['top1_agree']}  "
                         f"last-logit rel. diff {q['logit_rel_diff']:.3f}")
    if evaluation:
        lines += ["", *summary_lines(evaluation)]
    lines.append(comparison_table(rows, bk))
    text = "\n".join(lines) + "\n"
    (out_dir / "report.txt").write_text(text)
    log(text)

    plot_budget_heatmap(plan.budgets, max(bk.edges[0], 8192), out_dir / "budgets_heatmap.png")
    tp_show = 4 if 4 in tps else tps[-1]
    b_show = len(bk) - 1
    plot_gpu_loads(plan, cost, tp_show, b_show, out_dir / f"gpu_loads_tp{tp_show}.png",
                   resolve_solve_opts(solve_opts or {}, tp_show))
    plot_speedups(rows, bk, out_dir / "speedup_by_bucket.png")
    if profile is not None:
        plot_elasticity(profile, out_dir / "elasticity_curves.png")
    if stab is not None:
        plot_stability(stab, out_dir / "stability.png")
    return out_dir / "report.txt"


def plot_budget_heatmap(budgets: list[list[HeadBudget]], seq_len: int, path: Path) -> None:
    import matplotlib.pyplot as plt

    dens = np.array([[b.density(seq_len) for b in layer] for layer in budgets])
    letters = {Pattern.DENSE: "D", Pattern.STREAMING: "S", Pattern.TOPK: "K", Pattern.VSLASH: "V"}
    L, H = dens.shape
    fig, ax = plt.subplots(figsize=(max(4, 0.45 * H + 2), max(4, 0.22 * L + 1.5)))
    im = ax.imshow(dens, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    if L * H <= 600:
        for li in range(L):
            for h in range(H):
                ax.text(h, li, letters[budgets[li][h].pattern], ha="center", va="center", fontsize=6,
                        color="white" if dens[li, h] < 0.6 else "black")
    ax.set_xlabel("query head")
    ax.set_ylabel("layer")
    ax.set_title(f"per-head density at {_len(seq_len)} tokens\n(D dense, S streaming, K top-k, V vertical-slash)")
    fig.colorbar(im, ax=ax, label="density")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_gpu_loads(plan: Plan, cost: CostModel, tp: int, bucket: int, path: Path, solve_opts: dict) -> None:
    """Per-GPU predicted time summed over layers, stacked by query head, contiguous vs S-HPLB."""
    import matplotlib.pyplot as plt

    spec, seq_len = plan.model, plan.buckets.upper(bucket)
    sols = {s: solve_plan_placements(spec, plan.budgets, plan.buckets, [tp], cost, s, **solve_opts)[tp][bucket]
            for s in ("contiguous", "shplb")}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    cmap = plt.get_cmap("tab20")
    for ax, (name, p) in zip(axes, sols.items()):
        per_head = np.zeros((tp, spec.num_heads))
        for li, lp in enumerate(p.layers):
            costs, prof = layer_inputs(spec, plan.budgets[li], cost, seq_len)
            for r, g in enumerate(lp.gpus):
                for piece in g:
                    per_head[r, piece.head] += piece_load(piece, costs, cost.piece_overhead, prof)
        bottom = np.zeros(tp)
        for h in range(spec.num_heads):
            ax.bar(range(tp), per_head[:, h] * 1e3, bottom=bottom * 1e3, color=cmap(h % 20), width=0.7,
                   label=f"head {h}" if spec.num_heads <= 16 else None)
            bottom += per_head[:, h]
        ev = evaluate_placement(p, spec, plan.budgets, cost, seq_len)
        ax.set_title(f"{name}: sum of per-layer slowest {ev.slowest_s * 1e3:.1f} ms (bars: compute)\n"
                     f"bubble {ev.summary()['bubble']:.0%}", fontsize=10)
        ax.set_xlabel("GPU rank")
        ax.set_xticks(range(tp))
    axes[0].set_ylabel("predicted attention time, all layers (ms)")
    if spec.num_heads <= 16:
        axes[1].legend(fontsize=7, ncol=2, loc="upper right")
    fig.suptitle(f"TP {tp}, bucket {_len(seq_len)}: per-GPU load over all layers, stacked by query head")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_speedups(rows: list[dict], bk: Buckets, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, tp in enumerate(sorted({r["tp"] for r in rows})):
        for solver, style in (("lpt", "--"), ("shplb", "-")):
            sel = [r for r in rows if r["tp"] == tp and r["solver"] == solver]
            ax.plot([r["bucket"] for r in sel], [r["speedup_vs_contiguous"] for r in sel], style, marker="o",
                    color=f"C{i}", label=f"{solver} TP{tp}")
    ax.set_xticks(range(len(bk)))
    ax.set_xticklabels([_len(e) for e in bk.edges])
    ax.set_xlabel("context bucket")
    ax.set_ylabel("predicted speedup of slowest GPU vs contiguous")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.legend(fontsize=8, ncol=2)
    ax.set_title("predicted attention speedup over SGLang's contiguous heads")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_elasticity(profile: ProfileResult, path: Path, n_heads: int = 4) -> None:
    """Recall vs density per pattern family for the most and least elastic heads."""
    import matplotlib
    import matplotlib.pyplot as plt

    ref = max(profile.lengths)
    pooled = profile.pooled("recall")[ref].numpy()  # [L, H, O]
    fams = ["streaming", "topk", "topk_oracle", "vslash"]
    dens = np.array([o.budget.density(ref) for o in profile.options])
    # rank heads by recall of the 10 %-density top-k option
    j = min((i for i, o in enumerate(profile.options) if o.family == "topk"),
            key=lambda i: abs(profile.options[i].budget.fraction - 0.1))
    order = np.argsort(pooled[..., j].ravel())
    picks = [order[0], order[len(order) // 3], order[2 * len(order) // 3], order[-1]][:n_heads]
    fig, axes = plt.subplots(1, len(picks), figsize=(3.4 * len(picks), 3.4), sharey=True)
    for ax, flat in zip(axes, picks):
        li, h = divmod(int(flat), profile.num_heads)
        for f in fams:
            idx = [i for i, o in enumerate(profile.options) if o.family == f]
            idx.sort(key=lambda i: dens[i])
            ax.plot(dens[idx], pooled[li, h, idx], marker=".", label=f)
        ax.set_title(f"layer {li} head {h}")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel(f"density at {_len(ref)}")
        ax.axhline(0.95, color="grey", lw=0.8, ls=":")
    axes[0].set_ylabel("attention recall")
    axes[-1].legend(fontsize=7)
    fig.suptitle("sparsity elasticity: least to most elastic heads")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_stability(stab: Stability, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    rng = np.random.default_rng(0)
    a = stab.need_a.ravel() * np.exp(rng.normal(0, 0.03, stab.need_a.size))  # jitter for ties
    b = stab.need_b.ravel() * np.exp(rng.normal(0, 0.03, stab.need_b.size))
    ax.scatter(a, b, s=10, alpha=0.6)
    lo = max(1e-3, min(a.min(), b.min()) * 0.8)
    ax.plot([lo, 1.2], [lo, 1.2], color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("density needed on calibration set A")
    ax.set_ylabel("density needed on calibration set B")
    ax.set_title(f"per-head need at recall >= {stab.tau}\nSpearman rho = {stab.spearman:.2f}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
