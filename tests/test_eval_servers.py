"""``python -m sglang_shplb eval`` end to end on a tiny subset through real SGLang servers on the CPU
(dense torch_native, then shplb with the committed default plan): 2 tasks x 1K tokens x 2 prompts.

Slow (~3-4 min on 2 cores, mostly the two server starts): it runs in the serving pytest invocation of
``tests/run.sh``, not the first one."""
import json
import re
import shutil
import subprocess
import sys

import pytest

import sglang  # noqa: F401  (tests/run.sh installs it; a missing SGLang must fail, not skip)

from serving_helpers import ROOT

from sglang_shplb.core.plan import load_plan
from sglang_shplb.planning.report import report_plan


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    plan = tmp_path_factory.mktemp("default_plan")
    for name in ("plan.json", "plan.safetensors"):
        shutil.copy(ROOT / "bench" / "results" / "default_plan" / name, plan / name)
    r = subprocess.run([sys.executable, "-m", "sglang_shplb", "eval", "--plan", str(plan), "--lengths", "1024",
                        "--per-task", "2", "--tasks", "passkey", "qa", "--max-new-tokens", "8"],
                       capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return plan, r.stdout


def test_eval_writes_its_json_beside_the_plan(evaluated):
    plan, stdout = evaluated
    assert f"eval written to {plan / 'eval.json'}" in stdout  # --out defaults to the plan's folder
    doc = json.loads((plan / "eval.json").read_text())
    s = doc["settings"]
    assert (doc["schema"], s["device"], s["dtype"], s["dense_backend"], s["max_new_tokens"]) == \
        ("shplb-eval/1", "cpu", "float32", "torch_native", 8)
    assert s["servers"]["dense"][0] == "sglang.launch_server" and "--shplb-plan" in s["servers"]["sparse"]
    assert [(r["task"], r["length"], r["index"]) for r in doc["rows"]] == \
        [("passkey", 1024, 0), ("passkey", 1024, 1), ("qa", 1024, 0), ("qa", 1024, 1)]
    for row in doc["rows"]:
        assert 1004 <= row["tokens"] <= 1024
        for side in ("dense", "sparse"):
            a = row[side]
            assert 0 <= a["score"] <= 1 and 0 < a["ttft_s"] <= a["latency_s"] and 1 <= a["output_tokens"] <= 8, a
    # the pipeline is sound when the dense model finds a passkey at 1K (it finds both here)
    assert sum(r["dense"]["score"] for r in doc["rows"] if r["task"] == "passkey") >= 1
    assert [(c["task"], c["length"], c["n"]) for c in doc["summary"]] == [("passkey", 1024, 2), ("qa", 1024, 2)]
    assert doc["density"] == {"1024": pytest.approx(load_plan(plan).mean_density(1024))}
    assert (plan / "eval.png").stat().st_size > 10_000
    # the sparse server really served the plan's sparse heads
    sparse = re.search(r"(\d+) of \d+ rank-local heads sparse", (plan / "eval_logs" / "sparse.log").read_text())
    assert sparse and int(sparse.group(1)) > 0


def test_the_plan_report_shows_the_eval(evaluated, tmp_path):
    plan, _ = evaluated
    text = report_plan(plan, tmp_path).read_text()
    assert "eval (" in text and "   passkey     1K    2" in text and "qa     1K    2" in text
