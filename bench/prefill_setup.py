"""What the prefill benchmarks (``prefill_sweep.py``, ``api_paths.py``, ``tiles.py``) share: their flags, the
layer shape (Llama-3-8B on the GPU: 32 q heads, 8 KV heads, d = 128, bf16; tiny on the CPU smoke runs),
the inputs, the budget sets, the attended pairs of an index and the SDPA baseline.

Import it before torch: on ``--cpu-smoke`` it turns on the Triton interpreter.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import math
import os
import sys
import time
from dataclasses import dataclass, field

if "--cpu-smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from sglang_shplb.core.patterns import BLOCK, HeadBudget  # noqa: E402

from timing import bench, device_name, device_tag, log, results_writer  # noqa: E402  (bench/timing.py)


def parser(doc: str, ctx: str) -> argparse.ArgumentParser:
    """The flags every prefill benchmark takes; ``ctx``: its default GPU contexts."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU (Triton interpreter)")
    ap.add_argument("--ctx", default=ctx, help=f"context lengths on the GPU (default {ctx})")
    ap.add_argument("--budget-s", type=float, default=480.0, help="stop adding contexts past this")
    return ap


@dataclass
class PrefillRun:
    """One benchmark run: where, on what shape and contexts, and the results ``dump()`` writes (JSON + log)
    to ``--out/{stem}_{tag}``, ``tag`` naming the device (``h100``, ``h200``, ``smoke``)."""

    smoke: bool
    dev: str
    hq: int
    hkv: int
    d: int
    dtype: torch.dtype
    ctxs: list[int]
    out: str
    stem: str
    device: str
    date: str
    res: dict = field(default_factory=dict)
    t_start: float = field(default_factory=time.time)

    @property
    def tag(self) -> str:
        return device_tag(self.device)

    def path(self, suffix: str = "") -> str:
        """``--out/{stem}_{tag}{suffix}``."""
        return os.path.join(self.out, f"{self.stem}_{self.tag}{suffix}")

    def dump(self) -> None:
        results_writer(self.res, self.path())()

    def elapsed(self) -> float:
        return time.time() - self.t_start


def start_run(args, script: str, stem: str, smoke_ctxs: list[int]) -> PrefillRun:
    """The run of ``args`` (from :func:`parser`): shape, contexts, the log header and the results dict."""
    import triton

    smoke = args.cpu_smoke
    os.makedirs(args.out, exist_ok=True)
    if smoke:
        hq, hkv, d, dtype, ctxs = 4, 1, 64, torch.float32, smoke_ctxs
    else:
        hq, hkv, d, dtype, ctxs = 32, 8, 128, torch.bfloat16, [int(x) for x in args.ctx.split(",")]
    run = PrefillRun(smoke, "cpu" if smoke else "cuda", hq, hkv, d, dtype, ctxs, args.out, stem, device_name(smoke),
                     _dt.date.today().isoformat())
    run.res.update(device=run.device, date=run.date, shape=dict(hq=hq, hkv=hkv, d=d, dtype=str(dtype)), checks=[],
                   prefill=[])
    log(f"# bench/{script}  device={run.device}  date={run.date}  torch={torch.__version__}  "
        f"triton={triton.__version__}")
    return run


def time_sdpa(q, k, v, smoke: bool) -> dict[str, float]:
    """Causal GQA SDPA times (ms) of ``q [n, Hq, d]``, ``k, v [n, Hkv, d]`` per backend (flash, cuDNN)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qq, kk, vv = (x.transpose(0, 1)[None] for x in (q, k, v))
    t_sdpa = {}
    for name, be in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        try:
            with sdpa_kernel([be]):
                f = lambda: torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, is_causal=True, enable_gqa=True)  # noqa: E731
                f()
                t_sdpa[name] = bench(f, smoke)
        except Exception as e:  # noqa: BLE001
            log(f"sdpa {name} failed: {type(e).__name__}: {str(e)[:150]}")
    return t_sdpa


def one_sequence(n: int, hq: int, hkv: int, d: int, dev, dtype):
    """Fresh random ``q [n, Hq, d]``, ``k, v [n, Hkv, d]`` of one sequence, with its ``cu_seqlens`` and length."""
    return (torch.randn(n, hq, d, device=dev, dtype=dtype), torch.randn(n, hkv, d, device=dev, dtype=dtype),
            torch.randn(n, hkv, d, device=dev, dtype=dtype), torch.tensor([0, n], dtype=torch.int32, device=dev),
            torch.tensor([n], dtype=torch.int32, device=dev))


def check_batch(paged: bool, seed: int, smoke: bool, hq: int, hkv: int, d: int, dev, dtype):
    """The device checks' two-sequence batch: contiguous varlen, or paged (scattered token pool) with the
    first sequence chunked behind an unaligned 129-token prefix. Returns q, k, v, cu_seqlens_q, kv_lens,
    lens, q_lens and the KV layout keywords."""
    g = torch.Generator(device=dev).manual_seed(seed)
    lens = [300, 200] if smoke else [4096 + 77, 3000]
    q_lens = lens if not paged else [lens[0] - 129, lens[1]]
    q = torch.randn(sum(q_lens), hq, d, device=dev, dtype=dtype, generator=g)
    cu = torch.tensor([0, q_lens[0], sum(q_lens)], dtype=torch.int32, device=dev)
    kvl = torch.tensor(lens, dtype=torch.int32, device=dev)
    rows = 2 * max(lens) + 99 if paged else sum(lens)
    kb = torch.randn(rows, hkv, d, device=dev, dtype=dtype, generator=g)
    vb = torch.randn(rows, hkv, d, device=dev, dtype=dtype, generator=g)
    if paged:
        kw = dict(req_to_token=torch.randperm(rows, device=dev)[:2 * max(lens)].view(2, -1).int(),
                  req_pool_indices=torch.tensor([1, 0], dtype=torch.int32, device=dev))
    else:
        kw = dict(cu_seqlens_k=torch.tensor([0, lens[0], sum(lens)], dtype=torch.int32, device=dev))
    return q, kb, vb, cu, kvl, lens, q_lens, kw


def attended_pairs_tokens(index, n: int) -> list[int]:
    """Attended (q, k) token pairs per head: full blocks count BLOCK², the diagonal BLOCK(BLOCK+1)/2,
    the last partial row/column counted exactly."""
    nb = math.ceil(n / BLOCK)
    cnt = index.block_cnt[0, :, :nb].long()                   # [H, nb]
    # approximate: every listed pair is a full block except the diagonal (exact when n % BLOCK == 0)
    full = (cnt.sum(1) - nb) * BLOCK * BLOCK
    diag = nb * BLOCK * (BLOCK + 1) // 2
    return (full + diag).tolist()


def block_pairs_of(index, n: int) -> list[int]:
    nb = math.ceil(n / BLOCK)
    return index.block_cnt[0, :, :nb].long().sum(1).tolist()


def layer_sets(hq: int) -> dict[str, list[HeadBudget]]:
    """name → budgets of the prefill configurations."""
    sets = {"dense": [HeadBudget.dense()] * hq}
    for f in (1.0, 0.5, 0.2, 0.1, 0.05):
        sets[f"topk{f:g}"] = [HeadBudget.topk(f, 2)] * hq
    sets["1dense+topk0.1"] = [HeadBudget.dense()] + [HeadBudget.topk(0.1, 2)] * (hq - 1)
    sets["stream+topk0.1"] = [HeadBudget.streaming(128, 2048)] * (hq // 2) + [HeadBudget.topk(0.1, 2)] * (hq // 2)
    sets["stream(128+2048)"] = [HeadBudget.streaming(128, 2048)] * hq
    sets["vslash0.1"] = [HeadBudget.vslash(0.1, 2)] * hq
    return sets


def finish_efficiency_plot(fig, ax, title: str, path: str) -> None:
    """The per-head efficiency plots' frame: issue 15's 0.85 goal line, log2 context axis, labels, legend, saved."""
    ax.axhline(0.85, color="gray", lw=0.8, ls=":")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (K tokens)")
    ax.set_ylabel("per-head efficiency vs SDPA")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
