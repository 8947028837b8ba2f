"""SGLang plugin entry point (group ``sglang.srt.plugins``, name ``shplb``).

``register()`` runs in every SGLang process through ``load_plugins()`` (launcher, engine, each scheduler /
TP worker). It registers the ``shplb`` attention backend and its CLI choice, and these HookRegistry hooks:

* ``sglang.srt.utils.common.support_triton`` (AROUND): for ``shplb`` answer what the dense delegate
  answers, so on CPU SGLang treats ``shplb`` like ``torch_native`` (no Triton cache-index kernels).
* ``ForwardBatch.init_new`` (AFTER) and ``SchedulePolicy.calc_priority`` (AFTER): the context-bucket
  hook and the group-prefill-by-bucket policy (:mod:`sglang_shplb.scheduler.bucket_hook`).
* ``Scheduler.__init__`` (AFTER): turn the bucket hook on in schedulers that serve ``shplb`` (not where the backend
  factory serves a plan stock everywhere on the stock backend outright).
* ``DefaultPoolConfigurator._compute_cell_size`` (AFTER): count the decode page summaries in SGLang's per-token
  KV cell size (:func:`sglang_shplb.serving.backend.register_summary_budget_hook`), so the pool is sized with
  them. Registered here explicitly, before ``load_plugins()`` applies the hooks (idempotent).
* ``arg_groups.overrides._page_size_default`` (AFTER): SGLang's page-size default, so that a ``shplb`` server
  started by SGLang's own launcher (``SHPLB_PLAN`` set, no ``--page-size``) gets the 64-slot pages our launcher
  would ask for (:func:`page_size_default_hook`).
"""
from __future__ import annotations

import logging

from sglang_shplb.serving.version import check_sglang_version

logger = logging.getLogger(__name__)
_registered = False


def _dense_backend_for_current_device() -> str:
    from sglang.srt.utils import is_cpu

    from sglang_shplb.serving.config import ServingConfig
    cfg = ServingConfig.from_env()
    return cfg.dense_backend or ("torch_native" if is_cpu() else "flashinfer")


def support_triton_hook(original_fn, backend, *args, **kwargs):
    from sglang_shplb.serving.config import BACKEND_NAME
    if backend == BACKEND_NAME:
        backend = _dense_backend_for_current_device()
    return original_fn(backend, *args, **kwargs)


def _configured_plan():
    """The configured plan (through the one plan reader), or None: no plan, or one that does not load (the backend's
    load_plan, with the model, reports it as the server's error)."""
    from sglang_shplb.core.plan import PlanError, load_plan
    from sglang_shplb.serving.config import ServingConfig
    cfg = ServingConfig.from_env()
    if cfg.plan_path:
        try:
            return load_plan(cfg.plan_path)
        except PlanError as e:
            logger.warning("shplb: could not read the plan %s: %s", cfg.plan_path, e)
    return None


def after_scheduler_init(result, sched, *args, **kwargs):
    from sglang_shplb.core.buckets import Buckets
    from sglang_shplb.scheduler.bucket_hook import configure_buckets
    from sglang_shplb.serving.backend import stock_outright
    from sglang_shplb.serving.config import BACKEND_NAME, ServingConfig
    sa = getattr(sched, "server_args", None)
    if sa is None:
        return None
    names = {sa.attention_backend, getattr(sa, "prefill_attention_backend", None),
             getattr(sa, "decode_attention_backend", None)}
    if BACKEND_NAME not in names:
        return None
    cfg = ServingConfig.from_env()
    plan = _configured_plan()
    if stock_outright(plan, sa, cfg.dense_backend, cfg.always_backend) is not None:
        return None                                 # the backend factory serves the stock backend outright
    stats = configure_buckets(plan.buckets if plan is not None else Buckets(), cfg.bucket_log_every,
                              cfg.group_prefill_by_bucket, metrics=bool(getattr(sa, "enable_metrics", False)))
    logger.info("shplb: bucket hook on (edges %s, group prefill by bucket: %s, metrics: %s)",
                stats.buckets.edges, cfg.group_prefill_by_bucket, stats._counter is not None)
    return None


PAGE_SIZE_DEFAULT_TARGET = "sglang.srt.arg_groups.overrides._page_size_default"


def page_size_default_hook(result, view, *args, **kwargs):
    """After SGLang's page-size default: a ``shplb`` server without ``--page-size`` (``python -m
    sglang.launch_server --attention-backend shplb`` with ``SHPLB_PLAN`` set) gets ``--page-size 64`` where our
    launcher would add it (:func:`~sglang_shplb.serving.backend.page_size_args`, the one rule: CUDA, and the plan's
    decode page summaries or prefill heads cuDNN's block-sparse route may take); the log says why. A page size the
    user gives, another backend, no plan or a plan that does not load (the backend reports it, with the model): SGLang's
    default stands."""
    from sglang_shplb.core.plan import PlanError, load_plan
    from sglang_shplb.serving.backend import SUMMARY_PAGE_SIZE, page_size_args, serves_shplb
    from sglang_shplb.serving.config import ServingConfig
    path = ServingConfig.from_env().plan_path
    if view.page_size is not None or not serves_shplb(view) or not path:
        return None
    try:
        plan = load_plan(path)
    except PlanError:
        return None
    extra, why = page_size_args(plan, view, [])
    if not extra:
        return None
    logger.info("sglang_shplb: --page-size %d (%s)", SUMMARY_PAGE_SIZE, why)
    return {**(result or {}), "page_size": SUMMARY_PAGE_SIZE}


def register() -> None:
    """Entry point named in pyproject: ``shplb = "sglang_shplb.serving.plugin:register"``."""
    global _registered
    if _registered:
        return
    check_sglang_version()
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS, register_attention_backend
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType
    from sglang.srt.server_args import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices

    from sglang_shplb.scheduler.bucket_hook import install_hooks
    from sglang_shplb.serving.backend import create_shplb_backend, register_summary_budget_hook
    from sglang_shplb.serving.config import BACKEND_NAME

    if BACKEND_NAME not in ATTENTION_BACKENDS:
        register_attention_backend(BACKEND_NAME)(create_shplb_backend)
    if BACKEND_NAME not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([BACKEND_NAME])
    HookRegistry.register("sglang.srt.utils.common.support_triton", support_triton_hook, HookType.AROUND)
    HookRegistry.register("sglang.srt.managers.scheduler.Scheduler.__init__", after_scheduler_init, HookType.AFTER)
    HookRegistry.register(PAGE_SIZE_DEFAULT_TARGET, page_size_default_hook, HookType.AFTER)
    install_hooks()
    register_summary_budget_hook()   # idempotent: a no-op when importing backend already registered it
    _registered = True
