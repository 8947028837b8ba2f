"""Sparse prefill heads on cuDNN's block-sparse attention (the cuDNN frontend's CuTe DSL kernel for SM90, 64-token
blocks: ``cudnn.block_sparse_attention``), the causal diagonal on :mod:`.triton_diagonal`.

The package's :class:`.block_index.BlockIndex` lists each query block's KV blocks in ascending order, the
diagonal last. cuDNN's kernel takes such lists per (batch, q head, query block) with a count per row; it is not
causal and wants the query rows in whole 64-row blocks. One call covers every listed head of one sequence's chunk:

    counts     = block_cnt - 1 for the heads asked for (the diagonal dropped), 0 for the others
    o_p, lse_p = cuDNN(q, k, v, block_idx, counts)          every head, over its listed blocks, not causal
    out[:, heads] = diagonal_merge(q, k, v, o_p, lse_p)     the diagonal, causal, merged by log-sum-exp

It runs on CUDA at SM 9.x, bf16 / fp16, d = 64 or 128, where ``cudnn.block_sparse_attention`` imports
(nvidia-cudnn-frontend >= 1.28 with nvidia-cutlass-dsl: FlashInfer 0.6 requires the first, SGLang 0.5.17 pins
the second). ``SparsePrefill`` takes this route where it was measured to win (:func:`route_pays`: enough work per call;
``SHPLB_CUDNN_BLOCKS``: ``auto`` by default, ``1`` wherever it can run, ``0`` never: :func:`route_mode`).
:func:`listed_blocks_reference` is the torch stand-in of cuDNN's call (tests on the CPU). No SGLang.
"""
from __future__ import annotations

import math
import os
from functools import lru_cache
from typing import Callable

import torch

from sglang_shplb.core.patterns import BLOCK
from sglang_shplb.kernels.triton_diagonal import diagonal_merge

#: the environment variable that sets :class:`~.api.SparsePrefill`'s use of this route: ``auto`` (the default:
#: where :func:`route_pays`), ``1`` (wherever the route can run), ``0`` (never)
SWITCH = "SHPLB_CUDNN_BLOCKS"
ROUTE_MODES = ("auto", "1", "0")

#: head x query row x key pairs per call (the routed heads times the chunk's rows times the sequence's keys) from
#: which ``auto`` takes the route: each call has a fixed cost (its host work, ~0.5-1.5 ms; the diagonal merge,
#: linear in the rows) that the faster listed blocks must earn back. Measured, route on against off on the same
#: index, H100, 2026-12-07 (``bench/results/gpu_round26/h100/run3``): the serving benchmark's mixed layer through
#: ``SparsePrefill.run`` (28 routed heads of 32) 0.98x at 28 x 8K x 16K (3.8e9: an 8K chunk after 8K, 64-slot
#: pool), 1.04x at 28 x 16K x 16K (7.5e9), 1.11x at 28 x 8K x 32K (7.5e9), 1.07-1.13x from there to 128K;
#: per head 0.93-1.30x (contiguous keys) and 1.11-1.50x (page pool) from 16K. Round 28 timed each chunk of a
#: chunked prefill alone (``bench/results/gpu_round28/h100/cp``): the 8K chunk after 16K (5.6e9) took 2.3-2.75 ms
#: on the route against 1.81 ms off, but a call alone is host-bound there (the route's host work 1.7-2.2 ms a call
#: against 1.1-1.3 ms), while a server's forward keeps the host ahead of the GPU (the GEMMs take ~5 ms a layer), so
#: that is not the server's cost and the threshold stays until a server says otherwise.
ROUTE_MIN_PAIRS = 5.0e9

#: query rows per cuDNN call: a longer chunk is cut into pieces of at most this many rows (each the end of a
#: shorter sequence), which bounds the call's partial output ``o_p`` (every q head: 16K x 32 x 128 in bf16 is
#: 128 MiB, where an unchunked 128K prefill would hold 1 GiB outside SGLang's memory budget). At 16K rows a call
#: does >= 28 x 16K x 16K = 7.5e9 pairs, past :data:`ROUTE_MIN_PAIRS`, so the cut costs a few host launches.
ROUTE_MAX_ROWS = 16384

#: ``(q, k, v, block_idx, counts, scale) -> (o_p, lse_p)``: attention over listed blocks, not causal
ListedBlocks = Callable[..., tuple[torch.Tensor, torch.Tensor]]


@lru_cache(maxsize=None)
def _cudnn_forward():
    """cuDNN's ``block_sparse_attention_forward``, or the reason it cannot be imported."""
    try:
        from cudnn.block_sparse_attention import block_sparse_attention_forward
    except Exception as e:  # noqa: BLE001  (ImportError, or the DSL failing to load its libraries)
        return f"cudnn.block_sparse_attention does not import: {type(e).__name__}: {e}"
    return block_sparse_attention_forward


def route_mode() -> str:
    """``SHPLB_CUDNN_BLOCKS``: ``auto`` (unset), ``1`` or ``0``; anything else is refused."""
    mode = os.environ.get(SWITCH, "auto")
    if mode not in ROUTE_MODES:
        raise ValueError(f"{SWITCH}={mode!r}: expected one of {', '.join(ROUTE_MODES)}")
    return mode


def route_pays(n_heads: int, q_lens: list[int], kv_lens: list[int]) -> bool:
    """Whether ``auto`` takes the route for ``n_heads`` heads of a batch (one call per sequence with queries): the
    calls do on average at least :data:`ROUTE_MIN_PAIRS` head x row x key pairs (``n_heads * sum(n_q * n_kv) /
    calls``)."""
    seqs = [(n, L) for n, L in zip(q_lens, kv_lens) if n > 0]
    return bool(seqs) and n_heads * sum(n * L for n, L in seqs) >= ROUTE_MIN_PAIRS * len(seqs)


def route_takes(mode: str, n_heads: int, q_lens: list[int], kv_lens: list[int]) -> bool:
    """The switch's rule for a batch the route can run: never at ``0``, always at ``1``, at ``auto`` where
    :func:`route_pays`."""
    return mode == "1" or (mode == "auto" and route_pays(n_heads, q_lens, kv_lens))


def route_status(kv: torch.Tensor, head_dim: int, page_size: int = BLOCK) -> str:
    """One line for a server's log: whether :class:`~.api.SparsePrefill` takes the route for keys like ``kv``
    (their device and dtype) in a pool of ``page_size``-slot pages and this head dim, and when."""
    mode = route_mode()
    if mode == "0":
        return f"off ({SWITCH}=0)"
    why = cudnn_blocks_unavailable(kv.new_empty(1, 1, head_dim))
    if why:
        return f"unavailable: {why}"
    if page_size != BLOCK:
        return (f"unavailable: the KV pool's pages hold {page_size} slot(s); the route reads {BLOCK}-slot pages in "
                f"place (--page-size {BLOCK})")
    return (f"on wherever it can run ({SWITCH}=1)" if mode == "1"
            else f"auto: calls of >= {ROUTE_MIN_PAIRS:.0e} head x row x key pairs")


def cudnn_blocks_unavailable(q: torch.Tensor) -> str | None:
    """Why :func:`block_sparse_heads` cannot use cuDNN for ``q``, or None where it can."""
    if not q.is_cuda:
        return "not on CUDA"
    return _unavailable(q.device.index if q.device.index is not None else torch.cuda.current_device(), q.dtype,
                        q.shape[-1])


@lru_cache(maxsize=None)
def _unavailable(device: int, dtype: torch.dtype, d: int) -> str | None:
    sm = torch.cuda.get_device_capability(device)
    if sm[0] != 9:
        return f"SM {sm}: cuDNN's block-sparse forward here is SM90's"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {dtype}"
    if d not in (64, 128):
        return f"head dim {d}"
    f = _cudnn_forward()
    return f if isinstance(f, str) else None


def cudnn_listed_blocks(q4: torch.Tensor, k4: torch.Tensor, v4: torch.Tensor, block_idx: torch.Tensor,
                        counts: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cuDNN's call: ``q4 [1, n_q, Hq, d]`` (``n_q`` a multiple of 64), ``k4, v4 [1, n_kv, Hkv, d]``,
    ``block_idx [1, Hq, n_q / 64, MAXK]``, ``counts [1, Hq, n_q / 64]`` → ``o [1, n_q, Hq, d]``,
    ``lse [1, Hq, n_q]`` (float32, natural log, -inf where a row lists nothing)."""
    r = _cudnn_forward()(q4, k4, v4, block_idx, q2k_block_nums=counts, allow_empty_block_nums=True,
                         softmax_scale=scale, layout="bshd")
    return r["o_tensor"], r["lse_tensor"]


def listed_blocks_reference(q4: torch.Tensor, k4: torch.Tensor, v4: torch.Tensor, block_idx: torch.Tensor,
                            counts: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`cudnn_listed_blocks` in float32 torch ops: each row of query block ``j`` attends every key of the
    blocks ``block_idx[0, h, j, :counts[0, h, j]]``, none other, no causal mask."""
    _, n_q, hq, d = q4.shape
    n_kv, hkv = k4.shape[1], k4.shape[2]
    group = hq // hkv
    o = torch.zeros(1, n_q, hq, d, dtype=q4.dtype, device=q4.device)
    lse = torch.full((1, hq, n_q), float("-inf"), dtype=torch.float32, device=q4.device)
    for h in range(hq):
        for j in range(n_q // BLOCK):
            c = int(counts[0, h, j])
            if c == 0:
                continue
            keys = (block_idx[0, h, j, :c].long()[:, None] * BLOCK + torch.arange(BLOCK)).flatten()
            keys = keys[keys < n_kv]
            rows = slice(j * BLOCK, (j + 1) * BLOCK)
            s = (q4[0, rows, h].float() @ k4[0, keys, h // group].float().T) * scale
            lse[0, h, rows] = torch.logsumexp(s, -1)
            o[0, rows, h] = (torch.softmax(s, -1) @ v4[0, keys, h // group].float()).to(o.dtype)
    return o, lse


def block_sparse_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_idx: torch.Tensor,
                       block_cnt: torch.Tensor, heads: torch.Tensor, out: torch.Tensor, scale: float,
                       listed: ListedBlocks | None = None, kv_rows: torch.Tensor | None = None,
                       n_kv: int | None = None, max_rows: int = ROUTE_MAX_ROWS) -> torch.Tensor:
    """The heads ``heads`` (int32 on ``q``'s device) of one sequence's chunk, written into ``out [n_q, Hq, d]``.

    ``q [n_q, Hq, d]``: the last ``n_q`` of the sequence's ``n_kv`` positions (``n_kv - n_q`` a multiple of 64);
    ``k, v [n_kv, Hkv, d]``: its keys and values, contiguous rows, or with ``kv_rows`` (its ``req_to_token`` row:
    position -> pool slot) and ``n_kv`` SGLang's pool of 64-slot pages (``--page-size 64``: every 64-token block
    of the sequence is one page, so block ``j`` is the pool's block ``kv_rows[64 j] / 64``);
    ``block_idx [Hq, NB, MAXK]``, ``block_cnt [Hq, NB]``: the sequence's rows of a
    :class:`.block_index.BlockIndex` (absolute query blocks).
    ``listed``: the attention over the listed blocks (default cuDNN's :func:`cudnn_listed_blocks`, or
    :func:`listed_blocks_reference`). ``max_rows`` (a multiple of 64): query rows per call; a longer chunk runs
    as pieces, rows ``[a, b)`` being the last ``b - a`` positions of a sequence of ``n_kv - n_q + b``."""
    n_q, hq, d = q.shape
    n_kv = k.shape[0] if kv_rows is None else n_kv
    if max_rows % BLOCK or max_rows <= 0:
        raise ValueError(f"max_rows must be a positive multiple of {BLOCK}, got {max_rows}")
    if n_q > max_rows:
        for a in range(0, n_q, max_rows):
            b = min(a + max_rows, n_q)
            L = n_kv - n_q + b
            kb, vb, kv = (k, v, dict(kv_rows=kv_rows, n_kv=L)) if kv_rows is not None else (k[:L], v[:L], {})
            block_sparse_heads(q[a:b], kb, vb, block_idx, block_cnt, heads, out[a:b], scale, listed,
                               max_rows=max_rows, **kv)
        return out
    first = (n_kv - n_q) // BLOCK
    nqb = math.ceil(n_q / BLOCK)
    qq = q
    if n_q % BLOCK:              # cuDNN takes whole query blocks: zero rows past the chunk, dropped after
        qq = torch.cat([q, q.new_zeros(nqb * BLOCK - n_q, hq, d)])
    # 1 for the heads asked for, elementwise (an index_put_ of a host scalar made the host wait for the GPU)
    listed_head = (torch.arange(hq, device=q.device)[:, None] == heads.long()[None, :]).any(1).int()
    counts = (block_cnt[:, first:first + nqb] - 1).clamp(min=0) * listed_head[:, None]
    idx = block_idx[:, first:first + nqb]
    if kv_rows is not None:      # the sequence's blocks -> the pool's 64-slot blocks
        idx = torch.div(kv_rows[0:n_kv:BLOCK].long(), BLOCK, rounding_mode="floor")[idx.long()].int()
    o_p, lse_p = (listed or cudnn_listed_blocks)(qq[None], k[None], v[None], idx[None], counts[None].int(), scale)
    return diagonal_merge(q, k, v, o_p[:, :n_q], lse_p[:, :, :n_q], heads, out, scale, kv_rows=kv_rows, n_kv=n_kv)
