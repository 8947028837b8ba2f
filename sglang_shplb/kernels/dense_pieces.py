"""Dense attention of query rows that follow a cached prefix (an extend chunk, a moved or split unit, a dense
tail): the prefix (a rectangle, no mask) and the new rows (a causal square) as two kernel calls that return their
log-sum-exp, merged. This is how SGLang's FlashInfer backend runs an extend over a prefix (ragged + paged prefill,
``merge_state``), here on cuDNN so that dense heads keep cuDNN's speed after a prefix. No SGLang import."""
from __future__ import annotations

from contextlib import contextmanager
from functools import lru_cache

import torch

#: which kernel computes the two halves of a dense piece after a prefix: "cudnn" (CUDA, bf16/fp16: the
#: kernel whole dense heads run on), "flash" (torch's FlashAttention-2 on CUDA / its CPU flash kernel), or
#: "math" (explicit softmax, the reference). ``SHPLB_PIECE_BACKEND`` forces one; on CUDA cuDNN is taken
#: after a one-time check against "math" (:func:`piece_backend`), else flash.
PIECE_BACKENDS = ("cudnn", "flash", "math")
#: torch's switch (read once per process, at its first cuDNN attention call): cuDNN's attention plans keyed by
#: power-of-two length bucket for token-major (BSHD) operands without a bias, through cuDNN's ragged-offset path,
#: instead of one plan per new length (``sglang_shplb.launch_server`` sets it only without its warm-up)
CUDNN_BUCKETED_PLANS_ENV = "TORCH_CUDNN_SDPA_AVOID_RECOMPILE"
_CUDNN_OK: dict = {}
#: the backend :func:`forced_pieces` sets for a block of code (None: the usual choice)
_FORCED: list[str | None] = [None]
#: the call shapes (:func:`_shape_key`) cuDNN may build a plan for, None: any (:func:`keep_cudnn_to`)
_CUDNN_KEPT: list[frozenset | None] = [None]
#: whether :func:`piece_after_prefix` routes a small prefix rectangle to flash (:func:`prefix_backend`;
#: :func:`unrouted_prefixes` turns it off)
_ROUTING = [True]
#: the sets :func:`recording_shapes` fills, innermost last
_RECORDING: list[set] = []
#: natural-log units per unit of the log-sum-exp cuDNN returns (1: natural log, as torch documents; the
#: one-time check also accepts base 2, ln 2)
_CUDNN_LSE_SCALE = [1.0]


def _attention_with_lse(q, k, v, causal: bool, scale: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output ``[B, H, Lq, d]`` and its log-sum-exp ``[B, H, Lq]`` (float32, natural log of
    ``Σ_j exp(scale q·k_j)`` over the visible keys). ``causal``: top-left aligned (query i sees keys
    ``[0, i]``; with ``Lq == Lk`` that is also lower-right)."""
    if backend == "cudnn":
        o, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False,
                                                                     scale=scale)[:2]
        return o, lse.reshape(lse.shape[:3]).float() * _CUDNN_LSE_SCALE[0]
    if backend == "flash":
        if q.is_cuda:
            o, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)[:2]
        else:
            o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)[:2]
        return o, lse.float()
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    lse = torch.logsumexp(s, -1)
    return torch.matmul(torch.exp(s - lse[..., None]), v.float()).to(q.dtype), lse


#: query rows one program of cuDNN's attention forward holds (head dim <= 128 on Hopper): the unit
#: :func:`prefix_grid` counts a grid in
KERNEL_Q_TILE = 128
#: a prefix rectangle whose grid fills at most this share of the GPU's SMs runs on flash (:func:`prefix_backend`)
FLASH_GRID_SHARE = 1 / 3


def prefix_grid(rows: int, heads: int) -> int:
    """Programs of cuDNN's grid for a prefix rectangle of ``rows`` query rows in each of ``heads`` KV groups:
    ``heads x ceil(rows / KERNEL_Q_TILE)``."""
    return heads * -(-rows // KERNEL_Q_TILE)


def prefix_backend(rows: int, heads: int, programs: int, backend: str) -> str:
    """The kernel of a dense piece's prefix rectangle (``rows`` query rows of ``heads`` KV groups): flash where
    ``backend`` is cuDNN and the rectangle's grid (:func:`prefix_grid`) fills at most
    :data:`FLASH_GRID_SHARE` of the ``programs`` a wave runs (the GPU's SMs); else ``backend``.

    Why: each program of cuDNN's kernel walks every prefix key, so a short piece after a long prefix (a moved or
    split unit, a small last chunk) ran on a few SMs while the rest idled; torch's FlashAttention-2 forward
    splits the keys itself when its grid is small (flash-decoding's split-KV, ``num_splits_heuristic``).
    Measured (``bench/prefix_kernel.py``, H100, 2026-12-07, one dense piece, cuDNN vs flash): grids of 8-32
    programs 0.43 vs 0.14, 1.25 vs 0.30, 0.62 vs 0.20, 0.83 vs 0.50 ms; 44: 1.27 vs 1.03; 64: 0.52 vs 0.57;
    102-256: cuDNN 1.7-2.3x faster. Splitting the keys for cuDNN ourselves (chunks as the batch of one call,
    merged by log-sum-exp) ran 0.7-2.2x as fast as one call, unevenly by chunk count, and slowed the
    head-parallel ranks whose pieces it split (round 24, ``bench/results/gpu_round24/README.md``)."""
    if backend == "cudnn" and prefix_grid(rows, heads) <= programs * FLASH_GRID_SHARE:
        return "flash"
    return backend


@lru_cache(maxsize=None)
def _sm_count(index: int | None) -> int:
    index = torch.cuda.current_device() if index is None else index
    return torch.cuda.get_device_properties(index).multi_processor_count


def _bshd(x: torch.Tensor) -> torch.Tensor:
    """``x [T, H, d]`` (token-major, as SGLang's pool and q hold rows) as the ``[1, H, T, d]`` operand of an
    attention kernel, memory left token-major (BSHD): copied only when ``x`` is not contiguous."""
    return x.contiguous().transpose(0, 1)[None]


def piece_after_prefix(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                       backend: str) -> torch.Tensor:
    """Dense attention of ``S`` q heads sharing one KV head, queries the last ``n`` of ``L`` keys (lower-right
    causal): ``q [S, n, d]``, ``k/v [L, d]`` → ``[S, n, d]`` (float32); or of ``G`` such KV groups at once,
    ``q [G, S, n, d]``, ``k/v [G, L, d]`` → ``[G, S, n, d]``.

    Math. With ``p = L - n``, query ``i`` (position ``p + i``) sees keys ``[0, p + i]``: all of the prefix
    ``P = [0, p)`` and the top-left causal square ``D = [p, p + i]``. For a key set ``X`` let
    ``l_X = log Σ_{j∈X} e^{s_j}`` and ``o_X = Σ_{j∈X} e^{s_j - l_X} v_j`` (``s_j = scale q·k_j``); then over
    ``P ∪ D``: ``o = (e^{l_P} o_P + e^{l_D} o_D) / (e^{l_P} + e^{l_D}) = o_D + σ(l_P - l_D) (o_P - o_D)``
    (``σ`` the logistic function; no overflow). ``P`` is a rectangle with no mask, so each group's ``S`` heads
    are folded into its query axis (``S n`` rows against the ``G`` K/V heads: no GQA expansion); ``D`` is one
    causal call over the ``G S`` heads (its ``n`` K/V rows expanded to them). Each part is one kernel call of
    ``backend`` (:data:`PIECE_BACKENDS`) returning its log-sum-exp. Every operand is laid out token-major
    (BSHD: ``[1, H, T, d]`` whose ``transpose(1, 2)`` is contiguous), as SGLang's pool holds rows. On CUDA ``P``
    runs on :func:`prefix_backend`'s kernel (unless :func:`unrouted_prefixes`)."""
    grouped = q.dim() == 4
    if not grouped:
        q, k, v = q[None], k[None], v[None]
    G, S, n, d = q.shape
    L = k.shape[1]
    p = L - n
    kd = k[:, p:, None].expand(G, n, S, d).permute(1, 0, 2, 3).reshape(n, G * S, d)      # [n, G S, d]
    vd = v[:, p:, None].expand(G, n, S, d).permute(1, 0, 2, 3).reshape(n, G * S, d)
    o2, l2 = _attention_with_lse(_bshd(q.permute(2, 0, 1, 3).reshape(n, G * S, d)), _bshd(kd), _bshd(vd), True,
                                 scale, backend)
    o2 = o2[0].transpose(0, 1).reshape(n, G, S, d).permute(1, 2, 0, 3).float()           # [G, S, n, d]
    if p > 0:
        qp = q.permute(1, 2, 0, 3).reshape(S * n, G, d)                                 # rows (s, i) per group
        pb = prefix_backend(S * n, G, _sm_count(q.device.index), backend) if q.is_cuda and _ROUTING[0] else backend
        o1, l1 = _attention_with_lse(_bshd(qp), _bshd(k[:, :p].transpose(0, 1)), _bshd(v[:, :p].transpose(0, 1)),
                                     False, scale, pb)
        o1 = o1[0].transpose(0, 1).reshape(S, n, G, d).permute(2, 0, 1, 3)             # [G, S, n, d]
        w = torch.sigmoid(l1.reshape(G, S, n) - l2.reshape(G, S, n))[..., None]
        o2 = o2 + w * (o1.float() - o2)
    return o2 if grouped else o2[0]


def piece_backend(q: torch.Tensor) -> str:
    """The backend of :func:`piece_after_prefix` for ``q``'s device and dtype (see :data:`PIECE_BACKENDS`)."""
    import os
    forced = _FORCED[0] or os.environ.get("SHPLB_PIECE_BACKEND")
    if forced:
        if forced not in PIECE_BACKENDS:
            raise ValueError(f"SHPLB_PIECE_BACKEND={forced!r}; choose from {PIECE_BACKENDS}")
        return forced
    if not q.is_cuda:
        return "flash" if q.dtype in (torch.float32, torch.bfloat16) else "math"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return "math"
    key = (q.device.index, q.dtype, q.shape[-1])
    if key not in _CUDNN_OK:
        _CUDNN_OK[key] = _check_cudnn(q.device, q.dtype, q.shape[-1])
    return "cudnn" if _CUDNN_OK[key] else "flash"


@contextmanager
def forced_pieces(backend: str):
    """Within the block, :func:`piece_backend` answers ``backend`` (one of :data:`PIECE_BACKENDS`)."""
    if backend not in PIECE_BACKENDS:
        raise ValueError(f"piece backend {backend!r}; choose from {PIECE_BACKENDS}")
    prev, _FORCED[0] = _FORCED[0], backend
    try:
        yield
    finally:
        _FORCED[0] = prev


@contextmanager
def unrouted_prefixes():
    """Within the block every prefix rectangle runs on the piece's own backend, however small its grid (as before
    :func:`prefix_backend`): the baseline ``bench/unit_cost.py`` and ``bench/head_parallel.py
    --unrouted-prefixes`` time."""
    prev, _ROUTING[0] = _ROUTING[0], False
    try:
        yield
    finally:
        _ROUTING[0] = prev


def _shape_key(kind: str, q: torch.Tensor, k: torch.Tensor) -> tuple:
    """What a cuDNN attention plan is built for: the call (``"piece"``: :func:`dense_piece`, ``"sdpa"``:
    :func:`causal_sdpa`), the operands' shapes and dtype."""
    return kind, tuple(q.shape), tuple(k.shape), q.dtype


def _cudnn_may_plan(key: tuple) -> bool:
    for seen in _RECORDING:
        seen.add(key)
    return _CUDNN_KEPT[0] is None or key in _CUDNN_KEPT[0]


@contextmanager
def recording_shapes():
    """Collect the :func:`_shape_key` of every dense call made inside the block (whatever backend runs it)."""
    seen: set = set()
    _RECORDING.append(seen)
    try:
        yield seen
    finally:
        _RECORDING.remove(seen)


def keep_cudnn_to(keys: frozenset | None) -> None:
    """From now on cuDNN runs only the dense calls whose :func:`_shape_key` is in ``keys`` (None: any); the others
    run on flash. A server calls it after its warm-up with the shapes the warm-up planned: on an H100
    (2026-12-06, round 17) every new shape cost cuDNN a plan even with ``TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1``
    (59-152 ms; 0.72-1.08 s once ~350 plans existed), and serving meets a new last-chunk shape with almost
    every prompt length, while flash costs that chunk's dense heads a few percent more or less and no plan."""
    _CUDNN_KEPT[0] = None if keys is None else frozenset(keys)


def causal_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None, gqa: bool) -> torch.Tensor:
    """torch SDPA, top-left causal, ``q [1, Hq, n, d]`` against ``k/v [1, Hkv, n, d]`` (GQA when ``gqa``): on CUDA
    cuDNN first, then flash, where :func:`piece_backend` took cuDNN (its one-time check against the reference
    passed) and :func:`keep_cudnn_to` keeps this shape, else flash first; on the CPU torch's choice."""
    f = torch.nn.functional.scaled_dot_product_attention
    cudnn = _cudnn_may_plan(_shape_key("sdpa", q, k))
    if not q.is_cuda:
        return f(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    order = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    if cudnn and piece_backend(q) == "cudnn":
        order.insert(0, SDPBackend.CUDNN_ATTENTION)
    try:
        ctx = sdpa_kernel(order, set_priority=True)
    except TypeError:  # pragma: no cover - torch < 2.6
        ctx = sdpa_kernel(order)
    with ctx:
        return f(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)


def dense_piece(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """:func:`piece_after_prefix` on :func:`piece_backend`'s kernel (flash where :func:`keep_cudnn_to` keeps cuDNN
    from this shape); a shape cuDNN refuses goes to flash, and cuDNN is not tried again for that device, dtype
    and head dim."""
    backend = piece_backend(q)
    if not _cudnn_may_plan(_shape_key("piece", q, k)) and backend == "cudnn":
        backend = "flash"
    try:
        return piece_after_prefix(q, k, v, scale, backend)
    except RuntimeError:
        if backend != "cudnn":
            raise
        _CUDNN_OK[(q.device.index, q.dtype, q.shape[-1])] = False
        return piece_after_prefix(q, k, v, scale, "flash")


def _check_cudnn(device, dtype, d: int) -> bool:
    """cuDNN's split + merge equals the math reference on a small piece (once per device, dtype, head dim),
    its log-sum-exp read as natural log (or else base 2); otherwise flash is used."""
    import math
    try:
        g = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(2, 96, d, device=device, dtype=dtype, generator=g) * 2
        k = torch.randn(224, d, device=device, dtype=dtype, generator=g)
        v = torch.randn(224, d, device=device, dtype=dtype, generator=g)
        ref = piece_after_prefix(q, k, v, d ** -0.5, "math")
        with unrouted_prefixes():                   # both calls on cuDNN, however small the piece
            for unit in (1.0, math.log(2.0)):
                _CUDNN_LSE_SCALE[0] = unit
                if bool((piece_after_prefix(q, k, v, d ** -0.5, "cudnn") - ref).abs().max() < 2e-2):
                    return True
        _CUDNN_LSE_SCALE[0] = 1.0
        return False
    except (RuntimeError, NotImplementedError):
        _CUDNN_LSE_SCALE[0] = 1.0
        return False


def dense_heads_by_group(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, segs, groups,
                         scale: float) -> None:
    """Dense causal attention of some heads, written into ``out [T, Hq, d]``: per group ``(q heads, KV heads,
    c)`` of ``groups`` (``c`` q heads per KV head, the q heads ordered by KV head; each index a slice, or a
    device index tensor) and per sequence ``(q_start, n, L, kv_rows)`` of ``segs`` (its queries are the last
    ``n`` of its ``L`` keys, ``kv_rows`` where those keys are in ``k``/``v``): one causal :func:`causal_sdpa`
    call without a prefix (GQA in the kernel), one :func:`dense_piece` after one (the prefix and the new rows
    as two calls, merged). Operands token-major."""
    for qh, kvh, c in groups:
        for qs, n, L, rows in segs:
            qb = q[qs:qs + n, qh].contiguous()                                        # [n, g c, d]
            kb, vb = gather_rows(k, rows, kvh), gather_rows(v, rows, kvh)             # [L, g, d]
            if n == L:
                o = causal_sdpa(_bshd(qb), _bshd(kb), _bshd(vb), scale, c > 1)[0].transpose(0, 1)
            else:
                g = kb.shape[1]
                o = dense_piece(qb.view(n, g, c, -1).permute(1, 2, 0, 3), kb.transpose(0, 1), vb.transpose(0, 1),
                                scale)                                                 # [g, c, n, d]
                o = o.permute(2, 0, 1, 3).reshape(n, g * c, -1)
            if isinstance(qh, slice):
                out[qs:qs + n, qh] = o.to(out.dtype)
            else:
                out[qs:qs + n].index_copy_(1, qh, o.to(out.dtype))


def gather_rows(buf: torch.Tensor, rows: torch.Tensor | slice, groups: torch.Tensor | slice) -> torch.Tensor:
    """``buf[rows][:, groups]`` (``[len(rows), G, d]``) in one gather: a pool index tensor and a group index
    tensor are broadcast against each other, so the prefix is not first copied with every KV group."""
    if isinstance(rows, torch.Tensor) and isinstance(groups, torch.Tensor):
        return buf[rows[:, None], groups]
    return buf[rows, groups]
