"""Real SGLang 0.5.17 servers on CPU with a plan whose every layer is marked stock (issue 15, item 1), though its
budgets are sparse: our launcher serves the stock backend outright (SGLang's ``torch_native``, our backend not
built); so does SGLang's own launcher with ``--attention-backend shplb`` and ``SHPLB_PLAN`` (the plugin: the backend
factory builds the stock backend itself); with ``--shplb-always-backend`` the shplb backend runs every layer on it;
greedy tokens are the same.

The plan is the committed default plan (SmolLM2-135M; 136 streaming and 56 top-k heads of 270) with its
``stock`` array set for every phase, bucket and layer. Slow (three servers, ~4 min on 2 cores): run in the
serving pytest invocation (tests/run.sh)."""
from __future__ import annotations

import numpy as np
import pytest

import sglang  # noqa: F401  (tests/run.sh installs it; a missing SGLang must fail, not skip)

from serving_helpers import ROOT, greedy_answers, model_dir, passkey_prompt  # noqa: E402

from sglang_shplb.serving.config import ENV_PLAN, OUTRIGHT_MARK  # noqa: E402

MAX_NEW = 12


@pytest.fixture(scope="module")
def model():
    return model_dir()


@pytest.fixture(scope="module")
def all_stock_plan(model, tmp_path_factory):
    from sglang_shplb.core.plan import PHASES, load_plan, save_plan

    plan = load_plan(ROOT / "bench/results/default_plan", model)
    assert any(b.pattern.value != "dense" for layer in plan.budgets for b in layer)
    plan.stock = np.ones((len(PHASES), len(plan.buckets), plan.model.num_layers), dtype=bool)
    return save_plan(plan, tmp_path_factory.mktemp("stockplan") / "plan").parent


def answers(args: list[str], prompts: list[str], log, env_extra=None, module="sglang_shplb.launch_server"):
    return greedy_answers(args, prompts, log, MAX_NEW, env_extra, module)[0]


def test_all_stock_plan_serves_the_stock_backend_outright_or_through_shplb(model, all_stock_plan, tmp_path):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model)
    chat = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
    # the passkey prompt (~900 tokens) is long enough that the plan's sparse budgets would change the answer
    prompts = [chat.format("What is the capital of France?"), "The three primary colors are",
               passkey_prompt(tok, 52817)]
    m = ["--model-path", str(model), "--shplb-plan", str(all_stock_plan)]
    outright = answers(m, prompts, tmp_path / "outright.log")
    log = (tmp_path / "outright.log").read_text()
    assert f"serving with --attention-backend torch_native {OUTRIGHT_MARK}" in log, log[-3000:]
    assert "attention_backend='torch_native'" in log and "shplb backend:" not in log, log[-3000:]
    assert "shplb: bucket hook on" not in log and "shplb stock-path warm-up" not in log, log[-3000:]
    plugin = answers(["--model-path", str(model), "--attention-backend", "shplb"], prompts, tmp_path / "plugin.log",
                     {ENV_PLAN: str(all_stock_plan)}, module="sglang.launch_server")
    log = (tmp_path / "plugin.log").read_text()
    assert f"torch_native serves this server {OUTRIGHT_MARK}" in log, log[-3000:]
    assert "shplb backend:" not in log and "shplb: bucket hook on" not in log, log[-3000:]
    assert plugin == outright, (plugin, outright)
    ours = answers(m + ["--shplb-always-backend"], prompts, tmp_path / "shplb.log")
    log = (tmp_path / "shplb.log").read_text()
    assert "shplb stock fallback: layers on torch_native per bucket" in log, log[-3000:]
    assert "prefill {4096: 30, 8192: 30" in log and "decode {4096: 30, 8192: 30" in log, log[-3000:]
    # SGLang found and ran the stock-path warm-up the launcher named in --warmups (a no-op off CUDA)
    assert "shplb stock-path warm-up: skipped on cpu" in log and "Could not find custom warmup" not in log, log[-3000:]
    assert ours == outright, (ours, outright)
