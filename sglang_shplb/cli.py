"""``python -m sglang_shplb``: the offline planning pipeline.

    plan     all stages on the embedded default model (or --model): profile → budget → place → report
    profile  per-head sparsity elasticity on calibration prompts        → OUT/profile.{json,safetensors}
    budget   head-adaptive budgets (+ stability) from a profile          → OUT/budgets.json
    refine   budgets re-spent on the heads whose sparsity changes answers → OUT/budgets.json, refine.json
    place    S-HPLB placements per TP size and context bucket            → OUT/plan.{json,safetensors}
    report   text report and PNG plots of a plan                         → OUT/report.txt, OUT/*.png
    eval     dense vs plan answers through real SGLang servers           → OUT/eval.{json,png}
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

DEFAULT_OUT = "./shplb-plan"
# stage -> (its input option, the file it reads there, the stage that writes that file)
STAGE_INPUTS = {"budget": ("profile", "profile.json", "profile"), "place": ("budgets", "budgets.json", "budget"),
                "refine": ("budgets", "budgets.json", "budget"),
                "report": ("plan", "plan.json", "place")}


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="Hugging Face causal-LM checkpoint directory "
                   "(default: the embedded SmolLM2-135M-Instruct, converted once into the cache)")
    p.add_argument("--cache-dir", default=None, help="where the converted default model is kept "
                   "(default $SHPLB_CACHE or ~/.cache/sglang_shplb)")


def _add_out(p: argparse.ArgumentParser, after_input: bool = False) -> None:
    if after_input:
        p.add_argument("--out", default=None, help="output folder (default: the input's folder)")
    else:
        p.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")


def _add_profile(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="torch device for the model (cpu: float32, cuda: bf16)")
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192],
                   help="calibration context lengths in tokens (at most the model's context; default 2048 8192)")
    p.add_argument("--sets", nargs="+", default=["A", "B"], choices=["A", "B"],
                   help="disjoint calibration sets; two are needed for the stability score (default A B)")
    p.add_argument("--per-length", type=int, default=1, help="prompts per length and set (default 1)")
    p.add_argument("--rows-per-block", type=int, default=4,
                   help="query rows sampled per 64-token block for the recall/error estimates (default 4)")
    p.add_argument("--num-layers", type=int, default=None, help="truncate the model to its first N layers (tests)")
    p.add_argument("--topk-tiles", type=int, nargs="+", default=[64], choices=[64, 128],
                   help="top-k selection granularities to profile: 64-token blocks and/or 128-token superblocks "
                        "(the 128 x 128 tile kernel; default 64)")


def _add_budget(p: argparse.ArgumentParser) -> None:
    from sglang_shplb.planning.budget import DEFAULT_DENSITY_TARGET, DEFAULT_TOPK_MIN_BLOCKS, NEEDLE_SCALE

    p.add_argument("--density-target", type=float, default=None,
                   help="meet this mean density (at the longest profiled length) while maximising the worst head's "
                        f"recall (default {DEFAULT_DENSITY_TARGET} unless --tau is given)")
    p.add_argument("--tau", type=float, default=None,
                   help="instead of a density target: the cheapest option keeping this recall, head by head")
    p.add_argument("--recall-rows", default="needle", choices=["needle", "question", "all"],
                   help="recall a budget must keep: all sampled rows' (all, the method before 2026-12-02), also "
                        "the question rows' (question), also the answer needle's share weighted by the head's "
                        "needle mass (needle, default)")
    p.add_argument("--topk-min-blocks", type=int, default=DEFAULT_TOPK_MIN_BLOCKS,
                   help="top-k heads keep at least this many 64-token blocks per query block (default "
                        "%(default)d; 0: the profile's floor, 4); refine keeps the floor of the budgets it starts from")
    p.add_argument("--needle-scale", type=float, default=NEEDLE_SCALE,
                   help=f"needle mass from which a head must keep all of its needle share (default {NEEDLE_SCALE})")


def _add_refine(p: argparse.ArgumentParser, in_plan: bool) -> None:
    from sglang_shplb.planning.calibration_data import DEFAULT_QUESTIONS, QUESTIONS
    from sglang_shplb.planning.refine import DEFAULT_REFINE_LENGTHS, DEFAULT_REFINE_PROMPTS, DEFAULT_REFINE_TO

    if in_plan:
        p.add_argument("--refine-to", type=float, default=DEFAULT_REFINE_TO, metavar="DENSITY",
                       help="after the budget stage, spend density up to DENSITY (mean, at the longest profiled "
                            "length) on the heads whose sparsity changes the model's answers (the refine stage; "
                            "default %(default)g; skipped where the budgets are already that dense)")
        p.add_argument("--no-refine", action="store_true", help="skip the refine stage (the budgets as chosen)")
    else:
        p.add_argument("--density-target", type=float, default=None,
                       help="mean density to reach (at the budgets' reference length)")
        p.add_argument("--until-match", action="store_true",
                       help="go on until the plan is right on every held-in prompt where dense is "
                            "(up to --max-density)")
        p.add_argument("--max-density", type=float, default=1.0, help="never past this mean density (default 1)")
    p.add_argument("--refine-step", type=float, default=0.05,
                   help="mean density spent per round; sensitivities are measured again after each "
                        "(default %(default)g)")
    p.add_argument("--refine-prompts", type=int, default=DEFAULT_REFINE_PROMPTS,
                   help="held-in prompts (default %(default)d)")
    p.add_argument("--refine-lengths", type=int, nargs="+", default=list(DEFAULT_REFINE_LENGTHS),
                   help="held-in prompt lengths, cycled (default %(default)s)")
    p.add_argument("--refine-questions", nargs="+", default=list(DEFAULT_QUESTIONS), choices=QUESTIONS,
                   help="what the held-in prompts ask, cycled in pairs (default: %(default)s)")


def _add_place(p: argparse.ArgumentParser) -> None:
    from sglang_shplb.planning.cost_model import DEFAULT_LINK_BYTES_PER_S, DEFAULT_UNIT_OVERHEAD_S

    p.add_argument("--tp", type=int, nargs="+", default=[2, 4, 8], help="TP sizes to solve (default 2 4 8)")
    p.add_argument("--buckets", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536, 131072],
                   help="context bucket upper edges, doubling powers of two (default 4K … 128K)")
    p.add_argument("--solver", default="shplb", choices=["shplb", "shplb_exact", "lpt", "contiguous"],
                   help="placement solver stored in the plan (default: the fast, home-aware S-HPLB heuristic)")
    p.add_argument("--calibration", default=None,
                   help="cost-model calibration table (JSON, schema shplb-calibration/1, written by "
                        "bench/prefill_sweep.py or bench/tile_calibration.py); default: the analytic cost model")
    p.add_argument("--max-replicated-kv", default="auto",
                   help="cap on extra KV-head copies per layer (memory): a number, 'auto' (TP - 1, what "
                        "cutting heavy heads across GPU boundaries needs; the default) or 'none'")
    p.add_argument("--time-limit", type=float, default=2.0,
                   help="shplb_exact: seconds per layer MILP; on the limit the best placement found is kept, "
                        "never worse than shplb (default %(default)g)")
    p.add_argument("--no-split", action="store_true", help="place whole heads only (no query-block splits)")
    p.add_argument("--equal-heads", action="store_true", help="every GPU gets the same number of query heads")
    p.add_argument("--link-gbps", type=float, default=DEFAULT_LINK_BYTES_PER_S / 1e9,
                   help="GPU-to-GPU link bandwidth per direction, GB/s (1e9 bytes/s), that work moved off its "
                        "home rank pays (default %(default)g: NCCL all-to-all over H100/H200 NVLink; pass a "
                        "measured value where one exists)")
    p.add_argument("--unit-overhead-us", type=float, default=DEFAULT_UNIT_OVERHEAD_S * 1e6,
                   help="fixed executor time of each unit of work away from the single-rank path, microseconds "
                        "(default %(default)g: an assumption, to be fitted on the GPU)")
    p.add_argument("--head-scales", default=None, metavar="JSON",
                   help="measured per-head cost multipliers (schema shplb-head-scales/1, written by "
                        "bench/head_parallel.py --plan on a GPU against the same cost model): the placement corrects "
                        "the cost model's prices where the device measured them, and takes the cuts a refinement "
                        "measured best where the file has them")
    _add_stock(p)


def _add_stock(p: argparse.ArgumentParser) -> None:
    from sglang_shplb.planning import stock_decision as sd

    p.add_argument("--sparse-margin", type=float, default=sd.DEFAULT_MARGIN,
                   help="a layer runs sparse in a (phase, bucket) only where its predicted sparse time is at most "
                        "this times the stock backend's; elsewhere the server runs the stock backend for the whole "
                        "layer (default %(default)g)")
    p.add_argument("--no-stock-fallback", action="store_true",
                   help="mark no layer stock by the times: every layer with sparse heads runs sparse in every "
                        "bucket (but the phase --stock-decode names)")
    p.add_argument("--stock-decode", action="store_true",
                   help="decode on the stock backend in every bucket and layer: sparse prefill only")
    p.add_argument("--prefill-layer-overhead-us", type=float, default=sd.DEFAULT_PREFILL_LAYER_OVERHEAD_S * 1e6,
                   help="host and launch time the sparse prefill path adds per layer, microseconds (default "
                        "%(default)g: measured on H100, planning/stock_decision.py)")
    p.add_argument("--decode-layer-overhead-us", type=float, default=sd.DEFAULT_DECODE_LAYER_OVERHEAD_S * 1e6,
                   help="time the sparse decode path adds per layer, microseconds (default %(default)g: "
                        "fitted to served decode on an H200, planning/stock_decision.py)")
    p.add_argument("--decode-batch", type=int, default=1,
                   help="requests the decode decision assumes step together (default 1, where sparse decode's fixed "
                        "cost weighs most; on an H200 the Llama-3-8B mixed plan's sparse decode was 0.96-1.01x "
                        "FlashInfer at batch 1 and 1.23-1.40x at batch 4, 32K-64K)")
    p.add_argument("--hbm-gbps", type=float, default=sd.DEFAULT_HBM_BYTES_PER_S / 1e9,
                   help="KV read bandwidth of decode, GB/s (default %(default)g: FlashInfer's on an H200, measured)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m sglang_shplb", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", metavar="COMMAND")
    p = sub.add_parser("plan", help="run every stage (default command)")
    _add_model(p), _add_out(p), _add_profile(p), _add_budget(p), _add_refine(p, in_plan=True), _add_place(p)
    p.add_argument("--eval-lengths", type=int, nargs="*", default=[2048],
                   help="passkey prompt lengths for the dense-vs-sparse check (empty to skip; default 2048)")
    p.add_argument("--eval-prompts", type=int, default=4, help="passkey prompts per length (default 4)")
    p = sub.add_parser("profile", help="stage 1: per-head sparsity elasticity")
    _add_model(p), _add_out(p), _add_profile(p)
    p = sub.add_parser("budget", help="stage 2: head-adaptive budgets from a profile")
    p.add_argument("--profile", default=DEFAULT_OUT,
                   help=f"folder or profile.json of the profile stage (default {DEFAULT_OUT})")
    _add_out(p, after_input=True), _add_budget(p)
    p = sub.add_parser("refine", help="stage 2b: budgets re-spent on the heads whose sparsity changes answers")
    p.add_argument("--budgets", default=DEFAULT_OUT,
                   help=f"folder or budgets.json of the budget stage (default {DEFAULT_OUT})")
    p.add_argument("--profile", default=None, help="folder or profile.json the budgets were chosen from "
                   "(default: the budgets' folder)")
    p.add_argument("--out", required=True, help="output folder (never the input's: the budgets it refines stay)")
    p.add_argument("--device", default="cpu", help="torch device for the model (cpu: float32, cuda: bf16)")
    p.add_argument("--num-layers", type=int, default=None, help="truncate the model to its first N layers (tests)")
    _add_model(p), _add_refine(p, in_plan=False)
    p = sub.add_parser("place", help="stage 3-5: cost model, placements, plan file")
    p.add_argument("--budgets", default=DEFAULT_OUT,
                   help=f"folder or budgets.json of the budget stage (default {DEFAULT_OUT})")
    _add_out(p, after_input=True), _add_place(p)
    p = sub.add_parser("report", help="stage 6: text report and plots")
    p.add_argument("--plan", default=DEFAULT_OUT, help=f"folder or plan.json (default {DEFAULT_OUT})")
    p.add_argument("--calibration", default=None, help="cost-model calibration table (as for place)")
    _add_out(p, after_input=True)
    from sglang_shplb.evaluation.tasks import TASKS

    p = sub.add_parser("eval", help="dense vs sparse answers on long-context tasks through real SGLang servers")
    p.add_argument("--plan", nargs="+", default=[DEFAULT_OUT],
                   help=f"folder or plan.json of the plan to serve; several plans share one dense run "
                        f"(default {DEFAULT_OUT})")
    _add_model(p)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="cpu: float32, dense on torch_native; cuda: bfloat16, dense on flashinfer")
    p.add_argument("--lengths", type=int, nargs="+", default=None,
                   help="prompt lengths in tokens (default 2K, 4K, ... under the model's limit, and the limit)")
    p.add_argument("--per-task", type=int, default=20, help="prompts per task and length (default 20)")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS), help="tasks (default all)")
    p.add_argument("--out", default=None,
                   help="output folder (default: the plan's folder; with several plans, OUT/<plan folder name>)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="answer tokens, all tasks (default: per task)")
    p.add_argument("--concurrency", type=int, default=1,
                   help="requests in flight per server (default 1: TTFT of a lone request)")
    p.add_argument("--parallel-servers", action="store_true",
                   help="start and query all servers at once (a GPU that holds them all; set their memory "
                        "with --server-args)")
    p.add_argument("--dense-backend", default=None,
                   help="the dense server's attention backend, also the shplb servers' stock backend "
                        "(default torch_native on CPU, flashinfer on CUDA)")
    p.add_argument("--server-args", default="",
                   help="more SGLang flags for every server, one string (e.g. '--mem-fraction-static 0.15')")
    return ap


# ---- stages ---------------------------------------------------------------------------------------

def cmd_profile(a) -> Path:
    from sglang_shplb.planning.model_store import resolve_model
    from sglang_shplb.planning.profile import default_options, profile_model, save_profile

    model = resolve_model(a.model, a.cache_dir)
    res = profile_model(model, a.lengths, tuple(a.sets), a.per_length, a.device, a.rows_per_block, a.num_layers,
                        options=default_options(topk_tiles=tuple(a.topk_tiles)))
    path = save_profile(res, a.out)
    print(f"profile of {res.num_layers} layers x {res.num_heads} heads at {res.lengths} tokens → {path}")
    return path


def budget_rule(a) -> tuple[float, float | None]:
    """(tau, density target) of the budget stage: the rule asked for, else the default recipe's density target.
    tau is also the stability report's threshold."""
    from sglang_shplb.planning.budget import DEFAULT_DENSITY_TARGET, DEFAULT_TAU

    if a.tau is not None and a.density_target is not None:
        raise SystemExit(f"--tau {a.tau} and --density-target {a.density_target} are two budget rules: give one")
    if a.tau is not None:
        return a.tau, None
    return DEFAULT_TAU, DEFAULT_DENSITY_TARGET if a.density_target is None else a.density_target


def cmd_budget(a) -> Path:
    from sglang_shplb.planning.budget import BudgetsFile, choose_budgets, save_budgets, stability
    from sglang_shplb.planning.profile import load_profile

    prof = load_profile(a.profile)
    if a.topk_min_blocks < 0:
        raise SystemExit(f"--topk-min-blocks must be >= 0, got {a.topk_min_blocks}")
    tau, density_target = budget_rule(a)
    res = choose_budgets(prof, tau, density_target, a.recall_rows, a.needle_scale, a.topk_min_blocks)
    stab = None
    if len(prof.sets) >= 2:
        stab = stability(prof, tau, rows=a.recall_rows, needle_scale=a.needle_scale)
        from sglang_shplb.planning.report import stability_text

        print(f"stability between calibration sets: {stability_text(stab)}, same family {stab.same_family:.0%}")
    path = save_budgets(BudgetsFile.of(prof, res, tau, stab), a.out)
    print(f"budgets ({res.mode}): {res.pattern_counts()}, mean density {res.mean_density:.3f} at {res.ref_len} "
          f"tokens, worst recall {res.min_recall:.3f} → {path}")
    return path


def cmd_refine(a, density_target=None, until_match=None) -> Path:
    from sglang_shplb.planning import refine as rf
    from sglang_shplb.planning.budget import load_budgets, save_budgets
    from sglang_shplb.planning.model_store import load_model, resolve_model
    from sglang_shplb.planning.profile import load_profile

    budgets = load_budgets(a.budgets)
    source = Path(a.budgets) if Path(a.budgets).is_dir() else Path(a.budgets).parent
    if Path(a.out).resolve() == source.resolve() and a.cmd == "refine":
        raise ValueError(f"--out {a.out} is the budgets' folder: refine writes beside, never over, its input")
    profile = load_profile(a.profile or source)
    model, tok = load_model(resolve_model(a.model, a.cache_dir), a.device, a.num_layers)
    held = rf.held_in_prompts(tok, a.refine_lengths, a.refine_prompts, tuple(a.refine_questions))
    print(f"refine: {len(held)} held-in prompts of {sorted({len(h.input_ids) for h in held})} tokens, dense answers")
    held = rf.dense_answers(model, tok, held)
    res = rf.refine_budgets(model, tok, budgets, profile, held,
                            density_target if density_target is not None else a.density_target, a.refine_step,
                            a.until_match if until_match is None else until_match,
                            getattr(a, "max_density", 1.0))
    path = save_budgets(rf.refined_file(budgets, res), a.out)
    log = rf.save_refine(res, held, a.out)
    last = res.rounds[-1]
    print(f"refined budgets: mean density {res.rounds[0].density:.3f} → {last.density:.3f} in "
          f"{len(res.rounds) - 1} rounds; held-in: plan right on {last.sparse_correct}, dense on "
          f"{res.dense_correct} of {res.prompts} → {path} ({log.name})")
    return path


def _solve_opts(a) -> dict:
    opts = {}
    cap = str(a.max_replicated_kv).lower()
    if cap != "none":
        if cap != "auto" and not cap.isdigit():
            raise SystemExit(f"--max-replicated-kv must be a number, 'auto' or 'none', got {a.max_replicated_kv!r}")
        opts["max_replicated_kv"] = cap if cap == "auto" else int(cap)
    if a.no_split:
        opts["allow_split_heads"] = False
    if a.equal_heads:
        opts["equal_heads"] = True
    if a.solver == "shplb_exact":
        opts["time_limit"] = a.time_limit
    return opts


def _stock_opts(a):
    from sglang_shplb.planning.stock_decision import StockOptions

    try:
        return StockOptions(margin=a.sparse_margin, prefill_layer_overhead_s=a.prefill_layer_overhead_us * 1e-6,
                            decode_layer_overhead_s=a.decode_layer_overhead_us * 1e-6,
                            hbm_bytes_per_s=a.hbm_gbps * 1e9, decode_batch=a.decode_batch,
                            enabled=not a.no_stock_fallback,
                            stock_phases=("decode",) if a.stock_decode else ())
    except ValueError as e:
        raise SystemExit(f"--sparse-margin / --*-layer-overhead-us / --hbm-gbps / --decode-batch: {e}") from None


def cmd_place(a) -> Path:
    from tqdm.auto import tqdm

    from sglang_shplb.core.buckets import Buckets
    from sglang_shplb.core.plan import save_plan
    from sglang_shplb.planning.budget import load_budgets
    from sglang_shplb.planning.cost_model import load_cost_model
    from sglang_shplb.planning.place import place_budgets
    from sglang_shplb.planning.rank_feedback import HeadScalesError, load_head_scales

    budgets = load_budgets(a.budgets)
    buckets = Buckets(tuple(a.buckets))
    if not a.link_gbps > 0 or a.unit_overhead_us < 0:
        raise SystemExit(f"--link-gbps must be > 0 and --unit-overhead-us >= 0, got {a.link_gbps}, "
                         f"{a.unit_overhead_us}")
    cost = load_cost_model(a.calibration, link_bytes_per_s=a.link_gbps * 1e9, unit_overhead_s=a.unit_overhead_us * 1e-6)
    head_scales = None
    if a.head_scales:
        try:
            head_scales = load_head_scales(a.head_scales, budgets.spec, budgets.budgets, buckets, cost.to_dict())
        except HeadScalesError as e:
            raise SystemExit(f"--head-scales: {e}") from None
        print(f"--head-scales: {head_scales.summary['entries']} measured (TP, bucket, layer) cost corrections, "
              f"{head_scales.summary['measured_cuts']} with measured cuts, from "
              f"{head_scales.summary.get('device', 'an unnamed device')}")
    bar = tqdm(total=len(a.tp) * len(buckets), desc="placing")

    def progress(jobs):
        for tp, b in jobs:
            bar.set_postfix_str(f"TP {tp}, bucket {buckets.upper(b)}")
            yield tp, b
            bar.update()

    try:
        plan = place_budgets(budgets, buckets, a.tp, cost, a.solver, _solve_opts(a), progress=progress,
                             stock_options=_stock_opts(a), head_scales=head_scales)
    except HeadScalesError as e:
        raise SystemExit(f"--head-scales: {e}") from None
    bar.close()
    path = save_plan(plan, a.out)
    for phase in ("prefill", "decode"):
        print(f"{phase}: layers on the stock backend per bucket " + ", ".join(
            f"{buckets.upper(b)}: {len(plan.stock_layers(phase, b))}/{plan.model.num_layers}"
            for b in range(len(buckets))) + (" (--no-stock-fallback)" if a.no_stock_fallback else ""))
    for tp in a.tp:
        sp = [p.predicted for p in plan.placements[tp]]
        print(f"TP {tp}: slowest GPU per bucket (ms) " + ", ".join(f"{x['slowest_s'] * 1e3:.2f}" for x in sp)
              + "; units per layer " + ", ".join(f"{sum(x['units_per_layer']) / len(x['units_per_layer']):.1f}"
                                                 for x in sp))
        if a.solver == "shplb_exact":
            proven = sum(x["proven_optimal_layers"] for x in sp)
            print(f"  {proven} of {len(sp) * plan.model.num_layers} layer MILPs proven optimal; the others stopped "
                  f"at --time-limit {a.time_limit:g} s with their best placement")
    print(f"plan solved in {plan.meta['solve_s']:.2f} s → {path}")
    return path


def cmd_report(a, quality=None) -> Path:
    from sglang_shplb.planning.report import report_plan

    path = report_plan(a.plan, a.out, a.calibration, quality)
    if a.cmd == "report":
        print("(no --model: the report cannot check that the plan is for the model you will serve)")
    print(f"report and plots → {path.parent}")
    return path


def cmd_eval(a) -> list[Path]:
    from sglang_shplb.evaluation.runner import EvalConfig, run_eval

    return run_eval(EvalConfig(plans=[Path(p) for p in a.plan], model=a.model, cache_dir=a.cache_dir,
                               device=a.device, lengths=a.lengths, per_task=a.per_task, tasks=a.tasks, out=a.out,
                               max_new_tokens=a.max_new_tokens, concurrency=a.concurrency,
                               parallel_servers=a.parallel_servers, server_args=tuple(shlex.split(a.server_args)),
                               dense_backend=a.dense_backend))


def cmd_plan(a) -> Path:
    from sglang_shplb.core.plan import load_plan
    from sglang_shplb.planning.budget import load_budgets
    from sglang_shplb.planning.model_store import resolve_model
    from sglang_shplb.planning.quality import compare_dense_sparse, save_quality

    t0 = time.time()
    model = resolve_model(a.model, a.cache_dir)
    a.model = str(model)
    print(f"[1/5] profile {model}")
    a.profile = cmd_profile(a)
    print("[2/5] budgets")
    a.budgets = cmd_budget(a)
    density = float(load_budgets(a.budgets).density.mean())
    if a.no_refine:
        print("[2b/5] refine skipped (--no-refine)")
    elif density >= a.refine_to - 1e-9:
        print(f"[2b/5] refine skipped: the budgets' mean density {density:.3f} is already at or above --refine-to "
              f"{a.refine_to}")
    else:
        print(f"[2b/5] refine the budgets from density {density:.3f} up to {a.refine_to} on the model's answers")
        a.profile, a.budgets = a.profile.parent, a.budgets.parent
        a.budgets = cmd_refine(a, density_target=a.refine_to, until_match=False)
    print("[3/5] placements")
    plan_path = cmd_place(a)
    quality = None
    if a.eval_lengths:
        print(f"[4/5] dense vs sparse on passkey prompts of {a.eval_lengths} tokens")
        quality = compare_dense_sparse(model, load_plan(plan_path).budgets, a.eval_lengths, a.eval_prompts,
                                       device=a.device, num_layers=a.num_layers)
        save_quality(quality, a.out)
    print("[5/5] report")
    a.plan = plan_path.parent
    report = cmd_report(a, quality)
    print(f"done in {time.time() - t0:.0f} s: plan {plan_path}, report {report}")
    return plan_path


def main(argv=None) -> int:
    ap = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["plan", *argv]
    a = ap.parse_args(argv)
    if a.cmd in STAGE_INPUTS:
        option, name, writer = STAGE_INPUTS[a.cmd]
        given = Path(getattr(a, option))
        expected = given if given.is_file() else given / name
        if not expected.is_file():
            print(f"python -m sglang_shplb {a.cmd}: error: --{option} {given}: {expected} does not exist "
                  f"(the {writer} stage writes it: python -m sglang_shplb {writer} --out FOLDER)", file=sys.stderr)
            return 2
        a.out = a.out or str(expected.parent)
    from sglang_shplb.planning.budget import BudgetsFileError

    try:
        {"plan": cmd_plan, "profile": cmd_profile, "budget": cmd_budget, "refine": cmd_refine, "place": cmd_place,
         "report": cmd_report, "eval": cmd_eval}[a.cmd](a)
    except BudgetsFileError as e:  # not the budget stage's file: the message alone, exit 1
        raise SystemExit(str(e)) from None
    except (FileNotFoundError, ValueError) as e:  # bad input: say what, no traceback
        print(f"python -m sglang_shplb {a.cmd}: error: {e}", file=sys.stderr)
        return 2
    return 0
