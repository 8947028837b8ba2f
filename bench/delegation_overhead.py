"""What the ``shplb`` backend adds on the host where the plan runs a layer stock: one ``forward_extend`` /
``forward_decode`` call through :class:`~sglang_shplb.serving.backend.ShplbAttnBackend` against the same call on
the stock backend directly, and one ``init_forward_metadata``, with a stock backend that returns at once (so only
the delegation is timed), side by side in one process. CPU only; needs SGLang installed (tests/scaffolding).

    python bench/delegation_overhead.py [--calls 20000] [--out bench/results/delegation_overhead]

The question it answers: whether the host work of our backend class explains a gap to stock SGLang on a model
whose forward is host-bound (SmolLM2, every layer stock): per forward it is the per-call difference times the
layers, plus one metadata call. A decode step replayed from a CUDA graph runs no layer call on the host: it adds
``init_forward_metadata_out_graph`` (on SGLang's replay view, without the hook's attribute) and the scheduler's
``ForwardBatch.init_new`` hook (the batch's bucket, the histogram)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import types

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from sglang_shplb.core.buckets import Buckets  # noqa: E402
from sglang_shplb.core.model_spec import ModelSpec  # noqa: E402
from sglang_shplb.core.patterns import HeadBudget  # noqa: E402
from sglang_shplb.core.plan import Plan  # noqa: E402
from sglang_shplb.planning.cost_model import CostModel  # noqa: E402
from sglang_shplb.planning.place import solve_plan_placements  # noqa: E402
from sglang_shplb.scheduler.bucket_hook import after_forward_batch_init_new, configure_buckets  # noqa: E402

# SmolLM2's attention: 30 layers, 9 q / 3 KV heads of 64
CFG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 30,
       "num_attention_heads": 9, "num_key_value_heads": 3, "hidden_size": 576, "head_dim": 64,
       "intermediate_size": 1536, "max_position_embeddings": 8192, "vocab_size": 49152}


class ReturnsAtOnce:
    """A stock backend whose calls return their query: only the delegation around it is timed."""

    def __init__(self, runner):
        self.forward_metadata = None

    def init_forward_metadata(self, fb):
        return None

    def init_forward_metadata_out_graph(self, fb, in_capture=False):
        return None

    def forward_extend(self, q, k, v, layer, fb, save_kv_cache=True, **kw):
        return q

    def forward_decode(self, q, k, v, layer, fb, save_kv_cache=True, **kw):
        return q


def stock_plan() -> Plan:
    """SmolLM2's shape, sparse budgets, every layer marked stock in both phases and every bucket."""
    spec = ModelSpec.from_config(CFG)
    budgets = [[HeadBudget.dense()] * 3 + [HeadBudget.streaming(64, 64)] * 3 + [HeadBudget.topk(0.2, min_blocks=1)] * 3
               ] * spec.num_layers
    buckets = Buckets((4096, 8192))
    plan = Plan(spec, buckets, budgets, solve_plan_placements(spec, budgets, buckets, [1], CostModel.analytic(),
                                                              "contiguous"))
    plan.stock = np.ones((2, len(buckets), spec.num_layers), dtype=bool)
    return plan


def backend(plan: Plan):
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS

    from sglang_shplb.serving.backend import ShplbAttnBackend
    from sglang_shplb.serving.config import ServingConfig
    ATTENTION_BACKENDS["returns_at_once"] = ReturnsAtOnce
    runner = types.SimpleNamespace(
        device="cpu", req_to_token_pool=types.SimpleNamespace(req_to_token=torch.zeros(4, 8192, dtype=torch.int32)),
        token_to_kv_pool=None, server_args=types.SimpleNamespace(), ps=types.SimpleNamespace(tp_size=1, tp_rank=0),
        model_config=types.SimpleNamespace(context_len=8192, model_path=None))
    cfg = ServingConfig(plan_path=None, dense_fallback=False, dense_backend=None, group_prefill_by_bucket=False,
                        bucket_log_every=0)
    return ShplbAttnBackend(runner, cfg, plan=plan, dense_backend="returns_at_once")


def per_call_us(fn, calls: int) -> float:
    t0 = time.perf_counter()
    for i in range(calls):
        fn(i)
    return (time.perf_counter() - t0) / calls * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--out", default="bench/results/delegation_overhead")
    a = ap.parse_args()
    plan = stock_plan()
    be = backend(plan)
    nl = plan.model.num_layers
    layers = [types.SimpleNamespace(layer_id=li, tp_q_head_num=9, tp_k_head_num=3, qk_head_dim=64, v_head_dim=64,
                                    scaling=0.125, is_cross_attention=False) for li in range(nl)]
    mode = types.SimpleNamespace(is_extend=lambda: True, is_decode=lambda: False)
    lens = [2048] * 4
    fb = types.SimpleNamespace(forward_mode=mode, extend_seq_lens_cpu=lens, seq_lens_cpu=torch.tensor(lens),
                               seq_lens=torch.tensor(lens), req_pool_indices=torch.arange(4),
                               extend_seq_lens=torch.tensor(lens), out_cache_loc=None)
    q = torch.zeros(4, 9 * 64)
    be.init_forward_metadata(fb)
    res = {"calls": a.calls, "layers": nl, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "torch": torch.__version__}
    for phase in ("extend", "decode"):
        ours, stock = getattr(be, f"forward_{phase}"), getattr(be.inner, f"forward_{phase}")
        res[f"{phase}_shplb_us"] = per_call_us(lambda i: ours(q, q, q, layers[i % nl], fb), a.calls)
        res[f"{phase}_stock_us"] = per_call_us(lambda i: stock(q, q, q, layers[i % nl], fb), a.calls)
    res["init_forward_metadata_us"] = per_call_us(lambda i: be.init_forward_metadata(fb), a.calls // 10)
    # a decode step replayed from a CUDA graph: the replay view (host lengths, no bucket attribute) and the hook
    dec = types.SimpleNamespace(is_extend=lambda: False, is_decode=lambda: True)
    view = types.SimpleNamespace(seq_lens_cpu=torch.tensor(lens), forward_mode=dec)
    res["replay_metadata_shplb_us"] = per_call_us(lambda i: be.init_forward_metadata_out_graph(view), a.calls)
    res["replay_metadata_stock_us"] = per_call_us(lambda i: be.inner.init_forward_metadata_out_graph(view), a.calls)
    configure_buckets(plan.buckets, log_every=0)
    sched_batch, made = types.SimpleNamespace(seq_lens_cpu=torch.tensor(lens), forward_mode=dec, reqs=[]), \
        types.SimpleNamespace()
    res["init_new_hook_us"] = per_call_us(lambda i: after_forward_batch_init_new(made, batch=sched_batch), a.calls)
    res["added_per_replayed_decode_step_us"] = res["replay_metadata_shplb_us"] - res["replay_metadata_stock_us"] \
        + res["init_new_hook_us"]
    res["added_per_extend_forward_us"] = (res["extend_shplb_us"] - res["extend_stock_us"]) * nl \
        + res["init_forward_metadata_us"]
    for phase in ("extend", "decode"):
        print(f"forward_{phase}: shplb {res[f'{phase}_shplb_us']:.2f} us a call, the stock backend directly "
              f"{res[f'{phase}_stock_us']:.2f} us ({res[f'{phase}_shplb_us'] / res[f'{phase}_stock_us']:.1f}x)")
    print(f"init_forward_metadata {res['init_forward_metadata_us']:.2f} us; added per {nl}-layer extend forward: "
          f"{res['added_per_extend_forward_us']:.1f} us")
    print(f"replayed decode step: metadata {res['replay_metadata_shplb_us']:.2f} us (stock "
          f"{res['replay_metadata_stock_us']:.2f} us), ForwardBatch.init_new hook {res['init_new_hook_us']:.2f} us; "
          f"added per step: {res['added_per_replayed_decode_step_us']:.1f} us")
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "cpu.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
