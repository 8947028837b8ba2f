"""Benchmark: what a chunk costs the first time its shape is seen, route by route. Real traffic rarely repeats a
prompt length, so the last chunk of almost every prompt has a query count the process has not met; a kernel
that builds or compiles per shape (a cuDNN execution plan, a Triton specialisation) pays that on the request.

One Llama-3-8B-shaped layer, the serving benchmark's mixed plan, the chunk that ends a prompt of ``n`` tokens
(SGLang's chunked prefill: a prefix of whole ``--chunk`` chunks in the paged pool, ``m = n - prefix`` new
rows). After one warm-up length, for each length of ``--lengths`` (never two alike) and each route: the first
call (synchronised wall clock) and the steady call (``triton.testing.do_bench``), ms, and first - steady:

* ``shplb``: :class:`sglang_shplb.kernels.SparsePrefill` as the server plans it (dense heads as merged cuDNN
  pieces, the index for the query rows only);
* ``cudnn pieces`` / ``flash pieces``: the dense KV group alone through :func:`.dense_pieces.piece_after_prefix`
  on cuDNN, and on torch's FlashAttention-2 (no per-shape plan);
* ``flashinfer``: FlashInfer's paged prefill of every head (plan + run: the stock backend), where installed.

torch reads ``TORCH_CUDNN_SDPA_AVOID_RECOMPILE`` once per process (the server sets it to 1 only without its warm-up,
:func:`sglang_shplb.serving.launch.bucketed_cudnn_plans`): run the script once with it unset and once with 1.

    python bench/first_call.py --out $OUT                                             # GPU, ~1 min
    TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1 python bench/first_call.py --out $OUT          # cuDNN plans by length bucket
    TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1 python bench/first_call.py --warm-up --out $OUT  # after the server's warm-up
    TRITON_INTERPRET=1 python bench/first_call.py --cpu-smoke --out /tmp/fc           # logic check (CPU)

``--diagnose`` adds, per first call, the Triton kernels it compiled and the functions of most self time.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import os
import sys
import time

if "--cpu-smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from layer_path import SHAPES, paged_pool, plan_budgets  # noqa: E402  (bench/layer_path.py)
from timing import bench, device_tag, flashinfer_or_none, log, results_writer  # noqa: E402  (bench/timing.py)

from sglang_shplb.core.patterns import Pattern  # noqa: E402
from sglang_shplb.kernels.paged_layer import LayerKernels  # noqa: E402
from sglang_shplb.kernels.warmup import extend_warmup, warm_up_extend  # noqa: E402
from sglang_shplb.kernels.dense_pieces import CUDNN_BUCKETED_PLANS_ENV, keep_cudnn_to, piece_after_prefix  # noqa: E402


class CompileLog:
    """The Triton kernels compiled inside the block (Triton's ``jit_post_compile_hook``): per compile the kernel's
    name and what it was compiled for (argument types and specialisations, constexprs, launch options), as
    ``(name, frozenset of "field=value" tokens)``."""

    def __init__(self):
        self.compiled: list[tuple[str, frozenset]] = []

    def _hook(self, **kw):
        try:
            c = kw["compile"]
            tokens = [f"{k}={v}" for k, v in c["signature"].items()] + [f"const {k}={v}" for k, v in
                                                                          c["constants"].items()]
            tokens += [f"attrs={c['configs']}"] + [f"{k}={c[k]}" for k in ("num_warps", "num_stages", "num_ctas")]
            self.compiled.append((kw["fn"].name, frozenset(tokens)))
        except (KeyError, AttributeError) as e:     # another Triton's hook arguments: keep the repr
            self.compiled.append((str(kw.get("repr")), frozenset({f"hook arguments not read: {e!r}"})))

    def __enter__(self):
        try:
            import triton
            self._knobs = triton.knobs.runtime
            self._knobs.jit_post_compile_hook = self._hook
        except (ImportError, AttributeError):
            self._knobs = None
        return self

    def __exit__(self, *exc):
        if self._knobs is not None:
            self._knobs.jit_post_compile_hook = None

    def unlike(self, earlier: "CompileLog") -> list[str]:
        """Per compile here: its kernel and what sets it apart from the nearest compile of that kernel in
        ``earlier`` (tokens only here / only there), or that ``earlier`` never compiled the kernel."""
        out = []
        for name, tokens in self.compiled:
            seen = [t for n, t in earlier.compiled if n == name]
            if not seen:
                out.append(f"{name} (never compiled before)")
                continue
            near = min(seen, key=lambda t: len(t ^ tokens))
            out.append(f"{name}: {sorted(tokens - near)} where the nearest earlier compile had {sorted(near - tokens)}")
        return out


class FirstCallCauses(CompileLog):
    """What a first call spent its time on (``--diagnose``): the Triton kernels it compiled (:class:`CompileLog`)
    and the functions of most self time (cProfile; a cuDNN plan shows as the aten op's own time, a Triton compile
    as its compiler's calls)."""

    def __init__(self, earlier: CompileLog | None = None):
        import cProfile
        super().__init__()
        self.profile, self.earlier = cProfile.Profile(), earlier

    def __enter__(self):
        super().__enter__()
        self.profile.enable()
        return self

    def __exit__(self, *exc):
        self.profile.disable()
        super().__exit__(*exc)

    def summary(self, top: int = 6) -> dict:
        import pstats
        st = pstats.Stats(self.profile).stats       # {(file, line, name): (cc, nc, tottime, cumtime, callers)}
        rows = sorted(((v[2], f"{os.path.basename(k[0])}:{k[2]}") for k, v in st.items()), reverse=True)
        return {"compiled": self.unlike(self.earlier or CompileLog()),
                "self_ms": [(name, round(t * 1e3, 1)) for t, name in rows[:top]]}


def first_and_steady(fn, smoke: bool, diagnose: dict | None = None,
                     earlier: CompileLog | None = None) -> tuple[float, float]:
    """Wall ms of ``fn``'s first call (the device synchronised before and after) and its steady time; with a
    ``diagnose`` dict, :class:`FirstCallCauses`'s summary of the first call (its compiles against ``earlier``'s)
    is stored in it."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() and not smoke else (lambda: None)
    sync()
    causes = FirstCallCauses(earlier) if diagnose is not None else None
    t = time.perf_counter()
    with causes if causes is not None else contextlib.nullcontext():
        fn()
        sync()
    first = (time.perf_counter() - t) * 1e3       # with --diagnose, cProfile's overhead included
    if causes is not None:
        diagnose.update(causes.summary())
    return first, bench(fn, smoke)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="65597,66594,67591,98365,131011",
                    help="prompt lengths, each new to the process (the first chunk of a warm-up length runs first)")
    ap.add_argument("--warmup-length", type=int, default=40960)
    ap.add_argument("--chunk", type=int, default=8192, help="SGLang's --chunked-prefill-size")
    ap.add_argument("--out", default="/tmp/out")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU (Triton interpreter)")
    ap.add_argument("--warm-up", action="store_true",
                    help="first run the server's start-up warm-up (sglang_shplb.kernels.warmup) on the shplb layer, "
                         "for chunks of up to --chunk rows within the longest length, and keep cuDNN to its shapes "
                         "as the server does: what a first call still costs")
    ap.add_argument("--diagnose", action="store_true",
                    help="per first call, the Triton kernels it compiled and the functions of most self time "
                         "(in the JSON, and logged for the shplb route)")
    a = ap.parse_args()
    s = SHAPES["llama8b"]
    hq, hkv, d = s["hq"], s["hkv"], s["d"]
    budgets = plan_budgets("llama8b")[0]
    lengths = [int(x) for x in a.lengths.split(",")]
    dev, dt = "cuda", torch.bfloat16
    if a.cpu_smoke:
        lengths, a.warmup_length, a.chunk, dev, dt = [261, 390], 200, 128, "cpu", torch.float32
    group = hq // hkv
    dense_q = [h for h, b in enumerate(budgets) if b.pattern is Pattern.DENSE]
    dense_kv = sorted({h // group for h in dense_q})
    r2t, pool = paged_pool(1, max(lengths + [a.warmup_length]) + 64, dev)
    rpi = torch.zeros(1, dtype=torch.int32, device=dev)
    g = torch.Generator(device=dev).manual_seed(0)
    kb = torch.randn(pool, hkv, d, device=dev, dtype=dt, generator=g)
    vb = torch.randn(pool, hkv, d, device=dev, dtype=dt, generator=g)
    fi = flashinfer_or_none(a.cpu_smoke)
    ws = torch.empty(256 << 20, dtype=torch.uint8, device=dev) if fi is not None else None
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu (smoke)"
    bucketed = os.environ.get(CUDNN_BUCKETED_PLANS_ENV, "")
    res = {"device": name, "date": _dt.date.today().isoformat(), "chunk": a.chunk, "torch": torch.__version__,
           "warmup_length": a.warmup_length, CUDNN_BUCKETED_PLANS_ENV: bucketed, "rows": []}
    os.makedirs(a.out, exist_ok=True)
    tag = device_tag(name) + ("_bucketed" if bucketed == "1" else "") + ("_warm" if a.warm_up else "")
    dump = results_writer(res, os.path.join(a.out, f"first_call_{tag}"))
    lk = LayerKernels(budgets, hkv, d, max(lengths + [a.warmup_length]), dt, dev, pool_tokens=pool, decode=False)
    sp = lk.prefill                       # the object the warm-up runs and the server serves with
    sp.sm_scale = d ** -0.5
    res["warm_up"] = None
    backends = ["flash"] if a.cpu_smoke else ["cudnn", "flash"]
    log(f"# bench/first_call.py  device={name}  date={res['date']}  chunk={a.chunk}  {dt}  "
        f"{CUDNN_BUCKETED_PLANS_ENV}={bucketed or 'unset'}; ms: first call, steady, first - steady")

    def routes(n: int) -> dict:
        p = (n - 1) // a.chunk * a.chunk
        m = n - p
        q = torch.randn(m, hq, d, device=dev, dtype=dt, generator=g)
        cu = torch.tensor([0, m], dtype=torch.int32, device=dev)
        kvl = torch.tensor([n], dtype=torch.int32, device=dev)
        rows = r2t[0, :n].long()
        qd = q[:, dense_q].view(m, len(dense_kv), group, d).permute(1, 2, 0, 3)       # [G, S, m, d]
        kd, vd = (x[rows][:, dense_kv].transpose(0, 1).contiguous() for x in (kb, vb))  # [G, n, d]
        out = {"shplb": lambda: (sp.plan(cu, kvl, m, n, req_to_token=r2t, req_pool_indices=rpi, q_lens_cpu=[m],
                                         kv_lens_cpu=[n]), sp.run(q, kb, vb))}
        for be in backends:
            out[f"{be} pieces"] = lambda be=be: piece_after_prefix(qd, kd, vd, d ** -0.5, be)
        if fi is not None:
            def flashinfer():
                w = fi.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD")
                w.plan(cu, torch.tensor([0, n], dtype=torch.int32, device=dev), r2t[0, :n].contiguous(),
                       torch.ones(1, dtype=torch.int32, device=dev), hq, hkv, d, 1, causal=True, q_data_type=dt,
                       sm_scale=d ** -0.5)
                return w.run(q, (kb[:, None], vb[:, None]))
            out["flashinfer"] = flashinfer
        return {"prefix": p, "queries": m, "calls": out}

    compiled = CompileLog()                 # what the warm-up length and the warm-up compiled (--diagnose)
    with compiled if a.diagnose else contextlib.nullcontext():
        for fn in routes(a.warmup_length)["calls"].values():   # compiles, autotuning, first cuDNN plans
            first_and_steady(fn, a.cpu_smoke)
    if a.warm_up:
        shapes, planned = extend_warmup(a.chunk, max(lengths))
        with compiled if a.diagnose else contextlib.nullcontext():
            w = warm_up_extend(lambda n: [lk], shapes, dt, dev, r2t_cols=r2t.stride(0), scale=d ** -0.5,
                               planned=planned, log=log)
        keep_cudnn_to(w["cudnn_shapes"])   # as the server does: other shapes' dense calls on flash
        res["warm_up"] = {k: (len(x) if k == "cudnn_shapes" else x) for k, x in w.items()}
    for n in lengths:
        r = routes(n)
        row = {"n": n, "prefix": r["prefix"], "queries": r["queries"]}
        for route, fn in r["calls"].items():
            causes = {} if a.diagnose else None
            first, steady = first_and_steady(fn, a.cpu_smoke, causes, compiled)
            row[route] = {"first_ms": first, "steady_ms": steady, "extra_ms": first - steady}
            if causes:
                row[route]["causes"] = causes
                if route == "shplb":
                    log(f"  n={n} shplb first call: compiled {causes['compiled'] or 'nothing'}; "
                        f"most self time {causes['self_ms']}")
        res["rows"].append(row)
        log(f"n={n:7d} (prefix {r['prefix']}, {r['queries']} rows): " + "; ".join(
            f"{k} {v['first_ms']:.2f} / {v['steady_ms']:.2f} / {v['extra_ms']:+.2f}" for k, v in row.items()
            if isinstance(v, dict)))
        dump()
    dump()


if __name__ == "__main__":
    main()
