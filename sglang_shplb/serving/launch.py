"""``python -m sglang_shplb.launch_server``: SGLang's launcher with a validated plan.

Takes every ``sglang.launch_server`` flag plus ours (see ``--help``, group "sglang_shplb"). Order:
load and validate the plan against the model's config and TP size (exit 3 naming the cause; no plan and
no ``--shplb-dense-fallback``: exit 4) before SGLang is even imported; parse every flag with SGLang's
parser (an unknown flag exits 2 naming it); where the plan runs every layer on the stock backend at the server's
context (prefill and decode, every bucket it reaches), serve that stock backend outright unless
``--shplb-always-backend`` (:func:`~sglang_shplb.serving.backend.stock_outright`); else select
``--attention-backend shplb``; on CUDA, when the plan
decodes top-k / vertical-slash heads (their decode page summaries are indexed by 64-slot KV-pool page) or has
prefill heads cuDNN's block-sparse route may take (it reads 64-slot pages in place), add ``--page-size 64`` if
no page size is given, and refuse another one where the summaries need it (exit 2 naming the flag); with
``--shplb-no-warmup`` set ``TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1`` unless set (:func:`bucketed_cudnn_plans`); hand
over to SGLang's launcher in this process.
"""
from __future__ import annotations

import argparse
import os
import sys

from sglang_shplb.core.patterns import DECODE_RESELECT_EVERY

EXIT_BAD_PLAN = 3
EXIT_NO_PLAN = 4
EXIT_BAD_ARGS = 2


def add_shplb_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sglang_shplb", "head-adaptive sparse attention (the shplb attention backend)")
    g.add_argument("--shplb-plan", metavar="PATH", default=None,
                   help="plan directory or plan.json made by `python -m sglang_shplb` for this model; "
                        "validated before SGLang starts")
    g.add_argument("--shplb-dense-fallback", action="store_true",
                   help="run without a plan: every head dense through the shplb backend (a documented "
                        "fallback; without it a missing plan is an error)")
    g.add_argument("--shplb-dense-backend", default=None, metavar="NAME",
                   help="stock SGLang backend for dense heads (default: torch_native on CPU, flashinfer on CUDA)")
    g.add_argument("--shplb-group-prefill-by-bucket", action="store_true",
                   help="scheduler policy: order waiting requests so a prefill batch shares one context bucket")
    g.add_argument("--shplb-bucket-log-every", type=int, default=200, metavar="N",
                   help="log the batch bucket histogram every N batches (0: never; exported as the metric "
                        "sglang:shplb_bucket_batches_total with --enable-metrics)")
    g.add_argument("--shplb-decode-reselect-every", type=_positive_int, default=DECODE_RESELECT_EVERY, metavar="N",
                   help="decode steps a top-k / vertical-slash head keeps the pages it selected (LServe's "
                        "reusable page selector; the steps between skip the selection launch's scoring); 1: "
                        "select at every step (default %(default)s)")
    g.add_argument("--shplb-always-backend", action="store_true",
                   help="serve through the shplb backend even where the plan runs every layer on the stock backend "
                        "at this server's context, prefill and decode (without it the launcher then serves the "
                        "stock backend outright, as `sglang.launch_server --attention-backend NAME` would)")
    g.add_argument("--shplb-no-warmup", action="store_true",
                   help="skip the start-up warm-ups (CUDA): of the sparse extend kernels (every distinct layer run "
                        "once per query / prefix length bucket, so that no request pays a Triton compile or a "
                        "cuDNN plan) and of the stock backend's layers (one request through SGLang's --warmups, "
                        "so that none pays FlashInfer's JIT); they then compile on first use")


def _positive_int(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def build_parser():
    from sglang.srt.server_args import ServerArgs
    parser = argparse.ArgumentParser(
        prog="python -m sglang_shplb.launch_server",
        description="SGLang 0.5.17 server with the shplb attention backend (per-head sparse budgets from a plan). "
                    "Every `sglang.launch_server` flag is accepted.")
    ServerArgs.add_cli_args(parser)
    add_shplb_args(parser)
    return parser


_OURS = ("shplb_plan", "shplb_dense_fallback", "shplb_dense_backend", "shplb_group_prefill_by_bucket",
         "shplb_bucket_log_every", "shplb_decode_reselect_every", "shplb_no_warmup", "shplb_always_backend")


def split_argv(argv: list[str]) -> tuple[argparse.Namespace, list[str], argparse.Namespace]:
    """(our options, SGLang's argv without ``--attention-backend``, every option parsed). Exits 2 on an unknown
    flag."""
    parser = build_parser()
    args = parser.parse_args(argv)  # full parse: unknown flags and bad values exit 2 with argparse's message
    ours = argparse.Namespace(**{k: getattr(args, k) for k in _OURS})
    ab = getattr(args, "attention_backend", None)
    if ab not in (None, "shplb"):
        parser.error(f"--attention-backend {ab}: this launcher serves with the shplb backend; choose the stock "
                     f"backend for dense heads with --shplb-dense-backend {ab}")
    rest, skip = [], 0
    for i, a in enumerate(argv):
        if skip:
            skip -= 1
            continue
        name = a.split("=", 1)[0]
        if name.replace("-", "_").lstrip("_") in _OURS:
            if "=" not in a and parser._option_string_actions[name].nargs != 0:   # a switch takes no value
                skip = 1
            continue
        if name == "--attention-backend":
            if "=" not in a:
                skip = 1
            continue
        rest.append(a)
    return ours, rest, args


def validate_plan(plan_path: str, model_path: str, tp_size: int):
    """Load + validate, the head map included; raises PlanError / HeadMapError with the cause."""
    from sglang_shplb.core.head_map import placement_work
    from sglang_shplb.core.plan import load_plan
    plan = load_plan(plan_path, model_path, tp_size)
    if tp_size > 1:
        for b in range(len(plan.buckets)):
            placement_work(plan.placement(tp_size, b), plan.model.num_heads, plan.model.num_kv_heads)
    return plan


def _pre_parse(argv: list[str]) -> argparse.Namespace:
    """Our flags plus the two SGLang flags the plan check needs, without importing SGLang."""
    p = argparse.ArgumentParser(add_help=False)
    add_shplb_args(p)
    p.add_argument("--model-path", "--model", dest="model_path", default=None)
    p.add_argument("--tp-size", "--tp", dest="tp_size", type=int, default=1)
    ns, _ = p.parse_known_args(argv)
    return ns


def bucketed_cudnn_plans(environ, warmup: bool) -> str | None:
    """Without the start-up warm-up, set :data:`~sglang_shplb.kernels.dense_pieces.CUDNN_BUCKETED_PLANS_ENV` to 1 in
    ``environ`` (this process and the scheduler processes SGLang starts from it) unless the user set it; the line to
    log, or None. With the warm-up, cuDNN's plans of the chunk-aligned shapes are built at start-up and cuDNN is
    kept to them (every other dense call on flash), so no request builds a plan and the switch is left off: it
    slows cuDNN's calls at steady state (the merged pieces 12-36 %, H100, ``bench/results/first_call/round17_*``;
    TTFT 1.8 / 2.6 % at 64K / 128K, ``bench/results/gpu_round28/``). Without the warm-up cuDNN plans any shape on
    the request that brings it: 1.1-3.1 s per new chunk shape without the switch, 59-125 ms with it (H100,
    2026-12-06)."""
    from sglang_shplb.kernels.dense_pieces import CUDNN_BUCKETED_PLANS_ENV
    if warmup or CUDNN_BUCKETED_PLANS_ENV in environ:
        return None
    environ[CUDNN_BUCKETED_PLANS_ENV] = "1"
    return (f"sglang_shplb: {CUDNN_BUCKETED_PLANS_ENV}=1 (no warm-up: cuDNN attention plans keyed by length bucket "
            f"where torch can, so a new sequence length's plan is cheaper; set it to 0 to opt out)")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from sglang_shplb.serving.version import SGLangVersionError, check_sglang_version
    try:
        check_sglang_version()
    except SGLangVersionError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_ARGS
    # 1. the plan, before anything of SGLang is imported or started
    from sglang_shplb.core.head_map import HeadMapError
    from sglang_shplb.core.plan import PlanError
    from sglang_shplb.serving.config import OUTRIGHT_MARK, ServingConfig
    pre = None if any(a in ("-h", "--help") for a in argv) else _pre_parse(argv)
    plan = None
    if pre is not None and pre.shplb_plan:
        if not pre.model_path:
            print("error: --model-path is required", file=sys.stderr)
            return EXIT_BAD_ARGS
        try:
            plan = validate_plan(pre.shplb_plan, pre.model_path, int(pre.tp_size or 1))
        except (PlanError, HeadMapError) as e:
            print(f"error: plan rejected, server not started: {type(e).__name__}: {e}", file=sys.stderr)
            return EXIT_BAD_PLAN
        except (OSError, ValueError, KeyError) as e:
            print(f"error: cannot validate the plan against {pre.model_path}: {e}", file=sys.stderr)
            return EXIT_BAD_PLAN
        print(f"sglang_shplb: plan {pre.shplb_plan} OK for {plan.model.architecture} "
              f"({plan.model.num_layers} layers x {plan.model.num_heads} heads, buckets {list(plan.buckets.edges)})",
              file=sys.stderr)
    elif pre is not None and not pre.shplb_dense_fallback:
        print("error: no plan given. Pass --shplb-plan PATH (make one with `python -m sglang_shplb`), or "
              "--shplb-dense-fallback to serve with every head dense.", file=sys.stderr)
        return EXIT_NO_PLAN
    # 2. every flag, with SGLang's parser (unknown flags exit 2 naming them)
    from sglang.srt.plugins import load_plugins
    load_plugins()  # registers the shplb backend choice (the installed entry point) before parsing
    from sglang_shplb.serving.plugin import register
    register()       # when running from a source tree without the entry point installed
    ours, rest, args = split_argv(argv)
    from sglang_shplb.serving.backend import page_size_args, server_context, stock_outright
    stock = stock_outright(plan, args, ours.shplb_dense_backend, ours.shplb_always_backend)
    if stock is not None:
        print(f"sglang_shplb: the plan runs every layer on the stock backend at context {server_context(plan, args)} "
              f"(prefill and decode, every bucket it reaches): serving with --attention-backend {stock} "
              f"{OUTRIGHT_MARK}", file=sys.stderr)
        return serve(rest + ["--attention-backend", stock], shplb=False)
    sgl_argv = rest + ["--attention-backend", "shplb"]
    cfg = ServingConfig(os.path.abspath(ours.shplb_plan) if ours.shplb_plan else None, ours.shplb_dense_fallback,
                        ours.shplb_dense_backend, ours.shplb_group_prefill_by_bucket, ours.shplb_bucket_log_every,
                        ours.shplb_decode_reselect_every, not ours.shplb_no_warmup, ours.shplb_always_backend)
    os.environ.update(cfg.to_env())
    note = bucketed_cudnn_plans(os.environ, cfg.warmup)
    if note:
        print(note, file=sys.stderr)
    if cfg.warmup:
        from sglang_shplb.serving import stock_warmup
        stock_warmup.register()                       # SGLang runs it before serving (--warmups)
        sgl_argv = stock_warmup.with_warmup(sgl_argv)
    try:
        extra, why = page_size_args(plan, args, argv)
    except ValueError as e:                      # ShplbPageSizeError, or a bad SHPLB_CUDNN_BLOCKS
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_ARGS
    if extra:
        print(f"sglang_shplb: {' '.join(extra)} ({why})", file=sys.stderr)
        sgl_argv = sgl_argv + extra
    return serve(sgl_argv, shplb=True)


def serve(sgl_argv: list[str], shplb: bool) -> int:
    """3. SGLang's launcher, in this process (for ``shplb``, after refusing the SGLang modes it does not support)."""
    from sglang.launch_server import run_server
    from sglang.srt.server_args import prepare_server_args
    from sglang.srt.utils import kill_process_tree

    from sglang_shplb.serving.modes import UnsupportedModeError, check_supported
    server_args = prepare_server_args(sgl_argv)
    if shplb:
        try:
            check_supported(server_args)
        except UnsupportedModeError as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_BAD_ARGS
    try:
        run_server(server_args)
    finally:
        kill_process_tree(os.getpid(), include_parent=False)
    return 0
