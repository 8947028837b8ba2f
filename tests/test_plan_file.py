"""Plan file round trip and every kind of bad plan file → its specific error."""
import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from sglang_shplb.core.buckets import Buckets
from sglang_shplb.planning.cost_model import CostModel
from sglang_shplb.core.model_spec import ModelSpec
from sglang_shplb.core.patterns import HeadBudget
from sglang_shplb.planning.place import solve_plan_placements
from sglang_shplb.core.plan import (Plan, PlanCorruptError, PlanCoverageError, PlanError, PlanModelMismatchError,
                               PlanSchemaError, PlanTPError, load_plan, save_plan)

CFG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 3,
       "num_attention_heads": 9, "num_key_value_heads": 3, "hidden_size": 576, "head_dim": 64,
       "max_position_embeddings": 8192, "vocab_size": 100}


def _plan() -> Plan:
    spec = ModelSpec.from_config(CFG)
    mix = [HeadBudget.dense(), HeadBudget.streaming(64, 512), HeadBudget.topk(0.1), HeadBudget.vslash(0.2)]
    budgets = [[mix[(li + h) % 4] for h in range(9)] for li in range(3)]
    buckets = Buckets((4096, 8192))
    pl = solve_plan_placements(spec, budgets, buckets, [2, 4], CostModel.analytic(), "shplb")
    stock = np.zeros((2, 2, 3), dtype=bool)
    stock[0, 0, [0, 2]] = stock[1, 1, 1] = True   # [phase, bucket, layer]
    return Plan(spec, buckets, budgets, pl, {"note": "test"}, stock)


@pytest.fixture
def saved(tmp_path):
    save_plan(_plan(), tmp_path / "p")
    return tmp_path / "p"


def test_round_trip(tmp_path):
    orig = _plan()
    saved = tmp_path / "rt"
    save_plan(orig, saved)
    back = load_plan(saved, CFG, tp=4)
    assert back.model == orig.model and back.budgets == orig.budgets and back.buckets == orig.buckets
    for tp in (2, 4):
        for a, b in zip(orig.placements[tp], back.placements[tp]):
            assert a.to_rows() == b.to_rows()
            assert a.predicted == b.predicted
    assert np.array_equal(back.stock, orig.stock) and back.stock.dtype == np.bool_
    assert back.stock_layers("prefill", 0) == {0, 2} and back.stock_layers("decode", 1) == {1}
    assert load_plan(saved / "plan.json").meta == {"note": "test"}


def test_wrong_model(saved):
    other = dict(CFG, num_key_value_heads=9)
    with pytest.raises(PlanModelMismatchError, match="num_kv_heads"):
        load_plan(saved, other)
    with pytest.raises(PlanModelMismatchError, match="config hash"):
        load_plan(saved, dict(CFG, rope_theta=1e6))


def test_missing_tp(saved):
    with pytest.raises(PlanTPError, match="TP 8"):
        load_plan(saved, CFG, tp=8)
    assert load_plan(saved, CFG, tp=1)  # TP 1 needs no placement


def test_unknown_schema_version(saved):
    doc = json.loads((saved / "plan.json").read_text())
    doc["schema_version"] = 99
    (saved / "plan.json").write_text(json.dumps(doc))
    with pytest.raises(PlanSchemaError, match="99"):
        load_plan(saved)


def test_truncated_json(saved):
    text = (saved / "plan.json").read_text()
    (saved / "plan.json").write_text(text[: len(text) // 2])
    with pytest.raises(PlanCorruptError, match="not valid JSON"):
        load_plan(saved)


def test_corrupt_arrays(saved):
    data = (saved / "plan.safetensors").read_bytes()
    (saved / "plan.safetensors").write_bytes(data[: len(data) - 10])
    with pytest.raises(PlanCorruptError, match="checksum"):
        load_plan(saved)
    (saved / "plan.safetensors").unlink()
    with pytest.raises(PlanCorruptError, match="does not exist"):
        load_plan(saved)


def test_missing_file(tmp_path):
    with pytest.raises(PlanError, match="does not exist"):
        load_plan(tmp_path / "nope")


def test_placement_that_does_not_cover_every_head(tmp_path):
    plan = _plan()
    lp = plan.placements[2][0].layers[1]
    dropped = next(g for g in lp.gpus if g)
    dropped.pop()
    save_plan(plan, tmp_path / "bad")
    with pytest.raises(PlanCoverageError, match="layer 1"):
        load_plan(tmp_path / "bad")


def test_placement_with_overlap(tmp_path):
    plan = _plan()
    lp = plan.placements[4][1].layers[0]
    lp.gpus[0].append(lp.gpus[1][0])
    save_plan(plan, tmp_path / "bad")
    with pytest.raises(PlanCoverageError):
        load_plan(tmp_path / "bad")


def test_bad_budgets_shape(saved):
    doc = json.loads((saved / "plan.json").read_text())
    doc["budgets"] = doc["budgets"][:-1]
    (saved / "plan.json").write_text(json.dumps(doc))
    with pytest.raises(PlanCorruptError, match="3 layers"):
        load_plan(saved)


def _edit_json(saved, fn) -> None:
    doc = json.loads((saved / "plan.json").read_text())
    fn(doc)
    (saved / "plan.json").write_text(json.dumps(doc))


def _reseal(saved) -> None:
    """Record the array file's current checksum, so that the load gets past the checksum to the arrays."""
    digest = hashlib.sha256((saved / "plan.safetensors").read_bytes()).hexdigest()
    _edit_json(saved, lambda doc: doc["arrays"].update(sha256=digest))


def _edit_arrays(fn):
    def mutate(saved, other):
        tensors = load_file(str(saved / "plan.safetensors"))
        fn(tensors)
        save_file(tensors, str(saved / "plan.safetensors"))
        _reseal(saved)
    return mutate


def _set(name, fn):
    return _edit_arrays(lambda t: t.__setitem__(name, fn(t[name])))


def _put(tensor, row, col, value):
    tensor = tensor.clone()
    tensor[row, col] = value
    return tensor


def _truncate(saved, other, reseal):
    data = (saved / "plan.safetensors").read_bytes()
    (saved / "plan.safetensors").write_bytes(data[: len(data) // 2])
    if reseal:
        _reseal(saved)


def _swap(saved, other, reseal):
    shutil.copy(other / "plan.safetensors", saved / "plan.safetensors")
    if reseal:
        _reseal(saved)


IDX, FRAC, STOCK = "place.tp4.b1.idx", "place.tp4.b1.frac", "stock"
MUTATIONS = {  # name -> (mutate(saved, other plan), the PlanError subclass, the message must contain)
    "drop idx": (_edit_arrays(lambda t: t.pop(IDX)), PlanCorruptError, IDX),
    "drop frac": (_edit_arrays(lambda t: t.pop(FRAC)), PlanCorruptError, FRAC),
    "extra array": (_edit_arrays(lambda t: t.__setitem__("x", torch.zeros(1))), PlanCorruptError, "'x'"),
    "idx flattened": (_set(IDX, lambda a: a.reshape(-1)), PlanCorruptError, "schema"),
    "idx extra dim": (_set(IDX, lambda a: a[..., None]), PlanCorruptError, "schema"),
    "frac extra dim": (_set(FRAC, lambda a: a[None]), PlanCorruptError, "schema"),
    "idx transposed": (_set(IDX, lambda a: a.T.contiguous()), PlanCorruptError, "schema"),
    "frac transposed": (_set(FRAC, lambda a: a.T.contiguous()), PlanCorruptError, "schema"),
    "idx int64": (_set(IDX, lambda a: a.long()), PlanCorruptError, "int32"),
    "idx float": (_set(IDX, lambda a: a.double()), PlanCorruptError, "int32"),
    "frac float32": (_set(FRAC, lambda a: a.float()), PlanCorruptError, "float64"),
    "rows differ": (_set(FRAC, lambda a: a[:-1].contiguous()), PlanCorruptError, "rows"),
    "frac nan": (_set(FRAC, lambda a: _put(a, 0, 1, float("nan"))), PlanCorruptError, "non-finite"),
    "frac inf": (_set(FRAC, lambda a: _put(a, 0, 1, float("inf"))), PlanCorruptError, "non-finite"),
    "frac end > 1": (_set(FRAC, lambda a: _put(a, 0, 1, 1.5)), PlanCorruptError, "start < end"),
    "frac start < 0": (_set(FRAC, lambda a: _put(a, 0, 0, -0.5)), PlanCorruptError, "start < end"),
    "frac start = end": (_set(FRAC, lambda a: _put(a, 0, 0, float(a[0, 1]))), PlanCorruptError, "start < end"),
    "layer out of range": (_set(IDX, lambda a: _put(a, 0, 0, 3)), PlanCorruptError, "layer"),
    "layer negative": (_set(IDX, lambda a: _put(a, 0, 0, -1)), PlanCorruptError, "layer"),
    "rank out of range": (_set(IDX, lambda a: _put(a, 0, 1, 4)), PlanCorruptError, "rank"),
    "head out of range": (_set(IDX, lambda a: _put(a, 0, 2, 9)), PlanCorruptError, "head"),
    "row dropped": (_edit_arrays(lambda t: t.update({IDX: t[IDX][1:].contiguous(), FRAC: t[FRAC][1:].contiguous()})),
                    PlanCoverageError, "TP 4 bucket 1"),
    "truncated": (lambda s, o: _truncate(s, o, False), PlanCorruptError, "checksum"),
    "truncated, resealed": (lambda s, o: _truncate(s, o, True), PlanCorruptError, "readable"),
    "swapped": (lambda s, o: _swap(s, o, False), PlanCorruptError, "checksum"),
    "swapped, resealed": (lambda s, o: _swap(s, o, True), PlanCorruptError, "missing"),
    "no arrays entry": (lambda s, o: _edit_json(s, lambda d: d.pop("arrays")), PlanCorruptError, "arrays"),
    "arrays outside the folder": (lambda s, o: _edit_json(s, lambda d: d["arrays"].update(file="../plan.safetensors")),
                                  PlanCorruptError, "file name"),
    "placements not an object": (lambda s, o: _edit_json(s, lambda d: d.update(placements=[])), PlanCorruptError,
                                 "placements"),
    "TP key not a number": (lambda s, o: _edit_json(s, lambda d: d["placements"].update(two=[])), PlanCorruptError,
                            "'two'"),
    "buckets not a list": (lambda s, o: _edit_json(s, lambda d: d["placements"].update({"2": "x"})),
                           PlanCorruptError, "'2'"),
    "entry key not a string": (lambda s, o: _edit_json(s, lambda d: d["placements"]["4"][1].update(key=7)),
                               PlanCorruptError, "key: str"),
    "predicted not a dict": (lambda s, o: _edit_json(s, lambda d: d["placements"]["4"][1].update(predicted=[])),
                             PlanCorruptError, "predicted"),
    "model count a string": (lambda s, o: _edit_json(s, lambda d: d["model"].update(num_layers="3")),
                             PlanCorruptError, "num_layers"),
    "model field missing": (lambda s, o: _edit_json(s, lambda d: d["model"].pop("num_heads")), PlanCorruptError,
                            "num_heads"),
    "budgets layer not a list": (lambda s, o: _edit_json(s, lambda d: d["budgets"].__setitem__(0, 5)),
                                 PlanCorruptError, "malformed"),
    # the stock array [phase, bucket, layer] and its JSON entry
    "drop stock": (_edit_arrays(lambda t: t.pop(STOCK)), PlanCorruptError, "stock layers) is missing"),
    "stock uint8": (_set(STOCK, lambda a: a.to(torch.uint8)), PlanCorruptError, "torch.bool"),
    "stock int8": (_set(STOCK, lambda a: a.to(torch.int8)), PlanCorruptError, "torch.bool"),
    "stock a bucket short": (_set(STOCK, lambda a: a[:, :1].contiguous()), PlanCorruptError, "[2, 2, 3]"),
    "stock a layer extra": (_set(STOCK, lambda a: torch.cat([a, a[..., :1]], -1)), PlanCorruptError, "[2, 2, 3]"),
    "stock one phase": (_set(STOCK, lambda a: a[:1].contiguous()), PlanCorruptError, "[2, 2, 3]"),
    "stock transposed": (_set(STOCK, lambda a: a.transpose(0, 2).contiguous()), PlanCorruptError, "[2, 2, 3]"),
    "stock flattened": (_set(STOCK, lambda a: a.reshape(-1)), PlanCorruptError, "[2, 2, 3]"),
    "stock not named": (lambda s, o: _edit_json(s, lambda d: d.pop("stock")), PlanCorruptError, "['stock']"),
    "stock entry not an object": (lambda s, o: _edit_json(s, lambda d: d.update(stock="stock")), PlanCorruptError,
                                  "`stock` must be"),
    "stock entry null": (lambda s, o: _edit_json(s, lambda d: d.update(stock=None)), PlanCorruptError,
                         "`stock` must be"),
    "stock phases swapped": (lambda s, o: _edit_json(s, lambda d: d["stock"].update(phases=["decode", "prefill"])),
                             PlanCorruptError, "`stock` must be"),
    "stock key another array": (lambda s, o: _edit_json(s, lambda d: d["stock"].update(key=IDX)), PlanCorruptError,
                                "`stock` must be"),
    "stock entry extra field": (lambda s, o: _edit_json(s, lambda d: d["stock"].update(margin=0.9)),
                                PlanCorruptError, "`stock` must be"),
}


@pytest.fixture(scope="module")
def other_plan(tmp_path_factory):
    """A different plan (TP 2 only, other buckets) whose files can be swapped in."""
    plan = _plan()
    plan.placements = {2: solve_plan_placements(plan.model, plan.budgets, Buckets((2048,)), [2], CostModel.analytic(),
                                                "shplb")[2]}
    plan.buckets = Buckets((2048,))
    plan.stock = np.ones((2, 1, 3), dtype=bool)
    return save_plan(plan, tmp_path_factory.mktemp("other")).parent


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_every_mutation_is_refused_with_its_error(saved, other_plan, name):
    mutate, error, words = MUTATIONS[name]
    mutate(saved, other_plan)
    with pytest.raises(PlanError) as info:  # any other exception type fails the test
        load_plan(saved, CFG, tp=4)
    assert type(info.value) is error and words in str(info.value), repr(info.value)


def test_plan_written_before_the_stock_array_loads_as_all_sparse(tmp_path):
    plan = _plan()
    plan.stock = None
    save_plan(plan, tmp_path / "old")
    assert "stock" not in json.loads((tmp_path / "old" / "plan.json").read_text())
    assert "stock" not in load_file(str(tmp_path / "old" / "plan.safetensors"))
    back = load_plan(tmp_path / "old", CFG, tp=4)
    assert back.stock is None and not back.stock_layers("prefill", 0) and not back.stock_layers("decode", 1)


def test_import_refuses_another_sglang():
    import subprocess
    import sys
    code = ("import importlib.metadata as m\n"
            "real = m.version\n"
            "m.version = lambda name: '0.5.21' if name == 'sglang' else real(name)\n"
            "import sglang_shplb\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode != 0 and "supports SGLang 0.5.17 only; SGLang 0.5.21 is installed" in r.stderr


def test_a_served_placement_that_cuts_a_vertical_slash_head_is_refused(tmp_path):
    """A plan written before the planner kept vertical-slash heads whole: refused at the TP it would be served at
    (its answers would differ from TP 1's), loadable offline and at TP 1, where no placement runs."""
    from sglang_shplb.core.placement_types import Piece
    plan = _plan()
    li, h = next((li, h) for li in range(3) for h in range(9) if not plan.budgets[li][h].splittable)
    lp = plan.placements[2][1].layers[li]
    home = next(g for g in lp.gpus if any(p.head == h for p in g))
    other = next(g for g in lp.gpus if g is not home)
    home[:] = [p for p in home if p.head != h] + [Piece(h, 0.0, 0.5)]
    other.append(Piece(h, 0.5, 1.0))
    save_plan(plan, tmp_path / "old")
    with pytest.raises(PlanCoverageError, match=f"TP 2 bucket 1: layer {li} cuts head {h} \\(vslash\\)"):
        load_plan(tmp_path / "old", CFG, tp=2)
    assert load_plan(tmp_path / "old", CFG, tp=4).placements[2][1].layers[li] == lp
    load_plan(tmp_path / "old"), load_plan(tmp_path / "old", CFG, tp=1)
