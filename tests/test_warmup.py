"""The start-up warm-up of the extend kernels (:mod:`sglang_shplb.kernels.warmup`): its shape grid meets every
bucket a served chunk can fall in, it runs each distinct layer on the real kernels (Triton interpreter / CPU
pieces here) without touching the layers' state, and the backend warms only the layers each bucket runs on
the kernels."""
import inspect
import math
import types

import numpy as np
import pytest
import torch

from conftest import DEV
from sglang_shplb.core.patterns import BLOCK, HeadBudget
from sglang_shplb.kernels import dense_pieces
from sglang_shplb.kernels.paged_layer import ExtendBatch, LayerKernels
from sglang_shplb.kernels.warmup import (MIN_PREFIX, POOL_INDEX_DTYPE, bucket_lengths, chunk_shapes, distinct_layers,
                                         extend_warmup, warm_up_extend, warmup_shapes)
from sglang_shplb.kernels.triton_index import triton_next_pow2 as pow2_ceil
from sglang_shplb.kernels.triton_jit import int_specialisation


def _keys(m: int, p: int) -> tuple:
    """The caches a chunk of ``m`` rows after a ``p``-token prefix reads: cuDNN's (bucket of m, bucket of p),
    Triton's selection width for 64- and 128-token blocks of the ``p + m`` keys."""
    n = p + m
    return pow2_ceil(m), pow2_ceil(p) if p else 0, pow2_ceil(math.ceil(n / BLOCK)), pow2_ceil(math.ceil(n / 128))


@pytest.mark.parametrize("max_q,max_kv", [(128, 1024), (100, 1000), (300, 777), (8192, 131200)])
def test_grid_meets_every_bucket_of_a_served_chunk(max_q, max_kv):
    grid = warmup_shapes(max_q, max_kv)
    assert len(set(grid)) == len(grid) and all(m <= max_q and m + p <= max_kv for m, p in grid)
    assert [m + p for m, p in grid] == sorted(m + p for m, p in grid)
    cudnn = {_keys(m, p)[:2] for m, p in grid}
    width = {_keys(m, p)[2] for m, p in grid} | {_keys(m, p)[3] for m, p in grid}
    step = max(1, max_q // 97)
    for m in list(range(1, max_q + 1, step)) + [max_q]:
        for p in [0] + list(range(MIN_PREFIX, max_kv - m + 1, max(1, max_kv // 89))) + [max_kv - m]:
            if p and p < MIN_PREFIX:
                continue
            key = _keys(m, p)
            assert key[:2] in cudnn, (m, p)
            assert key[2] in width and key[3] in width, (m, p)


def test_grid_edges():
    assert bucket_lengths(1, 1) == [1] and bucket_lengths(3, 3) == [3] and bucket_lengths(5, 64) == [8, 16, 32, 64]
    assert bucket_lengths(128, 1000) == [128, 256, 512, 1000]
    assert warmup_shapes(4, 4) == [(1, 0), (2, 0), (4, 0)]                 # no room for a prefix
    assert (64, 512) in warmup_shapes(64, 1000) and (64, 936) in warmup_shapes(64, 1000)
    with pytest.raises(ValueError):
        warmup_shapes(0, 10)


def test_chunk_shapes_and_what_a_server_warms():
    assert chunk_shapes(8192, 32768) == [(8192, 0), (8192, 8192), (8192, 16384), (8192, 24576)]
    assert chunk_shapes(8192, 131200)[-1] == (8192, 122880) and chunk_shapes(100, 99) == []
    shapes, planned = extend_warmup(128, 1000)
    assert planned == frozenset(chunk_shapes(128, 1000)) and planned <= set(shapes)
    assert set(shapes) == set(warmup_shapes(128, 1000)) | planned and len(set(shapes)) == len(shapes)
    assert [m + p for m, p in shapes] == sorted(m + p for m, p in shapes)
    with pytest.raises(ValueError):
        chunk_shapes(0, 10)


def test_forced_pieces_overrides_and_restores():
    q = torch.zeros(1, 2, 64, dtype=torch.float32)
    usual = dense_pieces.piece_backend(q)
    with dense_pieces.forced_pieces("math"):
        assert dense_pieces.piece_backend(q) == "math"
        with dense_pieces.forced_pieces("flash"):
            assert dense_pieces.piece_backend(q) == "flash"
        assert dense_pieces.piece_backend(q) == "math"
    assert dense_pieces.piece_backend(q) == usual
    with pytest.raises(ValueError, match="choose from"):
        with dense_pieces.forced_pieces("xformers"):
            pass


HKV, D = 2, 64
DT = torch.bfloat16 if DEV == "cuda" else torch.float32   # a dtype whose dense pieces have a kernel on DEV
MIXED = [HeadBudget.dense(), HeadBudget.topk(0.3, min_blocks=2), HeadBudget.vslash(0.3, min_blocks=1),
         HeadBudget.streaming(64, 128), HeadBudget.topk(0.5, min_blocks=2), HeadBudget.dense()]


def _layer(budgets, ctx=1024, hkv=HKV):
    return LayerKernels(budgets, hkv, D, ctx, DT, DEV, pool_tokens=2048)


def test_distinct_layers_by_pattern_and_tile():
    a, b = _layer(MIXED), _layer([HeadBudget.topk(0.1, min_blocks=1) if x.pattern.name == "TOPK" else x
                                  for x in MIXED])       # other top-k budgets: the same kernels
    c = _layer([HeadBudget.dense()] * 3 + [HeadBudget.streaming(64, 64)] * 3)
    t = _layer([HeadBudget.topk(0.3, min_blocks=2, tile=128) if x.pattern.name == "TOPK" else x for x in MIXED])
    # the same kinds and dense grouping on other heads: the same kernels (head lists travel as tensors)
    r = _layer([MIXED[i] for i in (0, 1, 3, 2, 4, 5)])
    # the vertical-slash head made streaming (two streaming heads, no vertical-slash one): other kernels
    s = _layer([HeadBudget.streaming(64, 64) if x.pattern.name == "VSLASH" else x for x in MIXED])
    # two dense heads on one KV head instead of one on each: other dense calls
    g = _layer([MIXED[i] for i in (0, 5, 1, 2, 3, 4)])
    assert distinct_layers([a, b, c, a, t, r, s, g]) == [a, c, t, s, g]


def test_warm_up_runs_each_distinct_layer_on_the_kernels_and_leaves_the_layers_alone(monkeypatch):
    monkeypatch.setattr(dense_pieces, "_CUDNN_KEPT", [None])
    layers = [_layer(MIXED), _layer(MIXED), _layer([HeadBudget.dense()] * 3 + [HeadBudget.streaming(64, 64)] * 3)]
    before = [lk.kmin.clone() for lk in layers if lk.kmin is not None]
    pieces = []
    real = dense_pieces.piece_after_prefix
    monkeypatch.setattr(dense_pieces, "piece_after_prefix",
                        lambda q, k, v, *a: pieces.append((q.shape[-2], k.shape[-2])) or real(q, k, v, *a))
    shapes = warmup_shapes(64, 400)
    lines = []
    res = warm_up_extend(lambda n: layers if n <= 300 else layers[2:], shapes, DT, DEV, r2t_cols=512,
                         scale=D ** -0.5, log=lines.append)
    want = sum(2 if m + p <= 300 else 1 for m, p in shapes)
    assert res["shapes"] == len(shapes) and res["calls"] == want
    # every shape with a prefix cut the dense heads into pieces over exactly that prefix
    assert {(m, p + m) for m, p in shapes if p} <= set(pieces)
    assert lines and lines[-1].startswith(f"shplb warm-up: {len(shapes)}/{len(shapes)} shapes")
    assert all(torch.equal(x, lk.kmin) for x, lk in zip(before, [lk for lk in layers if lk.kmin is not None]))
    # only the planned shapes reach cuDNN's plans (their usual backend); the others take flash pieces
    forced = []
    real_prefill = LayerKernels.prefill_batch
    monkeypatch.setattr(LayerKernels, "prefill_batch", lambda self, q, k, v, kb, vb, batch, *a: forced.append(
        ((q.shape[0], batch.kv_lens_cpu[0] - q.shape[0]), dense_pieces._FORCED[0]))
        or real_prefill(self, q, k, v, kb, vb, batch, *a))
    planned = {(64, 0), (64, 128)}
    res = warm_up_extend(lambda n: layers[:1], shapes, DT, DEV, r2t_cols=512, scale=D ** -0.5, planned=planned)
    assert forced == [(s, None if s in planned else "flash") for s in shapes]
    assert dense_pieces._FORCED[0] is None
    # the dense calls of the planned shapes, and only those, are what cuDNN is then kept to: (64, 0) is a causal
    # SDPA of the dense heads, (64, 128) a merged piece over 192 keys (on the CPU the dense tail's calls too)
    calls = {(kind, q[-2], k[-2]) for kind, q, k, _ in res["cudnn_shapes"]}
    assert {("sdpa", 64, 64), ("piece", 64, 192)} <= calls <= {("sdpa", 64, 64), ("piece", 64, 192), ("piece", 64, 64)}
    # nothing to warm: no shapes, no allocation
    assert warm_up_extend(lambda n: [], shapes, DT, DEV, r2t_cols=512, scale=1.0)["shapes"] == 0
    with pytest.raises(ValueError, match="512 columns"):
        warm_up_extend(lambda n: layers, warmup_shapes(64, 1000), DT, DEV, r2t_cols=512, scale=1.0)


def test_warmed_layer_still_matches_a_cold_one():
    """The warm-up runs the same objects the server then serves with: a layer warmed first gives the output of
    a fresh one on a real batch with a prefix."""
    warm, cold = _layer(MIXED), _layer(MIXED)
    warm_up_extend(lambda n: [warm], warmup_shapes(32, 300), DT, DEV, r2t_cols=512, scale=D ** -0.5)
    g = torch.Generator().manual_seed(3)
    n, m = 290, 70
    kb, vb = (torch.randn(n, HKV, D, generator=g).to(DEV, DT) for _ in range(2))
    r2t = torch.zeros(1, 512, dtype=torch.int32, device=DEV)
    r2t[0, :n] = torch.randperm(n, generator=g).int().to(DEV)
    batch = ExtendBatch.build(r2t, torch.zeros(1, dtype=torch.int32, device=DEV), [m], [n])
    q = torch.randn(m, len(MIXED), D, generator=g).to(DEV, DT)
    outs = []
    for lk in (warm, cold):
        out = torch.empty_like(q)
        lk.prefill_batch(q, kb[r2t[0, n - m:n].long()], vb[r2t[0, n - m:n].long()], kb, vb, batch, D ** -0.5, out)
        outs.append(out)
    assert torch.equal(outs[0], outs[1])


def test_backend_warms_the_layers_each_bucket_runs_on_the_kernels(monkeypatch):
    """Glue: queries up to the chunked-prefill size, prefixes up to the context length, and at each length only
    the kernel-path layers the plan does not mark stock for prefill in that length's bucket."""
    from test_stock_fallback import HKV as SMOL_HKV, NL, _backend, _sparse_plan
    import sglang_shplb.kernels.warmup as wu
    import sglang_shplb.serving.backend as be_mod
    plan = _sparse_plan()                                     # buckets 256 / 512 / 1024, context 1024
    plan.stock = np.zeros((2, 3, NL), dtype=bool)
    plan.stock[0, 0, :2] = True                               # prefill up to 256 tokens: layers 0, 1 stock
    plan.stock[0, 2, 3] = True                                # above 512: layer 3 stock
    be, _ = _backend(monkeypatch, plan)
    be.kernels = {li: _layer(plan.budgets[li], hkv=SMOL_HKV) for li in range(NL)}
    seen = []
    monkeypatch.setattr(LayerKernels, "prefill_batch",
                        lambda self, q, k, v, kb, vb, batch, scale, out: seen.append((self, batch.kv_lens_cpu[0])))
    monkeypatch.setattr(wu, "dense_tail", lambda *a, **k: None)
    monkeypatch.setattr(dense_pieces, "_CUDNN_KEPT", [None])
    kept = []
    monkeypatch.setattr(be_mod, "keep_cudnn_to", kept.append)
    be._warm_up(types.SimpleNamespace(server_args=types.SimpleNamespace(chunked_prefill_size=128)))
    assert kept == [frozenset()]          # prefill_batch is stood in for: no dense call, nothing planned
    by_len = {}
    for lk, n in seen:
        by_len.setdefault(n, []).append(lk)
    assert sorted(by_len) == sorted({m + p for m, p in extend_warmup(128, 1024)[0]})
    for n, lks in by_len.items():
        b = plan.buckets.index(n)
        want = [li for li in range(NL) if not plan.stock[0, b, li]]
        # every layer of the plan has the same kernels: the first non-stock one stands for them all
        assert lks == [be.kernels[want[0]]] * (len(lks)), n
    assert max(n for n in by_len) == 1024 and max(m for m, _ in extend_warmup(128, 1024)[0]) == 128


def test_backend_serves_when_the_warm_up_runs_out_of_memory(monkeypatch, caplog):
    """Out of GPU memory in the warm-up (the pool took it) is a warning, not a failed start: the server then
    compiles on first use."""
    from test_stock_fallback import HKV as SMOL_HKV, NL, _backend, _sparse_plan
    import sglang_shplb.serving.backend as be_mod
    be, _ = _backend(monkeypatch, _sparse_plan())
    be.kernels = {li: _layer(be.plan.budgets[li], hkv=SMOL_HKV) for li in range(NL)}

    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(be_mod, "warm_up_extend", oom)
    with caplog.at_level("WARNING"):
        be._warm_up(types.SimpleNamespace(server_args=types.SimpleNamespace(chunked_prefill_size=128)))
    assert "warm-up stopped, out of GPU memory (CUDA out of memory. Tried to allocate 2.00 GiB)" in caplog.text
    assert len(be.kernels) == NL

    def broken(*a, **k):
        raise RuntimeError("a kernel bug")
    monkeypatch.setattr(be_mod, "warm_up_extend", broken)
    with pytest.raises(RuntimeError, match="a kernel bug"):       # anything else is not swallowed
        be._warm_up(types.SimpleNamespace(server_args=types.SimpleNamespace(chunked_prefill_size=128)))


def test_cudnn_kept_to_the_warmed_shapes(monkeypatch):
    """After ``keep_cudnn_to``, a dense piece of a shape outside the set runs on flash where it would have run on
    cuDNN, one inside stays on cuDNN; ``None`` lifts it. (cuDNN itself is stood in for on the CPU: the backend
    each call asks for is what is checked.)"""
    monkeypatch.setattr(dense_pieces, "_CUDNN_KEPT", [None])
    asked = []
    real = dense_pieces._attention_with_lse
    monkeypatch.setattr(dense_pieces, "_attention_with_lse", lambda q, k, v, causal, scale, backend: asked.append(
        backend) or real(q, k, v, causal, scale, "flash" if backend == "cudnn" else backend))
    monkeypatch.setattr(dense_pieces, "piece_backend", lambda q: "cudnn")
    g = torch.Generator().manual_seed(0)
    q1, q2 = torch.randn(2, 3, 40, 64, generator=g), torch.randn(2, 3, 56, 64, generator=g)
    k, v = torch.randn(2, 200, 64, generator=g), torch.randn(2, 200, 64, generator=g)
    with dense_pieces.recording_shapes() as seen:
        want1 = dense_pieces.dense_piece(q1, k, v, 0.125)
    assert asked == ["cudnn", "cudnn"] and len(seen) == 1
    dense_pieces.keep_cudnn_to(seen)
    asked.clear()
    got1 = dense_pieces.dense_piece(q1, k, v, 0.125)
    got2 = dense_pieces.dense_piece(q2, k, v, 0.125)
    assert asked == ["cudnn", "cudnn", "flash", "flash"]
    assert torch.equal(got1, want1)
    ref2 = dense_pieces.piece_after_prefix(q2, k, v, 0.125, "math")
    assert (got2 - ref2).abs().max() < 1e-4
    dense_pieces.keep_cudnn_to(None)
    asked.clear()
    dense_pieces.dense_piece(q2, k, v, 0.125)
    assert asked == ["cudnn", "cudnn"]


def _specialisation(fn, args: tuple, kwargs: dict) -> tuple:
    """What Triton 3.6 compiles a launch of the jit function ``fn`` for, emulated from the interpreter's launch:
    the constexprs and launch config by value; per other argument, an integer's class (1, a multiple of 16,
    other; none where ``do_not_specialize`` names it, only "is 1" where ``do_not_specialize_on_alignment`` does),
    a pointer's element type and 16-byte alignment."""
    params = list(inspect.signature(fn.fn).parameters.values())
    names = [p.name for p in params]

    def named(key):   # the interpreter's function keeps jit's arguments in .kwargs, a JITFunction as attributes
        declared = fn.kwargs.get(key) if hasattr(fn, "kwargs") else getattr(fn, key, None)
        return {names[x] if isinstance(x, int) else x for x in (declared or ())}
    free, unaligned = named("do_not_specialize"), named("do_not_specialize_on_alignment")
    bound = dict(zip(names, args)) | kwargs
    spec = [fn.fn.__name__]
    for p in params:
        v = bound.get(p.name)
        if "constexpr" in str(p.annotation) or isinstance(v, bool) or v is None:
            spec.append((p.name, v))
        elif isinstance(v, torch.Tensor):
            spec.append((p.name, v.dtype, p.name in free or v.data_ptr() % 16 == 0))
        elif isinstance(v, int):
            spec.append((p.name, None if p.name in free else v == 1 if p.name in unaligned else
                         int_specialisation(v)))
    return tuple(spec) + tuple(sorted((k, v) for k, v in kwargs.items() if k not in names))


def test_a_new_length_compiles_nothing_the_warm_up_did_not(monkeypatch):
    """After the warm-up, the extend kernels at chunk lengths it never ran launch only specialisations it did
    (emulated: :func:`_specialisation`, with the GPU's Triton index builders and the shipped H100 launch
    configs), so no served request pays for a Triton compile. Round 18 (H100, ``bench/first_call.py
    --diagnose``): each miss cost a first call 0.6-1.0 s, from lengths (the selection's row widths, index
    strides) that are multiples of 16 at the warm-up's shapes and not at most served ones."""
    from sglang_shplb.kernels import api, triton_prefill, tuned
    kernel_class = type(triton_prefill._kernel(False))   # the interpreter's function (CI), or a JITFunction
    assert hasattr(kernel_class, "run") and hasattr(triton_prefill._kernel(False), "fn")
    table = tuned.load_table("NVIDIA H100 80GB HBM3", tuned.TUNED_DIR, "9.0")
    monkeypatch.setattr(triton_prefill, "tuned_config", lambda kernel, values, q: table.get(kernel, {}).get(
        tuned.key_string(values, torch.bfloat16)))
    build = api.build_block_index
    monkeypatch.setattr(api, "build_block_index", lambda *a, **kw: build(*a, **kw | {"builder": "triton"}))
    launched = []
    monkeypatch.setattr(kernel_class, "run", lambda self, *args, grid, warmup, **kw: launched.append(
        _specialisation(self, args, kw)))                 # recorded, not run: the shapes are all that matter
    max_q, max_kv = 512, 8192
    lk = _layer(MIXED[:4] + [HeadBudget.topk(0.3, min_blocks=2, tile=128), MIXED[5]], ctx=max_kv)  # every kernel
    shapes, planned = extend_warmup(max_q, max_kv)
    warm_up_extend(lambda n: [lk], shapes, DT, DEV, r2t_cols=max_kv, scale=D ** -0.5, planned=planned)
    warmed, n_warm = set(launched), len(launched)
    served = [(m, p) for m in (1, 2, 3, 13, 16, 17, 47, 64, 65, 100, 255, 256, 300, 511, 512)
              for p in [0] + list(range(MIN_PREFIX, max_kv - m + 1, 307)) + [max_kv - m]]
    for m, p in served:
        del launched[:]
        warm_up_extend(lambda n: [lk], [(m, p)], DT, DEV, r2t_cols=max_kv, scale=D ** -0.5)
        assert launched, (m, p)
        missed = [s for s in launched if s not in warmed]
        assert not missed, f"a chunk of {m} rows after {p} tokens compiles " + "; ".join(
            f"{s[0]}, unlike the nearest warmed launch in " + str(min(
                ([(a, b) for a, b in zip(s, w) if a != b] for w in warmed if w[0] == s[0]), key=len, default="all"))
            for s in missed)
    assert n_warm > len(shapes)


def test_the_tail_reads_pool_indices_of_one_dtype_in_the_warm_up_and_in_serving(monkeypatch):
    """Triton compiles per pointer dtype: the dense tail's request-pool indices have one dtype in the warm-up and in
    the backend's forward (SGLang's int64). Until 2026-12-06 the warm-up's were int32, and a server's first sparse
    forward compiled the int64 variant of the tail kernel (+0.55-0.72 s once, H100 rounds 20-22)."""
    from test_stock_fallback import _run, _sparse_plan
    import sglang_shplb.kernels.warmup as wu
    import sglang_shplb.serving.backend as be_mod
    seen = {}
    for name, mod in (("warm-up", wu), ("serving", be_mod)):
        real = mod.dense_tail
        monkeypatch.setattr(mod, "dense_tail", lambda q, kb, vb, kv, *a, real=real, name=name:
                            seen.setdefault(name, set()).add(kv.req_pool_indices.dtype) or real(q, kb, vb, kv, *a))
    warm_up_extend(lambda n: [_layer(MIXED)], [(64, 128)], DT, DEV, r2t_cols=512, scale=D ** -0.5)
    _run(monkeypatch, _sparse_plan())
    assert seen == {"warm-up": {POOL_INDEX_DTYPE}, "serving": {POOL_INDEX_DTYPE}}
