"""Warm the extend path up before serving: run every distinct layer's prefill kernels once at each shape bucket a
server can meet, so that no request pays for a Triton compile, and build cuDNN's plans of the shapes every long
prompt passes through.

Why (``bench/first_call.py``, H100, 2026-12-06, Llama-3-8B-shaped layer, the last chunk of a prompt of a length
the process had not seen, ``TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1``): the first call at a new power of two of the
key count cost 0.88 s more than the steady call (Triton compiles the index builder's selection for the wider
row), and each new chunk shape 59–125 ms (cuDNN builds an execution plan: the merged pieces after a prefix, which
return a log-sum-exp, got one per exact shape there, not one per power-of-two bucket). After a warm-up that ran
every shape of the grid below on cuDNN (~350 plans), a new shape cost cuDNN 0.72–1.08 s instead (98,365 tokens:
59 ms before, 723 ms after); with the pieces on flash during the warm-up, 0.12–0.15 s. So:

* **Triton**, every bucket (:func:`warmup_shapes`), the dense pieces on flash (:func:`.dense_pieces.forced_pieces`):
  query rows ``m`` one per power-of-two bucket up to the longest extend (the chunked-prefill size); prefix ``p``
  0 (a first chunk: contiguous keys) and one per power-of-two bucket from :data:`MIN_PREFIX` (a later chunk or a
  radix hit: paged keys) with ``p + m`` within the context length. Triton compiles per power of two of the
  ``p + m`` keys' blocks and per launch config of the ``m`` rows' bucket: the grid meets every one that a chunk
  of at most ``max_q`` rows after a prefix of 0 or at least :data:`MIN_PREFIX` tokens can fall in. (Integer
  arguments that follow the lengths are not specialised, :mod:`.triton_jit`: otherwise a length whose values
  divide by 16 differently from the grid's compiled anew, 0.6–1.3 s on an H100, round 18);
* **cuDNN**, the chunk-aligned shapes only (:func:`chunk_shapes`): ``m`` the chunk size after ``p`` = 0, 1, 2, …
  chunks, every chunk of a long prompt but its last. The server then keeps cuDNN to those shapes
  (:func:`.dense_pieces.keep_cudnn_to`): the dense heads of any other chunk run on flash, which builds no plan;
* layers: one per :func:`kernel_signature` (what the kernels' compile-time constants, integer specialisations
  and the dense calls' shapes follow), among those that take the kernel path in the bucket of ``p + m``;
* the request-pool indices in the dtype serving passes (:data:`POOL_INDEX_DTYPE`): Triton compiles per pointer
  dtype too.

The keys live in a scratch pool whose pages all point into ``pool_slots`` slots (values are random; only shapes
and strides matter), and a scratch output: the server's pool, summaries and kept selections are not touched.
No SGLang."""
from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Collection, Sequence

import torch

from sglang_shplb.core.patterns import BLOCK
from sglang_shplb.kernels.dense_pieces import forced_pieces, recording_shapes
from sglang_shplb.kernels.dense_tail import dense_tail
from sglang_shplb.kernels.head_parallel import KVRows
from sglang_shplb.kernels.paged_layer import ExtendBatch, LayerKernels
from sglang_shplb.kernels.triton_index import triton_next_pow2
from sglang_shplb.kernels.triton_jit import int_specialisation

#: the shortest cached prefix warmed (one 128-token superblock: shorter ones share its buckets)
MIN_PREFIX = 2 * BLOCK
#: the dtype of the request-pool indices the dense tail's Triton kernel reads, in the warm-up and in serving:
#: SGLang's ``ForwardBatch.req_pool_indices`` (int64, ``mem_cache/allocation.py``). Triton compiles per pointer
#: dtype, and the warm-up's int32 indices (until 2026-12-06) left the server's first sparse forward to compile the
#: int64 variant: the +0.55-0.72 s first sparse request of rounds 20-22, cached on disk for the next server.
POOL_INDEX_DTYPE = torch.int64


def bucket_lengths(lo: int, hi: int) -> list[int]:
    """One length of each power-of-two bucket met by ``[lo, hi]`` (``1 <= lo <= hi``): the bucket's power of
    two, but ``hi`` for the last (``hi`` not a power of two: its bucket's power of two is out of range)."""
    out, x = [], triton_next_pow2(lo)
    while x < hi:
        out.append(x)
        x *= 2
    return out + [hi]


def warmup_shapes(max_q: int, max_kv: int, min_prefix: int = MIN_PREFIX) -> list[tuple[int, int]]:
    """``(query rows m, prefix p)`` pairs meeting every pair of power-of-two buckets (of ``m``, of ``p``) that a
    chunk of ``1 <= m <= max_q`` rows after a prefix of 0 or ``min_prefix <= p <= max_kv - m`` tokens can fall
    in: per bucket of ``m`` its largest length, and per bucket of ``p`` the largest prefix that fits beside it
    (beside the bucket's smallest ``m`` when none fits beside the largest); ordered by ``p + m``."""
    if max_q < 1 or max_kv < 1:
        raise ValueError(f"need max_q >= 1 and max_kv >= 1, got {max_q}, {max_kv}")
    shapes = set()
    for m_hi in bucket_lengths(1, min(max_q, max_kv)):
        m_lo = triton_next_pow2(m_hi) // 2 + 1 if m_hi > 1 else 1        # the bucket's smallest length
        shapes.add((m_hi, 0))
        if max_kv - m_lo < min_prefix:
            continue
        for bound in bucket_lengths(min_prefix, max_kv - m_lo):
            lo = max(min_prefix, triton_next_pow2(bound) // 2 + 1)        # the prefix bucket's smallest length
            m = next(x for x in (m_hi, m_lo) if min(bound, max_kv - x) >= lo)
            shapes.add((m, min(bound, max_kv - m)))
    return sorted(shapes, key=lambda s: (s[0] + s[1], s[0]))


def chunk_shapes(chunk: int, max_kv: int) -> list[tuple[int, int]]:
    """``(chunk, k * chunk)`` for every ``k >= 0`` with ``(k + 1) * chunk <= max_kv``: the shapes of every chunk
    of a prompt but its last under SGLang's chunked prefill."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    return [(chunk, k * chunk) for k in range(max_kv // chunk)]


def extend_warmup(max_q: int, max_kv: int) -> tuple[list[tuple[int, int]], frozenset[tuple[int, int]]]:
    """What a server with chunks of ``max_q`` rows and ``max_kv`` tokens of context warms: every shape of
    :func:`warmup_shapes` and :func:`chunk_shapes` (ordered by ``p + m``), and the chunk shapes as the ones
    planned on cuDNN (``warm_up_extend(..., planned=)``)."""
    planned = chunk_shapes(max_q, max_kv)
    return sorted(set(warmup_shapes(max_q, max_kv)) | set(planned), key=lambda s: (s[0] + s[1], s[0])), \
        frozenset(planned)


def kernel_signature(layer: LayerKernels) -> tuple:
    """What the prefill kernels of ``layer`` compile and plan for, beyond the shape every layer shares: the dense
    heads' grouping (``(c, KV heads with c dense q heads)``: the shapes of the dense calls) and, per kernel's
    head list (streaming, block-index, top-k at 64 and 128 tokens, vertical-slash), its length as Triton
    specialises integers. The budgets' values (windows, fractions) and which heads they are travel as tensors."""
    h = layer.heads
    per_kv = Counter(x // (layer.hq // layer.hkv) for x in h.dense)
    groups = tuple(sorted(Counter(per_kv.values()).items()))
    top64 = [x for x in h.topk if x not in h.tiled]
    heads = (h.streaming, top64 + list(h.vslash), top64, h.tiled, h.vslash)
    return groups, tuple(int_specialisation(len(x)) for x in heads)


def distinct_layers(layers: Sequence[LayerKernels]) -> list[LayerKernels]:
    """The first layer of each :func:`kernel_signature`, in order."""
    seen: dict[tuple, LayerKernels] = {}
    for lk in layers:
        seen.setdefault(kernel_signature(lk), lk)
    return list(seen.values())


def warm_up_extend(layers_at: Callable[[int], Sequence[LayerKernels]], shapes: Sequence[tuple[int, int]],
                   dtype: torch.dtype, device, *, r2t_cols: int, scale: float,
                   planned: Collection[tuple[int, int]] = (), pool_slots: int = 4096,
                   log: Callable[[str], None] | None = None, seed: int = 0) -> dict:
    """Run :meth:`.LayerKernels.prefill_batch` and the dense tail of each of ``distinct_layers(layers_at(p + m))``
    at every ``(m, p)`` of ``shapes`` (one request; a request-pool table of ``r2t_cols`` columns: pass the row
    stride of the table served from, which the kernels take as an argument that Triton specialises; a
    benchmark whose table was a view with a wider stride paid a compile per launch config, round 19): the
    shapes in ``planned`` with the dense calls on their usual backend (cuDNN on a GPU: its plans are built),
    the others on flash. ``log`` gets a line per tenth of the
    grid. Returns counts, the wall time and ``cudnn_shapes``: the dense calls' shape keys of the planned shapes
    (for :func:`.dense_pieces.keep_cudnn_to`)."""
    t0 = time.perf_counter()
    g = torch.Generator(device=device).manual_seed(seed)
    todo = [(m, p, distinct_layers(layers_at(p + m))) for m, p in shapes]
    todo = [t for t in todo if t[2]]
    if not todo:
        return {"shapes": 0, "calls": 0, "seconds": 0.0, "cudnn_shapes": frozenset()}
    hkv, d = todo[0][2][0].hkv, todo[0][2][0].d
    max_len = max(m + p for m, p, _ in todo)
    if max_len > r2t_cols:
        raise ValueError(f"warm-up shapes reach {max_len} tokens, the request table has {r2t_cols} columns")
    slots = min(pool_slots, max_len)
    k_buf = torch.randn(slots, hkv, d, device=device, dtype=dtype, generator=g)
    v_buf = torch.randn(slots, hkv, d, device=device, dtype=dtype, generator=g)
    r2t = torch.zeros(1, r2t_cols, dtype=torch.int32, device=device)
    r2t[0, :max_len] = torch.arange(max_len, device=device, dtype=torch.int32) % slots
    rpi = torch.zeros(1, dtype=POOL_INDEX_DTYPE, device=device)
    kv_rows = KVRows(r2t, rpi)
    calls, step, kept = 0, max(1, len(todo) // 10), set()
    for i, (m, p, layers) in enumerate(todo):
        batch = ExtendBatch.build(r2t, rpi, [m], [p + m])
        rows = slice(0, m) if m <= slots else torch.arange(m, device=device) % slots
        k, v = k_buf[rows], v_buf[rows]                 # the new tokens (read as such without a prefix)
        with recording_shapes() if (m, p) in planned else forced_pieces("flash") as seen:
            for lk in layers:
                q = torch.randn(m, lk.hq, d, device=device, dtype=dtype, generator=g)
                out = torch.empty_like(q)
                lk.prefill_batch(q, k, v, k_buf, v_buf, batch, scale, out)
                dense_tail(q, k_buf, v_buf, kv_rows, [m], [p + m], lk.heads.sparse, scale, out)
                calls += 1
        kept |= seen or set()
        if log is not None and ((i + 1) % step == 0 or i + 1 == len(todo)):
            if str(device).startswith("cuda"):
                torch.cuda.synchronize(device)
            log(f"shplb warm-up: {i + 1}/{len(todo)} shapes (up to {m} rows after a {p}-token prefix), "
                f"{calls} layer calls, {time.perf_counter() - t0:.1f} s")
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)
    return {"shapes": len(todo), "calls": calls, "seconds": time.perf_counter() - t0,
            "cudnn_shapes": frozenset(kept)}
