"""Plan file round trip and every kind of bad plan file → its specific error."""
import json
import shutil

import pytest

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
    return Plan(spec, buckets, budgets, pl, {"note": "test"})


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


def test_import_refuses_another_sglang():
    import subprocess
    import sys
    code = ("import importlib.metadata as m\n"
            "real = m.version\n"
            "m.version = lambda name: '0.5.21' if name == 'sglang' else real(name)\n"
            "import sglang_shplb\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode != 0 and "supports SGLang 0.5.17 only; SGLang 0.5.21 is installed" in r.stderr
