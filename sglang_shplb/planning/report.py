"""Stage 6: the text report and PNG plots of a plan.

Text: per TP size and bucket, contiguous vs LPT vs S-HPLB predicted slowest/mean GPU attention time
(summed over layers; compute + unit overhead + exposed transfer), bubble fraction, predicted speedup over
contiguous, units and bytes moved per layer, replicated KV heads and bytes; the budgets' pattern mix and
density; the stability of the head needs; the eval summary when ``eval.json`` sits beside the plan
(``python -m sglang_shplb eval``).
Plots: budget heatmap (layers × heads), per-GPU stacked loads contiguous vs S-HPLB, elasticity curves
of a few heads, stability scatter, predicted speedup per bucket. The plot functions return their Figure
(already saved and closed) so tests can read what they drew.

A TP size stock SGLang refuses for the model (:func:`tp_refusal`: query heads not divisible by TP, or KV
heads neither divisible by TP nor dividing it) is still planned, but its contiguous baseline is one SGLang
would not run: its speedups are marked ``*`` with a footnote in the text and the plots.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sglang_shplb.core.buckets import Buckets
from sglang_shplb.core.head_map import HeadMapError, check_tp
from sglang_shplb.core.model_spec import ModelSpec
from sglang_shplb.core.patterns import HeadBudget, Pattern
from sglang_shplb.core.plan import Plan, load_plan
from sglang_shplb.evaluation.summary import load_eval, summary_lines
from sglang_shplb.planning.budget import BUDGETS_NAME, DEFAULT_TAU, BudgetResult, Stability, load_budgets
from sglang_shplb.planning.cost_model import CostModel, load_cost_model, plan_cost_model
from sglang_shplb.planning.place import (compare_solvers, evaluate_placement, layer_inputs, piece_load,
                                        resolve_solve_opts, solve_plan_placements)
from sglang_shplb.planning.profile import ProfileResult, load_profile
from sglang_shplb.planning.quality import load_quality
from sglang_shplb.planning.refine import REFINE_NAME
from sglang_shplb.planning.stock_decision import sparse_vs_stock


def _fmt_ms(s: float) -> str:
    return f"{s * 1e3:9.3f}"


def tp_refusal(spec: ModelSpec, tp: int) -> str | None:
    """Why stock SGLang refuses TP ``tp`` for this model (its heads do not split over the ranks), or None
    when it runs it (:func:`~sglang_shplb.core.head_map.check_tp`, the rule the serving side enforces)."""
    try:
        check_tp(spec.num_heads, spec.num_kv_heads, tp)
    except HeadMapError:
        if spec.num_heads % tp:
            return f"TP {tp} does not divide its {spec.num_heads} query heads"
        return f"TP {tp} neither divides nor is a multiple of its {spec.num_kv_heads} KV heads"
    return None


def tp_footnote(spec: ModelSpec, tps) -> str | None:
    """One footnote for every TP size of ``tps`` stock SGLang refuses for ``spec``, or None."""
    bad = [tp for tp in sorted(tps) if tp_refusal(spec, tp)]
    if not bad:
        return None
    return (f"* stock SGLang refuses TP={', '.join(map(str, bad))} for this model ({spec.num_heads} q / "
            f"{spec.num_kv_heads} KV heads): the contiguous baseline is hypothetical")


def stability_text(stab: Stability) -> str:
    """The rank correlation of the heads' needs between sets A and B, or why there is none: a profile whose
    needs do not vary (a constant or random-weight model) has no rank correlation, so no rho."""
    flat = []
    for name, need in (("A", stab.need_a), ("B", stab.need_b)):
        need = np.asarray(need, dtype=float).ravel()
        if need.size == 0 or np.ptp(need) == 0:
            flat.append(f"set {name}" + (f" (every head needs density {need[0]:.3g})" if need.size else ""))
    if flat:
        return f"no variation in the needed density on {' and '.join(flat)}: no rank correlation"
    if not np.isfinite(stab.spearman):
        return "Spearman rho undefined"
    return f"Spearman rho {stab.spearman:.3f} (p {stab.pvalue:.1e})"


def comparison_table(rows: list[dict], buckets: Buckets, spec: ModelSpec | None = None) -> str:
    """Per TP size and bucket, the solvers' predicted times. With ``spec``, a TP size stock SGLang refuses
    for that model gets a ``*`` on its speedups and a note under its heading (:func:`tp_refusal`)."""
    out = []
    for tp in sorted({r["tp"] for r in rows}):
        why = tp_refusal(spec, tp) if spec is not None else None
        star = "*" if why else " "
        out.append(f"\nTP {tp}: predicted attention time per forward, summed over layers (ms), each layer's slowest "
                   f"rank: compute + unit overhead + exposed transfer (of which transfer: exposed); speedup = vs "
                   f"contiguous placement of the same budgets, vs dense = vs all heads dense, contiguous; units and "
                   f"MiB moved per layer: mean (max) over layers")
        out.append(f"{'bucket':>8} {'solver':>11} {'slowest':>9} {'mean':>9} {'exposed':>9} {'bubble':>7} "
                   f"{'speedup':>8} {'vs dense':>8} {'units/layer':>12} {'MiB/layer':>15} {'KV repl.':>8} "
                   f"{'repl. KB/tok':>12}")
        if why:
            out.insert(-1, f"* stock SGLang refuses TP={tp} for this model ({why}): the contiguous baseline is "
                           f"hypothetical, and so are the speedups marked *")
        for r in (r for r in rows if r["tp"] == tp):
            kb = r.get("replicated_kv_bytes_per_token", 0.0) / 1024
            units, mib = r["units_per_layer"], [b / 2**20 for b in r["moved_bytes_per_layer"]]
            out.append(f"{_len(buckets.upper(r['bucket'])):>8} {r['solver']:>11} {_fmt_ms(r['slowest_s'])} "
                       f"{_fmt_ms(r['mean_s'])} {_fmt_ms(r['transfer_s'])} {r['bubble']:7.1%} "
                       f"{r['speedup_vs_contiguous']:6.2f}x{star} "
                       f"{r.get('speedup_vs_dense', float('nan')):6.2f}x{star} "
                       f"{np.mean(units):5.1f} ({max(units):4d}) {np.mean(mib):7.1f} ({max(mib):5.0f}) "
                       f"{r['replicated_kv_heads']:8d} {kb:12.2f}")
    return "\n".join(out)


def stock_table(rows: list[dict]) -> str:
    """The plan's sparse-vs-stock decision (:func:`~sglang_shplb.planning.stock_decision.sparse_vs_stock`): per
    phase and bucket, the predicted attention time of one forward (TP 1) with every layer sparse, every layer
    on the stock backend, and as served (stock where the plan marks a layer; the marks also hold at the plan's
    other TP sizes, so a layer may be stock where TP 1 alone would run it sparse)."""
    out = ["\nsparse vs the stock backend, predicted attention ms per forward at TP 1 (prefill: one request; "
           "decode: one step), every layer sparse / every layer stock / as served, layers on stock (marks that "
           "hold at every TP size placed):"]
    for r in rows:
        out.append(f"  {r['phase']:>7} {_len(r['upper']):>5}: sparse {_fmt_ms(r['sparse_s']):>9}  stock "
                   f"{_fmt_ms(r['stock_s']):>9}  served {_fmt_ms(r['served_s']):>9}  ({r['n_stock']} layers stock, "
                   f"x{r['stock_s'] / r['served_s']:.2f} vs stock)")
    return "\n".join(out)


def refine_lines(doc: dict) -> list[str]:
    """The refine stage's rounds (``refine.json``): density, held-in prompts kept and right."""
    n = len(doc["prompts"])
    out = [f"\nbudgets refined on answers ({n} held-in prompts, dense right on {doc['dense_correct']}):"]
    for i, r in enumerate(doc["rounds"]):
        out.append(f"  round {i}: mean density {r['density']:.3f}, {r['upgraded']} heads upgraded, plan right on "
                   f"{r['sparse_correct']}, kept (right wherever dense is) {r['kept']}/{n}")
    return out


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
    refine = folder / REFINE_NAME
    return write_report(Path(out_dir), plan, cost, None, profile, stab, quality, plan.meta.get("solve_options", {}),
                        evaluation=load_eval(folder),
                        refine=json.loads(refine.read_text()) if refine.is_file() else None)


def write_report(out_dir: Path, plan: Plan, cost: CostModel, budgets: BudgetResult | None = None,
                 profile: ProfileResult | None = None, stab: Stability | None = None,
                 quality: list[dict] | None = None, solve_opts: dict | None = None, log=print,
                 evaluation: dict | None = None, refine: dict | None = None) -> Path:
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
        lines.append(f"stability (set A vs set B, tau {stab.tau}): {stability_text(stab)}, same pattern family "
                     f"for {stab.same_family:.0%} of heads; needed "
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
    if refine:
        lines += refine_lines(refine)
    if evaluation:
        lines += ["", *summary_lines(evaluation)]
    lines.append(stock_table(sparse_vs_stock(plan)))
    note = tp_footnote(spec, tps)
    if note:
        lines.append(note)
    hs = plan.meta.get("head_scales")
    if hs:
        cuts = hs.get("measured_cuts", 0)
        lines.append(f"the plan's placements were solved with measured head-cost corrections ({hs['entries']} "
                     f"(TP, bucket, layer) entries of {hs['file']}, {hs.get('device', 'device not named')})"
                     + (f", {cuts} of them holding the cuts a refinement measured best" if cuts else "")
                     + "; the solver comparison below prices with the cost model alone")
    lines.append(comparison_table(rows, bk, spec))
    text = "\n".join(lines) + "\n"
    (out_dir / "report.txt").write_text(text)
    log(text)

    plot_budget_heatmap(plan.budgets, max(bk.edges[0], 8192), out_dir / "budgets_heatmap.png")
    tp_show = 4 if 4 in tps else tps[-1]
    b_show = len(bk) - 1
    plot_gpu_loads(plan, cost, tp_show, b_show, out_dir / f"gpu_loads_tp{tp_show}.png",
                   resolve_solve_opts(solve_opts or {}, tp_show))
    plot_speedups(rows, bk, out_dir / "speedup_by_bucket.png", spec)
    if profile is not None:
        plot_elasticity(profile, out_dir / "elasticity_curves.png", tau=stab.tau if stab is not None else DEFAULT_TAU)
    if stab is not None:
        plot_stability(stab, out_dir / "stability.png")
    return out_dir / "report.txt"


def plot_budget_heatmap(budgets: list[list[HeadBudget]], seq_len: int, path: Path):
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
    return fig


_FAMILY_LABELS = {"streaming": "streaming: sink + recent window",
                  "topk": "topk: top-k blocks by pooled q·k (what the kernel runs)",
                  "topk_oracle": "topk_oracle: top-k blocks by the true attention mass (upper bound, not servable)",
                  "vslash": "vslash: vertical-slash (MInference)"}
MAX_HEAD_COLOURS = 10  # up to this many query heads the loads plot colours each head (tab10), else each family


def _log_ticks(axis, lo: float, hi: float) -> None:
    """Readable major ticks on a log ``axis`` spanning ``[lo, hi]``: 1-2-5 steps labelled as plain numbers
    (a log axis over less than a decade otherwise labels one tick, or none)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    decades = range(int(np.floor(np.log10(lo))) - 1, int(np.ceil(np.log10(hi))) + 1)
    cand = [m * 10.0 ** e for e in decades for m in (1, 2, 5)]
    ticks = [t for t in cand if lo <= t <= hi]
    if len(ticks) < 3:  # a narrow range: finer steps
        cand = [m * 10.0 ** e for e in decades for m in (1, 1.5, 2, 3, 5, 7)]
        ticks = [t for t in cand if lo <= t <= hi] or [lo, hi]
    axis.set_major_locator(FixedLocator(ticks))
    axis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:.3g}"))
    axis.set_minor_locator(NullLocator())


def plot_gpu_loads(plan: Plan, cost: CostModel, tp: int, bucket: int, path: Path, solve_opts: dict):
    """Per-GPU predicted time summed over layers, contiguous vs S-HPLB. A bar is one GPU: its compute stacked
    by query head (by pattern family when the model has more than :data:`MAX_HEAD_COLOURS` heads, so colours
    stay distinguishable), then its unit overhead + exposed transfer (hatched); its top is the GPU's time
    summed over layers, and each panel's title gives the tallest. The dashed line is the report's "slowest"
    (each layer's slowest GPU, summed over layers): above the tallest bar when the slowest GPU changes from
    layer to layer. Returns the Figure (saved to ``path`` and closed)."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    spec, seq_len = plan.model, plan.buckets.upper(bucket)
    sols = {s: solve_plan_placements(spec, plan.budgets, plan.buckets, [tp], cost, s, **solve_opts)[tp][bucket]
            for s in ("contiguous", "shplb")}
    by_head = spec.num_heads <= MAX_HEAD_COLOURS
    fams = [p.value for p in Pattern]
    keys = [f"head {h}" for h in range(spec.num_heads)] if by_head else fams
    colour = {k: plt.get_cmap("tab10")(i) for i, k in enumerate(keys)}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True, layout="constrained")
    top = 0.0
    for ax, (name, p) in zip(axes, sols.items()):
        stack = np.zeros((tp, len(keys)))  # seconds of compute per GPU and key, summed over layers
        for li, lp in enumerate(p.layers):
            costs, prof = layer_inputs(spec, plan.budgets[li], cost, seq_len)
            for r, g in enumerate(lp.gpus):
                for piece in g:
                    k = piece.head if by_head else fams.index(plan.budgets[li][piece.head].pattern.value)
                    stack[r, k] += piece_load(piece, costs, cost.piece_overhead, prof)
        ev = evaluate_placement(p, spec, plan.budgets, cost, seq_len)
        total = ev.loads.sum(axis=0)  # [tp] each GPU's time (compute + unit overhead + exposed transfer)
        extra = np.maximum(total - stack.sum(axis=1), 0.0)
        bottom = np.zeros(tp)
        for k, key in enumerate(keys):
            ax.bar(range(tp), stack[:, k] * 1e3, bottom=bottom * 1e3, color=colour[key], width=0.7,
                   edgecolor="white", linewidth=0.4)
            bottom += stack[:, k]
        ax.bar(range(tp), extra * 1e3, bottom=bottom * 1e3, width=0.7, facecolor="white", edgecolor="grey",
               hatch="///", linewidth=0.4)
        bars = (bottom + extra) * 1e3
        ax.axhline(ev.slowest_s * 1e3, color="black", ls="--", lw=1)
        ax.set_title(f"{name}: tallest bar {bars.max():.4g} ms (busiest GPU, all layers)\n"
                     f"dashed: each layer's slowest GPU, summed {ev.slowest_s * 1e3:.4g} ms; "
                     f"bubble {ev.summary()['bubble']:.0%}", fontsize=9.5)
        ax.set_xlabel("GPU rank")
        ax.set_xticks(range(tp))
        top = max(top, bars.max(), ev.slowest_s * 1e3)
    axes[0].set_ylim(0, top * 1.12)  # shared: headroom above the tallest bar and the dashed line
    axes[0].set_ylabel("predicted attention time, all layers (ms)")
    handles = [Patch(color=colour[k], label=k) for k in keys]
    handles += [Patch(facecolor="white", edgecolor="grey", hatch="///", label="unit overhead +\nexposed transfer"),
                Line2D([], [], color="black", ls="--", lw=1, label="sum over layers of\neach layer's slowest GPU")]
    fig.legend(handles=handles, loc="outside right upper", fontsize=8,
               title="compute by query head" if by_head else "compute by pattern family", title_fontsize=8)
    why = tp_refusal(spec, tp)
    star = "*" if why else ""
    fig.suptitle(f"TP {tp}{star}, bucket {_len(seq_len)}: per-GPU load over all layers, stacked by "
                 f"{'query head' if by_head else 'pattern family'}")
    if why:
        fig.supxlabel(f"* stock SGLang refuses TP={tp} for this model ({why}): the contiguous baseline is "
                      f"hypothetical", fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig


def plot_speedups(rows: list[dict], bk: Buckets, path: Path, spec: ModelSpec | None = None):
    """Predicted speedup of each solver over the contiguous heads per bucket and TP size; with ``spec``, a TP
    size stock SGLang refuses for that model is marked ``*`` (hollow markers) and footnoted. Returns the
    Figure (saved and closed)."""
    import matplotlib.pyplot as plt

    tps = sorted({r["tp"] for r in rows})
    fig, ax = plt.subplots(figsize=(8, 4.4), layout="constrained")
    for i, tp in enumerate(tps):
        hypo = spec is not None and tp_refusal(spec, tp) is not None
        for solver, style in (("lpt", "--"), ("shplb", "-")):
            sel = [r for r in rows if r["tp"] == tp and r["solver"] == solver]
            ax.plot([r["bucket"] for r in sel], [r["speedup_vs_contiguous"] for r in sel], style, marker="o",
                    color=f"C{i}", mfc="white" if hypo else f"C{i}", label=f"{solver} TP{tp}{'*' if hypo else ''}")
    ax.set_xticks(range(len(bk)))
    ax.set_xticklabels([_len(e) for e in bk.edges])
    ax.set_xlabel("context bucket")
    ax.set_ylabel("predicted speedup of slowest GPU vs contiguous")
    ax.axhline(1.0, color="grey", lw=0.8)
    fig.legend(loc="outside right upper", fontsize=8)
    ax.set_title("predicted attention speedup over SGLang's contiguous heads")
    note = tp_footnote(spec, tps) if spec is not None else None
    if note:
        fig.supxlabel(note.replace("* ", "* (hollow markers) ", 1), fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig


def plot_elasticity(profile: ProfileResult, path: Path, n_heads: int = 4, tau: float = DEFAULT_TAU):
    """Recall vs density per pattern family for the least to the most elastic heads; the dotted line is the
    recall target ``tau``. Returns the Figure (saved and closed)."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    ref = max(profile.lengths)
    pooled = profile.pooled("recall")[ref].numpy()  # [L, H, O]
    fams = [f for f in _FAMILY_LABELS if any(o.family == f for o in profile.options)]
    dens = np.array([o.budget.density(ref) for o in profile.options])
    # rank heads by recall of the 10 %-density top-k option
    j = min((i for i, o in enumerate(profile.options) if o.family == "topk"),
            key=lambda i: abs(profile.options[i].budget.fraction - 0.1))
    order = np.argsort(pooled[..., j].ravel())
    picks = [order[0], order[len(order) // 3], order[2 * len(order) // 3], order[-1]][:n_heads]
    fig, axes = plt.subplots(1, len(picks), figsize=(3.4 * len(picks), 4.2), sharey=True, squeeze=False,
                             layout="constrained")
    axes = axes[0]
    shown = dens[[i for i, o in enumerate(profile.options) if o.family in fams]]
    lo, hi = shown[shown > 0].min() * 0.85, min(1.0, shown.max() * 1.15)
    for ax, flat in zip(axes, picks):
        li, h = divmod(int(flat), profile.num_heads)
        for k, f in enumerate(fams):
            idx = [i for i, o in enumerate(profile.options) if o.family == f]
            idx.sort(key=lambda i: dens[i])
            ax.plot(dens[idx], pooled[li, h, idx], marker=".", color=f"C{k}")
        ax.set_title(f"layer {li} head {h}")
        ax.set_xscale("log")
        ax.set_xlim(lo, hi)
        _log_ticks(ax.xaxis, lo, hi)
        ax.grid(alpha=0.25)
        ax.set_xlabel(f"density at {_len(ref)} (log scale)")
        ax.axhline(tau, color="grey", lw=0.8, ls=":")
    axes[0].set_ylabel("attention recall")
    handles = [Line2D([], [], color=f"C{k}", marker=".", label=_FAMILY_LABELS[f]) for k, f in enumerate(fams)]
    handles.append(Line2D([], [], color="grey", lw=0.8, ls=":", label=f"recall target tau = {tau} of the budget stage"))
    fig.legend(handles=handles, loc="outside lower center", ncol=2, fontsize=8)
    fig.suptitle("sparsity elasticity: least to most elastic heads (ranked by recall of top-k at 10 % density)")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig


STABILITY_JITTER = 0.03  # log-normal sigma of the jitter that separates tied needs in the stability plot


def _jitter(need: np.ndarray, rng) -> np.ndarray:
    """``need`` times ``exp(N(0, STABILITY_JITTER))``; a point pushed above density 1 is mirrored below it
    (``need / factor``), so no point sits above the density it cannot exceed."""
    need = np.asarray(need, dtype=float).ravel()
    f = np.exp(rng.normal(0, STABILITY_JITTER, need.size))
    out = need * f
    return np.where(out > 1.0, np.minimum(need / f, 1.0), out)


def plot_stability(stab: Stability, path: Path):
    """Each head's needed density on set A vs set B (log-log), jittered as the axis labels say. Returns the
    Figure (saved and closed)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5), layout="constrained")
    rng = np.random.default_rng(0)
    a, b = _jitter(stab.need_a, rng), _jitter(stab.need_b, rng)
    ax.scatter(a, b, s=10, alpha=0.6)
    lo = max(1e-3, min(a.min(), b.min()) * 0.8)
    ax.plot([lo, 1.0], [lo, 1.0], color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, 1.12)
    ax.set_ylim(lo, 1.12)
    _log_ticks(ax.xaxis, lo, 1.12)
    _log_ticks(ax.yaxis, lo, 1.12)
    pct = f"{STABILITY_JITTER:.0%}"
    ax.set_xlabel(f"density needed on calibration set A\n(points jittered ~{pct} to separate ties, kept <= 1)")
    ax.set_ylabel(f"density needed on calibration set B (jittered ~{pct})")
    text = stability_text(stab)
    short = text.split(" (p ")[0].replace("Spearman rho ", "Spearman rho = ")
    if text.startswith("no variation"):
        short = "no variation between heads: no rank correlation"
    ax.set_title(f"per-head need at recall >= {stab.tau}\n{short}", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig
