"""The plan file: schema-versioned JSON plus a safetensors file for the placement arrays.

Layout of a plan directory (``save_plan`` writes both, ``load_plan`` reads either path)::

    plan.json          schema_version, model identity, buckets, per-head budgets, placement
                       summaries, meta; ``arrays`` names the safetensors file and its sha256
    plan.safetensors   per (TP, bucket): ``place.tp{T}.b{i}.idx`` int32 [n, 3] (layer, rank, head)
                       and ``place.tp{T}.b{i}.frac`` float64 [n, 2] (start, end of the query range);
                       ``stock`` bool [2, buckets, layers]: per phase (:data:`PHASES`: prefill, decode),
                       bucket and layer, True where the server runs the stock backend for the whole layer
                       (sparse does not pay there, :mod:`sglang_shplb.planning.stock_decision`)

The ``stock`` array is optional within schema version 1: the JSON's ``stock`` entry
(``{"key": "stock", "phases": ["prefill", "decode"]}``) names it, and a plan written before it existed
(no entry, no array) loads with ``Plan.stock = None``, which means every layer sparse in every bucket:
exactly how such a plan was served before. A plan that names the array must hold a valid one, and an
array the JSON does not name is refused like any other unnamed array.

Never pickle. ``load_plan(path, model_config)`` checks everything a server relies on and raises a
:class:`PlanError` subclass naming the mismatch.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from sglang_shplb.core.buckets import Buckets
from sglang_shplb.core.model_spec import ModelSpec
from sglang_shplb.core.patterns import HeadBudget
from sglang_shplb.core.placement_types import Placement, PlacementCoverageError, check_coverage

SCHEMA_VERSION = 1
#: the phases of the ``stock`` array, in its first axis' order (extend / prefill, then decode)
PHASES = ("prefill", "decode")
STOCK_KEY = "stock"
JSON_NAME = "plan.json"
ARRAYS_NAME = "plan.safetensors"


class PlanError(ValueError):
    """A plan file that cannot be used; the message names the cause."""


class PlanSchemaError(PlanError):
    pass


class PlanCorruptError(PlanError):
    pass


class PlanModelMismatchError(PlanError):
    pass


class PlanTPError(PlanError):
    pass


class PlanCoverageError(PlanError):
    pass


@dataclass
class Plan:
    model: ModelSpec
    buckets: Buckets
    budgets: list[list[HeadBudget]]  # [layer][query head]
    placements: dict[int, list[Placement]] = field(default_factory=dict)  # tp -> one per bucket
    meta: dict = field(default_factory=dict)
    #: bool [len(PHASES), buckets, layers]: True = that layer runs the stock backend in that phase and bucket;
    #: None (a plan written before the array) = every layer sparse everywhere
    stock: np.ndarray | None = None

    @property
    def tp_sizes(self) -> list[int]:
        return sorted(self.placements)

    def placement(self, tp: int, bucket: int) -> Placement:
        if tp not in self.placements:
            raise PlanTPError(f"plan has no placement for TP {tp} (it has TP {self.tp_sizes})")
        return self.placements[tp][bucket]

    def layer_budgets(self, layer: int) -> list[HeadBudget]:
        return self.budgets[layer]

    def mean_density(self, seq_len: int) -> float:
        flat = [b for layer in self.budgets for b in layer]
        return float(np.mean([b.density(seq_len) for b in flat]))

    def stock_layers(self, phase: str, bucket: int) -> frozenset[int]:
        """The layers that run the stock backend in ``phase`` (one of :data:`PHASES`) for batches of
        ``bucket``; empty when the plan has no ``stock`` array."""
        if self.stock is None:
            return frozenset()
        return frozenset(int(li) for li in np.flatnonzero(self.stock[PHASES.index(phase), bucket]))

    def reachable_buckets(self, max_context: int | None = None) -> range:
        """The buckets a server of context length ``max_context`` can meet (a batch's bucket is that of its
        longest context, at most ``max_context``); all of them when ``None``."""
        return range(len(self.buckets) if max_context is None else self.buckets.index(max_context) + 1)

    def stock_everywhere(self, phase: str, max_context: int | None = None) -> frozenset[int]:
        """The layers that run the stock backend in ``phase`` in every bucket a server of context length
        ``max_context`` can meet (one route for any batch there)."""
        return always_stock([self.stock_layers(phase, b) for b in self.reachable_buckets(max_context)])

    def all_stock(self, max_context: int | None = None) -> bool:
        """Whether the plan runs every layer on the stock backend, prefill and decode, in every bucket a server of
        context length ``max_context`` can meet (then the shplb backend would only delegate)."""
        return all(len(self.stock_everywhere(ph, max_context)) == self.model.num_layers for ph in PHASES)


def always_stock(stock_by_bucket) -> frozenset[int]:
    """The layers stock in every bucket of ``stock_by_bucket`` (per bucket, a set of layers; none: empty)."""
    return frozenset.intersection(*map(frozenset, stock_by_bucket)) if len(stock_by_bucket) else frozenset()


def save_plan(plan: Plan, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    placements_json: dict[str, list] = {}
    for tp, per_bucket in sorted(plan.placements.items()):
        entries = []
        for b, p in enumerate(per_bucket):
            rows = p.to_rows()
            key = f"place.tp{tp}.b{b}"
            tensors[key + ".idx"] = torch.tensor([r[:3] for r in rows], dtype=torch.int32).reshape(-1, 3)
            tensors[key + ".frac"] = torch.tensor([r[3:] for r in rows], dtype=torch.float64).reshape(-1, 2)
            entries.append({"bucket": b, "solver": p.solver, "key": key, "predicted": p.predicted})
        placements_json[str(tp)] = entries
    if plan.stock is not None:
        stock = np.asarray(plan.stock)
        want = (len(PHASES), len(plan.buckets), plan.model.num_layers)
        if stock.dtype != np.bool_ or stock.shape != want:
            raise ValueError(f"Plan.stock must be bool {list(want)} (phases, buckets, layers), got {stock.dtype} "
                             f"{list(stock.shape)}")
        tensors[STOCK_KEY] = torch.from_numpy(stock.copy())
    arrays_path = out / ARRAYS_NAME
    save_file(tensors, str(arrays_path), metadata={"schema_version": str(SCHEMA_VERSION)})
    doc = {
        "schema_version": SCHEMA_VERSION,
        "model": plan.model.to_dict(),
        "buckets": list(plan.buckets.edges),
        "budgets": [[b.to_dict() for b in layer] for layer in plan.budgets],
        "placements": placements_json,
        "meta": plan.meta,
        "arrays": {"file": ARRAYS_NAME, "sha256": _sha256(arrays_path)},
    }
    if plan.stock is not None:
        doc["stock"] = {"key": STOCK_KEY, "phases": list(PHASES)}
    path = out / JSON_NAME
    path.write_text(json.dumps(doc, indent=1))
    return path


def load_plan(path: str | Path, model_config=None, tp: int | None = None) -> Plan:
    """Read and validate a plan. ``model_config``: a ``transformers`` config, a dict, a checkpoint
    directory or a :class:`ModelSpec`; when given, the plan must be for that model. ``tp``: when
    given, the plan must hold a placement for that TP size in every bucket."""
    path = Path(path)
    if path.is_dir():
        path = path / JSON_NAME
    if not path.exists():
        raise PlanError(f"plan file {path} does not exist")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PlanCorruptError(f"plan file {path} is not valid JSON (truncated or corrupt): {e}") from None
    if not isinstance(doc, dict) or "schema_version" not in doc:
        raise PlanSchemaError(f"{path} has no schema_version: not a sglang_shplb plan")
    if doc["schema_version"] != SCHEMA_VERSION:
        raise PlanSchemaError(f"{path} has schema version {doc['schema_version']!r}; this sglang_shplb "
                              f"reads version {SCHEMA_VERSION}")
    try:
        model = ModelSpec(**doc["model"])
        buckets = Buckets(tuple(doc["buckets"]))
        budgets = [[HeadBudget.from_dict(b) for b in layer] for layer in doc["budgets"]]
        arrays_meta = doc["arrays"]
        placements_doc = doc["placements"]
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise PlanCorruptError(f"{path} is missing or has a malformed field: {e!r}") from None
    _check_model_fields(model, path)
    if not (isinstance(arrays_meta, dict) and isinstance(arrays_meta.get("file"), str)
            and Path(arrays_meta["file"]).name == arrays_meta["file"] and isinstance(arrays_meta.get("sha256"), str)):
        raise PlanCorruptError(f"{path}: `arrays` must be {{file: a file name in the plan folder, sha256: str}}")
    if not isinstance(placements_doc, dict) or not isinstance(doc.get("meta", {}), dict):
        raise PlanCorruptError(f"{path}: `placements` and `meta` must be objects")

    if model_config is not None:
        want = model_config if isinstance(model_config, ModelSpec) else ModelSpec.from_config(model_config)
        _check_model(model, want, path)
    if len(budgets) != model.num_layers or any(len(layer) != model.num_heads for layer in budgets):
        raise PlanCorruptError(f"{path}: budgets are not {model.num_layers} layers x {model.num_heads} heads")

    arrays_path = path.parent / arrays_meta["file"]
    if not arrays_path.exists():
        raise PlanCorruptError(f"{path} names array file {arrays_path}, which does not exist")
    if _sha256(arrays_path) != arrays_meta["sha256"]:
        raise PlanCorruptError(f"{arrays_path} does not match the checksum in {path} (corrupt, truncated or "
                               f"from another plan)")
    try:
        tensors = load_file(str(arrays_path))
    except Exception as e:  # safetensors raises its own error types
        raise PlanCorruptError(f"{arrays_path} is not a readable safetensors file: {e}") from None

    placements: dict[int, list[Placement]] = {}
    named: set[str] = set()
    for tp_key, entries in placements_doc.items():
        tp_size = _placement_tp(tp_key, entries, path)
        if len(entries) != len(buckets):
            raise PlanCoverageError(f"{path}: TP {tp_size} has placements for {len(entries)} buckets, "
                                    f"the plan has {len(buckets)}")
        per_bucket = []
        for b, e in enumerate(entries):
            where = f"{path}: TP {tp_size} bucket {b}"
            if not (isinstance(e, dict) and isinstance(e.get("key"), str) and isinstance(e.get("solver"), str)
                    and isinstance(e.get("predicted", {}), dict)):
                raise PlanCorruptError(f"{where}: entry is not {{key: str, solver: str, predicted: dict}}")
            named.update(e["key"] + suffix for suffix in (".idx", ".frac"))
            rows = _placement_rows(tensors, e["key"], tp_size, model, arrays_path, where)
            p = Placement.from_rows(tp_size, b, e["solver"], model.num_layers, rows, e.get("predicted", {}))
            try:
                check_coverage(p, model.num_heads)
            except PlacementCoverageError as err:
                raise PlanCoverageError(f"{path}: {err}") from None
            per_bucket.append(p)
        placements[tp_size] = per_bucket
    stock = None
    if "stock" in doc:
        stock = _stock_array(doc["stock"], tensors, model, buckets, arrays_path, path)
        named.add(doc["stock"]["key"])
    if set(tensors) != named:
        raise PlanCorruptError(f"{arrays_path} holds arrays {sorted(set(tensors) - named)} that {path} does not "
                               f"name (from another plan?)")
    plan = Plan(model, buckets, budgets, placements, doc.get("meta", {}), stock)
    if tp is not None and tp != 1 and tp not in placements:
        raise PlanTPError(f"{path} has no placement for TP {tp}; it was solved for TP {plan.tp_sizes}. "
                          f"Re-run `python -m sglang_shplb place --tp {tp}`.")
    if tp is not None and tp != 1:
        _check_uncut(placements[tp], budgets, path)
    return plan


def _check_uncut(placements: list[Placement], budgets: list[list[HeadBudget]], path: Path) -> None:
    """The placements a server at their TP size runs never cut a head that is not
    :attr:`~sglang_shplb.core.patterns.HeadBudget.splittable` (the planner never does; a plan written before
    2026-12-06 may, and would answer unlike TP 1)."""
    for p in placements:
        cut = [(li, h) for li, lp in enumerate(p.layers) for h in lp.cut_not_splittable(budgets[li])]
        if cut:
            li, h = cut[0]
            raise PlanCoverageError(
                f"{path}: TP {p.tp} bucket {p.bucket}: layer {li} cuts head {h} ({budgets[li][h].pattern.value}) "
                f"over ranks ({len(cut)} such heads in that bucket); a vertical-slash head chooses its blocks "
                f"from the sequence's last query block, so it must be computed whole. Re-place the plan "
                f"(python -m sglang_shplb place).")


def _check_model_fields(model: ModelSpec, path: Path) -> None:
    least = {"num_layers": 1, "num_heads": 1, "num_kv_heads": 1, "head_dim": 1, "max_context": 0}
    bad = [name for name, n in least.items() if type(getattr(model, name)) is not int or getattr(model, name) < n]
    if bad:
        raise PlanCorruptError(f"{path}: model fields {bad} are not integers >= {[least[n] for n in bad]}")
    if model.num_heads % model.num_kv_heads:
        raise PlanCorruptError(f"{path}: {model.num_heads} query heads do not divide into {model.num_kv_heads} KV heads")


def _placement_tp(tp_key: str, entries, path: Path) -> int:
    if not (tp_key.isdigit() and int(tp_key) >= 1 and isinstance(entries, list)):
        raise PlanCorruptError(f"{path}: placements[{tp_key!r}] is not a list of buckets keyed by a TP size >= 1")
    return int(tp_key)


def _placement_rows(tensors: dict[str, torch.Tensor], key: str, tp: int, model: ModelSpec, arrays_path: Path,
                    where: str) -> list[tuple[int, int, int, float, float]]:
    """The (layer, rank, head, start, end) rows of one placement, after checking the two arrays against the
    schema: ``key.idx`` int32 [n, 3] with indices in range, ``key.frac`` float64 [n, 2] with
    0 <= start < end <= 1."""
    arrays = {}
    for suffix, dtype, width in ((".idx", torch.int32, 3), (".frac", torch.float64, 2)):
        name = key + suffix
        if name not in tensors:
            raise PlanCorruptError(f"{where}: array {name} is missing from {arrays_path}")
        t = tensors[name]
        if t.dtype != dtype or t.dim() != 2 or t.shape[1] != width:
            raise PlanCorruptError(f"{where}: array {name} is {t.dtype} {list(t.shape)}, the schema says "
                                   f"{dtype} [n, {width}]")
        arrays[suffix] = t
    idx, frac = arrays[".idx"], arrays[".frac"]
    if idx.shape[0] != frac.shape[0]:
        raise PlanCorruptError(f"{where}: {key}.idx has {idx.shape[0]} rows, {key}.frac {frac.shape[0]}")
    if not torch.isfinite(frac).all():
        raise PlanCorruptError(f"{where}: {key}.frac holds a non-finite fraction")
    if not ((frac[:, 0] >= 0) & (frac[:, 0] < frac[:, 1]) & (frac[:, 1] <= 1)).all():
        raise PlanCorruptError(f"{where}: {key}.frac has a row outside 0 <= start < end <= 1")
    for col, name, bound in ((0, "layer", model.num_layers), (1, "rank", tp), (2, "head", model.num_heads)):
        if not ((idx[:, col] >= 0) & (idx[:, col] < bound)).all():
            raise PlanCorruptError(f"{where}: {key}.idx names a {name} outside [0, {bound})")
    return [(i[0], i[1], i[2], f[0], f[1]) for i, f in zip(idx.tolist(), frac.tolist())]


def _stock_array(entry, tensors: dict[str, torch.Tensor], model: ModelSpec, buckets: Buckets, arrays_path: Path,
                 path: Path) -> np.ndarray:
    """The ``stock`` array after checking it and its JSON entry against the schema: the entry is
    ``{"key": "stock", "phases": ["prefill", "decode"]}``, the array bool [phases, buckets, layers]."""
    if not (isinstance(entry, dict) and set(entry) == {"key", "phases"} and entry["key"] == STOCK_KEY
            and entry["phases"] == list(PHASES)):
        raise PlanCorruptError(f"{path}: `stock` must be {{key: {STOCK_KEY!r}, phases: {list(PHASES)}}}, "
                               f"got {entry!r}")
    key = entry["key"]
    if key not in tensors:
        raise PlanCorruptError(f"{path}: array {key} (the stock layers) is missing from {arrays_path}")
    t = tensors[key]
    want = [len(PHASES), len(buckets), model.num_layers]
    if t.dtype != torch.bool or list(t.shape) != want:
        raise PlanCorruptError(f"{path}: array {key} is {t.dtype} {list(t.shape)}, the schema says torch.bool "
                               f"{want} (phases, buckets, layers)")
    return t.numpy().copy()


def _check_model(have: ModelSpec, want: ModelSpec, path: Path) -> None:
    for name in ("architecture", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
        a, b = getattr(have, name), getattr(want, name)
        if a != b:
            raise PlanModelMismatchError(f"{path} was made for another model: {name} is {a} in the plan, "
                                         f"{b} in the model")
    if have.config_hash != want.config_hash:
        raise PlanModelMismatchError(f"{path} was made for another model: config hash {have.config_hash} in the "
                                     f"plan, {want.config_hash} in the model (same shape, different config)")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
