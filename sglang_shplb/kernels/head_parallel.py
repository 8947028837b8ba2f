"""Head-parallel extend of one layer on one TP rank: compute the heads the plan keeps at home, ship the
units it moves (q rows + the K/V prefix they read) to their target ranks, compute the units other ranks
ship here, and return their outputs home before ``o_proj`` (no SGLang import; torch.distributed only).

The schedule (:class:`sglang_shplb.scheduler.head_schedule.LayerSchedule`, read here through its
attributes) fixes every buffer's size on every rank, so the exchange is two ``all_to_all_single`` calls
with known splits (inputs, then outputs) on the TP group, no handshake. The inputs travel while the home
heads compute (``async_op``). A moved unit is an extend chunk over a staged prefix: its K/V rows arrive as
the requests' prefixes back to back (:class:`KVRows`) and are computed by the same attention as the home
heads (:func:`attend_heads`).

Layouts: ``q [T, Hq_local, d]`` (this rank's home heads, local order), ``k_buffer/v_buffer [pool,
Hkv_local, d]`` (SGLang's pool of this rank, the batch's new K/V already written), ``out [T, Hq_local,
d]``.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import torch
import torch.distributed as dist

from sglang_shplb.core.patterns import HeadBudget, Pattern
from sglang_shplb.kernels.block_index import int_tensor, pool_rows, to_device
from sglang_shplb.kernels.dense_pieces import dense_heads_by_group
from sglang_shplb.kernels.layer_reference import CHEAP, sparse_attention


# ---------------------------------------------------------------------------------------------------
# attention of some heads (extend semantics: the queries of request i are the last q_lens[i] of its
# kv_lens[i] tokens). Where request i's keys are: ``KVRows``
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KVRows:
    """Request ``i``'s keys: paged, ``buffer[req_to_token[req_pool_indices[i], :kv_len]]`` (SGLang's pool, in
    pages of ``page_size`` slots), or contiguous, ``buffer[starts[i] : starts[i] + kv_len]`` (a staged prefix, a
    batch's new tokens)."""
    req_to_token: torch.Tensor | None = None
    req_pool_indices: torch.Tensor | None = None
    starts: tuple[int, ...] | None = None
    page_size: int = 1

    @staticmethod
    def back_to_back(lens: Sequence[int]) -> "KVRows":
        starts, c = [], 0
        for L in lens:
            starts.append(c)
            c += L
        return KVRows(starts=tuple(starts))

    def rows(self, i: int, kv_len: int) -> torch.Tensor | slice:
        if self.starts is not None:
            return slice(self.starts[i], self.starts[i] + kv_len)
        return pool_rows(self.req_to_token, self.req_pool_indices, i, kv_len)

    def paged(self, kv_lens: Sequence[int], device) -> tuple[torch.Tensor, torch.Tensor]:
        """A ``(req_to_token, req_pool_indices)`` view of these rows for the paged kernels."""
        if self.starts is None:
            return self.req_to_token, self.req_pool_indices
        return contiguous_table(self.starts, tuple(int(L) for L in kv_lens), str(device))


@lru_cache(maxsize=16)
def contiguous_table(starts: tuple[int, ...], kv_lens: tuple[int, ...], device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(req_to_token, req_pool_indices)`` of contiguous rows: row ``i`` lists ``starts[i] + j`` for ``j <
    kv_lens[i]`` (0 after), built on the device from two small host lists and kept (a table built on the host
    costs a copy of every position, each call)."""
    s, n = (to_device(torch.tensor(x, dtype=torch.int32), device) for x in (starts, kv_lens))
    j = torch.arange(max(max(kv_lens), 1), dtype=torch.int32, device=device)[None, :]
    table = torch.where(j < n[:, None], s[:, None] + j, torch.zeros_like(j))
    return table, torch.arange(len(kv_lens), dtype=torch.int32, device=device)


# No host synchronisation on the executor's path: a sync in the middle of a layer drains the GPU queue and
# exposes the host's launch time that follows it. Host-built tensors travel with non-blocking copies
# (``block_index.to_device``); pool rows are read with a device index (``bench/head_parallel.py`` runs the
# executor under CUDA's sync check).
def head_index(heads: Sequence[int], device) -> slice | torch.Tensor:
    """``heads`` as an index of a head axis: a slice when they are consecutive, else a cached device tensor
    (a Python list as an index is copied to the device with a sync on every use)."""
    hs = tuple(int(h) for h in heads)
    if hs == tuple(range(hs[0], hs[0] + len(hs))):
        return slice(hs[0], hs[0] + len(hs))
    return int_tensor(hs, str(device), torch.long)


def dense_heads(q, k_buffer, v_buffer, kv: KVRows, q_lens, kv_lens, heads, scale, out) -> None:
    """Dense causal attention of ``heads``, query j of request i at position ``kv_len - q_len + j``, per request
    and KV head (:func:`.dense_pieces.dense_heads_by_group`: cuDNN / flash SDPA without a prefix, two merged
    calls after one)."""
    group = q.shape[1] // k_buffer.shape[1]
    by_kv: dict[int, list[int]] = {}
    for h in heads:
        by_kv.setdefault(h // group, []).append(h)
    groups = [(head_index(hs, q.device), slice(g, g + 1), len(hs)) for g, hs in by_kv.items()]
    segs, c = [], 0
    for i, (n, L) in enumerate(zip(q_lens, kv_lens)):
        if n:
            segs.append((c, n, L, kv.rows(i, L)))
        c += n
    dense_heads_by_group(q, k_buffer, v_buffer, out, segs, groups, scale)


_PREFILLS: dict = {}


@lru_cache(maxsize=64)
def lens_tensors(q_lens: tuple[int, ...], kv_lens: tuple[int, ...], device: str) -> tuple[torch.Tensor, ...]:
    """``cu_seqlens_q``, ``kv_lens`` and ``cu_seqlens_k`` (keys back to back) on the device, int32, copied
    without waiting and kept per batch shape (every layer of a forward asks for the same ones)."""
    def cum(x):
        return torch.tensor([0, *x], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return tuple(to_device(t, device) for t in (cum(q_lens), torch.tensor(kv_lens, dtype=torch.int32), cum(kv_lens)))


def _sparse_kernels(q, k_buffer, v_buffer, kv: KVRows, q_lens, kv_lens, budgets, heads, scale, out) -> None:
    """Sparse heads on CUDA: one :class:`~sglang_shplb.kernels.api.SparsePrefill` call (heads not asked for
    run at :data:`CHEAP` and are dropped)."""
    from sglang_shplb.kernels.api import SparsePrefill
    dev, want = q.device, set(heads)
    bud = tuple(b if h in want else CHEAP for h, b in enumerate(budgets))
    key = (bud, k_buffer.shape[1], q.shape[-1])
    sp = _PREFILLS.get(key)
    if sp is None:
        sp = _PREFILLS[key] = SparsePrefill(list(bud), k_buffer.shape[1], q.shape[-1])
    sp.sm_scale = scale
    cu, kvl, cu_k = lens_tensors(tuple(map(int, q_lens)), tuple(map(int, kv_lens)), str(dev))
    if kv.starts is not None and kv == KVRows.back_to_back(kv_lens):
        sp.plan(cu, kvl, max(q_lens), max(kv_lens), cu_seqlens_k=cu_k, q_lens_cpu=list(q_lens),
                kv_lens_cpu=list(kv_lens))
    else:
        r2t, rpi = kv.paged(kv_lens, dev)
        sp.plan(cu, kvl, max(q_lens), max(kv_lens), req_to_token=r2t, req_pool_indices=rpi,
                q_lens_cpu=list(q_lens), kv_lens_cpu=list(kv_lens),
                kv_page_size=kv.page_size if kv.starts is None else 1)
    o = sp.run(q, k_buffer, v_buffer)
    hs = head_index(heads, dev)
    out[:, hs] = o[:, hs].to(out.dtype)


def attend_heads(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor, kv: KVRows,
                 q_lens: Sequence[int], kv_lens: Sequence[int], budgets: Sequence[HeadBudget],
                 heads: Sequence[int], scale: float, out: torch.Tensor) -> None:
    """Write ``out[:, h]`` for ``h in heads`` (indices into ``budgets`` and q's head axis) at their budgets;
    other columns are left alone. Dense heads: SDPA (:func:`dense_heads`); the others: the Triton kernels on
    CUDA, the PyTorch reference elsewhere."""
    heads = list(heads)
    if not heads or q.shape[0] == 0:
        return
    dense = [h for h in heads if budgets[h].pattern is Pattern.DENSE]
    sparse = [h for h in heads if budgets[h].pattern is not Pattern.DENSE]
    if dense:
        dense_heads(q, k_buffer, v_buffer, kv, q_lens, kv_lens, dense, scale, out)
    if not sparse:
        return
    if q.is_cuda:
        _sparse_kernels(q, k_buffer, v_buffer, kv, q_lens, kv_lens, budgets, sparse, scale, out)
        return
    r2t, rpi = kv.paged(kv_lens, q.device)
    only = [b if h in sparse else HeadBudget.dense() for h, b in enumerate(budgets)]
    sparse_attention(q, k_buffer, v_buffer, r2t, rpi, torch.tensor(list(kv_lens), device=q.device),
                     torch.tensor(list(q_lens), device=q.device), only, scale, out, max_kv_len=max(kv_lens))


# ---------------------------------------------------------------------------------------------------
# the executor
# ---------------------------------------------------------------------------------------------------
@dataclass
class RankLayout:
    """This rank's place in the TP group and the model's head geometry (global ids)."""
    rank: int
    tp: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def hq_local(self) -> int:
        return self.num_q_heads // self.tp

    @property
    def q_base(self) -> int:
        return self.rank * self.hq_local

    def local_q(self, head: int) -> int:
        return head - self.q_base

    def local_kv(self, kv_head: int) -> int:
        """Index of a home KV head in this rank's pool: rank r's first KV head is ``r Hkv / TP`` (rounded
        down: when TP > Hkv each KV head is replicated and a rank holds one)."""
        return kv_head - self.rank * self.num_kv_heads // self.tp


@dataclass
class ExchangeStats:
    """What this rank shipped in the current batch (the backend logs it after the last layer)."""
    units_moved: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0


def _rows(x: torch.Tensor, ranges, head: int) -> torch.Tensor:
    """``x[rows, head]`` for rows given as ``[start, stop)`` ranges: ``[n, d]`` (slices, no index tensor)."""
    parts = [x[a:b, head] for a, b in ranges]
    return parts[0] if len(parts) == 1 else torch.cat(parts) if parts else x.new_empty(0, x.shape[-1])


def _put_rows(out: torch.Tensor, ranges, head: int, o: torch.Tensor) -> None:
    """``out[rows, head] = o`` for rows given as ranges (``o [n, d]`` in range order)."""
    c = 0
    for a, b in ranges:
        out[a:b, head] = o[c:c + b - a].to(out.dtype)
        c += b - a


def _gather_prefix(k_buffer, req_to_token, req_pool_indices, kv_local: int, lens,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """K (or V) rows ``[Σ lens, d]`` of one local KV head: positions ``[0, lens[i])`` of each request, one
    ``index_select`` per request, written into ``out [Σ lens, d]`` when given (no second copy)."""
    if out is None:
        out = k_buffer.new_empty(sum(lens), k_buffer.shape[-1])
    src, c = k_buffer[:, kv_local], 0
    for i, L in enumerate(lens):
        if not L:
            continue
        idx = pool_rows(req_to_token, req_pool_indices, i, L)
        if out.dtype == src.dtype:
            torch.index_select(src, 0, idx, out=out[c:c + L])
        else:
            out[c:c + L].copy_(src.index_select(0, idx))
        c += L
    return out


class HeadParallelExtend:
    """Runs one layer's :class:`LayerSchedule` on this rank (see the module docstring)."""

    def __init__(self, layout: RankLayout, group=None, pool_page_size: int = 1) -> None:
        """``pool_page_size``: the slots of the KV pool's pages (SGLang's ``--page-size``)."""
        self.lay = layout
        self.group = group
        self.pool_page_size = pool_page_size
        self.stats = ExchangeStats()

    # -- the whole layer ----------------------------------------------------------------------------
    def run(self, sched, budgets: Sequence[HeadBudget], q: torch.Tensor, k_buffer: torch.Tensor,
            v_buffer: torch.Tensor, req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, scale: float,
            out: torch.Tensor, k_new: torch.Tensor | None = None, v_new: torch.Tensor | None = None) -> torch.Tensor:
        """``budgets``: the layer's budgets of every q head (global order). ``k_new/v_new [T, Hkv_local,
        d]``: the batch's new K/V; when no request has a cached prefix the home heads read them directly."""
        lay, r, d = self.lay, self.lay.rank, self.lay.head_dim
        shape = sched.shape
        send = self.pack_inputs(sched, q, k_buffer, v_buffer, req_to_token, req_pool_indices)
        handle, recv, in_split = None, None, [sched.input_elems(s, r, d) for s in range(lay.tp)]
        if sched.exchanges:
            recv = q.new_empty(sum(in_split))
            handle = dist.all_to_all_single(recv, send, in_split, [sched.input_elems(r, t, d) for t in range(lay.tp)],
                                            group=self.group, async_op=True)
        # home heads computed whole, over every row, while the inputs travel
        whole = [lay.local_q(h) for h in sched.work.whole[r]]
        local_budgets = list(budgets[lay.q_base:lay.q_base + lay.hq_local])
        seq_lens = [p + e for p, e in zip(shape.prefix_lens, shape.extend_lens)]
        live = [i for i, e in enumerate(shape.extend_lens) if e]
        if whole and live:
            q_lens, kv_lens = [shape.extend_lens[i] for i in live], [seq_lens[i] for i in live]
            if k_new is not None and q_lens == kv_lens:
                attend_heads(q, k_new, v_new, KVRows.back_to_back(kv_lens), q_lens, kv_lens, local_budgets, whole,
                             scale, out)
            else:
                rpi = req_pool_indices if len(live) == len(shape.extend_lens) else \
                    req_pool_indices[to_device(torch.tensor(live), req_pool_indices.device)]
                attend_heads(q, k_buffer, v_buffer, KVRows(req_to_token, rpi, page_size=self.pool_page_size),
                             q_lens, kv_lens, local_budgets, whole, scale, out)
        # units whose home and target are this rank: staged from the home pool, no transfer
        self.compute_units(sched, r, budgets, scale, out, q=q, k_buffer=k_buffer, v_buffer=v_buffer,
                            req_to_token=req_to_token, req_pool_indices=req_pool_indices)
        if handle is None:
            return out
        handle.wait()
        # units shipped here, per home rank, outputs packed home-wise
        back: list[torch.Tensor] = []
        off = 0
        for s in range(lay.tp):
            n = in_split[s]
            if s != r:
                back.append(self.compute_units(sched, s, budgets, scale, None, recv=recv[off:off + n]))
            else:
                back.append(q.new_empty(0))
            off += n
        out_split = [sched.output_elems(r, t, d) for t in range(lay.tp)]
        ret = q.new_empty(sum(out_split))
        dist.all_to_all_single(ret, torch.cat(back), out_split, [sched.output_elems(s, r, d) for s in range(lay.tp)],
                               group=self.group)
        self.scatter_outputs(sched, ret, out_split, out)
        self.stats.bytes_received += (recv.numel() + ret.numel()) * q.element_size()
        return out

    # -- inputs --------------------------------------------------------------------------------------
    def pack_inputs(self, sched, q, k_buffer, v_buffer, req_to_token, req_pool_indices) -> torch.Tensor:
        """The send buffer (the layout of :mod:`sglang_shplb.scheduler.head_schedule`), every K/V prefix and
        q row gathered straight into its place."""
        lay, r, d = self.lay, self.lay.rank, self.lay.head_dim
        send = q.new_empty(sum(sched.input_elems(r, t, d) for t in range(lay.tp)))
        off = 0
        for t in range(lay.tp):
            if t == r:
                continue
            for b in sched.bundles_between(r, t):
                kv, n = lay.local_kv(b.kv_head), b.tokens * d
                _gather_prefix(k_buffer, req_to_token, req_pool_indices, kv, b.lens, send[off:off + n].view(-1, d))
                _gather_prefix(v_buffer, req_to_token, req_pool_indices, kv, b.lens,
                               send[off + n:off + 2 * n].view(-1, d))
                off += 2 * n
            for ur in sched.unit_rows_between(r, t):
                h = lay.local_q(ur.unit.head)
                for a, b in ur.token_ranges(sched.shape):
                    send[off:off + (b - a) * d].view(-1, d).copy_(q[a:b, h])
                    off += (b - a) * d
                self.stats.units_moved += 1
        self.stats.bytes_sent += send.numel() * q.element_size()
        return send

    # -- units ---------------------------------------------------------------------------------------
    def compute_units(self, sched, home: int, budgets, scale, out, *, recv=None, q=None, k_buffer=None,
                       v_buffer=None, req_to_token=None, req_pool_indices=None) -> torch.Tensor | None:
        """Compute the units ``home → this rank``. From this rank's own pool and q when ``recv`` is None
        (outputs written into ``out``), else from the received buffer (outputs returned packed)."""
        lay, d = self.lay, self.lay.head_dim
        shape = sched.shape
        rows = sched.unit_rows_between(home, lay.rank)
        bundles = sched.bundles_between(home, lay.rank)
        if not any(ur.n_rows for ur in rows):
            return None if recv is None else (recv.new_empty(0))
        dev = (recv if recv is not None else q).device
        dtype = (recv if recv is not None else q).dtype
        # staged K/V: one bundle per KV head, the requests' prefixes back to back; q rows per unit
        off = 0
        staged: dict[int, tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]] = {}
        for b in bundles:
            if recv is None:
                kv = lay.local_kv(b.kv_head)
                kk = _gather_prefix(k_buffer, req_to_token, req_pool_indices, kv, b.lens)
                vv = _gather_prefix(v_buffer, req_to_token, req_pool_indices, kv, b.lens)
            else:
                n = b.tokens * d
                kk, vv = recv[off:off + n].view(-1, d), recv[off + n:off + 2 * n].view(-1, d)
                off += 2 * n
            staged[b.kv_head] = (kk, vv, b.lens)
        q_rows: list[torch.Tensor] = []
        for ur in rows:
            if recv is None:
                q_rows.append(_rows(q, ur.token_ranges(shape), lay.local_q(ur.unit.head)))
            else:
                n = ur.n_rows * d
                q_rows.append(recv[off:off + n].view(-1, d))
                off += n
        results: list[torch.Tensor] = [torch.empty(0, d, dtype=dtype, device=dev)] * len(rows)
        # one attention call per (KV head, row range): its q heads share rows and prefix
        groups: dict[tuple, list[int]] = {}
        for j, ur in enumerate(rows):
            if ur.n_rows:
                groups.setdefault((ur.unit.kv_head, ur.rows), []).append(j)
        for (g, _), js in groups.items():
            kk, vv, lens = staged[g]
            ur0 = rows[js[0]]
            starts = KVRows.back_to_back(lens).starts
            kv_rows = KVRows(starts=tuple(starts[i] for i in ur0.requests()))
            qq = torch.stack([q_rows[j] for j in js], 1)                           # [n, S, d]
            oo = torch.empty_like(qq)
            attend_heads(qq, kk[:, None], vv[:, None], kv_rows, ur0.q_lens(), ur0.kv_lens(shape),
                         [budgets[rows[j].unit.head] for j in js], range(len(js)), scale, oo)
            for i, j in enumerate(js):
                results[j] = oo[:, i]
        if recv is None:
            for ur, o in zip(rows, results):
                _put_rows(out, ur.token_ranges(shape), lay.local_q(ur.unit.head), o)
            return None
        return torch.cat([o.reshape(-1) for o in results]) if results else recv.new_empty(0)

    def scatter_outputs(self, sched, ret: torch.Tensor, split: Sequence[int], out: torch.Tensor) -> None:
        lay, d, off = self.lay, self.lay.head_dim, 0
        for t in range(lay.tp):
            if t == lay.rank:
                continue
            for ur in sched.unit_rows_between(lay.rank, t):
                n = ur.n_rows * d
                _put_rows(out, ur.token_ranges(sched.shape), lay.local_q(ur.unit.head), ret[off:off + n].view(-1, d))
                off += n
