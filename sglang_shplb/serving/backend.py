"""The ``shplb`` attention backend: SGLang's ``AttentionBackend`` with per-head budgets.

Every layer runs the stock backend (``torch_native`` on CPU, ``flashinfer`` on CUDA, or
``SHPLB_DENSE_BACKEND``) first: it writes the batch's K/V into the token pool and computes the dense
heads on SGLang's fast path. Then the layer's sparse heads (the plan's budgets for the heads this rank
holds, :mod:`.head_map`) are recomputed from the pool through ``req_to_token`` and their columns
replaced (:mod:`.sparse`: Triton kernels on CUDA, PyTorch reference on CPU). Metadata, CUDA-graph state
and everything else the runner asks of a backend are the stock backend's.
"""
from __future__ import annotations

import logging
import math
import os

import torch

from sglang.srt.layers.attention.base_attn_backend import AttentionBackend

from ..patterns import HeadBudget, Pattern
from .config import BACKEND_NAME, ServingConfig
from .head_map import rank_heads
from .sparse import prepare_decode_constants, sparse_attention, sparse_decode, sparse_heads

logger = logging.getLogger(__name__)


class ShplbPlanMissingError(RuntimeError):
    pass


def default_dense_backend(device: str) -> str:
    return "torch_native" if str(device).startswith("cpu") else "flashinfer"


def load_runner_plan(cfg: ServingConfig, model_path: str, tp_size: int):
    """The plan for this server, validated against the served model's config; None in dense fallback."""
    from ..plan import load_plan
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
        self.tp_size = int(getattr(model_runner, "tp_size", 1))
        self.tp_rank = int(getattr(model_runner, "tp_rank", 0))
        self.max_context = int(model_runner.model_config.context_len)
        self.plan = plan if plan is not None else load_runner_plan(
            self.cfg, model_runner.model_config.model_path, self.tp_size)
        self.layer_budgets: dict[int, list[HeadBudget]] = {}
        self.current_bucket = 0
        if self.plan is not None:
            for li, layer in enumerate(self.plan.budgets):
                local = [layer[h] for h in rank_heads(self.plan.model.num_heads, self.tp_size, self.tp_rank, li)]
                self.layer_budgets[li] = local
                prepare_decode_constants(local, self.device)
        n_sparse = sum(len(sparse_heads(b)) for b in self.layer_budgets.values())
        n_all = sum(len(b) for b in self.layer_budgets.values())
        logger.info("shplb backend: dense heads on %s, %d of %d rank-local heads sparse (plan %s), TP rank %d/%d",
                    self.dense_backend_name, n_sparse, n_all, self.cfg.plan_path or "none: dense fallback",
                    self.tp_rank, self.tp_size)
        self.stats = {"extend_layers_sparse": 0, "decode_layers_sparse": 0}

    # ---- everything but the forward passes is the stock backend's ---------------------------------
    def __getattr__(self, name):
        # only reached for attributes this object does not have
        inner = self.__dict__.get("inner")
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)

    def init_forward_metadata(self, forward_batch):
        self.current_bucket = getattr(forward_batch, "shplb_bucket", 0)
        return self.inner.init_forward_metadata(forward_batch)

    def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False):
        self.current_bucket = getattr(forward_batch, "shplb_bucket", 0)
        return self.inner.init_forward_metadata_out_graph(forward_batch, in_capture)

    @property
    def needs_cpu_seq_lens(self):  # type: ignore[override]
        return getattr(self.inner, "needs_cpu_seq_lens", True)

    @property
    def use_captured_forward_metadata_for_breakable_cuda_graph(self):  # type: ignore[override]
        return getattr(self.inner, "use_captured_forward_metadata_for_breakable_cuda_graph", False)

    @property
    def supports_full_cuda_graph_chunked_prefix(self):  # type: ignore[override]
        return getattr(self.inner, "supports_full_cuda_graph_chunked_prefix", False)

    @property
    def supports_ragged_verify_graph(self):  # type: ignore[override]
        return getattr(self.inner, "supports_ragged_verify_graph", False)

    # ---- forward ----------------------------------------------------------------------------------
    def _budgets(self, layer) -> list[HeadBudget] | None:
        b = self.layer_budgets.get(layer.layer_id)
        if b is None or len(b) != layer.tp_q_head_num:
            if b is not None:
                raise RuntimeError(f"shplb: layer {layer.layer_id} has {layer.tp_q_head_num} heads on this rank, "
                                   f"the plan's head map gives {len(b)}")
            return None
        return b if any(x.pattern is not Pattern.DENSE for x in b) else None

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
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
        self.stats["extend_layers_sparse"] += 1
        return o

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        o = self.inner.forward_decode(q, k, v, layer, forward_batch, save_kv_cache=save_kv_cache, **kwargs)
        budgets = self._budgets(layer)
        if budgets is None or layer.is_cross_attention:
            return o
        q3, o3 = _per_head(q, o, layer)
        capturing = q.is_cuda and torch.cuda.is_current_stream_capturing()
        seq_lens_cpu = getattr(forward_batch, "seq_lens_cpu", None)
        max_kv = int(seq_lens_cpu.max()) if (seq_lens_cpu is not None and not capturing) else self.max_context
        bs = forward_batch.req_pool_indices.shape[0]
        sparse_decode(q3[:bs], self.token_to_kv_pool.get_key_buffer(layer.layer_id),
                      self.token_to_kv_pool.get_value_buffer(layer.layer_id),
                      self.req_to_token_pool.req_to_token, forward_batch.req_pool_indices,
                      forward_batch.seq_lens, budgets, layer.scaling, o3[:bs], max_kv_len=max_kv)
        if not capturing:
            self.stats["decode_layers_sparse"] += 1
        return o


def _per_head(q, o, layer):
    """``[T, H, d]`` views of a layer's queries and of the stock backend's output (written in place)."""
    hq = layer.tp_q_head_num
    return q.reshape(-1, hq, layer.qk_head_dim), o.view(-1, hq, layer.v_head_dim)


# AttentionBackend defines these (raising NotImplementedError), so __getattr__ never sees them: hand each
# to the stock backend explicitly.
_DELEGATED = ('init_forward_metadata_in_graph', 'draft_extend_metadata_captured_in_graph', 'prepare_full_cuda_graph_chunked_prefix', 'init_cuda_graph_state', 'init_forward_metadata_for_breakable_cuda_graph_capture', 'prepare_forward_metadata_for_breakable_cuda_graph_replay', 'get_cuda_graph_seq_len_fill_value', 'on_after_cuda_graph_warmup', 'verify_mask', 'update_verify_buffers_to_fill_after_draft', 'get_indexer_metadata', 'support_triton')


def _delegate(name: str):
    def method(self, *args, **kwargs):
        return getattr(self.inner, name)(*args, **kwargs)
    method.__name__ = name
    return method


for _name in _DELEGATED:
    setattr(ShplbAttnBackend, _name, _delegate(_name))


def create_shplb_backend(runner):
    return ShplbAttnBackend(runner)
