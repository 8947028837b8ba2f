"""Real SGLang 0.5.17 on the CPU: the in-process sgl.Engine (run in a subprocess of its own, since
Engine.shutdown() kills every child of its caller) and the HTTP server from our launcher.

Slow (~5 min on 2 cores): CI runs this file in its own pytest invocation (see docs/serving.md)."""
import json
import subprocess
import sys
import time

import pytest

import sglang  # noqa: F401  (tests/run.sh installs it; a missing SGLang must fail, not skip)

from serving_helpers import ROOT, Server, env, model_dir, passkey_prompt  # noqa: E402

from sglang_shplb.planning.synthetic_plans import dense_budget, synthetic_plan  # noqa: E402

PROMPTS = ["<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
           "The three primary colors are",
           "def fibonacci(n):"]


@pytest.fixture(scope="module")
def model():
    return model_dir()


@pytest.fixture(scope="module")
def plans(model, tmp_path_factory):
    d = tmp_path_factory.mktemp("plans")
    return {"dense": synthetic_plan(model, dense_budget, d / "dense").parent,
            # every layer: KV group 0 dense, groups 1-2 (6 of 9 heads) top-k at 50 % of the blocks
            "mixed": synthetic_plan(model, topk_budget, d / "mixed").parent}


def topk_budget(layer, head, spec):
    from sglang_shplb.core.patterns import HeadBudget
    return HeadBudget.dense() if spec.kv_head_of(head) == 0 else HeadBudget.topk(0.5, min_blocks=2)


def run_engine(model, backend, plan, prompts, max_new, tmp_path):
    p = tmp_path / f"prompts_{backend}.json"
    p.write_text(json.dumps(prompts))
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "serving_engine_script.py"), str(model), backend,
                        str(plan) if plan else "-", str(p), str(max_new)],
                       capture_output=True, text=True, env=env(), timeout=400)
    line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    assert r.returncode == 0 and line, r.stdout[-3000:] + r.stderr[-5000:]
    return json.loads(line[-1][7:])


def test_dense_plan_equals_torch_native_token_for_token(model, plans, tmp_path):
    stock = run_engine(model, "torch_native", None, PROMPTS, 16, tmp_path)
    ours = run_engine(model, "shplb", plans["dense"], PROMPTS, 16, tmp_path)
    assert ours["ids"] == stock["ids"], (ours["texts"], stock["texts"])
    assert "Paris" in ours["texts"][0]
    # the second pass hit the radix cache and still agrees
    assert all(c > 0 for c in ours["cached"]) and ours["texts2"] == stock["texts2"]


@pytest.fixture(scope="module")
def server(model, plans, tmp_path_factory):
    log = tmp_path_factory.mktemp("srv") / "server.log"
    s = Server(["--model-path", str(model), "--shplb-plan", str(plans["mixed"]), "--chunked-prefill-size", "512",
                "--shplb-bucket-log-every", "1", "--context-length", "2048", "--log-level", "info"], log)
    yield s
    s.stop()


def test_openai_client_and_passkey_with_plan_budgets(server, model):
    from transformers import AutoTokenizer
    import openai
    tok = AutoTokenizer.from_pretrained(model)
    key = 68142
    prompt = passkey_prompt(tok, key)
    n = len(tok(prompt)["input_ids"])
    assert n > 900, n  # ~17 blocks of 64: the top-k heads read about half of them
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
    t0 = time.time()
    r = client.completions.create(model="default", prompt=prompt, max_tokens=12, temperature=0)
    assert str(key) in r.choices[0].text, r.choices[0].text
    c = client.chat.completions.create(model="default", messages=[{"role": "user", "content":
                                       "What is the capital of France?"}], max_tokens=16, temperature=0)
    assert "Paris" in c.choices[0].message.content
    log = server.log.read_text()
    assert "180 of 270 rank-local heads sparse" in log, log[-3000:]
    assert "shplb bucket histogram" in log
    # the passkey prompt came in 512-token chunks: the scheduler hook marked the first one mid-prompt, so only
    # the chunk that ends the prompt had the dense tail, and the key was still found
    assert "1 of 1 requests of this extend batch end mid-prompt" in log, log[-3000:]
    print(f"passkey prompt {n} tokens answered in {time.time() - t0:.2f}s")


def test_frontend_program(server):
    import sglang as sgl

    @sgl.function
    def qa(s, question):
        s += sgl.user(question)
        s += sgl.assistant(sgl.gen("answer", max_tokens=16, temperature=0))

    sgl.set_default_backend(sgl.RuntimeEndpoint(server.url))
    state = qa.run(question="What is the capital of France?")
    assert "Paris" in state["answer"]


def test_over_long_request_is_rejected_and_server_keeps_serving(server):
    code, body = server.post("/generate", {"text": "hello " * 3000, "sampling_params": {"max_new_tokens": 4}})
    assert code == 400 or "error" in json.dumps(body).lower(), (code, body)
    assert "context length" in json.dumps(body).lower() or "longer than" in json.dumps(body).lower(), body
    code, body = server.post("/generate", {"text": "The capital of France is", "sampling_params":
                                           {"max_new_tokens": 4, "temperature": 0}})
    assert code == 200 and "Paris" in body["text"], body


def launch_fails(args, timeout=180):
    r = subprocess.run([sys.executable, "-m", "sglang_shplb.launch_server", *args], capture_output=True,
                       text=True, env=env(), timeout=timeout, cwd=ROOT)
    return r.returncode, r.stderr


def test_bad_inputs_exit_nonzero_naming_the_cause(model, plans, tmp_path):
    # wrong model: a plan for another config
    other = tmp_path / "other"
    other.mkdir()
    cfg = json.loads((model / "config.json").read_text())
    cfg["num_hidden_layers"] = 12
    (other / "config.json").write_text(json.dumps(cfg))
    wrong = synthetic_plan(other, dense_budget, tmp_path / "wrong").parent
    rc, err = launch_fails(["--model-path", str(model), "--shplb-plan", str(wrong)])
    assert rc == 3 and "PlanModelMismatchError" in err and "num_layers" in err, err
    # corrupt plan
    bad = tmp_path / "corrupt"
    bad.mkdir()
    (bad / "plan.json").write_text((plans["mixed"] / "plan.json").read_text()[:500])
    rc, err = launch_fails(["--model-path", str(model), "--shplb-plan", str(bad)])
    assert rc == 3 and "PlanCorruptError" in err, err
    # unknown flag
    rc, err = launch_fails(["--model-path", str(model), "--shplb-plan", str(plans["mixed"]), "--no-such-flag"])
    assert rc == 2 and "--no-such-flag" in err, err
    # no plan and no fallback flag
    rc, err = launch_fails(["--model-path", str(model)])
    assert rc == 4 and "--shplb-plan" in err and "--shplb-dense-fallback" in err, err
    # TP size the plan was not solved for
    rc, err = launch_fails(["--model-path", str(model), "--shplb-plan", str(plans["mixed"]), "--tp-size", "3"])
    assert rc == 3 and "TP 3" in err, err
