"""The ``shplb`` attention backend: SGLang's ``AttentionBackend`` with per-head budgets.

A stock backend (``flashinfer`` on CUDA, ``torch_native`` on CPU, or ``SHPLB_DENSE_BACKEND``) is kept
inside: layers whose heads (the plan's budgets for the heads this rank holds, :mod:`sglang_shplb.core.head_map`) are all
dense run on it unchanged, and its metadata, CUDA-graph state and everything else the runner asks of a
backend are used as they are. A layer with sparse heads takes:

* **on CUDA** the kernel path (:mod:`sglang_shplb.kernels.paged_layer`): the backend writes the batch's K/V to the token pool
  and runs *every* head of the layer on the sparse kernels (dense heads on SDPA / cuDNN or the dense
  Triton tiles, streaming heads on the rule kernel, top-k / vertical-slash heads on the block-index kernel;
  decode: one paged kernel with Quest page selection, CUDA-graph safe);
* **on CPU** the reference path: the stock backend computes all heads and writes K/V, then the sparse
  heads are recomputed from the pool through ``req_to_token`` by the PyTorch reference
  (:mod:`sglang_shplb.kernels.layer_reference`) and their columns replaced.

On either path, after the sparse heads are written, the last query rows of every request whose extend ends its
prompt (the dense tail, :data:`~sglang_shplb.core.patterns.DENSE_TAIL`: the question a prompt ends with; not the
earlier chunks of a chunked prefill) are recomputed dense in those heads (:mod:`sglang_shplb.kernels.dense_tail`).

At TP ≥ 2, a layer whose placement (the plan's, for the batch's bucket) moves work between ranks runs its
extend through :class:`~sglang_shplb.kernels.head_parallel.HeadParallelExtend` on SGLang's TP group (see
``docs/serving.md``); decode stays on the home heads.

**Stock layers.** Where the plan marks a layer stock for a phase and the batch's bucket (``Plan.stock``,
:mod:`sglang_shplb.planning.stock_decision`: sparse does not pay there), the whole layer runs on the stock
backend, before any head-parallel or kernel path. A layer that decodes sparse in some bucket keeps its
decode page summaries current through stock steps (rebuilt after a stock extend, the new token folded in
after an eager stock decode), so a batch that grows into a sparse bucket selects from complete summaries.
A captured decode CUDA graph is shared by every bucket (SGLang captures one per batch size, at the fill
length, and replays it for any length). A layer stock for decode in *every* bucket is captured on the stock
backend; a layer whose decode choice depends on the bucket is captured on the kernel path with a route flag
(dense on our Triton kernel where the bucket marks it stock: :meth:`ShplbAttnBackend._init_decode_routes`).
Eager decode follows the plan per bucket. Buckets above the one of the server's context length never occur and
do not count: a layer stock in every bucket the server can meet is captured on the stock backend, keeps no page
summaries, and (stock in both phases there) gets no kernels. (CUDA conditional nodes, which would let such a layer run the stock
backend's own decode in its stock buckets, are not captured by torch 2.11, the one SGLang 0.5.17 pins:
``bench/results/serve_h200/2026-12-04``.)

**Decode page summaries** (kernel path): per layer that decodes with top-k / vertical-slash heads, the key
min/max of every 64-slot page of SGLang's KV pool (``kmin/kmax [pool pages + 1, Hkv, d]``, read through
``req_to_token``), 1/64 of the layer's K+V and independent of ``--max-running-requests``. They need the pool
to hand out 64-token pages: the backend refuses another ``--page-size`` there (``python -m
sglang_shplb.launch_server`` sets ``--page-size 64`` when none is given). Their bytes are counted in SGLang's
per-token cell size (an AFTER hook on ``DefaultPoolConfigurator._compute_cell_size``, registered by the
plugin's ``register()`` before SGLang applies hooks, and when this module is imported), so the pool shrinks
by what they take instead of eating the slack.
"""
from __future__ import annotations

import logging
import math
from functools import cached_property
from typing import Iterable, Sequence

import torch

from sglang.srt.layers.attention.base_attn_backend import AttentionBackend

from sglang_shplb.core.head_map import LayerWork, placement_work, rank_heads
from sglang_shplb.core.plan import always_stock
from sglang_shplb.core.patterns import HeadBudget, Pattern, decode_budgets
from sglang_shplb.kernels.api import cudnn_candidates
from sglang_shplb.kernels.cudnn_blocks import route_mode, route_status, route_takes
from sglang_shplb.kernels.dense_pieces import keep_cudnn_to
from sglang_shplb.kernels.dense_tail import dense_tail
from sglang_shplb.kernels.head_parallel import ExchangeStats, HeadParallelExtend, KVRows, RankLayout
from sglang_shplb.kernels.layer_heads import LayerHeads
from sglang_shplb.kernels.layer_reference import prepare_decode_constants, sparse_attention, sparse_decode, sparse_heads
from sglang_shplb.kernels.reference import SelectionMemory
from sglang_shplb.kernels.paged_layer import (DecodeWorkspace, ExtendBatch, LayerKernels, layer_max_selected,
                                              selected_heads)
from sglang_shplb.kernels.triton_decode import page_summary_bytes_per_token, update_page_summaries
from sglang_shplb.kernels.tuned import device_identity, table_note
from sglang_shplb.kernels.warmup import POOL_INDEX_DTYPE, distinct_layers, extend_warmup, warm_up_extend
from sglang_shplb.scheduler.bucket_hook import ATTR as BUCKET_ATTR, batch_bucket, batch_prompt_ends
from sglang_shplb.scheduler.head_schedule import ExtendShape, layer_schedule
from sglang_shplb.serving.config import BACKEND_NAME, OUTRIGHT_MARK, ServingConfig
from sglang_shplb.serving.modes import check_supported

logger = logging.getLogger(__name__)


class ShplbPlanMissingError(RuntimeError):
    pass


SUMMARY_PAGE_SIZE = 64   # the decode page summaries cover 64-slot pages of the KV pool (core.patterns.BLOCK)
CELL_SIZE_TARGET = "sglang.srt.model_executor.pool_configurator.DefaultPoolConfigurator._compute_cell_size"


class ShplbPageSizeError(ValueError):
    pass


def summary_layers(plan, max_context: int | None = None) -> frozenset[int]:
    """Layers whose decode page summaries the kernel path keeps: a head that selects its pages at decode
    (top-k, vertical-slash, a streaming head below the decode floor: :func:`~sglang_shplb.core.patterns.decode_budget`) on some TP rank
    (every rank budgets the same set, so their pool sizes agree) and sparse decode in some bucket a server of
    context length ``max_context`` can meet (all buckets when ``None``)."""
    if plan is None:
        return frozenset()
    sel = {li for li, layer in enumerate(plan.budgets) if LayerHeads.of(decode_budgets(layer)).selected}
    return frozenset(sel) - plan.stock_everywhere("decode", max_context)


def cudnn_route_layers(plan, max_context: int | None = None, mode: str = "1") -> frozenset[int]:
    """Layers whose sparse prefill cuDNN's block-sparse route may take
    (:func:`~sglang_shplb.kernels.api.cudnn_candidates`) in some bucket a server of context length ``max_context``
    (default the plan's) can meet, under ``SHPLB_CUDNN_BLOCKS`` ``mode``: none at ``0``; at ``auto`` only where the
    largest call, a whole prefill of ``max_context`` tokens, pays
    (:func:`~sglang_shplb.kernels.cudnn_blocks.route_takes`). The route reads the KV pool in 64-slot pages."""
    if plan is None:
        return frozenset()
    ctx = max_context or plan.model.max_context
    routed = {li for li, layer in enumerate(plan.budgets)
              if (n := len(cudnn_candidates(LayerHeads.of(layer)))) and route_takes(mode, n, [ctx], [ctx])}
    return frozenset(routed) - plan.stock_everywhere("prefill", max_context)


def summary_cell_bytes(layers: frozenset[int], num_kv_heads: int, head_dim: int, kv_dtype: torch.dtype) -> int:
    """Decode page-summary bytes per pool token on one rank for ``layers`` (:func:`summary_layers`): added to
    SGLang's cell size."""
    return math.ceil(len(layers) * page_summary_bytes_per_token(num_kv_heads, head_dim, kv_dtype))


def serves_shplb(server_args) -> bool:
    return BACKEND_NAME in {getattr(server_args, a, None) for a in
                            ("attention_backend", "decode_attention_backend", "prefill_attention_backend")}


def cell_size_with_summaries(result, configurator, kvc, num_layers, *args, **kwargs):
    """AFTER hook on ``DefaultPoolConfigurator._compute_cell_size``: a ``shplb`` server on CUDA (the kernel
    path) adds its decode page summaries to the per-token cell size, so the pool is sized with them."""
    sa = kvc.server_args
    if not result or not serves_shplb(sa) or not str(getattr(sa, "device", "") or "").startswith("cuda"):
        return None
    cfg = ServingConfig.from_env()
    if not cfg.plan_path:
        return None
    from sglang.srt.runtime_context import get_parallel
    from sglang_shplb.core.plan import load_plan
    plan = load_plan(cfg.plan_path)
    mc = kvc.model_config
    layers = summary_layers(plan, int(mc.context_len))
    extra = summary_cell_bytes(layers, mc.get_num_kv_heads(get_parallel().attn_tp_size), mc.head_dim,
                               kvc.kv_cache_dtype)
    if extra:
        logger.info("shplb: KV cell size %d + %d bytes per token for the decode page summaries of %d layers",
                    result, extra, len(layers))
    return result + extra if extra else None


_budget_hook_registered = False


def register_summary_budget_hook() -> None:
    """Register :func:`cell_size_with_summaries` with SGLang's HookRegistry (idempotent). The plugin's
    ``register()`` calls it in every SGLang process, before ``load_plugins()`` applies the hooks and long
    before the pool is sized; importing this module also calls it (below), for code that builds the backend
    without the plugin."""
    global _budget_hook_registered
    if _budget_hook_registered:
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType
    HookRegistry.register(CELL_SIZE_TARGET, cell_size_with_summaries, HookType.AFTER)
    _budget_hook_registered = True


def server_page_size(model_runner) -> int:
    """The KV pool's page size (SGLang's ``--page-size``, 1 when unset)."""
    return int(getattr(model_runner, "page_size", None) or getattr(model_runner.server_args, "page_size", None) or 1)


def check_summary_page_size(page_size, what: str = "the shplb kernel path") -> None:
    """The decode page summaries are indexed by 64-slot pool page: refuse any other ``--page-size``."""
    if int(page_size or 1) != SUMMARY_PAGE_SIZE:
        raise ShplbPageSizeError(
            f"{what} selects decode pages (top-k, vertical-slash, short-window streaming heads) from page summaries "
            f"indexed by KV-pool page and needs "
            f"--page-size {SUMMARY_PAGE_SIZE} (got --page-size {page_size or 1}): start the server with "
            f"--page-size {SUMMARY_PAGE_SIZE} (python -m sglang_shplb.launch_server sets it when the flag is "
            f"not given)")


def page_size_args(plan, args, argv: list[str]) -> tuple[list[str], str]:
    """``(["--page-size", "64"], why)`` on CUDA when no ``--page-size`` is given and the plan keeps decode page
    summaries or has prefill heads cuDNN's block-sparse route may take at this context under ``SHPLB_CUDNN_BLOCKS``
    (:func:`cudnn_route_layers`): both read the KV pool in 64-slot pages; else
    ``([], "")``. Raises ``ShplbPageSizeError`` (naming the flag) for another page size where the summaries need
    64; the route does without it (the server logs it unavailable)."""
    if plan is None:
        return [], ""
    ctx = server_context(plan, args)
    if not server_device(args).startswith("cuda"):
        return [], ""                              # the CPU reference path reads the pool per token
    summaries = summary_layers(plan, ctx)
    why = [what for what, needs in (
        ("the plan decodes top-k / vertical-slash heads from page summaries indexed by 64-slot KV-pool page",
         summaries),
        ("cuDNN's block-sparse prefill reads 64-slot KV-pool pages in place; SHPLB_CUDNN_BLOCKS=0 turns it off",
         cudnn_route_layers(plan, ctx, route_mode()))) if needs]
    if not why:
        return [], ""
    if any(a == "--page-size" or a.startswith("--page-size=") for a in argv):
        if summaries:
            check_summary_page_size(getattr(args, "page_size", None), "this plan")
        return [], ""
    return ["--page-size", str(SUMMARY_PAGE_SIZE)], "; ".join(why)


def server_context(plan, args) -> int:
    """The context length a server started with SGLang's parsed ``args`` will have (``--context-length``, else the
    model's, which the plan was validated against)."""
    return int(getattr(args, "context_length", None) or plan.model.max_context)


def server_device(args) -> str:
    """The device a server started with ``args`` runs on (``--device``, else CUDA where there is one)."""
    device = getattr(args, "device", None)
    return str(device) if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")


def default_dense_backend(device: str) -> str:
    return "torch_native" if str(device).startswith("cpu") else "flashinfer"


def stock_outright(plan, args, dense_backend: str | None, always: bool = False) -> str | None:
    """The stock backend a server should run outright, or None for ``shplb``: when the plan runs every layer on the
    stock backend, prefill and decode, in every bucket this server's context can reach (:meth:`Plan.all_stock`),
    the shplb backend would only delegate to it (measured: 4.5 µs of host time per replayed decode step,
    17 µs per extend, ``bench/delegation_overhead.py``), so SGLang serves the stock one itself. ``always``
    (``--shplb-always-backend``, ``SHPLB_ALWAYS_BACKEND=1``) keeps ``shplb``. The one rule for our launcher, the
    backend factory and the scheduler hook of a server SGLang's own launcher started."""
    if always or plan is None or not plan.all_stock(server_context(plan, args)):
        return None
    return dense_backend or default_dense_backend(server_device(args))


def load_runner_plan(cfg: ServingConfig, model_path: str, tp_size: int):
    """The plan for this server, validated against the served model's config; None in dense fallback."""
    from sglang_shplb.core.plan import load_plan
    if cfg.plan_path:
        return load_plan(cfg.plan_path, model_path, tp_size)
    if cfg.dense_fallback:
        return None
    raise ShplbPlanMissingError(
        "the shplb attention backend needs a plan: start the server with `python -m sglang_shplb.launch_server "
        "--shplb-plan PATH ...` (or set SHPLB_PLAN), or pass --shplb-dense-fallback to run every head dense")


class ShplbAttnBackend(AttentionBackend):
    def __init__(self, model_runner, cfg: ServingConfig | None = None, plan=None, dense_backend: str | None = None):
        super().__init__()
        from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS

        self.cfg = cfg or ServingConfig.from_env()
        self.device = model_runner.device
        self.req_to_token_pool = model_runner.req_to_token_pool
        self.token_to_kv_pool = model_runner.token_to_kv_pool
        self.dense_backend_name = dense_backend or self.cfg.dense_backend or default_dense_backend(self.device)
        if self.dense_backend_name == BACKEND_NAME:
            raise ValueError("SHPLB_DENSE_BACKEND cannot be shplb itself")
        self.inner: AttentionBackend = ATTENTION_BACKENDS[self.dense_backend_name](model_runner)
        check_supported(model_runner.server_args)
        self.tp_size, self.tp_rank = model_runner.ps.tp_size, model_runner.ps.tp_rank
        self.pp_size = getattr(model_runner.ps, "pp_size", 1)
        self.max_context = int(model_runner.model_config.context_len)
        self.plan = plan if plan is not None else load_runner_plan(
            self.cfg, model_runner.model_config.model_path, self.tp_size)
        self.layer_budgets: dict[int, list[HeadBudget]] = {}
        self.current_bucket = 0
        self._init_stock_layers()
        # per bucket, the layers' work under the plan's placement for this TP size (None: all at home)
        self.work: list[tuple[LayerWork, ...] | None] = []
        self.head_parallel: HeadParallelExtend | None = None
        self.extend_shape: ExtendShape | None = None
        if self.plan is not None:
            spec = self.plan.model
            for li, layer in enumerate(self.plan.budgets):
                local = [layer[h] for h in rank_heads(spec.num_heads, self.tp_size, self.tp_rank)]
                self.layer_budgets[li] = local
            for budgets in self.layer_decode_budgets.values():
                prepare_decode_constants(budgets, self.device)
            if self.tp_size > 1:
                self._init_head_parallel(model_runner)
        n_sparse = sum(len(sparse_heads(b)) for b in self.layer_budgets.values())
        n_all = sum(len(b) for b in self.layer_budgets.values())
        self.kernels: dict[int, LayerKernels] = {}
        # the reference path's kept page selections (the kernel path keeps them on the device, per layer)
        self.selections = SelectionMemory(self.cfg.decode_reselect_every)
        self.decode_ws: DecodeWorkspace | None = None
        self.extend_batch: ExtendBatch | None = None
        self.extend_lens: tuple[list[int], list[int]] | None = None   # (q, kv) host lengths of this extend batch
        self.extend_ends: tuple[bool, ...] | None = None   # which of its requests end their prompt (None: all)
        self.route_by_bucket: torch.Tensor | None = None
        self.kernel_extend_buckets: frozenset[int] = frozenset()
        if str(self.device).startswith("cuda"):
            self._init_kernel_path(model_runner)
            self._init_decode_routes()
            logger.info("shplb: %s", table_note(*device_identity(torch.cuda.current_device())))
            if self.cfg.warmup and self.kernels:
                self._warm_up(model_runner)
        logger.info("shplb backend: %d of %d rank-local heads sparse (plan %s), TP rank %d/%d; all-dense layers "
                    "on %s, layers with sparse heads on the %s path", n_sparse, n_all,
                    self.cfg.plan_path or "none: dense fallback", self.tp_rank, self.tp_size,
                    self.dense_backend_name, "kernel" if str(self.device).startswith("cuda") else "reference")
        self.stats = {"extend_layers_sparse": 0, "decode_layers_sparse": 0, "extend_layers_head_parallel": 0,
                      "extend_layers_stock": 0, "decode_layers_stock": 0, "extend_mid_prompt": 0}
        if self.plan is not None and self.plan.stock is not None:
            logger.info("shplb stock fallback: layers on %s per bucket, prefill %s, decode %s; in decode CUDA "
                        "graphs %d layers stock (those stock in every bucket)", self.dense_backend_name,
                        {e: len(s) for e, s in zip(self.plan.buckets.edges, self.stock_layers["prefill"])},
                        {e: len(s) for e, s in zip(self.plan.buckets.edges, self.stock_layers["decode"])},
                        len(self.graph_decode_stock))

    def _init_stock_layers(self) -> None:
        """Per phase and bucket the layers the plan runs on the stock backend, and what follows from them for the
        buckets this server can meet (none above the one of its context length, :meth:`Plan.reachable_buckets`):
        the layers stock in every one of them per phase (inside a captured decode graph, shared by all buckets,
        a layer runs stock only if so) and the layers whose page summaries must stay current through stock
        steps (those that decode sparse in some reachable bucket)."""
        nb = len(self.plan.buckets) if self.plan is not None else 1
        self.stock_layers = {ph: [self.plan.stock_layers(ph, b) if self.plan is not None else frozenset()
                                  for b in range(nb)] for ph in ("prefill", "decode")}
        self.reachable = self.plan.reachable_buckets(self.max_context) if self.plan is not None else range(1)
        self.stock_everywhere = {ph: self.plan.stock_everywhere(ph, self.max_context) if self.plan is not None
                                 else frozenset() for ph in ("prefill", "decode")}
        self.graph_decode_stock = self.stock_everywhere["decode"]
        self.summarized_layers = frozenset(range(self.plan.model.num_layers) if self.plan is not None else ()) \
            - self.graph_decode_stock
        self.stock_extend = self.stock_layers["prefill"][0]
        self.stock_decode = self.stock_layers["decode"][0]

    def _init_head_parallel(self, model_runner) -> None:
        """Per bucket, the plan's placement for this TP size as layer work; the executor when any layer of
        any bucket computes work away from home (on SGLang's TP group: NCCL on CUDA, gloo on CPU)."""
        spec = self.plan.model
        for b in range(len(self.plan.buckets)):
            work = placement_work(self.plan.placement(self.tp_size, b), spec.num_heads, spec.num_kv_heads)
            self.work.append(None if all(w.at_home for w in work) else work)
        moved = [sum(not w.at_home for w in work) if work else 0 for work in self.work]
        if any(moved):
            from sglang.srt.distributed import get_tp_group
            lay = RankLayout(self.tp_rank, self.tp_size, spec.num_heads, spec.num_kv_heads, spec.head_dim)
            self.head_parallel = HeadParallelExtend(lay, get_tp_group().device_group, server_page_size(model_runner))
        logger.info("shplb head-parallel placement, TP rank %d/%d: layers computing work away from home per bucket "
                    "%s", self.tp_rank, self.tp_size, dict(zip(self.plan.buckets.edges, moved)))

    def _init_kernel_path(self, model_runner) -> None:
        mc = model_runner.model_config
        hkv = mc.get_num_kv_heads(self.tp_size)
        k0 = self.token_to_kv_pool.get_key_buffer(0)
        pool_tokens = k0.shape[0]
        keep = summary_layers(self.plan, self.max_context)   # the layers budgeted by cell_size_with_summaries
        # a layer stock in both phases in every bucket this server can meet never takes the kernel path
        never = self.stock_everywhere["prefill"] & self.stock_everywhere["decode"]
        page_size = server_page_size(model_runner)
        if any(LayerHeads.of(b).selected for li, b in self.layer_decode_budgets.items() if li in keep):
            check_summary_page_size(page_size)
        # decode reads one slot per 64-slot pool page (--page-size 64), else one per token
        pool_page = SUMMARY_PAGE_SIZE if page_size == SUMMARY_PAGE_SIZE else 1
        for li, budgets in self.layer_budgets.items():
            if sparse_heads(budgets) and li not in never:
                self.kernels[li] = LayerKernels(budgets, hkv, mc.head_dim, self.max_context, k0.dtype, self.device,
                                                pool_tokens=pool_tokens, decode=li in keep, pool_page_size=pool_page,
                                                request_slots=self.req_to_token_pool.req_to_token.shape[0],
                                                reselect_every=self.cfg.decode_reselect_every,
                                                decode_budgets=self.layer_decode_budgets[li])
        if self.kernels:
            logger.info("shplb: sparse prefill heads on cuDNN's block-sparse attention: %s",
                        route_status(k0, mc.head_dim, page_size))
        # buckets whose extend batches reach a kernel (a sparse layer, or summaries rebuilt after a stock one)
        self.kernel_extend_buckets = frozenset(
            b for b in range(len(self.stock_layers["prefill"]))
            if (self.kernels.keys() - self.stock_layers["prefill"][b]) or (self.kernels.keys() & self.summarized_layers))
        if self.kernels:
            max_sel = max(layer_max_selected(lk.decode_budgets, self.max_context) for lk in self.kernels.values())
            hq = len(next(iter(self.kernels.values())).budgets)
            self.decode_ws = DecodeWorkspace(hq, hkv, mc.head_dim, math.ceil(self.max_context / 64), max_sel, self.device,
                                             max(selected_heads(lk.decode_budgets) for lk in self.kernels.values()))
            mib = sum(lk.summary_bytes for lk in self.kernels.values()) / 2**20
            logger.info("shplb kernel path: %d layers, decode page summaries %.1f MiB for %d layers (%d pool "
                        "tokens / %d per page; counted in the KV cell size); page selections kept %d decode steps "
                        "(%.1f MiB for %d request slots)", len(self.kernels), mib,
                        sum(lk.kmin is not None for lk in self.kernels.values()), pool_tokens, SUMMARY_PAGE_SIZE,
                        self.cfg.decode_reselect_every, sum(lk.kept_bytes for lk in self.kernels.values()) / 2**20,
                        self.req_to_token_pool.req_to_token.shape[0])

    def _warm_up(self, model_runner) -> None:
        """Every shape bucket an extend batch of this server can fall in, met once before serving
        (:mod:`sglang_shplb.kernels.warmup`): queries up to the chunked-prefill size, prefixes up to the context
        length, per bucket the kernel-path layers the plan does not run stock there; cuDNN's plans for the
        chunk-aligned shapes only, and cuDNN kept to them from then on (:func:`~sglang_shplb.kernels.dense_pieces.
        keep_cudnn_to`). The head-parallel route (work moved between ranks) is not warmed."""
        sa = model_runner.server_args
        chunk = int(getattr(sa, "chunked_prefill_size", 0) or 0)
        max_q = min(chunk, self.max_context) if chunk > 0 else self.max_context
        stock, edges = self.stock_layers["prefill"], self.plan.buckets

        def layers_at(n: int) -> list[LayerKernels]:
            return [lk for li, lk in sorted(self.kernels.items()) if li not in stock[edges.index(n)]]

        k0 = self.token_to_kv_pool.get_key_buffer(0)
        shapes, planned = extend_warmup(max_q, self.max_context)
        logger.info("shplb warm-up: %d (query rows, prefix) shape buckets up to %d rows and %d tokens, %d layer "
                    "signatures (--shplb-no-warmup skips it)", len(shapes), max_q, self.max_context,
                    len(distinct_layers(list(self.kernels.values()))))
        try:
            res = warm_up_extend(layers_at, shapes, k0.dtype, self.device,
                                 r2t_cols=self.req_to_token_pool.req_to_token.stride(0),
                                 scale=next(iter(self.kernels.values())).d ** -0.5, planned=planned,
                                 log=logger.info)
        except torch.cuda.OutOfMemoryError as e:   # the pool took the memory: serve, compiling on first use
            torch.cuda.empty_cache()
            logger.warning("shplb warm-up stopped, out of GPU memory (%s); kernels not met yet compile on first "
                           "use. A lower --mem-fraction-static leaves room for it.", str(e).splitlines()[0])
            return
        torch.cuda.empty_cache()
        keep_cudnn_to(res["cudnn_shapes"])
        logger.info("shplb warm-up done: %d shapes, %d layer calls in %.1f s; cuDNN kept to the %d dense-call "
                    "shapes it planned (the chunk-aligned ones), other dense calls on flash", res["shapes"],
                    res["calls"], res["seconds"], len(res["cudnn_shapes"]))

    # ---- per-batch metadata ----------------------------------------------------------------------------
    def _bucket(self, forward_batch) -> int:
        """The batch's bucket: the hook's attribute, else from its host lengths by the same rule (SGLang 0.5.17
        hands the backend copies without the attribute: the eager runner's ``dataclasses.replace``, the decode
        CUDA-graph replay view, whose padding, the fill value, never exceeds the real maximum)."""
        b = getattr(forward_batch, BUCKET_ATTR, None)
        if b is not None or self.plan is None:
            return b or 0
        return batch_bucket(self.plan.buckets, getattr(forward_batch, "seq_lens_cpu", None))

    def _init_decode_routes(self) -> None:
        """Kernel-path layers stock for decode in some buckets but not all (:func:`routed_layers`): inside a decode
        CUDA graph (shared by every bucket) they take the kernel path with a route flag per layer, written per
        batch from the bucket (:attr:`LayerKernels.route`; dense on the same launches where the plan marks the
        layer stock)."""
        routed = routed_layers([self.stock_layers["decode"][b] for b in self.reachable], self.kernels)
        if not routed:
            return
        table = torch.zeros(len(self.stock_layers["decode"]), self.plan.model.num_layers, dtype=torch.int32)
        for b, stock in enumerate(self.stock_layers["decode"]):
            table[b, sorted(stock)] = 1
        self.route_by_bucket = table.to(self.device)
        self.decode_route = torch.zeros(self.plan.model.num_layers, dtype=torch.int32, device=self.device)
        for li in routed:
            self.kernels[li].route = self.decode_route[li:li + 1]
        logger.info("shplb decode routes: %d layers follow the bucket inside decode CUDA graphs by a route flag "
                    "(dense on the kernel path where the plan marks them stock)", len(routed))

    def _set_bucket(self, forward_batch) -> None:
        b = self.current_bucket = self._bucket(forward_batch)
        self.stock_extend = self.stock_layers["prefill"][b]
        self.stock_decode = self.stock_layers["decode"][b]
        if self.route_by_bucket is None or (
                str(self.device).startswith("cuda") and torch.cuda.is_current_stream_capturing()):
            return
        self.decode_route.copy_(self.route_by_bucket[b])   # before the replay, on its stream; never captured

    def init_forward_metadata(self, forward_batch):
        self._set_bucket(forward_batch)
        self.extend_batch = self.extend_shape = self.extend_lens = self.extend_ends = None
        mode = forward_batch.forward_mode
        if mode.is_extend() and forward_batch.extend_seq_lens_cpu:
            seq_lens = forward_batch.seq_lens_cpu.tolist()
            self.extend_lens = (list(forward_batch.extend_seq_lens_cpu), seq_lens)   # host lengths, once a forward
            # pipeline parallelism builds micro-batches ahead of their forwards, so the hook's last batch need not be
            # this one: there every request keeps its tail
            self.extend_ends = batch_prompt_ends(seq_lens) if self.pp_size == 1 else None
            if self.extend_ends is not None and not all(self.extend_ends) and not self.stats["extend_mid_prompt"]:
                logger.info("shplb: chunked prefill: %d of %d requests of this extend batch end mid-prompt; their "
                            "dense tails wait for the chunk that ends the prompt", self.extend_ends.count(False),
                            len(self.extend_ends))
            if self.extend_ends is not None:
                self.stats["extend_mid_prompt"] += self.extend_ends.count(False)
            if not self.kernels and self.selections.kept:   # the slots this batch (re)fills
                self.selections.forget(forward_batch.req_pool_indices.tolist())
            if self.current_bucket in self.kernel_extend_buckets:
                self.extend_batch = ExtendBatch.build(
                    self.req_to_token_pool.req_to_token, forward_batch.req_pool_indices,
                    forward_batch.extend_seq_lens_cpu, seq_lens)
            if self.head_parallel is not None and self.work[self.current_bucket] is not None:
                self.extend_shape = ExtendShape.of(forward_batch.extend_seq_lens_cpu, seq_lens)
                self.head_parallel.stats = ExchangeStats()   # the log line counts this batch
        return self.inner.init_forward_metadata(forward_batch)

    def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False):
        self._set_bucket(forward_batch)
        return self.inner.init_forward_metadata_out_graph(forward_batch, in_capture)

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int):
        self.inner.init_cuda_graph_state(max_bs, max_num_tokens)
        if self.decode_ws is not None:
            self.decode_ws.ensure(max_bs)

    # ---- delegated to the stock backend, spelled out (as SGLang's hybrid_attn_backend.py does) --------
    def init_forward_metadata_in_graph(self, forward_batch):
        return self.inner.init_forward_metadata_in_graph(forward_batch)

    def draft_extend_metadata_captured_in_graph(self) -> bool:
        return self.inner.draft_extend_metadata_captured_in_graph()

    def prepare_full_cuda_graph_chunked_prefix(self, *args, **kwargs):
        return self.inner.prepare_full_cuda_graph_chunked_prefix(*args, **kwargs)

    def init_forward_metadata_for_breakable_cuda_graph_capture(self, *args, **kwargs):
        return self.inner.init_forward_metadata_for_breakable_cuda_graph_capture(*args, **kwargs)

    def prepare_forward_metadata_for_breakable_cuda_graph_replay(self, *args, **kwargs):
        return self.inner.prepare_forward_metadata_for_breakable_cuda_graph_replay(*args, **kwargs)

    def get_cuda_graph_seq_len_fill_value(self):
        return self.inner.get_cuda_graph_seq_len_fill_value()

    def on_after_cuda_graph_warmup(self):
        return self.inner.on_after_cuda_graph_warmup()

    def init_cpu_graph_state(self, *args, **kwargs):
        return self.inner.init_cpu_graph_state(*args, **kwargs)

    def init_forward_metadata_capture_cpu_graph(self, *args, **kwargs):
        return self.inner.init_forward_metadata_capture_cpu_graph(*args, **kwargs)

    def get_cpu_graph_seq_len_fill_value(self):
        return self.inner.get_cpu_graph_seq_len_fill_value()

    def verify_mask(self):
        return self.inner.verify_mask()

    def update_verify_buffers_to_fill_after_draft(self, *args, **kwargs):
        return self.inner.update_verify_buffers_to_fill_after_draft(*args, **kwargs)

    def get_indexer_metadata(self, layer_id: int, forward_batch):
        return self.inner.get_indexer_metadata(layer_id, forward_batch)

    def support_triton(self):
        return self.inner.support_triton()

    @property
    def forward_metadata(self):
        return self.inner.forward_metadata

    @forward_metadata.setter
    def forward_metadata(self, value):
        self.inner.forward_metadata = value

    @property
    def max_context_len(self):
        return self.inner.max_context_len

    @property
    def needs_cpu_seq_lens(self) -> bool:
        return getattr(self.inner, "needs_cpu_seq_lens", True)

    @property
    def use_captured_forward_metadata_for_breakable_cuda_graph(self) -> bool:
        return getattr(self.inner, "use_captured_forward_metadata_for_breakable_cuda_graph", False)

    @property
    def supports_full_cuda_graph_chunked_prefix(self) -> bool:
        return getattr(self.inner, "supports_full_cuda_graph_chunked_prefix", False)

    @property
    def supports_ragged_verify_graph(self) -> bool:
        return getattr(self.inner, "supports_ragged_verify_graph", False)

    # ---- forward ----------------------------------------------------------------------------------
    @cached_property
    def layer_decode_budgets(self) -> dict[int, list[HeadBudget]]:
        """What decode follows per layer: :func:`~sglang_shplb.core.patterns.decode_budgets` of the rank-local
        budgets (a streaming head below the decode floor selects Quest pages)."""
        return {li: decode_budgets(b) for li, b in self.layer_budgets.items()}

    def _budgets(self, layer) -> list[HeadBudget] | None:
        b = self.layer_budgets.get(layer.layer_id)
        if b is None or len(b) != layer.tp_q_head_num:
            if b is not None:
                raise RuntimeError(f"shplb: layer {layer.layer_id} has {layer.tp_q_head_num} heads on this rank, "
                                   f"the plan's head map gives {len(b)} (SGLang padded the heads for TP "
                                   f"{self.tp_size}?)")
            return None
        return b if any(x.pattern is not Pattern.DENSE for x in b) else None

    def _kernel_io(self, q, k, v, layer, forward_batch, save_kv_cache):
        """Kernel path prologue: check the head map, write the new K/V to the pool, give ``[T, Hq, d]``
        views of q and a fresh output."""
        self._budgets(layer)
        if save_kv_cache and k is not None:
            self.token_to_kv_pool.set_kv_buffer(layer, forward_batch.out_cache_loc, k, v)
        q3 = q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim)
        return q3, q.new_empty(q3.shape[0], layer.tp_q_head_num, layer.v_head_dim)

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        if layer.layer_id in self.stock_extend and not layer.is_cross_attention:
            return self._extend_stock(q, k, v, layer, forward_batch, save_kv_cache, **kwargs)
        if self.extend_shape is not None and not layer.is_cross_attention:
            work = self.work[self.current_bucket][layer.layer_id]
            if not work.at_home:
                return self._extend_head_parallel(q, k, v, layer, forward_batch, save_kv_cache, work)
        lk = self.kernels.get(layer.layer_id)
        if lk is not None and not layer.is_cross_attention and self.extend_batch is not None:
            q3, o = self._kernel_io(q, k, v, layer, forward_batch, save_kv_cache)
            lk.extend(q3, k.reshape(-1, lk.hkv, layer.qk_head_dim), v.reshape(-1, lk.hkv, layer.v_head_dim),
                      self.token_to_kv_pool.get_key_buffer(layer.layer_id),
                      self.token_to_kv_pool.get_value_buffer(layer.layer_id), self.extend_batch, layer.scaling, o)
            self._dense_tail(q3, o, layer, forward_batch)
            self.stats["extend_layers_sparse"] += 1
            return o.view(q3.shape[0], -1)
        o = self.inner.forward_extend(q, k, v, layer, forward_batch, save_kv_cache=save_kv_cache, **kwargs)
        budgets = self._budgets(layer)
        if budgets is None or layer.is_cross_attention:
            return o
        q3, o3 = _per_head(q, o, layer)
        seq_lens_cpu = getattr(forward_batch, "seq_lens_cpu", None)
        max_kv = int(seq_lens_cpu.max()) if seq_lens_cpu is not None else None
        sparse_attention(q3, self.token_to_kv_pool.get_key_buffer(layer.layer_id),
                         self.token_to_kv_pool.get_value_buffer(layer.layer_id),
                         self.req_to_token_pool.req_to_token, forward_batch.req_pool_indices,
                         forward_batch.seq_lens, forward_batch.extend_seq_lens, budgets, layer.scaling, o3,
                         max_kv_len=max_kv)
        self._dense_tail(q3, o3, layer, forward_batch)
        self.stats["extend_layers_sparse"] += 1
        return o

    def _dense_tail(self, q3, o3, layer, forward_batch) -> None:
        """The last :data:`~sglang_shplb.core.patterns.DENSE_TAIL` query rows of every request whose extend ends
        its prompt (the scheduler hook's :func:`~sglang_shplb.scheduler.bucket_hook.prompt_ends`; without it,
        every request) in this layer's sparse heads (home heads on this rank) recomputed dense over the pool
        (:func:`~sglang_shplb.kernels.dense_tail.dense_tail`), after whichever route wrote them."""
        heads = sparse_heads(self.layer_budgets.get(layer.layer_id) or [])
        if not heads:
            return
        q_lens, kv_lens = self.extend_lens
        dense_tail(q3, self.token_to_kv_pool.get_key_buffer(layer.layer_id),
                   self.token_to_kv_pool.get_value_buffer(layer.layer_id),
                   KVRows(self.req_to_token_pool.req_to_token, forward_batch.req_pool_indices.to(POOL_INDEX_DTYPE)),
                   q_lens, kv_lens, heads, layer.scaling, o3, self.extend_ends)   # the warm-up's dtype (no copy)

    def _extend_stock(self, q, k, v, layer, forward_batch, save_kv_cache, **kwargs):
        """The plan marks this layer stock for prefill in this bucket: the stock backend for every head, then
        (kernel path, a layer that decodes sparse somewhere) its decode page summaries rebuilt from the pool."""
        o = self.inner.forward_extend(q, k, v, layer, forward_batch, save_kv_cache=save_kv_cache, **kwargs)
        lk = self.kernels.get(layer.layer_id)
        if lk is not None and self.extend_batch is not None and layer.layer_id in self.summarized_layers:
            lk.summarize(self.token_to_kv_pool.get_key_buffer(layer.layer_id), self.extend_batch)
        self.stats["extend_layers_stock"] += 1
        return o

    def _decode_stock(self, q, k, v, layer, forward_batch, save_kv_cache, capturing, **kwargs):
        """The stock backend for every head of a decode layer; on the kernel path, outside a graph, the new
        token folded into the page summaries of a layer that decodes sparse in some bucket."""
        o = self.inner.forward_decode(q, k, v, layer, forward_batch, save_kv_cache=save_kv_cache, **kwargs)
        if not capturing and layer.layer_id in self.summarized_layers:
            self._fold_new_token(layer, forward_batch)
        if not capturing:
            self.stats["decode_layers_stock"] += 1
        return o

    def _fold_new_token(self, layer, forward_batch) -> None:
        """A stock decode step of a kernel-path layer with page summaries: the new token's key folded into its
        page's summary, so a later sparse step selects from complete summaries."""
        lk = self.kernels.get(layer.layer_id)
        if lk is None or lk.kmin is None:
            return
        rpi = forward_batch.req_pool_indices
        update_page_summaries(self.token_to_kv_pool.get_key_buffer(layer.layer_id), self.req_to_token_pool.req_to_token,
                              rpi, forward_batch.seq_lens[:rpi.shape[0]], lk.kmin, lk.kmax)

    def _extend_head_parallel(self, q, k, v, layer, forward_batch, save_kv_cache, work: LayerWork):
        """The plan moves work of this layer between ranks in this bucket: K/V to the home pool, then
        :class:`~sglang_shplb.kernels.head_parallel.HeadParallelExtend` (home heads here, moved units on
        their targets, outputs back home in home order for ``o_proj``)."""
        q3, o = self._kernel_io(q, k, v, layer, forward_batch, save_kv_cache)
        kb = self.token_to_kv_pool.get_key_buffer(layer.layer_id)
        vb = self.token_to_kv_pool.get_value_buffer(layer.layer_id)
        hp = self.head_parallel
        hkv = kb.shape[1]
        hp.run(layer_schedule(work, self.extend_shape), self.plan.budgets[layer.layer_id], q3, kb, vb,
               self.req_to_token_pool.req_to_token, forward_batch.req_pool_indices, layer.scaling, o,
               k_new=k.reshape(-1, hkv, layer.qk_head_dim), v_new=v.reshape(-1, hkv, layer.v_head_dim))
        self._dense_tail(q3, o, layer, forward_batch)
        lk = self.kernels.get(layer.layer_id)
        if lk is not None and self.extend_batch is not None:
            lk.summarize(kb, self.extend_batch)   # decode stays at home: its page summaries cover every home head
        self.stats["extend_layers_head_parallel"] += 1
        if layer.layer_id == self.plan.model.num_layers - 1:
            st = hp.stats
            logger.info("shplb head-parallel extend, TP rank %d: bucket %d, %d units sent away, %.1f KiB sent, "
                        "%.1f KiB received over %d layers", self.tp_rank, self.current_bucket, st.units_moved,
                        st.bytes_sent / 1024, st.bytes_received / 1024,
                        sum(not w.at_home for w in self.work[self.current_bucket]))
        return o.view(q3.shape[0], -1)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        capturing = q.is_cuda and torch.cuda.is_current_stream_capturing()
        if layer.layer_id in (self.graph_decode_stock if capturing else self.stock_decode) \
                and not layer.is_cross_attention:
            return self._decode_stock(q, k, v, layer, forward_batch, save_kv_cache, capturing, **kwargs)
        lk = self.kernels.get(layer.layer_id)
        if lk is not None and not layer.is_cross_attention:
            q3, o = self._kernel_io(q, k, v, layer, forward_batch, save_kv_cache)
            lk.decode(q3, self.token_to_kv_pool.get_key_buffer(layer.layer_id),
                      self.token_to_kv_pool.get_value_buffer(layer.layer_id), self.req_to_token_pool.req_to_token,
                      forward_batch.req_pool_indices, forward_batch.seq_lens, self.decode_ws, layer.scaling, o)
            if not torch.cuda.is_current_stream_capturing():
                self.stats["decode_layers_sparse"] += 1
            return o.view(q3.shape[0], -1)
        o = self.inner.forward_decode(q, k, v, layer, forward_batch, save_kv_cache=save_kv_cache, **kwargs)
        if self._budgets(layer) is None or layer.is_cross_attention:
            return o
        q3, o3 = _per_head(q, o, layer)
        bs = forward_batch.req_pool_indices.shape[0]
        sparse_decode(q3[:bs], self.token_to_kv_pool.get_key_buffer(layer.layer_id),
                      self.token_to_kv_pool.get_value_buffer(layer.layer_id),
                      self.req_to_token_pool.req_to_token, forward_batch.req_pool_indices,
                      forward_batch.seq_lens, self.layer_decode_budgets[layer.layer_id], layer.scaling, o3[:bs],
                      self.selections, layer.layer_id)
        if not capturing:
            self.stats["decode_layers_sparse"] += 1
        return o


def routed_layers(stock_by_bucket: Sequence[frozenset[int]], layers: Iterable[int]) -> frozenset[int]:
    """Of ``layers``, those stock for decode in some buckets but not in all (their route follows the bucket)."""
    always = always_stock(stock_by_bucket)
    some = frozenset().union(*stock_by_bucket)
    return frozenset(li for li in layers if li in some and li not in always)


def _per_head(q, o, layer):
    """``[T, H, d]`` views of a layer's queries and of the stock backend's output (written in place)."""
    hq = layer.tp_q_head_num
    return q.reshape(-1, hq, layer.qk_head_dim), o.view(-1, hq, layer.v_head_dim)


def create_shplb_backend(runner):
    """SGLang's factory for ``--attention-backend shplb``. A plan stock everywhere this server reaches
    (:func:`stock_outright`) gets the stock backend itself, as our launcher would have served it: this is the path of
    a server SGLang's own launcher started with ``SHPLB_PLAN`` set (the plugin), or of SGLang's ``one_batch``."""
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
    cfg = ServingConfig.from_env()
    plan = load_runner_plan(cfg, runner.model_config.model_path, runner.ps.tp_size)
    stock = stock_outright(plan, runner.server_args, cfg.dense_backend, cfg.always_backend)
    if stock is not None:
        logger.info("shplb: the plan runs every layer on the stock backend at context %d: %s serves this server %s",
                    server_context(plan, runner.server_args), stock, OUTRIGHT_MARK)
        return ATTENTION_BACKENDS[stock](runner)
    return ShplbAttnBackend(runner, cfg, plan)


register_summary_budget_hook()   # also on import (tests and direct users rely on it); plugin.register() calls it too
