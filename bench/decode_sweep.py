"""Tuning sweep of the decode launches (report, never assert): the fused selector's warps and the group kernel's
split count and pages per step, each alone in a CUDA graph of L layers (L2 flushed between replays, median).

Llama-3-8B layer (32 q / 8 KV heads, d 128, bf16), SGLang's ``--page-size 64`` pool (bench/decode.py's
``scattered_pool``), the budget sets of ``bench/decode.py``. Two parts:

* **select**: ``update_and_select_pages`` (summary update, Quest scores, selection, union lists) at
  ``num_warps`` 4 / 8 / 16, with ``max_pages`` the context's pages and 2048 (a 128K server's);
* **group**: ``group_decode`` on a kept selection (the reuse path) at the rule's split (``decode_splits``) and at
  ``nsplit`` 16 / 32 / 64 slices, ``pages_per_step`` 1 / 2 / 4.

    PYTHONUNBUFFERED=1 python3 bench/decode_sweep.py            # GPU; prints µs per layer
    python3 bench/decode_sweep.py --cpu-smoke                     # logic check (Triton interpreter, tiny shapes)
"""
from __future__ import annotations

import os
import sys

SMOKE = "--cpu-smoke" in sys.argv
if SMOKE:
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from sglang_shplb.core.patterns import BLOCK  # noqa: E402
from sglang_shplb.kernels import triton_select  # noqa: E402
from sglang_shplb.kernels.paged_layer import (DecodeWorkspace, LayerKernels, layer_max_selected,  # noqa: E402
                                              selected_heads)
from sglang_shplb.kernels.triton_decode import DecodeScratch, build_page_summaries, group_decode  # noqa: E402

from decode import budget_sets, graph_ms, scattered_pool  # noqa: E402  (bench/decode.py)

PLAN = "plan: 1 dense, 4 stream, 3 topk0.1 groups"
if SMOKE:
    HQ, HKV, D, DTYPE, DEV, POINTS, WIDE = 8, 2, 64, torch.float32, "cpu", [(320, 1)], 8
else:
    HQ, HKV, D, DTYPE, DEV = 32, 8, 128, torch.bfloat16, "cuda"
    POINTS, WIDE = [(16384, 1), (16384, 4), (65536, 1), (65536, 4)], 2048   # (context, batch); a 128K server


def layers(budgets, bsz: int, n: int, max_pages: int, count: int):
    """``count`` layers of ``budgets`` over one pool: (LayerKernels, q, K, V) each, summaries built."""
    r2t, pool = scattered_pool(bsz, max_pages * BLOCK, DEV)
    rpi = torch.arange(bsz, dtype=torch.int32, device=DEV)
    seq = torch.full((bsz,), n, dtype=torch.int32, device=DEV)
    out = []
    for _ in range(count):
        lk = LayerKernels(budgets, HKV, D, max_pages * BLOCK, DTYPE, DEV, pool_tokens=pool, pool_page_size=BLOCK)
        kb = torch.randn(pool, HKV, D, device=DEV, dtype=DTYPE)
        vb = torch.randn(pool, HKV, D, device=DEV, dtype=DTYPE)
        if lk.kmin is not None:
            build_page_summaries(kb, r2t, rpi, seq - 1, lk.kmin, lk.kmax)
        out.append((lk, torch.randn(bsz, HQ, D, device=DEV, dtype=DTYPE), kb, vb))
    return out, r2t, rpi, seq


def sweep_select(sets) -> None:
    for n, bsz in POINTS:
        for max_pages in (n // BLOCK + 1, WIDE):
            for name in ("topk0.1", PLAN):
                ls, r2t, rpi, seq = layers(sets[name], bsz, n, max_pages, 8)
                lk0 = ls[0][0]
                sc = triton_select.select_scratch(bsz, lk0.select_consts, HKV, DEV)
                ds = DecodeScratch(bsz, HQ, HKV, D, max_pages, bsz * HQ * 64, DEV)
                pidx = torch.zeros(bsz, HQ, max_pages, dtype=torch.int32, device=DEV)
                pcnt = torch.zeros(bsz, HQ, dtype=torch.int32, device=DEV)
                cells = []
                for nw in (4, 8, 16):
                    def run(nw=nw):
                        for lk, q, kb, _ in ls:
                            triton_select.update_and_select_pages(q, kb, r2t, rpi, seq, lk.kmin, lk.kmax,
                                                                  lk.select_consts, max_pages, pidx, pcnt, sc,
                                                                  union=(lk.page_rules, ds), num_warps=nw)
                    cells.append(f"nw{nw} {graph_ms(run, SMOKE) / len(ls) * 1e3:6.1f}us")
                print(f"select ctx {n:6d} b{bsz} max_pages {max_pages:5d} {name[:12]:12s} " + "  ".join(cells),
                      flush=True)
                del ls
                if not SMOKE:
                    torch.cuda.empty_cache()


def sweep_group(sets) -> None:
    for n, bsz in POINTS:
        max_pages = n // BLOCK + 1
        for name in ("dense", PLAN):
            budgets = sets[name]
            ls, r2t, rpi, seq = layers(budgets, bsz, n, max_pages, 4)
            ws = DecodeWorkspace(HQ, HKV, D, max_pages, layer_max_selected(budgets, max_pages * BLOCK), DEV,
                                 selected_heads(budgets))
            ws.ensure(bsz)
            kept = []
            for lk, q, kb, vb in ls:   # one step each, its selection kept
                lk.decode(q, kb, vb, r2t, rpi, seq, ws, 0.1, torch.empty_like(q))
                kept.append((ws.page_idx[:bsz].clone(), ws.page_cnt[:bsz].clone(), torch.empty_like(q)))
            big = DecodeScratch(bsz, HQ, HKV, D, max_pages, bsz * HQ * 64, DEV)
            ns0, sp0 = ls[0][0].splits(bsz)

            def reuse(ns, sp, pb):
                for (lk, q, kb, vb), (pi, pc, o) in zip(ls, kept):
                    group_decode(q, kb, vb, r2t, rpi, seq, lk.page_rules, pi, pc, big, ns, sp, sm_scale=0.1, out=o,
                                 pool_page_size=BLOCK, pages_per_step=pb)
            cells = []
            for pb in (1, 2, 4):
                us = graph_ms(lambda: reuse(ns0, sp0, pb), SMOKE) / len(ls) * 1e3
                cells.append(f"rule(ns{ns0},sp{sp0})/pb{pb} {us:6.1f}")
                for ns in (16, 32, 64):
                    cells.append(f"ns{ns}/pb{pb} {graph_ms(lambda: reuse(ns, 1, pb), SMOKE) / len(ls) * 1e3:6.1f}")
            print(f"group ctx {n} b{bsz} {name[:12]:12s} us/layer: " + ", ".join(cells), flush=True)
            del ls, ws, big
            if not SMOKE:
                torch.cuda.empty_cache()


if __name__ == "__main__":
    print(f"# bench/decode_sweep.py  {'cpu (Triton interpreter)' if SMOKE else torch.cuda.get_device_name()}",
          flush=True)
    budget_sets_ = budget_sets(HQ, HQ // HKV)
    sweep_select(budget_sets_)
    sweep_group(budget_sets_)
