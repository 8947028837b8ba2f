"""Cost model: predicted time of one query head's prefill attention on one GPU.

Work unit
---------
A head with budget ``b`` at context length ``L`` computes ``b.block_pairs(L)`` (query block, KV block)
pairs of 64 x 64 tokens. One pair is ``4 * 64 * 64 * d`` FLOPs (QK^T and PV, 2 FLOPs per MAC), ``d`` the
head dimension. The time of a head is modelled as a fixed per-head cost plus a cost per pair::

    head_time = per_head_fixed + pairs * per_pair[pattern, d]

The cost of query block ``i`` of a head is proportional to the KV blocks it attends
(:func:`query_block_pairs`); :class:`CostProfile` holds that causal profile, which the placement uses to
cut a head into query-block pieces that each carry an intended share of the head's cost.

Analytic default (:meth:`CostModel.analytic`)
---------------------------------------------
``per_pair = 4 * 64 * 64 * d / throughput[pattern]``, ``per_head_fixed = 5 us``. The numbers and where
they come from (estimates for an H100 SXM, bf16; replace them with a calibration table):

* ``dense`` 600 TFLOP/s: FlashAttention-3 forward, bf16, d = 128, long sequences reaches 600-740 TFLOP/s
  on H100 SXM (Shah et al. 2024, arXiv 2407.08608, Fig. 5); 600 is the low end of that range.
* ``streaming`` 450 TFLOP/s: sink + local window is a contiguous, regular block set; assumed 75 % of
  dense (the per-block index indirection and ragged diagonal tiles cost a little).
* ``topk`` 300 TFLOP/s: block-sparse gather kernels (FlashInfer block-sparse / Block-Sparse FlashAttention)
  run at roughly half of dense per computed block; assumed 50 % of dense.
* ``vslash`` 250 TFLOP/s: vertical-slash adds irregular diagonal gathers (MInference's kernel); assumed
  about 40 % of dense.
* ``per_head_fixed`` 5 us: fixed cost of a head inside a batched kernel (block-index construction,
  partial waves, launch share); the order of a kernel launch on H100. ``piece_overhead`` (cost of each
  extra piece when a head is split across GPUs) defaults to the same 5 us.

Transfer term (:class:`Transfer`, :meth:`CostModel.transfer`)
--------------------------------------------------------------
Work placed away from its home rank (SGLang's contiguous head slicing, :mod:`sglang_shplb.core.head_map`)
is a *unit*: its q rows and the K/V prefix they read travel home → target, its outputs back
(:mod:`sglang_shplb.core.exchange` counts the elements). Two numbers price that:

* ``link_bytes_per_s`` 370e9 (per direction): about what NCCL's all-to-all reaches between GPUs of one
  H100/H200 NVLink-4 node (450 GB/s per direction nominal; nccl-tests ``alltoall_perf`` bus bandwidth
  on 8 x H100 SXM is about 350-380 GB/s at large messages). An estimate: pass a value measured on the
  machine (``place --link-gbps``) where one exists.
* ``unit_overhead_s`` 50 us: fixed executor time of one unit (staging copies, an extra attention call,
  its share of the two collectives). An assumption where no move calibration is given
  (``place --unit-overhead-us``).
* ``gather_bytes_per_s`` (default None: gathers not priced): bytes per second of the staging gathers a
  rank runs before the exchange (the K/V prefixes of its units out of the paged pool, their q rows);
* ``piece_efficiency`` (default 1): a unit's compute is ``piece / piece_efficiency`` (the executor's
  pieces run below the home's fused call per FLOP: ``< 1``).

The last three are fitted on a device from the head-parallel benchmark's per-rank times
(:mod:`sglang_shplb.planning.move_calibration`, a record of schema ``shplb-move-calibration/1``, e.g.
``bench/results/move_calibration_h200.json``); :func:`load_cost_model` reads such a record in place of a
kernel table (it names the kernel table it was fitted against) and sets them, in this model's seconds.

All are stored in :meth:`CostModel.to_dict`, so a plan records what it was solved with. The planner
prices a layer at the bucket's representative length, one request, no cached prefix
(:mod:`sglang_shplb.planning.solvers.objective` has the per-rank formula).

GQA ratio: prefill attention is compute bound, so the analytic model ignores the GQA ratio (it changes KV
traffic, not FLOPs). A calibration table may resolve it (fits are keyed by ``gqa`` when several are given).

Calibration table (:meth:`CostModel.from_calibration`), schema ``shplb-calibration/1``
------------------------------------------------------------------------------------
Written with :func:`calibration_record` and :func:`write_calibration` by the GPU kernel benchmarks
(``bench/prefill_sweep.py``; ``bench/tile_calibration.py`` adds the 128-token top-k records)::

    {"schema": "shplb-calibration/1",
     "device": "NVIDIA H100 80GB HBM3",          # free text
     "date": "2025-01-31",                       # free text (ISO date)
     "kernel": "flashinfer-0.6.15 block-sparse", # free text: which kernel was timed
     "records": [
       {"pattern": "dense" | "streaming" | "topk" | "vslash",
        "density": 0.12,       # fraction of causal block pairs, in (0, 1]
        "ctx_len": 32768,      # prefill length (tokens), > 0
        "head_dim": 128,       # > 0
        "gqa": 4,              # query heads per KV head, >= 1
        "num_heads": 8,        # query heads in the timed call, all with this pattern/density, >= 1
        "time_ms": 1.234,      # time of ONE layer call over those num_heads heads, > 0
        "block_pairs": 123456, # total (query block, KV block) pairs over those heads, >= 0
        "tile": 128}           # optional, top-k only: selection granularity (HeadBudget.tile), default 64
     ]}

Top-k records of ``tile`` 128 are fitted apart, under the key ``"topk@128"`` (the 128 x 128 tile kernel is
faster per pair); a tile-128 head without such a fit falls back to the ``topk`` fit below.

Fit: per ``(pattern, head_dim)`` (and per ``(pattern, head_dim, gqa)`` where several GQA ratios are
present) a non-negative least-squares line ``time = a + b * block_pairs`` (seconds). When the records
of a key vary ``num_heads`` the model is ``time = a + b * block_pairs + c * num_heads`` and the fixed
per-head cost is ``c``; otherwise it is ``a / num_heads`` (the call's intercept shared by its heads).
With a single distinct ``block_pairs`` value the line is degenerate: ``a = 0``, ``b = mean time / pairs``.

Fallbacks, in order, for a head whose key is not calibrated:
``(pattern, d, gqa)`` -> ``(pattern, d)`` -> ``(pattern, nearest d)`` with ``b`` scaled by ``d / d_fit``
-> the calibrated ``dense`` fit (same rules) with ``b`` scaled by the analytic throughput ratio
``throughput[dense] / throughput[pattern]`` -> the analytic default.
"""
from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import nnls

from sglang_shplb.core.exchange import piece_rows
from sglang_shplb.core.patterns import BLOCK, TOPK_TILES, HeadBudget, Pattern

CALIBRATION_SCHEMA = "shplb-calibration/1"

#: Analytic throughputs (TFLOP/s), see the module docstring for their sources.
DEFAULT_THROUGHPUT_TFLOPS: dict[str, float] = {"dense": 600.0, "streaming": 450.0, "topk": 300.0, "vslash": 250.0}
DEFAULT_PER_HEAD_OVERHEAD_S = 5e-6
#: Transfer term defaults (see the module docstring): NCCL all-to-all over H100/H200 NVLink, per direction,
#: and the fixed executor cost of one unit of work away from the single-rank path (to be fitted).
DEFAULT_LINK_BYTES_PER_S = 370e9
DEFAULT_UNIT_OVERHEAD_S = 50e-6
#: Without a move calibration: the staging gathers are not priced and moved pieces run as fast as home heads.
DEFAULT_GATHER_BYTES_PER_S: float | None = None
DEFAULT_PIECE_EFFICIENCY = 1.0


def flops_per_pair(head_dim: int) -> float:
    """FLOPs of one 64 x 64 (query block, KV block) pair: QK^T plus PV, 2 FLOPs per multiply-add."""
    return 4.0 * BLOCK * BLOCK * head_dim


class CalibrationError(ValueError):
    """A calibration table that does not follow schema ``shplb-calibration/1``."""


# ---- per-query-block work: the causal cost profile -----------------------------------------------------

@functools.lru_cache(maxsize=4096)
def _profile_cached(budget: HeadBudget, nb: int) -> np.ndarray:
    w = budget.row_pairs(nb).astype(np.float64)
    w.setflags(write=False)
    return w


def query_block_pairs(budget: HeadBudget, seq_len: int) -> np.ndarray:
    """KV blocks attended by each query block of a prefill of ``seq_len`` tokens (read-only float array,
    :meth:`HeadBudget.row_pairs`, the dense tail included); its sum is ``budget.block_pairs(seq_len)``."""
    return _profile_cached(budget, math.ceil(seq_len / BLOCK))


@functools.lru_cache(maxsize=65536)
def block_pairs(budget: HeadBudget, seq_len: int) -> int:
    """``budget.block_pairs(seq_len)``, cached (the planner asks it for every head, bucket and TP size)."""
    return budget.block_pairs(seq_len)


class CostProfile:
    """Cumulative cost of a head's query blocks at one length: ``cum[i]`` = share of the head's variable
    cost in query blocks ``[0, i)``. A :class:`~sglang_shplb.core.placement_types.Piece` ``[start, end)`` holds
    blocks ``[round(start * nb), round(end * nb))`` and so the share ``cum[round(end nb)] - cum[round(start nb)]``."""

    __slots__ = ("nb", "cum")

    def __init__(self, weights: np.ndarray):
        w = np.asarray(weights, dtype=np.float64)
        self.nb = len(w)
        cum = np.concatenate([[0.0], np.cumsum(w)])
        self.cum = cum / cum[-1] if cum[-1] > 0 else np.linspace(0.0, 1.0, self.nb + 1)

    @staticmethod
    def of(budget: HeadBudget, seq_len: int) -> "CostProfile":
        return CostProfile(query_block_pairs(budget, seq_len))

    def share(self, start: float, end: float) -> float:
        return float(self.cum[round(end * self.nb)] - self.cum[round(start * self.nb)])

    def query_fraction(self, cost_fraction: float) -> float:
        """The query-block boundary ``b / nb`` whose cumulative cost share is nearest ``cost_fraction``."""
        if cost_fraction <= 0.0:
            return 0.0
        if cost_fraction >= 1.0:
            return 1.0
        i = int(np.searchsorted(self.cum, cost_fraction))
        if i > 0 and cost_fraction - self.cum[i - 1] <= self.cum[i] - cost_fraction:
            i -= 1
        return i / self.nb


# ---- calibration ---------------------------------------------------------------------------------------

_RECORD_FIELDS = {"pattern": str, "density": (int, float), "ctx_len": int, "head_dim": int, "gqa": int,
                  "num_heads": int, "time_ms": (int, float), "block_pairs": int}


def validate_calibration(doc) -> list[dict]:
    """Check a calibration document against schema ``shplb-calibration/1``; return its records.
    Raises :class:`CalibrationError` naming the first problem."""
    if not isinstance(doc, dict):
        raise CalibrationError(f"calibration table must be a JSON object, got {type(doc).__name__}")
    schema = doc.get("schema")
    if schema != CALIBRATION_SCHEMA:
        raise CalibrationError(f"calibration schema is {schema!r}; this sglang_shplb reads {CALIBRATION_SCHEMA!r}")
    for key in ("device", "date", "kernel"):
        if not isinstance(doc.get(key), str):
            raise CalibrationError(f"calibration field {key!r} must be a string, got {doc.get(key)!r}")
    records = doc.get("records")
    if not isinstance(records, list) or not records:
        raise CalibrationError("calibration 'records' must be a non-empty list")
    patterns = {p.value for p in Pattern}
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise CalibrationError(f"record {i} is not an object")
        for name, typ in _RECORD_FIELDS.items():
            if name not in r:
                raise CalibrationError(f"record {i} lacks field {name!r}")
            v = r[name]
            if isinstance(v, bool) or not isinstance(v, typ):
                raise CalibrationError(f"record {i} field {name!r} has type {type(v).__name__}: {v!r}")
        if r["pattern"] not in patterns:
            raise CalibrationError(f"record {i}: unknown pattern {r['pattern']!r} (known: {sorted(patterns)})")
        if not 0.0 < r["density"] <= 1.0 + 1e-9:
            raise CalibrationError(f"record {i}: density {r['density']} not in (0, 1]")
        for name in ("ctx_len", "head_dim", "gqa", "num_heads"):
            if r[name] < 1:
                raise CalibrationError(f"record {i}: {name} must be >= 1, got {r[name]}")
        if not (r["time_ms"] > 0 and math.isfinite(r["time_ms"])):
            raise CalibrationError(f"record {i}: time_ms must be a positive number, got {r['time_ms']}")
        if r["block_pairs"] < 0:
            raise CalibrationError(f"record {i}: block_pairs must be >= 0, got {r['block_pairs']}")
        tile = r.get("tile", BLOCK)
        if isinstance(tile, bool) or tile not in (TOPK_TILES if r["pattern"] == "topk" else (BLOCK,)):
            raise CalibrationError(f"record {i}: tile {tile!r} is not a tile of pattern {r['pattern']!r}")
    return records


def calibration_record(budget: HeadBudget, ctx_len: int, head_dim: int, gqa: int, num_heads: int, time_ms: float,
                       pairs: int | None = None, **notes) -> dict:
    """One record: a layer call of ``num_heads`` heads, all with ``budget``, that took ``time_ms`` at
    ``ctx_len`` tokens. ``pairs``: the block pairs the kernel computed over those heads (default the rule's,
    ``num_heads * budget.block_pairs(ctx_len)``); the density is taken from them. ``notes``: free fields
    kept beside the schema's (e.g. ``config``, ``index_ms``)."""
    nb = math.ceil(ctx_len / BLOCK)
    pairs = num_heads * block_pairs(budget, ctx_len) if pairs is None else int(pairs)
    rec = {"pattern": budget.pattern.value, "density": round(pairs / (num_heads * nb * (nb + 1) // 2), 6),
           "ctx_len": ctx_len, "head_dim": head_dim, "gqa": gqa, "num_heads": num_heads, "time_ms": time_ms,
           "block_pairs": pairs}
    if budget.pattern is Pattern.TOPK:
        rec["tile"] = budget.tile
    return {**rec, **notes}


def write_calibration(path: str | Path, device: str, date: str, kernel: str, records: list[dict]) -> Path:
    """Write a calibration table (schema ``shplb-calibration/1``) of ``records``, checked first."""
    doc = {"schema": CALIBRATION_SCHEMA, "device": device, "date": date, "kernel": kernel, "records": records}
    validate_calibration(doc)
    path = Path(path)
    path.write_text(json.dumps(doc, indent=1))
    return path


def fit_key(pattern: str, tile: int = BLOCK) -> str:
    """The pattern name a calibration fit is kept under: ``topk@128`` for 128-token top-k, else the pattern."""
    return pattern if tile == BLOCK else f"{pattern}@{tile}"


@dataclass(frozen=True)
class LinearFit:
    """``time_s = a + b * pairs + c * num_heads`` for one layer call, and the derived per-head cost."""

    a: float  # s per call
    b: float  # s per block pair
    c: float  # s per head (0 unless num_heads varied)
    heads_ref: float  # median num_heads of the records
    n: int
    rmse_s: float
    degenerate: bool = False

    @property
    def per_head_fixed(self) -> float:
        return self.c if self.c > 0 else self.a / self.heads_ref

    def to_dict(self) -> dict:
        d = asdict(self)
        d["per_head_fixed"] = self.per_head_fixed
        return d


def fit_records(records: list[dict]) -> LinearFit:
    """Non-negative least-squares fit of one key's records (see the module docstring)."""
    t = np.array([r["time_ms"] for r in records], dtype=np.float64) * 1e-3
    p = np.array([r["block_pairs"] for r in records], dtype=np.float64)
    h = np.array([r["num_heads"] for r in records], dtype=np.float64)
    heads_ref = float(np.median(h))
    if len(np.unique(p)) < 2 or p.max() <= 0:
        b = float(t.mean() / p.mean()) if p.mean() > 0 else 0.0
        a = 0.0 if p.mean() > 0 else float(t.mean())
        pred = a + b * p
        return LinearFit(a, b, 0.0, heads_ref, len(t), float(np.sqrt(np.mean((pred - t) ** 2))), True)
    cols = [np.ones_like(p), p]
    if len(np.unique(h)) >= 2:
        cols.append(h)
    A = np.stack(cols, axis=1)
    scale = np.abs(A).max(axis=0)
    coef, _ = nnls(A / scale, t / t.max())
    coef = coef / scale * t.max()
    a, b = float(coef[0]), float(coef[1])
    c = float(coef[2]) if len(coef) > 2 else 0.0
    pred = A @ coef
    return LinearFit(a, b, c, heads_ref, len(t), float(np.sqrt(np.mean((pred - t) ** 2))))


# ---- the transfer term -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Transfer:
    """What moving work off its home rank costs in one layer prefilling ``seq_len`` tokens (one request,
    no cached prefix): elements of ``dtype_bytes`` over a link of ``link_bytes_per_s`` per direction, and
    ``unit_overhead_s`` per unit."""

    seq_len: int
    head_dim: int
    link_bytes_per_s: float = DEFAULT_LINK_BYTES_PER_S
    unit_overhead_s: float = DEFAULT_UNIT_OVERHEAD_S
    dtype_bytes: int = 2
    gather_bytes_per_s: float | None = DEFAULT_GATHER_BYTES_PER_S
    piece_efficiency: float = DEFAULT_PIECE_EFFICIENCY

    def rows(self, start: float, end: float) -> tuple[int, int]:
        """Rows ``[lo, hi)`` the query-block range ``[start, end)`` of a head computes: q rows and outputs
        ``hi - lo`` each, the K/V prefix it reads ``hi`` tokens (:func:`~sglang_shplb.core.exchange.piece_rows`)."""
        return piece_rows(start, end, 0, self.seq_len)

    def seconds(self, elems: int) -> float:
        """Seconds ``elems`` elements take over one link direction."""
        return elems * self.dtype_bytes / self.link_bytes_per_s

    def gather_seconds(self, elems: int) -> float:
        """Seconds the staging gathers of ``elems`` elements take (0 when gathers are not priced)."""
        return 0.0 if self.gather_bytes_per_s is None else elems * self.dtype_bytes / self.gather_bytes_per_s

    def unit_compute_extra(self, compute: float) -> float:
        """What ``compute`` seconds of units cost beyond the cost model's: ``compute (1 / eff - 1)``."""
        return 0.0 if self.piece_efficiency == 1.0 else compute * (1.0 / self.piece_efficiency - 1.0)


# ---- the model -----------------------------------------------------------------------------------------

class CostModel:
    """Predicted seconds of one query head's prefill attention: analytic or fitted from a calibration table.

    ``head_time(budget, seq_len, head_dim, gqa)`` is the total time of a whole head, including its fixed
    cost; :attr:`piece_overhead` is the fixed cost every piece pays when a head is cut into query-block
    pieces on several GPUs (a piece with cost share ``s`` costs ``piece_overhead + s * (head_time -
    piece_overhead)``); :meth:`transfer` prices work moved off its home rank (``link_bytes_per_s``,
    ``unit_overhead_s``: the module docstring).
    """

    def __init__(self, throughput_tflops: dict[str, float] | None = None,
                 per_head_overhead_s: float = DEFAULT_PER_HEAD_OVERHEAD_S,
                 piece_overhead_s: float | None = None,
                 fits: dict[tuple, LinearFit] | None = None, source: str = "analytic",
                 calibration_info: dict | None = None, link_bytes_per_s: float = DEFAULT_LINK_BYTES_PER_S,
                 unit_overhead_s: float = DEFAULT_UNIT_OVERHEAD_S,
                 gather_bytes_per_s: float | None = DEFAULT_GATHER_BYTES_PER_S,
                 piece_efficiency: float = DEFAULT_PIECE_EFFICIENCY, move_calibration: dict | None = None):
        if not link_bytes_per_s > 0 or unit_overhead_s < 0:
            raise ValueError(f"link bandwidth must be > 0 and unit overhead >= 0, got {link_bytes_per_s} B/s, "
                             f"{unit_overhead_s} s")
        if (gather_bytes_per_s is not None and not gather_bytes_per_s > 0) or not piece_efficiency > 0:
            raise ValueError(f"gather bandwidth must be > 0 or None and piece efficiency > 0, got "
                             f"{gather_bytes_per_s} B/s, {piece_efficiency}")
        self.link_bytes_per_s = float(link_bytes_per_s)
        self.unit_overhead_s = float(unit_overhead_s)
        self.gather_bytes_per_s = None if gather_bytes_per_s is None else float(gather_bytes_per_s)
        self.piece_efficiency = float(piece_efficiency)
        self.move_calibration = dict(move_calibration or {})
        self.throughput_tflops = dict(DEFAULT_THROUGHPUT_TFLOPS)
        if throughput_tflops:
            unknown = set(throughput_tflops) - set(self.throughput_tflops)
            if unknown:
                raise ValueError(f"unknown patterns in throughput_tflops: {sorted(unknown)}")
            self.throughput_tflops.update(throughput_tflops)
        self.per_head_overhead_s = float(per_head_overhead_s)
        self.fits: dict[tuple, LinearFit] = dict(fits or {})
        self.source = source
        self.calibration_info = dict(calibration_info or {})
        if piece_overhead_s is None:
            fixed = [f.per_head_fixed for f in self.fits.values() if f.per_head_fixed > 0]
            piece_overhead_s = float(np.median(fixed)) if fixed else self.per_head_overhead_s
        self._piece_overhead = float(piece_overhead_s)
        self._coef_cache: dict[tuple, tuple[float, float]] = {}

    # ---- constructors ---------------------------------------------------------------------------------
    @classmethod
    def analytic(cls, throughput_tflops: dict[str, float] | None = None,
                 per_head_overhead_s: float = DEFAULT_PER_HEAD_OVERHEAD_S,
                 piece_overhead_s: float | None = None, **transfer_kw) -> "CostModel":
        """The analytic model; ``transfer_kw``: ``link_bytes_per_s``, ``unit_overhead_s``."""
        return cls(throughput_tflops, per_head_overhead_s, piece_overhead_s, **transfer_kw)

    @classmethod
    def from_calibration(cls, path_or_doc, piece_overhead_s: float | None = None, **analytic_kw) -> "CostModel":
        """Fit from a calibration table (a path to its JSON, or the parsed document)."""
        if isinstance(path_or_doc, (str, Path)):
            try:
                doc = json.loads(Path(path_or_doc).read_text())
            except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CalibrationError(f"cannot read calibration table {path_or_doc}: {e}") from None
            where = str(path_or_doc)
        else:
            doc, where = path_or_doc, "<dict>"
        records = validate_calibration(doc)
        groups: dict[tuple, list[dict]] = {}
        for r in records:
            groups.setdefault((fit_key(r["pattern"], r.get("tile", BLOCK)), r["head_dim"]), []).append(r)
        fits: dict[tuple, LinearFit] = {}
        for (pat, d), recs in sorted(groups.items()):
            fits[(pat, d)] = fit_records(recs)
            gqas = sorted({r["gqa"] for r in recs})
            if len(gqas) > 1:
                for g in gqas:
                    fits[(pat, d, g)] = fit_records([r for r in recs if r["gqa"] == g])
        info = {"path": where, "device": doc["device"], "date": doc["date"], "kernel": doc["kernel"],
                "records": len(records)}
        return cls(fits=fits, source="calibrated", calibration_info=info, piece_overhead_s=piece_overhead_s,
                   **analytic_kw)

    # ---- queries ---------------------------------------------------------------------------------------
    @property
    def piece_overhead(self) -> float:
        """Seconds each piece of a split head pays (its own fixed cost); a whole head pays it once."""
        return self._piece_overhead

    def _analytic_coef(self, pattern: str, head_dim: int) -> tuple[float, float]:
        return self.per_head_overhead_s, flops_per_pair(head_dim) / (self.throughput_tflops[pattern] * 1e12)

    def _fit_coef(self, pattern: str, head_dim: int, gqa: int) -> tuple[float, float] | None:
        f = self.fits.get((pattern, head_dim, gqa)) or self.fits.get((pattern, head_dim))
        if f is not None:
            return f.per_head_fixed, f.b
        dims = sorted({k[1] for k in self.fits if k[0] == pattern and len(k) == 2})
        if dims:
            near = min(dims, key=lambda x: (abs(x - head_dim), x))
            f = self.fits[(pattern, near)]
            return f.per_head_fixed, f.b * head_dim / near
        return None

    def coefficients(self, pattern: Pattern | str, head_dim: int, gqa: int = 1,
                     tile: int = BLOCK) -> tuple[float, float]:
        """(fixed seconds per head, seconds per block pair) used for this pattern/head_dim/GQA ratio (and
        top-k tile: a ``topk@128`` fit if calibrated, else the ``topk`` coefficients)."""
        pattern = Pattern(pattern).value
        key = (fit_key(pattern, tile), head_dim, gqa)
        hit = self._coef_cache.get(key)
        if hit is not None:
            return hit
        coef = None
        if tile != BLOCK:
            coef = self._fit_coef(key[0], head_dim, gqa) or self.coefficients(pattern, head_dim, gqa)
        elif self.fits:
            coef = self._fit_coef(pattern, head_dim, gqa)
            if coef is None:
                dense = self._fit_coef("dense", head_dim, gqa)
                if dense is not None:
                    ratio = self.throughput_tflops["dense"] / self.throughput_tflops[pattern]
                    coef = (dense[0], dense[1] * ratio)
        if coef is None:
            coef = self._analytic_coef(pattern, head_dim)
        self._coef_cache[key] = coef
        return coef

    def head_time(self, budget: HeadBudget, seq_len: int, head_dim: int, gqa: int = 1) -> float:
        """Seconds of one query head's attention for a prefill of ``seq_len`` tokens."""
        fixed, per_pair = self.coefficients(budget.pattern, head_dim, gqa, budget.tile)
        return fixed + per_pair * block_pairs(budget, seq_len)

    def layer_costs(self, budgets: list[HeadBudget], seq_len: int, head_dim: int, gqa: int = 1) -> np.ndarray:
        """``head_time`` of every head of a layer, as a float64 array."""
        return np.array([self.head_time(b, seq_len, head_dim, gqa) for b in budgets], dtype=np.float64)

    def transfer(self, seq_len: int, head_dim: int, dtype_bytes: int = 2) -> Transfer:
        """The transfer term of a layer prefilling ``seq_len`` tokens with this model's link and unit cost."""
        return Transfer(seq_len, head_dim, self.link_bytes_per_s, self.unit_overhead_s, dtype_bytes,
                        self.gather_bytes_per_s, self.piece_efficiency)

    # ---- serialisation ---------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """JSON-serialisable description (for the plan's meta)."""
        return {
            "source": self.source,
            "throughput_tflops": self.throughput_tflops,
            "per_head_overhead_s": self.per_head_overhead_s,
            "piece_overhead_s": self.piece_overhead,
            "link_bytes_per_s": self.link_bytes_per_s,
            "unit_overhead_s": self.unit_overhead_s,
            "gather_bytes_per_s": self.gather_bytes_per_s,
            "piece_efficiency": self.piece_efficiency,
            "move_calibration": self.move_calibration,
            "calibration": self.calibration_info,
            "fits": [{"key": list(k), **f.to_dict()} for k, f in sorted(self.fits.items(), key=lambda kv: str(kv[0]))],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "CostModel":
        fits = {}
        for f in d.get("fits", []):
            f = dict(f)
            key = tuple(f.pop("key"))
            f.pop("per_head_fixed", None)
            fits[key] = LinearFit(**f)
        return cls(d.get("throughput_tflops"), d.get("per_head_overhead_s", DEFAULT_PER_HEAD_OVERHEAD_S),
                   d.get("piece_overhead_s"), fits, d.get("source", "analytic"), d.get("calibration"),
                   d.get("link_bytes_per_s", DEFAULT_LINK_BYTES_PER_S),
                   d.get("unit_overhead_s", DEFAULT_UNIT_OVERHEAD_S),
                   d.get("gather_bytes_per_s", DEFAULT_GATHER_BYTES_PER_S),
                   d.get("piece_efficiency", DEFAULT_PIECE_EFFICIENCY), d.get("move_calibration"))

    def __repr__(self) -> str:
        g = "free" if self.gather_bytes_per_s is None else f"{self.gather_bytes_per_s / 1e9:.0f} GB/s"
        return (f"CostModel({self.source}, piece_overhead={self.piece_overhead:.3g}s, fits={len(self.fits)}, "
                f"link {self.link_bytes_per_s / 1e9:.0f} GB/s, unit overhead {self.unit_overhead_s * 1e6:.0f} us, "
                f"gathers {g}, piece efficiency {self.piece_efficiency:.3g})")


# ---- move calibration records (schema ``shplb-move-calibration/1``, written by
# :mod:`sglang_shplb.planning.move_calibration`) ---------------------------------------------------------

MOVE_CALIBRATION_SCHEMA = "shplb-move-calibration/1"


def validate_move_calibration(doc) -> dict:
    """Check a move calibration record's schema and terms (ValueError naming the problem)."""
    if not isinstance(doc, dict) or doc.get("schema") != MOVE_CALIBRATION_SCHEMA:
        raise ValueError(f"not a {MOVE_CALIBRATION_SCHEMA} record")
    for k in ("compute_scale", "unit_overhead_s", "piece_efficiency"):
        v = doc.get(k)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0 or (k == "unit_overhead_s" and v == 0)):
            raise ValueError(f"move calibration field {k!r} must be a positive number, got {v!r}")
    g = doc.get("gather_bytes_per_s")
    if g is not None and (isinstance(g, bool) or not isinstance(g, (int, float)) or not g > 0):
        raise ValueError(f"move calibration 'gather_bytes_per_s' must be > 0 or null, got {g!r}")
    return doc


def is_move_calibration(doc) -> bool:
    return isinstance(doc, dict) and doc.get("schema") == MOVE_CALIBRATION_SCHEMA


def model_terms(doc: dict) -> dict:
    """A move calibration's terms in this model's seconds (:mod:`sglang_shplb.planning.move_calibration`:
    measured times over the compute scale ``sigma``): ``unit_overhead_s``,
    ``gather_bytes_per_s`` (None: free), ``piece_efficiency``."""
    validate_move_calibration(doc)
    s = float(doc["compute_scale"])
    g = doc.get("gather_bytes_per_s")
    return {"unit_overhead_s": float(doc["unit_overhead_s"]) / s,
            "gather_bytes_per_s": None if g is None else float(g) * s,
            "piece_efficiency": float(doc["piece_efficiency"])}


def kernel_calibration_path(doc: dict, where: str | Path | None) -> Path | None:
    """The kernel table a move calibration was fitted against (relative to the record's folder), or None."""
    k = doc.get("kernel_calibration")
    if not k:
        return None
    p = Path(k)
    if not p.is_absolute() and where is not None:
        p = Path(where).parent / p
    return p


def load_cost_model(calibration: str | Path | None, **transfer_kw) -> CostModel:
    """The model fitted to the calibration table at ``calibration``, or the analytic default when None;
    ``transfer_kw``: ``link_bytes_per_s``, ``unit_overhead_s``, ``gather_bytes_per_s``, ``piece_efficiency``
    (defaults: the module docstring).

    ``calibration`` may also be a move calibration (schema ``shplb-move-calibration/1``,
    :mod:`sglang_shplb.planning.move_calibration`): the kernel table it names is loaded (the analytic model
    when it names none) and its unit overhead, gather bandwidth and piece efficiency are set, in that
    model's seconds. A ``transfer_kw`` value given explicitly overrides the record's, except ``None`` or a
    value equal to the documented default (what a command line passes when the flag is not given)."""
    if not calibration:
        return CostModel.analytic(**{k: v for k, v in transfer_kw.items() if v is not None})
    try:
        doc = json.loads(Path(calibration).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CalibrationError(f"cannot read calibration table {calibration}: {e}") from None
    if not is_move_calibration(doc):
        return CostModel.from_calibration(calibration,
                                          **{k: v for k, v in transfer_kw.items() if v is not None})
    try:
        terms = model_terms(doc)
    except ValueError as e:
        raise CalibrationError(f"move calibration {calibration}: {e}") from None
    defaults = {"link_bytes_per_s": DEFAULT_LINK_BYTES_PER_S, "unit_overhead_s": DEFAULT_UNIT_OVERHEAD_S,
                "gather_bytes_per_s": DEFAULT_GATHER_BYTES_PER_S, "piece_efficiency": DEFAULT_PIECE_EFFICIENCY}
    for k, v in transfer_kw.items():
        if v is not None and v != defaults.get(k):
            terms[k] = v
        elif k not in terms and v is not None:
            terms[k] = v
    info = {"path": str(calibration), **{k: doc.get(k) for k in ("device", "date", "compute_scale",
                                                                    "unit_overhead_s", "gather_bytes_per_s",
                                                                    "piece_efficiency", "kernel_calibration")}}
    kernel = kernel_calibration_path(doc, calibration)
    if kernel is None:
        return CostModel.analytic(move_calibration=info, **terms)
    return CostModel.from_calibration(kernel, move_calibration=info, **terms)


def plan_cost_model(meta: dict) -> CostModel:
    """The cost model a plan was solved with (its meta's ``cost_model``), or the analytic default."""
    d = meta.get("cost_model")
    return CostModel.from_dict(d) if d else CostModel.analytic()
