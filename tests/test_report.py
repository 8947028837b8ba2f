"""The plan report's plots and text say what they show: the loads plot's title number is a bar on it, with
headroom and its legend off the data; readable log ticks and explained curves; stability jitter kept in
range and "no variation" instead of ``rho = nan``; speedups for TP sizes stock SGLang refuses marked."""
import re
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg

from sglang_shplb.core.buckets import Buckets
from sglang_shplb.core.model_spec import ModelSpec
from sglang_shplb.core.patterns import HeadBudget
from sglang_shplb.core.plan import Plan
from sglang_shplb.planning.budget import Stability
from sglang_shplb.planning.cost_model import CostModel
from sglang_shplb.planning.place import solve_plan_placements
from sglang_shplb.planning.profile import ProfileResult, default_options
from sglang_shplb.planning.report import (comparison_table, plot_elasticity, plot_gpu_loads, plot_speedups,
                                          plot_stability, stability_text, tp_footnote, tp_refusal, write_report)

MIX = [HeadBudget.dense(), HeadBudget.streaming(64, 512), HeadBudget.topk(0.1), HeadBudget.vslash(0.2)]


def _spec(heads: int, kv: int, layers: int = 3) -> ModelSpec:
    return ModelSpec.from_config({"architectures": ["LlamaForCausalLM"], "num_hidden_layers": layers,
                                  "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": 64,
                                  "hidden_size": 64 * heads, "max_position_embeddings": 8192})


def _plan(heads: int = 9, kv: int = 3, tps=(2, 3), layers: int = 3) -> Plan:
    spec = _spec(heads, kv, layers)
    budgets = [[MIX[(li + h) % 4] for h in range(heads)] for li in range(layers)]
    buckets = Buckets((4096, 8192))
    pl = solve_plan_placements(spec, budgets, buckets, list(tps), CostModel.analytic(), "shplb")
    return Plan(spec, buckets, budgets, pl, {})


def _bar_tops(ax) -> np.ndarray:
    return np.array([p.get_y() + p.get_height() for p in ax.patches])


def _overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


# ---- per-GPU loads ----------------------------------------------------------------------------------

@pytest.mark.parametrize("heads, kv, tp", [(9, 3, 3), (32, 8, 4)])
def test_gpu_loads_title_is_the_tallest_bar_with_headroom_and_the_legend_off_the_axes(tmp_path, heads, kv, tp):
    plan = _plan(heads, kv, (tp,), layers=2)
    fig = plot_gpu_loads(plan, CostModel.analytic(), tp, 1, tmp_path / "loads.png", {})
    assert (tmp_path / "loads.png").stat().st_size > 0
    axes = fig.axes[:2]
    for ax in axes:
        tops = _bar_tops(ax)
        stated = float(re.search(r"tallest bar ([\d.e+-]+) ms", ax.get_title()).group(1))
        assert stated == pytest.approx(tops.max(), rel=1e-3)  # the number printed is a bar's top
        assert ax.get_ylim()[1] >= 1.05 * tops.max()  # headroom above the tallest bar
        dashed = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
        assert dashed and ax.get_ylim()[1] > dashed[0].get_ydata()[0]  # the dashed reference line shows too
    FigureCanvasAgg(fig).draw()  # the figure is closed: draw it on a canvas of its own
    leg = fig.legends[0].get_window_extent()
    assert not any(_overlaps(leg, ax.get_window_extent()) for ax in axes)
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    if heads <= 10:
        assert [f"head {h}" for h in range(heads)] == labels[:heads]
    else:  # many heads: one entry and one colour per pattern family, never repeated colours
        assert not any(label.startswith("head ") for label in labels)
        assert {"dense", "streaming", "topk", "vslash"} <= set(labels)
    colours = [tuple(h.get_facecolor()) for h in fig.legends[0].legend_handles[:-2]]
    assert len(set(colours)) == len(colours)


def test_gpu_loads_marks_a_tp_stock_sglang_refuses(tmp_path):
    plan = _plan(9, 3, (2, 3), layers=2)
    fig = plot_gpu_loads(plan, CostModel.analytic(), 2, 0, tmp_path / "l2.png", {})
    assert "TP 2*" in fig.get_suptitle() and "refuses TP=2" in fig.get_supxlabel()
    fig = plot_gpu_loads(plan, CostModel.analytic(), 3, 0, tmp_path / "l3.png", {})
    assert "*" not in fig.get_suptitle() and fig.get_supxlabel() == ""


# ---- TP sizes stock SGLang refuses -------------------------------------------------------------------

def test_tp_refusal_follows_sglang_head_split():
    smollm = _spec(9, 3)
    assert "9 query heads" in tp_refusal(smollm, 2)
    assert tp_refusal(smollm, 4) and tp_refusal(smollm, 8)
    assert tp_refusal(smollm, 3) is None and tp_refusal(smollm, 1) is None
    assert tp_refusal(_spec(32, 8), 16) is None  # KV heads replicated: runnable
    assert "4 KV heads" in tp_refusal(_spec(12, 4), 6)
    assert "TP=2, 4" in tp_footnote(smollm, [2, 3, 4]) and tp_footnote(smollm, [1, 3]) is None


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("rep")
    plan = _plan(9, 3, (2, 3), layers=2)
    write_report(out, plan, CostModel.analytic(), log=lambda *_: None)
    return out, plan


def test_report_text_marks_tp2_not_tp3(written):
    out, _ = written
    text = (out / "report.txt").read_text()
    tp2, tp3 = text.split("\nTP 2:")[1].split("\nTP 3:")
    assert "stock SGLang refuses TP=2 for this model" in tp2 and "hypothetical" in tp2
    assert "refuses" not in tp3
    rows2 = [ln for ln in tp2.splitlines() if re.match(r"\s+\d+K?\s+(contiguous|lpt|shplb)\s", ln)]
    rows3 = [ln for ln in tp3.splitlines() if re.match(r"\s+\d+K?\s+(contiguous|lpt|shplb)\s", ln)]
    assert len(rows2) == len(rows3) == 6  # 3 solvers x 2 buckets
    assert all(len(re.findall(r"\dx\*", ln)) == 2 for ln in rows2)  # both speedup columns starred
    assert not any("x*" in ln for ln in rows3)
    assert "refuses TP=2 for this model (9 q / 3 KV heads)" in text.split("\nTP 2:")[0]  # the header's footnote
    for name in ("gpu_loads_tp3.png", "speedup_by_bucket.png", "budgets_heatmap.png"):
        assert (out / name).stat().st_size > 0


def test_comparison_table_without_a_model_marks_nothing():
    rows = [{"tp": 2, "bucket": 0, "solver": "contiguous", "slowest_s": 1e-3, "mean_s": 1e-3, "transfer_s": 0.0,
             "bubble": 0.0, "speedup_vs_contiguous": 1.0, "units_per_layer": [0], "moved_bytes_per_layer": [0],
             "replicated_kv_heads": 0}]
    assert "*" not in comparison_table(rows, Buckets((4096,)))
    assert "1.00x*" in comparison_table(rows, Buckets((4096,)), _spec(9, 3))


def test_speedup_plot_marks_refused_tp(tmp_path):
    rows = [{"tp": tp, "bucket": b, "solver": s, "speedup_vs_contiguous": 1.0 + b}
            for tp in (2, 3) for b in (0, 1) for s in ("lpt", "shplb")]
    fig = plot_speedups(rows, Buckets((4096, 8192)), tmp_path / "s.png", _spec(9, 3))
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "shplb TP2*" in labels and "shplb TP3" in labels
    assert "refuses TP=2 " in fig.get_supxlabel() and "TP=2, 3" not in fig.get_supxlabel()
    fig = plot_speedups(rows, Buckets((4096, 8192)), tmp_path / "s.png", _spec(12, 6))  # TP 2 and 3 both run
    assert fig.get_supxlabel() == "" and not any("*" in t.get_text() for t in fig.legends[0].get_texts())


# ---- elasticity --------------------------------------------------------------------------------------

def test_elasticity_has_readable_log_ticks_and_explains_every_line(tmp_path):
    opts = default_options()
    g = torch.Generator().manual_seed(0)
    prof = ProfileResult(opts, [8192], 2, 3, recall={("A", 8192): torch.rand(2, 3, len(opts), generator=g)})
    fig = plot_elasticity(prof, tmp_path / "e.png", tau=0.9)
    FigureCanvasAgg(fig).draw()  # the figure is closed: draw it on a canvas of its own
    for ax in fig.axes:
        lo, hi = ax.get_xlim()
        shown = [t for t in ax.xaxis.get_major_ticks() if lo <= t.get_loc() <= hi and t.label1.get_text()]
        assert len(shown) >= 3
    labels = " | ".join(t.get_text() for t in fig.legends[0].get_texts())
    assert "topk_oracle: " in labels and "upper bound" in labels and "recall target tau = 0.9" in labels
    dotted = [ln for ln in fig.axes[0].get_lines() if ln.get_linestyle() == ":"]
    assert dotted and dotted[0].get_ydata()[0] == 0.9


# ---- stability ---------------------------------------------------------------------------------------

def _stab(a, b, rho=0.5, p=0.1) -> Stability:
    return Stability(rho, p, np.asarray(a, dtype=float), np.asarray(b, dtype=float), 1.0, 0.95)


@pytest.mark.parametrize("b", [np.full((2, 3), 0.25), np.linspace(0.1, 1, 6).reshape(2, 3)])
def test_no_variation_instead_of_nan_and_no_warning(tmp_path, b):
    stab = _stab(np.full((2, 3), 0.25), b, rho=float("nan"), p=float("nan"))  # a constant / random-weight profile
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        text = stability_text(stab)
        fig = plot_stability(stab, tmp_path / "st.png")
    assert "no variation" in text and "set A" in text and "nan" not in text
    assert "no variation" in fig.axes[0].get_title() and "nan" not in fig.axes[0].get_title()


def test_stability_text_with_variation():
    a = np.linspace(0.05, 1, 12)
    assert stability_text(_stab(a, a[::-1], rho=-1.0, p=0.0)).startswith("Spearman rho -1.000")


def test_stability_jitter_stays_at_or_below_density_one_and_is_stated(tmp_path):
    need = np.r_[np.ones(200), np.full(50, 0.99), np.linspace(0.02, 0.9, 50)]
    fig = plot_stability(_stab(need, need[::-1]), tmp_path / "st.png")
    ax = fig.axes[0]
    pts = ax.collections[0].get_offsets()
    assert pts.max() <= 1.0 and np.ptp(pts[:200, 0]) > 0  # ties still separated, none above 1
    assert "jitter" in ax.get_xlabel() and "jitter" in ax.get_ylabel()
    assert ax.get_ylim()[1] > 1.0


# ---- the CPU SGLang scaffolding keeps pip's conflict report out of the log ---------------------------

SCRIPT = Path(__file__).parent / "scaffolding" / "install_sglang_cpu.sh"


def test_install_script_turns_the_expected_pip_conflicts_into_one_line(tmp_path):
    log = tmp_path / "pip.log"
    expected = ["ERROR: pip's dependency resolver does not currently take into account all the packages that are "
                "installed. This behaviour is the source of the following dependency conflicts.",
                *[f"sglang 0.5.17 requires dep{i}, which is not installed." for i in range(33)],
                "sglang 0.5.17 requires torch==2.11.0, but you have torch 2.13.0+cpu which is incompatible."]
    log.write_text("\n".join(expected) + "\n")
    r = subprocess.run(["bash", str(SCRIPT), "--summarise-pip-log", str(log)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and r.stderr == ""
    assert len(r.stdout.splitlines()) == 1 and "34 unmet" in r.stdout and "torch 2.13.0" in r.stdout
    log.write_text("\n".join(expected + ["foo 1.0 requires bar, which is not installed."]) + "\n")
    r = subprocess.run(["bash", str(SCRIPT), "--summarise-pip-log", str(log)], capture_output=True, text=True,
                       timeout=60)
    assert r.stderr.splitlines() == [expected[0], "foo 1.0 requires bar, which is not installed."]  # not hidden


def test_report_shows_sparse_vs_stock_per_phase_and_bucket(written):
    from sglang_shplb.planning.stock_decision import sparse_vs_stock

    out, plan = written
    text = (out / "report.txt").read_text().split("sparse vs the stock backend")[1].split("\nTP ")[0]
    lines = [ln for ln in text.splitlines() if re.match(r"\s+(prefill|decode)\s", ln)]
    rows = sparse_vs_stock(plan)
    assert len(lines) == len(rows) == 2 * len(plan.buckets)
    for ln, r in zip(lines, rows):   # the numbers are the decision's, in ms
        assert f"sparse {r['sparse_s'] * 1e3:9.3f}" in ln and f"{r['n_stock']} layers stock" in ln


def test_refine_rounds_in_the_report():
    from sglang_shplb.planning.report import refine_lines

    doc = {"prompts": [{}] * 4, "dense_correct": 3,
           "rounds": [{"density": 0.2, "upgraded": 0, "sparse_correct": 1, "kept": 2},
                      {"density": 0.3, "upgraded": 17, "sparse_correct": 3, "kept": 4}]}
    lines = refine_lines(doc)
    assert "4 held-in prompts, dense right on 3" in lines[0]
    assert "round 1: mean density 0.300, 17 heads upgraded, plan right on 3" in lines[2] and "4/4" in lines[2]
