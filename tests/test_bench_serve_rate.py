"""``bench/serve_gpu.py``'s decode rate of a batch sent at once, on hand-made stream timings; its cold-start sum and
its Llama-3-8B plans."""
import gzip
import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from serve_gpu import (LLAMA8B, batch_decode_rate, cold_start_s, fresh_offsets, make_plans, median_cell,  # noqa: E402
                       merge_results, run_cold_start_s, server_kind)

from sglang_shplb.core.patterns import Pattern  # noqa: E402
from sglang_shplb.core.plan import load_plan  # noqa: E402
from sglang_shplb.evaluation.servers import Generation  # noqa: E402


def gen(sent_at: float, first: float, n: int, step: float) -> Generation:
    """``n`` tokens, the first at ``first`` s after sending, then one every ``step`` s."""
    chunks = tuple((first + i * step, i + 1) for i in range(n))
    return Generation("", first, chunks[-1][0], n, sent_at, chunks)


def test_batch_one_is_tokens_after_the_first_over_the_time():
    window, rate = batch_decode_rate([gen(0.0, 0.5, 11, 0.01)])
    assert window == "batch" and rate == pytest.approx(100.0)


def test_whole_batch_window_counts_every_request():
    # two requests decode at 100 tok/s each from 0.5 s and 0.6 s: together from 0.6 s until the first ends
    window, rate = batch_decode_rate([gen(0.0, 0.5, 51, 0.01), gen(0.0, 0.6, 51, 0.01)])
    assert window == "batch" and rate == pytest.approx(100.0, rel=0.05)


def test_no_common_window_falls_back_to_each_request_after_the_last_prefill():
    # the first request ends (1.0 s) before the second's first token (2.0 s): no window where both decode
    early, late = gen(0.0, 0.5, 6, 0.1), gen(0.0, 2.0, 11, 0.05)
    window, rate = batch_decode_rate([early, late])
    assert window == "tail" and rate == pytest.approx(10 / 0.5)   # the late one alone: 10 tokens in 0.5 s
    window, rate = batch_decode_rate([gen(0.0, 0.5, 1, 0.1), gen(0.0, 2.0, 1, 0.1)])
    assert window == "tail" and math.isnan(rate)                   # nobody decodes after the last first token


def test_median_cell_takes_medians_over_passes_and_skips_nan_rates():
    passes = [{"ttft_s": t, "decode_tok_s": r, "texts": [str(i)]}
              for i, (t, r) in enumerate([(0.30, 100.0), (0.10, float("nan")), (0.20, 300.0), (0.90, 200.0)])]
    cell = median_cell(passes)
    assert cell["ttft_s"] == 0.25   # median of 0.1, 0.2, 0.3, 0.9
    assert cell["decode_tok_s"] == 200.0   # median of 100, 300, 200: the NaN pass left out
    assert cell["texts"] == ["3"] and cell["ttft_all_s"] == [0.30, 0.10, 0.20, 0.90]
    assert math.isnan(median_cell([{"ttft_s": 1.0, "decode_tok_s": float("nan")}])["decode_tok_s"])


def test_merge_results_joins_runs_of_one_model_and_keeps_the_first_run_of_a_server():
    a = {"which": "llama8b", "date": "d1", "runs": [{"server": "shplb", "n": 1}, {"server": "flashinfer", "n": 1}]}
    b = {"which": "llama8b", "date": "d2", "runs": [{"server": "shplb_routed", "n": 2}, {"server": "shplb", "n": 2}]}
    c = {"which": "smollm2", "date": "d3", "runs": [{"server": "shplb", "n": 3}]}
    merged = merge_results([a, b, c])
    assert [m["which"] for m in merged] == ["llama8b", "smollm2"]
    assert [(r["server"], r["n"]) for r in merged[0]["runs"]] == [("shplb", 1), ("flashinfer", 1), ("shplb_routed", 2)]
    assert merged[0]["date"] == "d1" and merged[1]["runs"] == c["runs"]


def test_a_repeated_server_is_its_kind_again():
    assert [server_kind(n) for n in ("flashinfer#2", "shplb", "shplb_routed#3")] == ["flashinfer", "shplb", "shplb_routed"]


@pytest.mark.parametrize("n", [2048, 65536, 131072])
def test_fresh_lengths_are_new_shapes(n):
    """``--fresh-lengths``: lengths below the cell's, apart, none a multiple of 64 (a pool page, a block) or of
    SGLang's 8192-token chunk, none under half the cell's, so a server meets each one for the first time."""
    offs = fresh_offsets(n, 4)
    lens = [n - o for o in offs]
    assert len(offs) == 4 and len(set(lens)) == 4
    assert all(n // 2 < L < n and L % 64 and L % 8192 for L in lens)
    assert fresh_offsets(300, 4) == [61, 125]     # short cells keep the offsets that stay above half


def test_cold_start_is_startup_plus_what_first_requests_took_over_the_measured_ones():
    run = {"startup_s": 100.0, "cells": [{"first_ttft_s": 9.0, "ttft_s": 1.0}, {"first_ttft_s": 2.0, "ttft_s": 2.5}]}
    assert run_cold_start_s(run) == 108.0 == cold_start_s(100.0, [(9.0, 1.0), (2.0, 2.5)])   # +8 s, then +0 (faster)
    assert run_cold_start_s({"server": "x", "error": "died"}) is None


def test_the_tile128_llama_plan_differs_from_shplb_in_its_top_k_tile_only(tmp_path):
    model = tmp_path / "llama8b_cfg"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({**LLAMA8B, "max_position_embeddings": 131200}))
    plans = {k: load_plan(v) for k, v in make_plans("llama8b", model, tmp_path).items()}
    base, tiled = plans["shplb"].budgets, plans["shplb_tile128"].budgets
    pairs = [(a, b) for la, lb in zip(base, tiled) for a, b in zip(la, lb)]
    assert sum(a.pattern is Pattern.TOPK for a, _ in pairs) == 32 * 16   # 4 top-k KV groups of 4 heads a layer
    for a, b in pairs:
        assert (b.tile, b.pattern, b.fraction) == ((128 if a.pattern is Pattern.TOPK else 64), a.pattern, a.fraction)


def test_the_smollm2_plans_place_the_shipped_default_budgets(tmp_path):
    """The GPU runs carry ``bench/results/default_plan`` (not the older eval plans): both SmolLM2 plans place its
    budgets, ``shplb`` with the stock decision, ``shplb_sparse`` without."""
    from serve_gpu import DEFAULT_BUDGETS
    plans = {k: load_plan(v) for k, v in make_plans("smollm2", tmp_path, tmp_path).items()}
    shipped = json.loads((DEFAULT_BUDGETS / "budgets.json").read_text())["budgets"]
    for plan in plans.values():
        assert [[b.to_dict() for b in layer] for layer in plan.budgets] == shipped
    assert plans["shplb"].stock_layers("prefill", 0) and not plans["shplb_sparse"].stock_layers("prefill", 0)


def test_variants_name_an_existing_plan_and_the_switch_the_kernels_read(tmp_path, monkeypatch):
    """``shplb_triton`` / ``shplb_p64_triton`` are the Llama-3-8B ``shplb`` plan with the cuDNN route's switch set to
    ``0`` (the value that :func:`sglang_shplb.kernels.cudnn_blocks.route_mode` reads as never), the second with
    ``--page-size 64``, a flag SGLang's parser takes."""
    from serve_gpu import VARIANTS

    from sglang_shplb.kernels.cudnn_blocks import SWITCH, route_mode
    model = tmp_path / "llama8b_cfg"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({**LLAMA8B, "max_position_embeddings": 131200}))
    plans = make_plans("llama8b", model, tmp_path)
    for name, flags in (("shplb_triton", ()), ("shplb_p64_triton", ("--page-size", "64"))):
        base, env, got = VARIANTS[name]
        assert base in plans and env == {SWITCH: "0"} and got == flags
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert route_mode() == "0"


def test_a_plan_through_sglang_own_launcher():
    """``shplb_sglang``: the stock server's command (``sglang.launch_server``, same flags) with ``--attention-backend
    shplb`` and the plan in ``SHPLB_PLAN``, the variables the plugin reads."""
    from serve_gpu import VIA_SGLANG, via_sglang

    from sglang_shplb.evaluation.servers import server_specs
    from sglang_shplb.serving.config import ENV_PLAN, ServingConfig
    dense, (ours,) = server_specs(Path("m"), [Path("p")], "cuda", "bfloat16", 4096, extra=("--page-size", "16"))
    spec = via_sglang(dense, Path("plans/shplb"))
    assert VIA_SGLANG["shplb_sglang"] == "shplb" and spec.module == dense.module == "sglang.launch_server"
    args = list(spec.args)
    assert args[args.index("--attention-backend") + 1] == "shplb" and "--shplb-plan" not in args
    assert len(args) == len(dense.args) and "--page-size" in args
    assert ServingConfig.from_env(spec.env).plan_path == "plans/shplb" and ENV_PLAN not in dense.env


def test_the_route_and_bucketing_variants_set_the_variables_their_readers_read(tmp_path, monkeypatch):
    """``shplb_route1`` sets the route's switch to ``1`` (always, for ``route_mode``); ``shplb_bucketed`` sets torch's
    cuDNN bucketing switch, the variable the launcher leaves alone once it is given."""
    from serve_gpu import VARIANTS

    from sglang_shplb.kernels.cudnn_blocks import SWITCH, route_mode
    from sglang_shplb.kernels.dense_pieces import CUDNN_BUCKETED_PLANS_ENV
    from sglang_shplb.serving.launch import bucketed_cudnn_plans
    base, env, flags = VARIANTS["shplb_route1"]
    assert base == "shplb" and flags == () and env == {SWITCH: "1"}
    monkeypatch.setenv(SWITCH, env[SWITCH])
    assert route_mode() == "1"
    base, env, flags = VARIANTS["shplb_bucketed"]
    assert base == "shplb" and flags == () and env == {CUDNN_BUCKETED_PLANS_ENV: "1"}
    given = dict(env)
    assert bucketed_cudnn_plans(given, warmup=True) is None and given == env


def test_a_server_the_launcher_served_stock_outright_is_labelled_so(tmp_path, capsys):
    """``shplb_always`` is the ``shplb`` plan through our backend (the launcher's switch); a run whose log showed the
    launcher serving the stock backend outright (``stock_outright``) is labelled so in the table, not with its plan's
    stock layers."""
    from serve_gpu import VARIANTS, report

    from sglang_shplb.serving.config import OUTRIGHT_MARK
    from sglang_shplb.serving.launch import build_parser
    base, env, flags = VARIANTS["shplb_always"]
    assert base == "shplb" and env == {} and build_parser().parse_args(["--model-path", "m", *flags]).shplb_always_backend
    assert "--shplb-always-backend" in OUTRIGHT_MARK
    cell = {"length": 2048, "batch": 1, "ttft_s": 0.04, "decode_tok_s": 500.0}
    res = {"which": "smollm2", "device": "cuda", "date": "d", "runs": [
        {"server": "flashinfer", "cells": [cell]},
        {"server": "shplb", "stock_outright": True, "cells": [dict(cell, ttft_s=0.05)]},
        {"server": "shplb_always", "cells": [dict(cell, stock_layers={"prefill": 30, "decode": 30, "layers": 30})]}]}
    report([res], tmp_path)
    out = capsys.readouterr().out
    assert "0.050 / 500 (stock outright) | 0.80 | 1.00" in out, out
    assert "0.040 / 500 (stock layers 30 / 30 of 30)" in out and out.count("stock outright") == 1, out


class _FakeServer:
    """Stands in for a started server in ``serve_interleaved``: records which server each request went to."""
    calls: list[str] = []

    def __init__(self, spec, log, timeout_s=900):
        if spec.name == "broken":
            raise RuntimeError("did not start")
        self.spec, self.log, self.startup_s, self.requests = spec, log, 1.0, 0
        log.write_text("healthy\n")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def generate(self, ids, new_tokens, ignore_eos=False):
        self.requests += 1
        if self.spec.name == "flaky" and self.requests > 2:          # the warm-up and one measured pass, then fails
            raise RuntimeError("server died")
        _FakeServer.calls.append(self.spec.name)
        return gen(0.0, 0.01 * len(ids), new_tokens, 0.002)

    def post(self, path, body):
        """SGLang's profiler endpoints: at ``/stop_profile`` the trace of the kernels run since ``/start_profile``."""
        if path == "/start_profile":
            self.profiling = body
            return "Start profiling.\n"
        b = self.profiling
        kernels = [{"ph": "X", "cat": "kernel", "name": "gemm", "ts": 1000.0 * i, "dur": 400.0} for i in range(3)]
        Path(b["output_dir"]).mkdir(parents=True, exist_ok=True)
        with gzip.open(Path(b["output_dir"]) / f"{b['profile_id']}-TP-0.trace.json.gz", "wt") as f:
            json.dump({"traceEvents": kernels}, f)
        return "Stop profiling.\n"


def test_interleaved_servers_take_turns_rotated_each_round(tmp_path, monkeypatch):
    import serve_gpu
    from serve_gpu import rotated, serve_interleaved, share_memory

    from sglang_shplb.evaluation.servers import ServerSpec
    assert rotated([1, 2, 3], 0) == [1, 2, 3] and rotated([1, 2, 3], 1) == [2, 3, 1] and rotated([1, 2, 3], 4) == \
        [2, 3, 1] and rotated([], 2) == []
    # each of n servers gets f/n of the card: the k-th sees (1 - k f/n) of it free and SGLang takes its fraction of that
    mem = ("--x", "1", "--mem-fraction-static", "0.85")
    fractions = [float(share_memory(mem, 2, k)[-1]) for k in range(2)]
    assert share_memory(mem, 2, 0)[:3] == mem[:3] and fractions == [0.425, 0.739]
    free = 1.0
    for f in fractions:                                # the share of the whole card each one's static memory takes
        assert abs(free * f - 0.425) < 1e-3
        free -= free * f
    assert share_memory(("--x", "1"), 3, 2) == ("--x", "1")
    monkeypatch.setattr(serve_gpu, "Server", _FakeServer)
    _FakeServer.calls = []
    grid = {(4, 1): {"prompts": [[1, 2, 3, 4]], "keys": None}}
    servers = [(n, ServerSpec(n, "m", ()), None) for n in ("a", "b", "broken", "flaky")]
    runs = serve_interleaved(servers, grid, 8, tmp_path, repeats=3)
    assert [r["server"] for r in runs] == ["a", "b", "broken", "flaky"]
    # warm-ups in start order, then round 1 a b flaky, round 2 b flaky(dies) a, round 3 (flaky out) a b
    assert _FakeServer.calls == ["a", "b", "flaky", "a", "b", "flaky", "b", "a", "a", "b"]
    a, b, broken, flaky = runs
    assert "did not start" in broken["error"] and not broken["cells"]
    assert "server died" in flaky["error"] and flaky["rounds"] == 1 and len(flaky["cells"]) == 1
    assert a["rounds"] == b["rounds"] == 3 and a["interleaved"] and "error" not in a
    assert len(a["cells"][0]["ttft_all_s"]) == 3 and a["cells"][0]["ttft_s"] == pytest.approx(0.04)
    assert sorted(p.name for p in tmp_path.glob("server_*.log")) == ["server_a.log", "server_b.log", "server_flaky.log"]
    # --profile: after the rounds, each server that is still up runs the cell once more under the profiler
    _FakeServer.calls = []
    (tmp_path / "p").mkdir()
    runs = serve_interleaved(servers[:2], grid, 8, tmp_path / "p", repeats=1, profile=[(4, 1)])
    assert _FakeServer.calls == ["a", "b", "a", "b", "a", "b"]
    for r in runs:
        prof = r["profile"]["4x1"]
        assert prof["trace"] == f"{r['server']}_4x1-TP-0.trace.json.gz" and prof["ttft_s"] == pytest.approx(0.04)
        assert prof["gpu"]["busy_ms"] == pytest.approx(1.2) and prof["gpu"]["idle_ms"] == pytest.approx(1.2)
        assert prof["window"]["ms"] == pytest.approx(40) and prof["window"]["kernels"] == 3


def test_trace_summary_tells_gpu_busy_from_idle_and_names_the_gaps():
    """bench/trace_summary.py on a hand-made trace: overlapping kernels count once, the idle gaps between them are
    listed with the kernels around them, runtime calls and CPU ops are totalled by name."""
    from trace_summary import busy_intervals, summarize
    ev = [{"ph": "X", "cat": "kernel", "name": "a", "ts": 0.0, "dur": 100.0},
          {"ph": "X", "cat": "kernel", "name": "b", "ts": 50.0, "dur": 100.0},     # overlaps a (another stream)
          {"ph": "X", "cat": "kernel", "name": "c", "ts": 1150.0, "dur": 50.0},    # after 1 ms idle
          {"ph": "X", "cat": "kernel", "name": "a", "ts": 1230.0, "dur": 10.0},    # after 30 us: idle, not listed
          {"ph": "X", "cat": "cuda_runtime", "name": "cudaStreamSynchronize", "ts": 160.0, "dur": 900.0},
          {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 10.0, "dur": 5.0},
          {"ph": "X", "cat": "cpu_op", "name": "aten::item", "ts": 150.0, "dur": 950.0},
          {"ph": "i", "name": "marker", "ts": 3.0}]
    assert busy_intervals(ev[:3]) == [(0.0, 150.0), (1150.0, 1200.0)]
    s = summarize({"traceEvents": ev})
    g = s["gpu"]
    assert g["kernels"] == 4 and g["span_ms"] == pytest.approx(1.24) and g["busy_ms"] == pytest.approx(0.21)
    assert g["idle_ms"] == pytest.approx(1.03) and g["idle_gaps_over_ms"] == {"0.05": 1, "0.5": 1, "2.0": 0}
    assert g["longest_gaps"] == [{"ms": 1.0, "at_ms": 0.15, "after": "b", "before": "c"}]
    assert s["kernels"][0] == {"name": "a", "count": 2, "ms": 0.11}
    assert s["runtime"][0] == {"name": "cudaStreamSynchronize", "count": 1, "ms": 0.9}
    assert s["cpu_ops"] == [{"name": "aten::item", "count": 1, "ms": 0.95}] and "window" not in s
    w = summarize({"traceEvents": ev}, window_ms=1.2)["window"]    # kernels starting in the first 1.2 ms: a, b, c
    assert w["kernels"] == 3 and w["busy_ms"] == pytest.approx(0.2) and w["span_ms"] == pytest.approx(1.2)
