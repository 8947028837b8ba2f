"""S-HPLB at runtime, TP emulated on one GPU: each rank's share of one layer's prefill timed alone with the
real code path (:class:`sglang_shplb.kernels.head_parallel.HeadParallelExtend`), competitors side by side.

Per rank ``r`` of a placement, the time of a layer is
``pack + max(home + local units, link_in) + units shipped here + link_out + scatter + tail``:
``pack`` gathers the q rows and K/V prefixes it ships (real copies), ``home`` runs the heads it keeps whole
(one SparsePrefill call, dense heads on cuDNN), ``units`` runs the pieces shipped to it on their staged
prefixes, ``scatter`` writes returned outputs into its home columns, ``tail`` recomputes the last
:data:`~sglang_shplb.core.patterns.DENSE_TAIL` rows of its home sparse heads dense (as the backend does after
the exchange; :mod:`sglang_shplb.kernels.dense_tail`). The links are not real (one GPU): their
time is bytes / ``--link-gbps`` per direction (default 370 GB/s, about what NCCL all-to-all reaches over
H100/H200 NVLink; state it when quoting), the inputs overlapping the home heads as the executor does
(``async_op``), the outputs exposed. The slowest rank is the layer's time.

Placements of the same budgets: ``contiguous`` (SGLang's slicing, nothing moves) and ``shplb`` (the planner's
solver). Dense competitors per rank (its ``Hq / TP`` heads): cuDNN SDPA and FlashInfer's ragged prefill.
One prompt of n tokens, no prefix, bf16; outputs of the emulated ranks are checked against one
single-GPU call of all heads (max abs diff printed).

Placement ``shplb`` is solved with ``--calibration`` (a kernel table, or a move calibration record of
:mod:`sglang_shplb.planning.move_calibration`: per-unit overhead, gather bandwidth, moved-piece
efficiency, fitted from an earlier run's per-rank times); ``shplb_prior`` with ``--compare-calibration``
(default the kernel table alone, the planner before the move calibration; emulated only when it differs).
Every rank's record holds what the fit needs (measured: home, local units, units shipped here, pack,
scatter; predicted: its home heads' and each unit's cost-model seconds, the bytes it gathers), and the
run ends with a refit written to ``OUT/move_calibration_<gpu>.json`` (residuals printed).
``--fit FILE...`` refits from earlier result files alone (placements re-solved and checked against the
recorded units and bytes), no GPU. ``--feedback N`` closes the loop per cell instead: up to N re-solves with the
heads' costs scaled by the measured ranks' mispricing (:mod:`sglang_shplb.planning.rank_feedback`), each
emulated; ``--refine N`` then up to N rounds that keep the best placement's structure and move its cuts to even
out its measured ranks (``refine_cuts``), or with ``--open-cuts`` cut a head of the slowest rank where no cut can
move (``open_cut``); the best of all rounds is ``shplb_feedback``. ``--routing-pair`` times that placement again
with every dense prefix on cuDNN and as routed (``dense_pieces.prefix_backend``); ``--pipelined L`` also times each
rank's layer as L layers back to back in one call (the host ahead, as in a forward; the parts timed alone each
pay their host time where it outlasts their kernels).

Decode stays on the home heads: per TP the pages each rank reads per step (slowest / mean), what they
would be if decode followed the prefill placement, and the bytes per token a replica side pool would
need for that (K + V of every KV head copied to a rank that computes its moved q heads, per layer and
for the model's layers).

  python bench/head_parallel.py --out $OUT                     # Llama-3-8B and 70B shapes, 32K-128K, TP 2/4/8
  python bench/head_parallel.py --quick --out $OUT             # 8B + 70B, 64K/128K, TP 4/8 (about 5 min, H200)
  python bench/head_parallel.py --fit bench/results/head_parallel_h200.json --out bench/results   # refit only
  TRITON_INTERPRET=1 python bench/head_parallel.py --cpu-smoke --out /tmp/hp   # logic check on the CPU

``--plan DIR`` measures a plan's own layers instead (its budgets, model shape and bucket edges; ``--ctx`` names
bucket edges, ``--tp`` the TP sizes, ``--layers`` a subset; layers with the same budgets are measured once) with
``--feedback N`` / ``--refine N`` rounds each, and writes the best round's multipliers (and, where a refine round
was best, its measured cuts) per (TP, bucket, layer) to a head-scales file (:mod:`sglang_shplb.planning.rank_feedback`)
that ``python -m sglang_shplb place --head-scales FILE`` solves the served plan with (the same ``--calibration``):

  python bench/head_parallel.py --plan bench/results/default_plan --ctx 8192 --tp 3 --feedback 2 \
      --calibration bench/results/calibration_h100_tiles.json --out $OUT   # -> $OUT/head_scales_<gpu>.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from timing import (bench, device_name, device_tag, flashinfer_or_none, host_syncs, kernel_ms, log,  # noqa: E402
                    results_writer)

from sglang_shplb.core.buckets import Buckets  # noqa: E402
from sglang_shplb.core.head_map import home_rank, layer_work, rank_heads  # noqa: E402
from sglang_shplb.core.model_spec import ModelSpec  # noqa: E402
from sglang_shplb.core.patterns import HeadBudget  # noqa: E402
from sglang_shplb.core.placement_types import LayerPlacement, Piece  # noqa: E402
from sglang_shplb.kernels.dense_tail import dense_tail  # noqa: E402
from sglang_shplb.kernels.dense_pieces import causal_sdpa, piece_backend, unrouted_prefixes  # noqa: E402
from sglang_shplb.kernels.head_parallel import HeadParallelExtend, KVRows, RankLayout, attend_heads  # noqa: E402
from sglang_shplb.kernels.layer_reference import sparse_heads  # noqa: E402
from sglang_shplb.planning.cost_model import load_cost_model  # noqa: E402
from sglang_shplb.planning.move_calibration import (RankRecord, fit_moves, format_fit,  # noqa: E402
                                                    rank_predictions, write_move_calibration)
from sglang_shplb.planning.place import (layer_inputs, resolve_solve_opts, solve_plan_placements,  # noqa: E402
                                         whole_heads)
from sglang_shplb.planning.rank_feedback import MAX_CUT_STEP, head_cost_scale, open_cut, refine_cuts  # noqa: E402
from sglang_shplb.planning.solvers import LayerProblem, layer_times  # noqa: E402
from sglang_shplb.planning.synthetic_plans import serving_bench_budget  # noqa: E402
from sglang_shplb.scheduler.head_schedule import ExtendShape, layer_schedule  # noqa: E402

SHAPES = {"llama8b": (32, 8, 128), "llama70b": (64, 8, 128), "smoke": (8, 4, 64)}
LAYERS = {"llama8b": 32, "llama70b": 80, "smoke": 2}
KERNEL_TABLE = HERE / "results" / "calibration_h100_tiles.json"
MOVE_CALIBRATION = HERE / "results" / "move_calibration_h200.json"
#: round 13's refit on an H100 (not the default)
H100_REFIT = HERE / "results" / "head_parallel" / "move_calibration_round13_h100.json"
QUICK = {"shapes": "llama8b,llama70b", "ctx": "65536,131072", "tp": "4,8", "plans": "mixed,profiled", "reps": 20,
         "time_budget_s": 270}


def bench_spec(hq: int, hkv: int, d: int) -> ModelSpec:
    """The one-layer model the benchmark's layer problems are posed on (only its heads and ``d`` matter)."""
    return ModelSpec("LlamaForCausalLM", 1, hq, hkv, d, 131072, "bench")


def plan_budgets(which: str, hq: int, hkv: int, seed: int) -> list[HeadBudget]:
    """One layer's budgets. ``mixed``: the serving benchmark's plan (KV group 0 dense, then streaming 128 +
    2048 and top-k 10 % groups in turn); ``profiled``: heads drawn (seeded) from the committed SmolLM2
    plan's 270 budgets, so the mix of dense / streaming / top-k heads is the profile's."""
    spec = bench_spec(hq, hkv, 128)
    if which == "mixed":
        f = serving_bench_budget()
        return [f(0, h, spec) for h in range(hq)]
    data = json.loads((HERE / "results" / "default_plan" / "plan.json").read_text())
    pool = [HeadBudget.from_dict(b) for layer in data["budgets"] for b in layer]
    g = torch.Generator().manual_seed(seed)
    return [pool[int(i)] for i in torch.randint(len(pool), (hq,), generator=g)]


def run_grid(a: argparse.Namespace) -> tuple:
    """``(smoke, device, dtype, shapes, contexts, TP sizes)`` of a run: ``--cpu-smoke``'s tiny grid on the CPU
    in float32, else ``--shapes`` / ``--ctx`` / ``--tp`` on CUDA in bf16."""
    smoke = a.cpu_smoke
    dev, dt = ("cpu", torch.float32) if smoke else ("cuda", torch.bfloat16)
    if smoke:
        return smoke, dev, dt, ["smoke"], [256], [2]
    return (smoke, dev, dt, a.shapes.split(","), [int(x) for x in a.ctx.split(",")],
            [int(x) for x in a.tp.split(",")])


def layer_qkv(n: int, hq: int, hkv: int, d: int, dev, dt) -> tuple:
    """One prompt's q ``[n, hq, d]``, k and v ``[n, hkv, d]``, random, seeded by ``n``."""
    g = torch.Generator(device=dev).manual_seed(n)
    return tuple(torch.randn(n, h, d, device=dev, dtype=dt, generator=g) for h in (hq, hkv, hkv))


def rank_qkv(q, k, v, tp: int, r: int) -> tuple:
    """Rank ``r``'s share of one layer's inputs under SGLang's slicing: its q heads and the KV heads they
    read, each contiguous."""
    hq, hkv = q.shape[1], k.shape[1]
    qh = rank_heads(hq, tp, r)
    kv = sorted({h // (hq // hkv) for h in qh}) if tp <= hkv else [r * hkv // tp]
    return q[:, qh].contiguous(), k[:, kv].contiguous(), v[:, kv].contiguous()


def solve(budgets, hq, hkv, d, tp, n, cost, scale=None) -> LayerPlacement:
    """The planner's ``shplb`` placement of one layer under ``cost`` at the bucket holding ``n`` (its head costs
    times ``scale``, measured feedback, when given)."""
    spec = bench_spec(hq, hkv, d)
    edge = 1 << (n - 1).bit_length()
    solved = solve_plan_placements(spec, [budgets], Buckets((edge,)), [tp], cost, "shplb",
                                   head_scale=None if scale is None else lambda *_: scale,
                                   **resolve_solve_opts({"max_replicated_kv": "auto"}, tp))
    return solved[tp][0].layers[0]


def placements(budgets, hq, hkv, d, tp, n, cost, prior=None) -> dict[str, LayerPlacement]:
    """``contiguous`` (home), ``shplb`` (solved with ``cost``) and, with ``prior``, ``shplb_prior`` (solved
    with that model) when it differs from ``shplb``."""
    home = LayerPlacement([[Piece(h) for h in rank_heads(hq, tp, r)] for r in range(tp)])
    out = {"contiguous": home, "shplb": solve(budgets, hq, hkv, d, tp, n, cost)}
    if prior is not None:
        lp = solve(budgets, hq, hkv, d, tp, n, prior)
        if lp != out["shplb"]:
            out["shplb_prior"] = lp
    return out


def layer_problem(budgets, hq, hkv, d, tp, n, cost, scale=None) -> LayerProblem:
    """One layer's placement problem at ``n`` under ``cost`` (head costs times ``scale`` when given)."""
    spec = bench_spec(hq, hkv, d)
    costs, prof = layer_inputs(spec, budgets, cost, n)
    return LayerProblem(costs if scale is None else costs * scale, hq // hkv, tp, cost.piece_overhead,
                        profiles=prof, transfer=cost.transfer(n, d), whole_heads=whole_heads(budgets))


def ms_per_model_s(cost) -> float:
    """Measured milliseconds per second of the cost model (the move calibration's compute scale, 1 without
    one)."""
    return ((cost.move_calibration or {}).get("compute_scale") or 1.0) * 1e3


def predicted_ms(lp, budgets, hq, hkv, d, tp, n, cost, scale=None) -> list[float]:
    """Per-rank times of ``lp`` under ``cost``'s objective, in measured milliseconds (the home call's fixed
    part left out: the same on every rank)."""
    prob = layer_problem(budgets, hq, hkv, d, tp, n, cost, scale)
    return [float(x) * ms_per_model_s(cost) for x in layer_times(lp, prob).total]


def emulate_checked(lp, budgets, q, k, v, ref, tp, sm_scale, smoke, a, cost, scale=None) -> tuple[dict, torch.Tensor]:
    """:func:`emulate` of ``lp`` and its absolute difference from ``ref`` (the single-device layer), the emulation
    holding the cost model's per-rank predictions (``pred``, for the move-calibration fit), the pieces and the
    objective's per-rank milliseconds (head costs times ``scale`` when given), and ``max_abs_diff``."""
    n, hq, d, hkv = q.shape[0], q.shape[1], q.shape[2], k.shape[1]
    e = emulate(lp, budgets, q, k, v, tp, sm_scale, smoke, a.link_gbps, a.reps, a.pipelined)
    diff = (e.pop("out").float() - ref.float()).abs()
    e["max_abs_diff"] = float(diff.max())
    for t, p in zip(e["ranks"], rank_predictions(lp, budgets, cost, n, hkv, tp, d, q.element_size())):
        t["pred"] = p
    e["pieces"] = [[[pc.head, pc.start, pc.end] for pc in gpu] for gpu in lp.gpus]
    e["predicted_rank_ms"] = predicted_ms(lp, budgets, hq, hkv, d, tp, n, cost, scale)
    e["predicted_slowest_ms"] = max(e["predicted_rank_ms"])
    return e, diff


#: the most an emulated placement's output may differ from the single-device layer's (bf16: rounds differ by up to
#: 1e-3 there) and still count: a feedback round past it is never the best (round 22's cut vertical-slash head: 1.2)
MAX_DIFF = 0.02


def best_checked(rounds: list[dict]) -> int:
    """Index of the fastest round whose output matched the single-device layer (each round's ``max_abs_diff``;
    round 0, the open loop, always counts: it is the placement served without feedback)."""
    ok = [i for i, r in enumerate(rounds) if i == 0 or r["max_abs_diff"] <= MAX_DIFF]
    return min(ok, key=lambda i: rounds[i]["slowest_ms"])


def feedback_rounds(budgets, q, k, v, ref, tp, sm_scale, smoke, a, cost, first: tuple) -> list[dict]:
    """``--feedback``: from ``first = (placement, its emulation)`` (the open-loop ``shplb``), up to
    ``a.feedback`` rounds of measured feedback (:mod:`sglang_shplb.planning.rank_feedback`): the heads' costs
    are scaled by what the last placement's measured ranks (their attention calls: home, units, tail; round 21
    used the whole rank time, staging included) say the cost model missed, the layer re-solved and
    emulated again and checked against ``ref`` (the single-device layer). Stops early when the solve returns a
    placement already measured. One emulation per round (with the scale it was solved with)."""
    n, hq, d = q.shape[0], q.shape[1], q.shape[2]
    hkv = k.shape[1]
    lp, e = first
    scale = np.ones(hq)
    seen = [lp]
    out = []
    for i in range(a.feedback):
        prob = layer_problem(budgets, hq, hkv, d, tp, n, cost, scale)
        busy = [t["compute_ms"] / ms_per_model_s(cost) for t in e["ranks"]]   # the rank's attention calls
        scale = scale * head_cost_scale(lp, prob, busy)
        lp = solve(budgets, hq, hkv, d, tp, n, cost, scale)
        if lp in seen:
            log(f"  feedback round {i + 1}: the solve returns a placement already measured; stop")
            break
        seen.append(lp)
        e, _ = emulate_checked(lp, budgets, q, k, v, ref, tp, sm_scale, smoke, a, cost, scale)
        e["head_scale"], e["kind"] = [float(x) for x in scale], "scale"
        log(f"  feedback round {i + 1}: slowest {e['slowest_ms']:.2f} ms (slowest/mean {e['slowest_over_mean']:.2f}, "
            f"compute {e['compute_slowest_over_mean']:.2f}), {e['units_moved']} units, max|diff| "
            f"{e['max_abs_diff']:.3g}; head scale {min(scale):.2f}-{max(scale):.2f}" + pipelined_note(e))
        out.append(e)
    return out


def placement_of(e: dict) -> LayerPlacement:
    """The placement an emulation record ran (its ``pieces``)."""
    return LayerPlacement([[Piece(int(h), float(s), float(t)) for h, s, t in gpu] for gpu in e["pieces"]])


def refine_rounds(budgets, q, k, v, ref, tp, sm_scale, smoke, a, cost, rounds: list[dict]) -> list[dict]:
    """``--refine``: up to ``a.refine`` rounds, each from the best checked round so far (``rounds``, then these):
    its structure kept and its cuts moved to even out its measured ranks
    (:func:`sglang_shplb.planning.rank_feedback.refine_cuts`, priced with that round's head multipliers), emulated
    and checked against ``ref``. A round no faster than the one it refined halves the next round's step; stops when
    the best placement cuts no head or a refinement returns a placement already measured."""
    n, hq, d, hkv = q.shape[0], q.shape[1], q.shape[2], k.shape[1]
    per, step = ms_per_model_s(cost), MAX_CUT_STEP
    seen, out = [placement_of(r) for r in rounds], []
    for i in range(a.refine):
        done = rounds + out
        src = best_checked(done)
        scale = np.asarray(done[src].get("head_scale", np.ones(hq)))
        ranks = done[src]["ranks"]
        prob = layer_problem(budgets, hq, hkv, d, tp, n, cost, scale)
        total, busy = [t["total_ms"] / per for t in ranks], [t["compute_ms"] / per for t in ranks]
        kind = "cuts"
        lp, pred = refine_cuts(placement_of(done[src]), prob, total, busy, step)
        if lp in seen and a.open_cuts:      # no cut to move on the slowest rank: cut one of its heads
            kind = "open"
            lp, pred = open_cut(placement_of(done[src]), prob, total, busy)
        if lp in seen:
            log(f"  refine round {i + 1}: round {src}'s cuts stay (or it cuts no head)"
                + (" and no new cut is predicted to help" if a.open_cuts else "") + "; stop")
            break
        seen.append(lp)
        e, _ = emulate_checked(lp, budgets, q, k, v, ref, tp, sm_scale, smoke, a, cost, scale)
        e.update(head_scale=[float(x) for x in scale], kind=kind, refined_from=src, refine_predicted_ms=pred * per)
        log(f"  refine round {i + 1} ({'a new cut' if kind == 'open' else 'cuts'} of round {src}, step {step:.3g}): "
            f"slowest {e['slowest_ms']:.2f} ms "
            f"(predicted {pred * per:.2f}; slowest/mean {e['slowest_over_mean']:.2f}, compute "
            f"{e['compute_slowest_over_mean']:.2f}), {e['units_moved']} units, max|diff| {e['max_abs_diff']:.3g}"
            + pipelined_note(e))
        if e["slowest_ms"] >= done[src]["slowest_ms"]:
            step /= 2
        out.append(e)
    return out


def routing_pair(row: dict, budgets, q, k, v, ref, tp, sm_scale, smoke, a, cost) -> dict:
    """``--routing-pair``: the row's best placement (``shplb_feedback``, else ``shplb``) emulated twice more, back to
    back in this process: dense pieces' prefixes on cuDNN however small the grid
    (:func:`.dense_pieces.unrouted_prefixes`), then as :func:`.dense_pieces.prefix_backend` routes them."""
    best = row.get("shplb_feedback", row["shplb"])
    lp = placement_of(best)
    with unrouted_prefixes():
        eu, _ = emulate_checked(lp, budgets, q, k, v, ref, tp, sm_scale, smoke, a, cost)
    er, _ = emulate_checked(lp, budgets, q, k, v, ref, tp, sm_scale, smoke, a, cost)
    log(f"  routing pair (the best placement again): slowest {eu['slowest_ms']:.2f} ms unrouted, "
        f"{er['slowest_ms']:.2f} ms routed (x{eu['slowest_ms'] / er['slowest_ms']:.3f}); per rank unrouted/routed "
        + ", ".join(f"{x['total_ms']:.2f}/{y['total_ms']:.2f}" for x, y in zip(eu["ranks"], er["ranks"]))
        + f"; max|diff| {eu['max_abs_diff']:.3g} / {er['max_abs_diff']:.3g}")
    return {"unrouted": eu, "routed": er}


def forced_moves(hq: int, tp: int) -> LayerPlacement:
    """Home, except rank 0's first head split (its query blocks [0.5, 1) on rank 1, a dense piece after a
    prefix when the head is dense) and its second head moved whole to rank 1 (the smoke run's moves)."""
    gpus = [[Piece(h) for h in rank_heads(hq, tp, r)] for r in range(tp)]
    h0, h1 = gpus[0][0].head, gpus[0][1].head
    gpus[0] = [Piece(h0, 0.0, 0.5)] + gpus[0][2:]
    gpus[1] = sorted(gpus[1] + [Piece(h0, 0.5, 1.0), Piece(h1)], key=lambda p: (p.head, p.start))
    return LayerPlacement(gpus)


def emulate(lp, budgets, q, k, v, tp, scale, smoke, link_gbps, reps, pipelined: int = 0) -> dict:
    """Per-rank times (ms) of one layer under placement ``lp`` (see the module docstring). ``pipelined = L``: each
    rank's whole layer (its parts but the links) also run as L layers back to back in one timed call, the L2
    flushed between them (``pipelined_ms``: per layer, the flushes taken off), as a forward issues them: the host
    runs ahead, so a part whose launches outlast its kernels costs its kernels only while the rank's device work
    outlasts its host work. The parts timed alone each pay their own host time when it is the longer."""
    n, hq, d = q.shape[0], q.shape[1], q.shape[2]
    hkv = k.shape[1]
    dev = q.device
    work = layer_work(lp, hq, hkv, tp)
    shape = ExtendShape((0,), (n,))
    sched = layer_schedule(work, shape)
    r2t, rpi = torch.arange(n, dtype=torch.int32, device=dev)[None], torch.zeros(1, dtype=torch.long, device=dev)
    lays = [RankLayout(r, tp, hq, hkv, d) for r in range(tp)]
    hps = [HeadParallelExtend(lay, None) for lay in lays]
    qs, ks, vs = (list(x) for x in zip(*(rank_qkv(q, k, v, tp, r) for r in range(tp))))
    outs = [torch.zeros_like(x) for x in qs]
    sends = [hps[r].pack_inputs(sched, qs[r], ks[r], vs[r], r2t, rpi) for r in range(tp)]

    def recv_from(s: int, r: int) -> torch.Tensor:
        off = sum(sched.input_elems(s, t, d) for t in range(tp) if t < r)
        return sends[s][off:off + sched.input_elems(s, r, d)]

    results = {(s, r): hps[r].compute_units(sched, s, budgets, scale, None, recv=recv_from(s, r))
               for r in range(tp) for s in range(tp) if s != r}
    ranks, bw = [], link_gbps * 1e9
    for r in range(tp):
        lay, hp = lays[r], hps[r]
        whole = [lay.local_q(h) for h in work.whole[r]]
        local = list(budgets[lay.q_base:lay.q_base + lay.hq_local])
        rets = [results[(r, t)] if t != r else q.new_empty(0) for t in range(tp)]
        split = [sched.output_elems(r, t, d) for t in range(tp)]
        ret = torch.cat([x for x in rets if x is not None and x.numel()] or [q.new_empty(0)])

        def home(r=r, whole=whole, local=local):
            attend_heads(qs[r], ks[r], vs[r], KVRows.back_to_back([n]), [n], [n], local, whole, scale, outs[r])

        def local_units(r=r):
            hps[r].compute_units(sched, r, budgets, scale, outs[r], q=qs[r], k_buffer=ks[r], v_buffer=vs[r],
                                 req_to_token=r2t, req_pool_indices=rpi)

        def tail(r=r, local=local):  # the backend's dense tail: home sparse heads, after the exchange
            dense_tail(qs[r], ks[r], vs[r], KVRows.back_to_back([n]), [n], [n], sparse_heads(local), scale, outs[r])

        home()
        local_units()
        hp.scatter_outputs(sched, ret, split, outs[r])
        tail()
        t = {"home_ms": bench(home, smoke, reps), "whole_heads": len(whole)}
        if sparse_heads(local):
            t["tail_ms"] = bench(tail, smoke, reps)
        if not smoke:  # after the warm-up calls: the executor's steady state should never wait for the GPU
            t["host_syncs"] = sum(host_syncs(lambda r=r: (
                home(), local_units(), hps[r].pack_inputs(sched, qs[r], ks[r], vs[r], r2t, rpi),
                [hps[r].compute_units(sched, s, budgets, scale, None, recv=recv_from(s, r)) for s in range(tp) if s != r],
                hps[r].scatter_outputs(sched, ret, split, outs[r]))).values())
        if any(u.home == u.target == r for u in work.units):
            t["local_units_ms"] = bench(local_units, smoke, reps)
        moved_in = sum(sched.input_elems(s, r, d) for s in range(tp)) * q.element_size()
        moved_out = sum(sched.input_elems(r, t_, d) for t_ in range(tp)) * q.element_size()
        back_in = sum(sched.output_elems(r, t_, d) for t_ in range(tp)) * q.element_size()
        back_out = sum(sched.output_elems(s, r, d) for s in range(tp)) * q.element_size()
        # timed only where there is something to do (a rank with nothing takes the timer's floor)
        if moved_out:
            t["pack_ms"] = bench(lambda r=r: hps[r].pack_inputs(sched, qs[r], ks[r], vs[r], r2t, rpi), smoke, reps)
        srcs = [s for s in range(tp) if s != r and any(ur.n_rows for ur in sched.unit_rows_between(s, r))]
        if srcs:  # the units each home ships here, timed per home (their sum is the rank's units time)
            per = {s: bench(lambda s=s, r=r: hps[r].compute_units(sched, s, budgets, scale, None, recv=recv_from(s, r)),
                            smoke, reps) for s in srcs}
            t["units_from_ms"] = {str(s): v for s, v in per.items()}
            t["units_ms"] = sum(per.values())
        if back_in:
            t["scatter_ms"] = bench(lambda: hp.scatter_outputs(sched, ret, split, outs[r]), smoke, reps)
        # the rank's output once more, whole: the timers re-ran the home call over the dense tail's rows (on
        # CUDA the sparse kernels leave the tail to ``dense_tail``; rounds 12-15 compared that output, so their
        # max |diff| of 0.2-1.5 was the last 64 rows of streaming heads without their tail)
        home()
        local_units()
        hp.scatter_outputs(sched, ret, split, outs[r])
        tail()
        if pipelined:
            t["pipelined_ms"] = pipelined_ms(lambda r=r: (
                moved_out and hps[r].pack_inputs(sched, qs[r], ks[r], vs[r], r2t, rpi), home(), local_units(),
                [hps[r].compute_units(sched, s, budgets, scale, None, recv=recv_from(s, r)) for s in srcs],
                back_in and hp.scatter_outputs(sched, ret, split, outs[r]), sparse_heads(local) and tail()),
                pipelined, smoke, reps)
        t["link_in_ms"] = max(moved_in, moved_out) / bw * 1e3
        t["link_out_ms"] = max(back_in, back_out) / bw * 1e3
        t["compute_ms"] = (t["home_ms"] + t.get("local_units_ms", 0.0) + t.get("units_ms", 0.0)
                           + t.get("tail_ms", 0.0))
        t["total_ms"] = (t.get("pack_ms", 0.0) + max(t["home_ms"] + t.get("local_units_ms", 0.0), t["link_in_ms"])
                         + t.get("units_ms", 0.0)
                         + t["link_out_ms"] + t.get("scatter_ms", 0.0) + t.get("tail_ms", 0.0))
        t["bytes_in"], t["bytes_out"] = moved_in + back_in, moved_out + back_out
        ranks.append(t)
    slow = max(x["total_ms"] for x in ranks)
    mean = sum(x["total_ms"] for x in ranks) / tp
    cslow = max(x["compute_ms"] for x in ranks)
    cmean = sum(x["compute_ms"] for x in ranks) / tp
    out = {"ranks": ranks, "slowest_ms": slow, "slowest_over_mean": slow / mean,
           "compute_slowest_over_mean": cslow / cmean, "moved_bytes": sched.moved_elems(d, tp) * q.element_size(),
           "units_moved": len(work.moved_units()), "out": torch.cat(outs, 1)}
    if pipelined:
        pl = [x["pipelined_ms"] for x in ranks]
        out["pipelined_slowest_ms"], out["pipelined_slowest_over_mean"] = max(pl), max(pl) * tp / sum(pl)
    return out


def pipelined_note(e: dict) -> str:
    """The pipelined slowest rank of an emulation, for a log line ('' without ``--pipelined``)."""
    if "pipelined_slowest_ms" not in e:
        return ""
    return f"; pipelined {e['pipelined_slowest_ms']:.2f} ms (slowest/mean {e['pipelined_slowest_over_mean']:.2f})"


def pipelined_ms(layer, layers: int, smoke: bool, reps: int) -> float:
    """Milliseconds per layer of ``layer()`` issued ``layers`` times back to back with the L2 flushed before each
    (a 256 MiB write, timed alone and taken off)."""
    flush = torch.empty((1 if smoke else 256) << 20, dtype=torch.int8, device="cpu" if smoke else "cuda")

    def forward():
        for _ in range(layers):
            flush.zero_()
            layer()
    return (bench(forward, smoke, reps) - layers * bench(flush.zero_, smoke, reps)) / layers


def worst_heads(diff: torch.Tensor, budgets, top: int = 4) -> list[dict]:
    """The heads whose output differs most from the single-device call (``diff [n, hq, d]``, absolute): head,
    budget, max |diff|, the row where it is, and how many rows differ by more than 0.05."""
    per_row = diff.amax(-1)                                                    # [n, hq]
    m, at = per_row.max(0)
    order = m.argsort(descending=True)[:top].tolist()
    return [{"head": h, "budget": budgets[h].describe(), "max": float(m[h]), "row": int(at[h]),
             "rows_over_0.05": int((per_row[:, h] > 0.05).sum())} for h in order if float(m[h]) > 0]


def decode_balance(budgets, hq, hkv, tp, n, lp=None, d=128, layers=1, elem=2) -> dict:
    """Decode stays at home: pages each rank's KV groups read per step at context ``n`` (the group's union of
    its heads' pages lies between its largest head's and the sum, capped at all pages), slowest / mean.
    With ``lp`` (a prefill placement): the same if decode followed it (each rank reads the pages of the q
    heads it computes whole or in part, per KV group), and the replica side pool that would need: every KV
    head copied to each rank other than its home that computes one of its q heads, ``2 d elem`` bytes per
    token per copy (K and V), per layer and for ``layers`` layers."""
    pages = -(-n // 64)
    g = hq // hkv
    per_head = [b.decode_pages(pages) for b in budgets]

    def balance(groups_on: list[dict[int, list[int]]]) -> tuple[list[float], list[float]]:
        lo, hi = [0.0] * tp, [0.0] * tp
        for r, groups in enumerate(groups_on):
            for hs in groups.values():
                lo[r] += max(per_head[h] for h in hs)
                hi[r] += min(pages, sum(per_head[h] for h in hs))
        return lo, hi

    home = [{} for _ in range(tp)]
    for h in range(hq):
        home[home_rank(h, hq, tp)].setdefault(h // g, []).append(h)
    lo, hi = balance(home)
    out = {"pages_per_rank_low": lo, "pages_per_rank_high": hi,
           "slowest_over_mean_low": max(lo) / (sum(lo) / tp), "slowest_over_mean_high": max(hi) / (sum(hi) / tp)}
    if lp is not None:
        placed = [{} for _ in range(tp)]
        copies = 0
        for r, pieces in enumerate(lp.gpus):
            for h in sorted({pc.head for pc in pieces}):
                placed[r].setdefault(h // g, []).append(h)
            copies += sum(1 for kv in placed[r] if all(home_rank(h, hq, tp) != r for h in range(kv * g, (kv + 1) * g)))
        plo, phi = balance(placed)
        per_tok = copies * 2 * d * elem
        out.update({"placed_slowest_over_mean_low": max(plo) / (sum(plo) / tp),
                    "placed_slowest_over_mean_high": max(phi) / (sum(phi) / tp),
                    "side_pool_kv_copies_per_layer": copies, "side_pool_bytes_per_token_per_layer": per_tok,
                    "side_pool_bytes_per_token": per_tok * layers,
                    "side_pool_bytes_at_n": per_tok * layers * n})
    return out


def chunked_reship(lp, hq, hkv, tp, n, chunk, d, elem) -> dict:
    """Bytes a placement moves over a whole prompt, in one extend vs chunked prefill (each chunk re-ships the
    prefix K/V its moved units read)."""
    work = layer_work(lp, hq, hkv, tp)
    one = layer_schedule(work, ExtendShape((0,), (n,))).moved_elems(d, tp) * elem
    total = sum(layer_schedule(work, ExtendShape((p,), (min(chunk, n - p),))).moved_elems(d, tp) * elem
                for p in range(0, n, chunk))
    return {"chunk": chunk, "one_shot_bytes": one, "chunked_bytes": total}


def dense_per_rank(q, k, v, tp, scale, smoke, reps, flashinfer) -> dict:
    """One rank's dense share (Hq / TP heads and their KV heads): SDPA through the routine the dense heads of every
    placement take (:func:`.dense_pieces.causal_sdpa`: cuDNN first where its one-time check passed; the plain
    ``scaled_dot_product_attention`` call with torch's own backend choice, used before, took 1.6-1.9x longer in
    round 17 than in round 16 with the same code on an H100, for a reason not found), FlashInfer ragged
    prefill."""
    n, hq, d = q.shape
    hkv = k.shape[1]
    hs = rank_heads(hq, tp, 0)
    kv = sorted({h // (hq // hkv) for h in hs}) if tp <= hkv else [0]
    qq, kk, vv = q[:, hs].contiguous(), k[:, kv].contiguous(), v[:, kv].contiguous()
    def sdpa():
        return causal_sdpa(qq.transpose(0, 1)[None], kk.transpose(0, 1)[None], vv.transpose(0, 1)[None], scale, True)
    row = {"sdpa_ms": bench(sdpa, smoke, reps)}
    if not smoke:   # which kernels the competitor ran, so that a backend change shows in the record
        row["sdpa_kernels"] = {k: round(v, 4) for k, v in list(kernel_ms(sdpa, 3).items())[:3]}
    if flashinfer is not None:
        ws = torch.empty(256 << 20, dtype=torch.uint8, device=q.device)
        w = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(ws, "NHD")
        cu = torch.tensor([0, n], dtype=torch.int32, device=q.device)
        w.plan(cu, cu, len(hs), len(kv), d, causal=True, q_data_type=q.dtype)
        row["flashinfer_ms"] = bench(lambda: w.run(qq, kk, vv), smoke, reps)
    return row


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="llama8b,llama70b")
    ap.add_argument("--ctx", default="32768,65536,131072")
    ap.add_argument("--tp", default="2,4,8")
    ap.add_argument("--plans", default="mixed,profiled")
    ap.add_argument("--quick", action="store_true",
                    help="llama8b + llama70b at 64K / 128K, TP 4 / 8, both plans, 20 ms per timing (about 5 min "
                         "on one H200); overrides --shapes --ctx --tp --plans --reps")
    ap.add_argument("--link-gbps", type=float, default=370.0, help="per-direction link bandwidth (GB/s)")
    ap.add_argument("--calibration", default=str(MOVE_CALIBRATION if MOVE_CALIBRATION.exists() else KERNEL_TABLE),
                    help="cost model the shplb placement is solved with: a kernel table (shplb-calibration/1) or a "
                         "move calibration record (shplb-move-calibration/1, naming its kernel table); default "
                         "%(default)s")
    ap.add_argument("--compare-calibration", default=str(KERNEL_TABLE),
                    help="also solve and emulate shplb_prior with this cost model when its placement differs "
                         "(default: the kernel table alone; '' to skip)")
    ap.add_argument("--reps", type=int, default=60, help="milliseconds of repeats per timing")
    ap.add_argument("--time-budget-s", type=float, default=None,
                    help="start no new row after this many seconds (the fit and the files are still written)")
    ap.add_argument("--chunk", type=int, default=8192, help="chunked-prefill size for the re-shipping count")
    ap.add_argument("--out", default="/tmp/out")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU (Triton interpreter)")
    ap.add_argument("--feedback", type=int, default=0, metavar="N",
                    help="after the open-loop shplb placement, up to N rounds of measured feedback "
                         "(sglang_shplb/planning/rank_feedback.py): re-solve with the heads' costs scaled by "
                         "what the measured ranks say the cost model missed, emulate again; the best round is "
                         "reported as shplb_feedback")
    ap.add_argument("--refine", type=int, default=0, metavar="N",
                    help="then up to N rounds that keep the best round's structure and move its cuts to even out "
                         "its measured ranks (rank_feedback.refine_cuts), each emulated; counted with the feedback "
                         "rounds")
    ap.add_argument("--open-cuts", action="store_true",
                    help="with --refine: where no cut can be moved (the slowest rank holds none), cut one of the "
                         "slowest rank's heads instead (rank_feedback.open_cut)")
    ap.add_argument("--plan", default=None, metavar="DIR",
                    help="measure this plan's layers (its budgets and shape) at --ctx (bucket edges of the plan) and "
                         "--tp with --feedback N rounds each, and write the head-scales file for place --head-scales")
    ap.add_argument("--layers", default=None, help="with --plan: the layers to measure, comma-separated (default all)")
    ap.add_argument("--fit", nargs="+", default=None, metavar="JSON",
                    help="no run: refit the move calibration from these result files (their placements "
                         "re-solved with --compare-calibration's kernel table when they lack predictions)")
    ap.add_argument("--unrouted-prefixes", action="store_true",
                    help="dense pieces run their prefix on cuDNN however small its grid (dense_pieces.unrouted_prefixes;"
                         " default: dense_pieces.prefix_backend, flash for a small grid)")
    ap.add_argument("--pipelined", type=int, default=0, metavar="L",
                    help="also time each rank's layer as L layers back to back in one call, the L2 flushed between "
                         "them (pipelined_ms: the host running ahead, as in a forward; links not included)")
    ap.add_argument("--routing-pair", action="store_true",
                    help="emulate each row's best placement again with every prefix on cuDNN and then routed, back "
                         "to back (the same placement, the same process)")
    a = ap.parse_args(argv)
    if a.routing_pair and a.unrouted_prefixes:
        ap.error("--routing-pair times both routings itself: leave out --unrouted-prefixes")
    if a.plan and a.feedback + a.refine < 1:
        ap.error("--plan measures feedback rounds: give --feedback N or --refine N (N >= 1)")
    if a.quick:
        a.shapes, a.ctx, a.tp, a.plans, a.reps = QUICK["shapes"], QUICK["ctx"], QUICK["tp"], QUICK["plans"], QUICK["reps"]
        a.time_budget_s = a.time_budget_s or QUICK["time_budget_s"]
    return a


def records_of(row: dict) -> list[RankRecord]:
    """The fit's per-rank records of one result row (every placement with predictions)."""
    out = []
    placed = [(name, row.get(name)) for name in ("contiguous", "shplb", "shplb_prior")]
    placed += [(f"feedback{i + 1}", e) for i, e in enumerate(row.get("feedback", []))]
    for name, e in placed:
        if not isinstance(e, dict) or "ranks" not in e:
            continue
        for r, t in enumerate(e["ranks"]):
            if "pred" in t:
                out.append(RankRecord.from_dict({**t["pred"], **t,
                                                 "tag": f"{row['shape']} {row['plan']} {row['n']} TP{row['tp']} {name}"}))
    return out


def fit_and_write(recs: list[RankRecord], out: Path, tag: str, device: str, sources: list[str],
                  kernel_table: str) -> dict | None:
    try:
        fit = fit_moves(recs)
    except ValueError as e:
        log(f"move calibration: no fit ({e})")
        return None
    log("move calibration fit (per-rank times; model in the docstring of sglang_shplb/planning/move_calibration.py):")
    log(format_fit(fit))
    path = out / f"move_calibration_{tag}.json"
    kt = Path(kernel_table).resolve()
    try:
        kt_rel = str(kt.relative_to(path.resolve().parent))
    except ValueError:
        kt_rel = str(kt)
    rec = fit.record(device, time.strftime("%Y-%m-%d"), sources, kt_rel)
    write_move_calibration(path, rec)
    log(f"wrote {path}")
    return rec


def refit(files: list[str], out: Path, kernel_table: str) -> None:
    """``--fit``: records of earlier runs (predictions re-derived from re-solved placements where absent)."""
    cost = load_cost_model(kernel_table)
    recs, device = [], None
    for f in files:
        res = json.loads(Path(f).read_text())
        device = device or res.get("device")
        for row in res["rows"]:
            if any("pred" in t for t in row.get("shplb", {}).get("ranks", [])):
                recs += records_of(row)
                continue
            hq, hkv, d = SHAPES[row["shape"]]
            budgets = plan_budgets(row["plan"], hq, hkv, seed=row["n"])
            lps = {"contiguous": placements(budgets, hq, hkv, d, row["tp"], row["n"], cost)["contiguous"],
                   "shplb": solve(budgets, hq, hkv, d, row["tp"], row["n"], cost)}
            work = layer_work(lps["shplb"], hq, hkv, row["tp"])
            moved = layer_schedule(work, ExtendShape((0,), (row["n"],))).moved_elems(d, row["tp"]) * 2
            if (len(work.moved_units()), moved) != (row["shplb"]["units_moved"], row["shplb"]["moved_bytes"]):
                log(f"{f}: {row['shape']} {row['plan']} {row['n']} TP{row['tp']}: re-solved placement differs "
                    f"from the recorded one (units, bytes); left out")
                continue
            for name, lp in lps.items():
                preds = rank_predictions(lp, budgets, cost, row["n"], hkv, row["tp"], d)
                for r, (t, p) in enumerate(zip(row[name]["ranks"], preds)):
                    recs.append(RankRecord.from_dict({**p, **t, "tag": f"{row['shape']} {row['plan']} {row['n']} "
                                                                       f"TP{row['tp']} {name}"}))
    out.mkdir(parents=True, exist_ok=True)
    log(f"refit from {len(recs)} rank records of {files}")
    fit_and_write(recs, out, device_tag(device or "gpu"), device or "?", [str(f) for f in files], kernel_table)


def main(argv=None) -> None:
    a = parse_args(argv)
    with unrouted_prefixes() if a.unrouted_prefixes else nullcontext():
        run(a)


def run(a: argparse.Namespace) -> None:
    out = Path(a.out)
    if a.fit:
        refit(a.fit, out, a.compare_calibration or str(KERNEL_TABLE))
        return
    if a.plan:
        plan_feedback(a, out)
        return
    smoke, dev, dt, shapes, ctxs, tps = run_grid(a)
    cost = load_cost_model(a.calibration)
    prior = load_cost_model(a.compare_calibration) if a.compare_calibration else None
    kernel_table = (cost.calibration_info or {}).get("path") or str(KERNEL_TABLE)
    flashinfer = flashinfer_or_none(smoke)
    name = device_name(smoke)
    tag = device_tag(name)
    out.mkdir(parents=True, exist_ok=True)
    res = {"device": name, "date": time.strftime("%Y-%m-%d"), "link_gbps": a.link_gbps, "argv": sys.argv[1:],
           "cost_model": cost.to_dict(), "prior_cost_model": None if prior is None else prior.to_dict(),
           "piece_backend": piece_backend(torch.zeros(1, 1, SHAPES[shapes[0]][2], device=dev, dtype=dt)),
           "rows": []}
    dump = results_writer(res, str(out / f"head_parallel_{tag}"))
    log(f"head-parallel emulation on {name}; links at {a.link_gbps} GB/s per direction (assumed); shplb solved "
        f"with {cost!r}" + (f"; shplb_prior with {prior!r}" if prior is not None else "")
        + f"; dense pieces after a prefix on {res['piece_backend']}")
    t_start = time.perf_counter()
    for shape in shapes:
        hq, hkv, d = SHAPES[shape]
        scale = d ** -0.5
        for n in ctxs:
            q, k, v = layer_qkv(n, hq, hkv, d, dev, dt)
            for plan in a.plans.split(","):
                budgets = plan_budgets(plan, hq, hkv, seed=n)
                ref = single_device_layer(q, k, v, budgets)
                for tp in tps:
                    if hq % tp:
                        continue
                    if a.time_budget_s is not None and time.perf_counter() - t_start > a.time_budget_s:
                        log(f"{shape} n={n} {plan} TP{tp}: skipped (past --time-budget-s {a.time_budget_s:.0f})")
                        continue
                    row = {"shape": shape, "n": n, "plan": plan, "tp": tp}
                    lps = placements(budgets, hq, hkv, d, tp, n, cost, prior)
                    if smoke:  # tiny shapes: no placement moves anything; run a hand-made one that does
                        lps["shplb_prior"] = forced_moves(hq, tp)
                    for pname, lp in lps.items():
                        e, diff = emulate_checked(lp, budgets, q, k, v, ref, tp, scale, smoke, a, cost)
                        row[f"{pname}_max_abs_diff"] = e["max_abs_diff"]
                        row[f"{pname}_worst_heads"] = worst_heads(diff, budgets)
                        row[pname] = e
                    if a.feedback or a.refine:
                        row["feedback"] = feedback_rounds(budgets, q, k, v, ref, tp, scale, smoke, a, cost,
                                                          (lps["shplb"], row["shplb"]))
                        row["feedback"] += refine_rounds(budgets, q, k, v, ref, tp, scale, smoke, a, cost,
                                                         [row["shplb"]] + row["feedback"])
                        rounds = [row["shplb"]] + row["feedback"]
                        row["feedback_best_round"] = best_checked(rounds)
                        row["shplb_feedback"] = rounds[row["feedback_best_round"]]
                    if a.routing_pair:
                        row["routing_pair"] = routing_pair(row, budgets, q, k, v, ref, tp, scale, smoke, a, cost)
                    row.update(dense_per_rank(q, k, v, tp, scale, smoke, a.reps, flashinfer))
                    if row.get("sdpa_kernels"):
                        log("  dense SDPA competitor's kernels (ms per call): " + ", ".join(
                            f"{k} {v:.3f}" for k, v in row["sdpa_kernels"].items()))
                    row["decode"] = decode_balance(budgets, hq, hkv, tp, n, lps["shplb"], d, LAYERS[shape],
                                                   q.element_size())
                    row["chunked_prefill"] = chunked_reship(lps["shplb"], hq, hkv, tp, n, a.chunk, d, q.element_size())
                    s = row["shplb"]["slowest_ms"]
                    row["speedup_vs_contiguous"] = row["contiguous"]["slowest_ms"] / s
                    row["speedup_vs_dense_sdpa"] = row["sdpa_ms"] / s
                    # the most any placement can give: the contiguous ranks' work spread evenly, moves free
                    row["bound_vs_dense_sdpa"] = row["sdpa_ms"] * tp / sum(
                        x["compute_ms"] for x in row["contiguous"]["ranks"])
                    if "shplb_prior" in row:
                        row["speedup_vs_prior"] = row["shplb_prior"]["slowest_ms"] / s
                    if "shplb_feedback" in row:
                        fb = row["shplb_feedback"]["slowest_ms"]
                        row["feedback_vs_contiguous"] = row["contiguous"]["slowest_ms"] / fb
                        row["feedback_vs_dense_sdpa"] = row["sdpa_ms"] / fb
                        log(f"  with feedback (best of {len(row['feedback']) + 1}, round "
                            f"{row['feedback_best_round']}): slowest {fb:.2f} ms, slowest/mean "
                            f"{row['shplb_feedback']['slowest_over_mean']:.2f} (compute "
                            f"{row['shplb_feedback']['compute_slowest_over_mean']:.2f}), x"
                            f"{row['feedback_vs_contiguous']:.2f} vs contiguous, x{row['feedback_vs_dense_sdpa']:.2f} "
                            f"vs dense SDPA" + pipelined_note(row["shplb_feedback"]))
                    if "flashinfer_ms" in row:
                        row["speedup_vs_flashinfer"] = row["flashinfer_ms"] / s
                    res["rows"].append(row)
                    dec = row["decode"]
                    log(f"{shape} n={n} {plan} TP{tp}: slowest ms contiguous {row['contiguous']['slowest_ms']:.2f} "
                        f"shplb {s:.2f} (slowest/mean {row['shplb']['slowest_over_mean']:.2f}, compute "
                        f"{row['shplb']['compute_slowest_over_mean']:.2f}; contiguous "
                        f"{row['contiguous']['slowest_over_mean']:.2f}), moved {row['shplb']['moved_bytes'] / 2**20:.1f}"
                        f" MiB in {row['shplb']['units_moved']} units; x{row['speedup_vs_contiguous']:.2f} vs "
                        f"contiguous, x{row['speedup_vs_dense_sdpa']:.2f} vs dense SDPA (bound: even work, free "
                        f"moves, x{row['bound_vs_dense_sdpa']:.2f})"
                        + (f", x{row['speedup_vs_flashinfer']:.2f} vs FlashInfer" if "flashinfer_ms" in row else "")
                        + (f"; shplb_prior {row['shplb_prior']['slowest_ms']:.2f} ms ({row['shplb_prior']['units_moved']}"
                           f" units, slowest/mean {row['shplb_prior']['slowest_over_mean']:.2f}): x"
                           f"{row['speedup_vs_prior']:.2f}" if "shplb_prior" in row else "; shplb_prior = shplb")
                        + pipelined_note(row["shplb"]) + (f" (contiguous {row['contiguous']['pipelined_slowest_ms']:.2f})"
                                                           if a.pipelined else "")
                        + f"; max|diff| {row['shplb_max_abs_diff']:.3g}; the calibrated objective predicted "
                        + ", ".join(f"{p} {row[p]['predicted_slowest_ms']:.2f}" for p in lps) + " ms")
                    if row["contiguous_max_abs_diff"] > 0.05:
                        log("  heads differing most from the single-device call (contiguous): " + "; ".join(
                            f"{w['head']} {w['budget']} {w['max']:.3g} at row {w['row']} ({w['rows_over_0.05']} rows "
                            f"> 0.05)" for w in row["contiguous_worst_heads"]))
                    log(f"  decode TP{tp} (home) slowest/mean {dec['slowest_over_mean_low']:.2f}-"
                        f"{dec['slowest_over_mean_high']:.2f}; following the prefill placement "
                        f"{dec['placed_slowest_over_mean_low']:.2f}-{dec['placed_slowest_over_mean_high']:.2f} with a "
                        f"side pool of {dec['side_pool_kv_copies_per_layer']} KV-head copies per layer = "
                        f"{dec['side_pool_bytes_per_token_per_layer']} B/token/layer, "
                        f"{dec['side_pool_bytes_per_token'] / 2**10:.0f} KiB/token over {LAYERS[shape]} layers, "
                        f"{dec['side_pool_bytes_at_n'] / 2**30:.2f} GiB at {n} tokens; chunked prefill moves "
                        f"{row['chunked_prefill']['chunked_bytes'] / 2**20:.0f} MiB vs "
                        f"{row['chunked_prefill']['one_shot_bytes'] / 2**20:.0f} MiB one-shot "
                        f"[{time.perf_counter() - t_start:.0f} s]")
                    dump()
            del q, k, v
    recs = [r for row in res["rows"] for r in records_of(row)]
    res["move_calibration"] = fit_and_write(recs, out, tag, name, [str(out / f"head_parallel_{tag}.json")], kernel_table)
    log(f"done in {time.perf_counter() - t_start:.0f} s")
    dump()
    summary(res)
    plot(res, out / f"head_parallel_{tag}.png")
    if any(r.get("feedback") is not None for r in res["rows"]):
        plot_rounds(res, out / f"head_parallel_rounds_{tag}.png")


def single_device_layer(q, k, v, budgets) -> torch.Tensor:
    """One layer's attention of every head on one device: the reference every emulated placement is checked
    against (sparse heads' last rows recomputed dense, as the backend does)."""
    n, hq, d = q.shape
    ref = torch.zeros_like(q)
    attend_heads(q, k, v, KVRows.back_to_back([n]), [n], [n], budgets, range(hq), d ** -0.5, ref)
    dense_tail(q, k, v, KVRows.back_to_back([n]), [n], [n], sparse_heads(budgets), d ** -0.5, ref)
    return ref


def plan_feedback(a: argparse.Namespace, out: Path) -> None:
    """``--plan``: per (TP, bucket edge, layer) of the plan, the open-loop placement and ``--feedback`` rounds
    emulated; the best round's multipliers (ones when the open loop was best) written as a head-scales file."""
    from sglang_shplb.core.plan import load_plan
    from sglang_shplb.planning.rank_feedback import budgets_fingerprint, save_head_scales

    plan = load_plan(a.plan)
    spec, smoke = plan.model, a.cpu_smoke
    hq, hkv, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
    dev, dt = ("cpu", torch.float32) if smoke else ("cuda", torch.bfloat16)
    ctxs, tps = [int(x) for x in a.ctx.split(",")], [int(x) for x in a.tp.split(",")]
    layers = range(spec.num_layers) if a.layers is None else [int(x) for x in a.layers.split(",")]
    bad = [f"--ctx {n}: not a bucket edge of the plan {list(plan.buckets.edges)}" for n in ctxs
           if n not in plan.buckets.edges or n > spec.max_context]
    bad += [f"--tp {tp}: needs 2 <= TP dividing the {hq} query heads" for tp in tps if tp < 2 or hq % tp]
    bad += [f"--layers {li}: the plan has {spec.num_layers}" for li in layers if not 0 <= li < spec.num_layers]
    if bad:
        raise SystemExit("head_parallel.py --plan: " + "; ".join(bad))
    cost = load_cost_model(a.calibration)
    name = device_name(smoke)
    res = {"device": name, "date": time.strftime("%Y-%m-%d"), "argv": sys.argv[1:], "plan": a.plan,
           "link_gbps": a.link_gbps, "cost_model": cost.to_dict(), "rows": []}
    tag = device_tag(name)
    out.mkdir(parents=True, exist_ok=True)
    dump = results_writer(res, str(out / f"plan_feedback_{tag}"))
    log(f"plan feedback on {name}: {a.plan} ({spec.num_layers} layers, {hq} q / {hkv} KV heads, d {d}), layers "
        f"{list(layers)}, TP {tps}, {ctxs} tokens, {a.feedback} rounds; solved with {cost!r}")
    # layers with the same budgets are one problem: measured once (on the first), the entry written for each
    alike: dict[str, list[int]] = {}
    for li in layers:
        alike.setdefault(budgets_fingerprint([plan.budgets[li]]), []).append(li)
    t0, entries = time.perf_counter(), []
    for n in ctxs:
        q, k, v = layer_qkv(n, hq, hkv, d, dev, dt)
        for same in alike.values():
            li, budgets = same[0], plan.budgets[same[0]]
            ref = single_device_layer(q, k, v, budgets)
            for tp in tps:
                if a.time_budget_s is not None and time.perf_counter() - t0 > a.time_budget_s:
                    log(f"layers {same} TP{tp} n={n}: skipped (past --time-budget-s {a.time_budget_s:.0f})")
                    continue
                lp = solve(budgets, hq, hkv, d, tp, n, cost)
                e, _ = emulate_checked(lp, budgets, q, k, v, ref, tp, d ** -0.5, smoke, a, cost)
                rounds = [e] + feedback_rounds(budgets, q, k, v, ref, tp, d ** -0.5, smoke, a, cost, (lp, e))
                rounds += refine_rounds(budgets, q, k, v, ref, tp, d ** -0.5, smoke, a, cost, rounds)
                best = best_checked(rounds)
                entry = {"tp": tp, "seq_len": n, "scale": rounds[best].get("head_scale", [1.0] * hq),
                         "best_round": best, "slowest_ms": [r["slowest_ms"] for r in rounds],
                         "compute_slowest_over_mean": [r["compute_slowest_over_mean"] for r in rounds],
                         "max_abs_diff": rounds[best]["max_abs_diff"],
                         "worst_abs_diff": max(r["max_abs_diff"] for r in rounds), "measured_on": li}
                if rounds[best].get("kind") in ("cuts", "open"):   # the measured cuts themselves (place adopts them)
                    entry["pieces"] = rounds[best]["pieces"]
                entries += [{**entry, "layer": x} for x in same]
                res["rows"].append({"tp": tp, "n": n, "layer": li, "layers": same, "rounds": rounds})
                log(f"layer {li}" + (f" (and {len(same) - 1} alike)" if len(same) > 1 else "") + f" TP{tp} n={n}: "
                    "slowest ms " + " -> ".join(f"{r['slowest_ms']:.3f}" for r in rounds)
                    + f" (best round {best}); max|diff| {entry['max_abs_diff']:.3g} (worst round "
                    f"{entry['worst_abs_diff']:.3g}) [{time.perf_counter() - t0:.0f} s]")
                dump()
        del q, k, v
    path = save_head_scales(out / f"head_scales_{tag}.json", spec, plan.budgets, cost.to_dict(), entries,
                            device=name, date=res["date"], command="bench/head_parallel.py " + " ".join(sys.argv[1:]),
                            link_gbps=a.link_gbps)
    for tp in tps:
        for n in ctxs:
            es = [e for e in entries if e["tp"] == tp and e["seq_len"] == n]
            opened, best = sum(e["slowest_ms"][0] for e in es), sum(e["slowest_ms"][e["best_round"]] for e in es)
            log(f"TP{tp} n={n}: slowest rank summed over {len(es)} layers {opened:.2f} ms open loop, {best:.2f} ms "
                f"with feedback (x{opened / best:.3f}); {sum(e['best_round'] > 0 for e in es)} layers changed")
    res["head_scales"] = str(path)
    dump()
    log(f"head scales -> {path} ({len(entries)} entries) in {time.perf_counter() - t0:.0f} s")


def summary(res: dict) -> None:
    """Per (shape, plan, TP): S-HPLB over contiguous and over the prior placement, slowest/mean, decode."""
    log("summary: shape plan n TP | x contiguous | x prior | x dense SDPA (bound) | slowest/mean (compute) | units"
        " | decode home / placed | host syncs (most on a rank)")
    for r in res["rows"]:
        e, dec = r["shplb"], r["decode"]
        log(f"  {r['shape']:8s} {r['plan']:8s} {r['n'] // 1024:4d}K TP{r['tp']} | {r['speedup_vs_contiguous']:.2f} | "
            f"{r.get('speedup_vs_prior', 1.0):.2f} | {r['speedup_vs_dense_sdpa']:.2f} "
            f"({r.get('bound_vs_dense_sdpa', float('nan')):.2f}) | {e['slowest_over_mean']:.2f} ({e['compute_slowest_over_mean']:.2f})"
            f" | {e['units_moved']} | {dec['slowest_over_mean_low']:.2f}-{dec['slowest_over_mean_high']:.2f} / "
            f"{dec['placed_slowest_over_mean_low']:.2f}-{dec['placed_slowest_over_mean_high']:.2f}"
            f" | {max(x.get('host_syncs', 0) for x in e['ranks'])}"
            + (f" | feedback: x{r['feedback_vs_contiguous']:.2f} contiguous, x{r['feedback_vs_dense_sdpa']:.2f} dense, "
               f"slowest/mean {r['shplb_feedback']['slowest_over_mean']:.2f} "
               f"({r['shplb_feedback']['compute_slowest_over_mean']:.2f}), round {r['feedback_best_round']}"
               if "shplb_feedback" in r else "")
            + (f" | prefixes unrouted / routed {r['routing_pair']['unrouted']['slowest_ms']:.2f} / "
               f"{r['routing_pair']['routed']['slowest_ms']:.2f} ms" if "routing_pair" in r else ""))


def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = res["rows"]
    keys = sorted({(r["shape"], r["plan"]) for r in rows})
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False)
    for ax, (shape, plan) in zip(axes[0], keys):
        for tp, m in zip(sorted({r["tp"] for r in rows}), "os^"):
            sel = sorted((r for r in rows if (r["shape"], r["plan"], r["tp"]) == (shape, plan, tp)), key=lambda r: r["n"])
            xs = [r["n"] // 1024 for r in sel]
            ax.plot(xs, [r["speedup_vs_contiguous"] for r in sel], "-" + m, label=f"TP{tp} vs contiguous")
            ax.plot(xs, [r["speedup_vs_dense_sdpa"] for r in sel], "--" + m, label=f"TP{tp} vs dense SDPA")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xticks([32, 64, 128], ["32K", "64K", "128K"])
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("slowest-rank speedup of S-HPLB")
        ax.set_title(f"{shape}, {plan} plan")
        ax.legend(fontsize=7)
    fig.suptitle(f"{res['device']}: TP emulated on one GPU, links at {res['link_gbps']} GB/s (assumed)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


#: marker and colour of each kind of round in :func:`plot_rounds` (None: the open loop)
ROUND_STYLES = {None: ("s", "black"), "scale": ("o", "tab:blue"), "cuts": ("^", "tab:orange"),
                "open": ("D", "tab:green")}


def plot_rounds(res: dict, path: Path) -> None:
    """Per cell, every emulated round's slowest rank over the open loop's (multiplier rounds, refine rounds, the
    best marked) and its compute slowest/mean: what ``--feedback`` / ``--refine`` did, cell by cell."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in res["rows"] if r.get("feedback") is not None]
    fig, (top, bot) = plt.subplots(2, 1, figsize=(max(8, 0.75 * len(rows)), 7), sharex=True)
    for i, r in enumerate(rows):
        rounds = [r["shplb"]] + r["feedback"]
        base = rounds[0]["slowest_ms"]
        for e in rounds:
            style = ROUND_STYLES.get(e.get("kind"), ROUND_STYLES[None])
            top.plot(i, e["slowest_ms"] / base, style[0], color=style[1], ms=5, alpha=0.8)
            bot.plot(i, e["compute_slowest_over_mean"], style[0], color=style[1], ms=5, alpha=0.8)
        b = rounds[r["feedback_best_round"]]
        top.plot(i, b["slowest_ms"] / base, "*", color="tab:red", ms=12, mfc="none")
        bot.plot(i, b["compute_slowest_over_mean"], "*", color="tab:red", ms=12, mfc="none")
    for label, (m, c) in (("open loop", ROUND_STYLES[None]),
                          ("per-head multipliers (--feedback)", ROUND_STYLES["scale"]),
                          ("cuts moved (--refine)", ROUND_STYLES["cuts"]),
                          ("a head cut (--open-cuts)", ROUND_STYLES["open"]), ("best round", ("*", "tab:red"))):
        top.plot([], [], m, color=c, label=label, mfc="none" if m == "*" else None)
    top.axhline(1.0, color="gray", lw=0.8)
    top.set_ylabel("slowest rank / open loop's")
    top.legend(fontsize=7, ncol=5)
    bot.axhline(1.05, color="gray", lw=0.8, ls="--")
    bot.set_ylabel("compute slowest / mean")
    bot.set_xticks(range(len(rows)), [f"{r['shape']} {r['n'] // 1024}K\n{r['plan']} TP{r['tp']}" for r in rows],
                   fontsize=7, rotation=60)
    fig.suptitle(f"{res['device']}: measured feedback rounds per cell (TP emulated on one GPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
