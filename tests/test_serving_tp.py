"""A real SGLang 0.5.17 server on CPU at TP 3 (gloo) with S-HPLB placements that move work between ranks.

The TP-3 placement moves work in every layer (whole GQA groups, a split group, heads cut into query-block
pieces over every rank, in turn) at the committed default plan's budgets. Greedy answers must equal
(a) at the plan's budgets, the TP-1 ``shplb`` server's on the same plan;
(b) at full budgets with the same placement, the TP-3 ``torch_native`` server's.
The TP-3 ``shplb`` server's log shows the units and bytes moved per batch. Both ``shplb`` servers cut prompts
into 512-token chunks, so the passkey prompt's second chunk moves work after a prefix and only its last chunk has
the dense tail. Slow (~8 min on 2 cores): run in the serving pytest invocation (tests/run.sh)."""
from __future__ import annotations

import re

import pytest

import sglang  # noqa: F401  (tests/run.sh installs it; a missing SGLang must fail, not skip)

from serving_helpers import ROOT, greedy_answers, model_dir, passkey_prompt  # noqa: E402

TP3_ENV = {"SGLANG_CPU_OMP_THREADS_BIND": "0|1|0", "OMP_NUM_THREADS": "1"}
MAX_NEW = 12


@pytest.fixture(scope="module")
def model():
    return model_dir()


@pytest.fixture(scope="module")
def plans(model, tmp_path_factory):
    """The committed default plan's budgets with a TP-3 placement that moves work in every layer and bucket
    (whole GQA groups, a split group, heads cut into query-block pieces over every rank, in turn), and the
    same placement at full budgets."""
    from conftest import moving_placements

    from sglang_shplb.core.patterns import HeadBudget
    from sglang_shplb.core.placement_types import Placement
    from sglang_shplb.core.plan import load_plan, save_plan

    d = tmp_path_factory.mktemp("tp3plans")
    plan = load_plan(ROOT / "bench/results/default_plan", model)
    plan.stock = None   # every layer sparse: the default plan runs the stock backend up to 32K (its stock decision)
    kinds = [lp for name, lp in moving_placements(plan.model.num_heads, 3).items() if name != "home"]
    layers = [kinds[li % len(kinds)] for li in range(plan.model.num_layers)]
    plan.placements[3] = [Placement(3, b, "test_moving", layers) for b in range(len(plan.buckets))]
    save_plan(plan, d / "sparse")
    plan.budgets = [[HeadBudget.dense() for _ in layer] for layer in plan.budgets]
    save_plan(plan, d / "dense")
    return {"sparse": d / "sparse", "dense": d / "dense"}


@pytest.fixture(scope="module")
def prompts(model):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model)
    chat = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
    return [chat.format("What is the capital of France?"), "The three primary colors are",
            chat.format("Write a Python function that reverses a string."), passkey_prompt(tok, 40721)]


def answers(args: list[str], prompts: list[str], log, env_extra=None, module="sglang_shplb.launch_server"):
    return greedy_answers(args, prompts, log, MAX_NEW, env_extra, module)


def test_tp3_head_parallel_server_answers_as_tp1_and_as_dense_tp3(model, plans, prompts, tmp_path):
    m = ["--model-path", str(model)]
    tp3 = m + ["--tp-size", "3"]
    chunked = ["--chunked-prefill-size", "512"]
    sparse3, t_up = answers(tp3 + chunked + ["--shplb-plan", str(plans["sparse"])], prompts, tmp_path / "sparse3.log",
                            TP3_ENV)
    log = (tmp_path / "sparse3.log").read_text()
    assert "1 of 1 requests of this extend batch end mid-prompt" in log, log[-3000:]
    moved = re.findall(r"shplb head-parallel extend, TP rank \d: bucket \d+, (\d+) units sent away, ([\d.]+) KiB sent",
                       log)
    assert moved and all(int(u) > 0 and float(b) > 0 for u, b in moved), log[-3000:]
    print(f"TP-3 shplb server up in {t_up:.0f} s; per batch and rank: units, KiB sent {moved}; answers {sparse3}")
    sparse1, _ = answers(m + chunked + ["--shplb-plan", str(plans["sparse"])], prompts, tmp_path / "sparse1.log")
    assert sparse3 == sparse1, (sparse3, sparse1)
    dense3, _ = answers(tp3 + ["--shplb-plan", str(plans["dense"])], prompts, tmp_path / "dense3.log", TP3_ENV)
    stock3, _ = answers(tp3 + ["--attention-backend", "torch_native"], prompts, tmp_path / "stock3.log", TP3_ENV,
                        module="sglang.launch_server")
    assert dense3 == stock3, (dense3, stock3)
