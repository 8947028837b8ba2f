"""GPU end-to-end: the same greedy requests against stock SGLang 0.5.17 (`--attention-backend flashinfer`)
and `python -m sglang_shplb.launch_server` (`shplb`: all-dense layers on flashinfer, layers with sparse heads
on the kernel path), on one GPU. Reports answers, TTFT and decode tokens/s.

  python bench/serve_gpu.py smollm2 --model /tmp/smollm2 --out $OUT        # 2K/4K/8K passkey prompts,
                                                                           # the profiled plan (bench/results/default_plan)
  python bench/serve_gpu.py llama8b --tokenizer /tmp/smollm2 --out $OUT    # Llama-3-8B shape, dummy weights, 16K-64K,
                                                                           # a mixed plan (dense / top-k / streaming)
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

PORT = 30000
FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")


def passkey_prompt(tok, target_tokens: int, key: int, depth: float = 0.5) -> str:
    unit = len(tok(FILLER)["input_ids"])
    n = max(1, (target_tokens - 80) // unit)
    parts = [FILLER] * n
    parts.insert(int(n * depth), f"The pass key is {key}. Remember it. {key} is the pass key. ")
    body = "".join(parts)
    msg = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it.\n"
           f"{body}\nWhat is the pass key? The pass key is")
    return msg


def wait_up(proc, log, timeout=420):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited rc={proc.returncode}; log tail:\n{Path(log).read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{PORT}/health_generate", timeout=30) as r:
                if r.status == 200:
                    return time.time() - t0
        except Exception:
            pass
        time.sleep(2)
    raise RuntimeError("server did not come up")


def generate_stream(payload: dict) -> dict:
    payload = dict(payload, stream=True)
    req = urllib.request.Request(f"http://127.0.0.1:{PORT}/generate", data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    first = last = None
    text, meta = "", {}
    with urllib.request.urlopen(req, timeout=600) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            obj = json.loads(data)
            now = time.perf_counter()
            if first is None:
                first = now
            last = now
            text, meta = obj.get("text", text), obj.get("meta_info", meta)
    n = int(meta.get("completion_tokens", 0))
    ttft = first - t0
    dec = (n - 1) / (last - first) if n > 1 and last > first else float("nan")
    return {"text": text, "ttft_s": round(ttft, 4), "decode_tok_s": round(dec, 1), "completion_tokens": n,
            "prompt_tokens": meta.get("prompt_tokens")}


def start(cmd, log, env):
    f = open(log, "w")
    return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def stop(proc):
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    except Exception:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except Exception:
            pass
    time.sleep(3)


def port_in_use(port: int) -> bool:
    import socket
    with socket.socket() as sk:
        return sk.connect_ex(("127.0.0.1", port)) == 0


def run_server(name, cmd, requests, out: Path, env):
    if port_in_use(PORT):   # a server left over (e.g. killed by an outer timeout) would answer instead
        raise RuntimeError(f"port {PORT} is already in use: stop the old server first")
    log = out / f"server_{name}.log"
    proc = start(cmd, log, env)
    res = {"backend": name, "cmd": " ".join(cmd)}
    try:
        res["startup_s"] = round(wait_up(proc, log), 1)
        # warm-up pass over every request (JIT builds of each shape), not reported; the radix cache is off
        # (--disable-radix-cache), so the measured pass recomputes every prompt
        res["warmup"] = [generate_stream(r["payload"])["ttft_s"] for r in requests]
        res["results"] = []
        for r in requests:
            o = generate_stream(r["payload"])
            o.update({k: v for k, v in r.items() if k != "payload"})
            res["results"].append(o)
            print(name, json.dumps({k: v for k, v in o.items() if k != "text"}), repr(o["text"][:80]), flush=True)
    except Exception as e:
        res["error"] = f"{type(e).__name__}: {e}"[-3000:]
        print(name, "ERROR", res["error"], flush=True)
    finally:
        stop(proc)
    return res


PROFILED_PLAN = HERE / "results" / "default_plan"


def full_budget(layer, head, spec):
    """Sparse patterns whose budgets cover the whole context (8K): every path of the kernel path runs, and
    the answers must equal the stock backend's (up to bf16 rounding). Per KV group: dense, streaming with a
    window of 8192 tokens, top-k of all blocks."""
    from sglang_shplb.core.patterns import HeadBudget
    g = spec.kv_head_of(head) % 3
    return [HeadBudget.dense(), HeadBudget.streaming(0, 8192), HeadBudget.topk(1.0, min_blocks=1)][g]


def make_plan(kind, model_dir, out_dir, full: bool = False):
    """SmolLM2: the plan profiled on this model (`python -m sglang_shplb plan`). Llama-3-8B shape (dummy
    weights, nothing to profile): per layer KV group 0 dense (4 of 32 query heads), odd KV groups top-k at
    10 % of the blocks, even ones streaming sink 128 + window 2048 tokens (3-12 % of 16K-64K)."""
    from sglang_shplb.planning.synthetic_plans import mixed_budget, synthetic_plan
    if full:
        return synthetic_plan(model_dir, full_budget, out_dir, meta={"source": "bench/serve_gpu.py full budgets"})
    if kind == "smollm2":
        return PROFILED_PLAN / "plan.json"
    return synthetic_plan(model_dir, mixed_budget(128, 2048, 0.1), out_dir,
                          meta={"source": f"bench/serve_gpu.py {kind}"})


LLAMA8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
           "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
           "head_dim": 128, "max_position_embeddings": 131072, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
           "vocab_size": 128256, "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 1,
           "eos_token_id": 2, "torch_dtype": "bfloat16"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("which", choices=["smollm2", "llama8b"])
    ap.add_argument("--model", default="/tmp/smollm2")
    ap.add_argument("--tokenizer", default="/tmp/smollm2")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    ap.add_argument("--lengths", default=None)
    ap.add_argument("--backends", default="shplb,shplb_full,flashinfer",
                    help="shplb: the plan of make_plan; shplb_full: full budgets (must answer as flashinfer)")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    py = sys.executable
    if a.which == "smollm2":
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(a.model)
        model = a.model
        lengths = [int(x) for x in (a.lengths or "2048,4096,8000").split(",")]
        rng = random.Random(0)
        reqs = []
        for n in lengths:
            key = rng.randint(10000, 99999)
            reqs.append({"target_tokens": n, "passkey": key,
                         "payload": {"text": passkey_prompt(tok, n, key),
                                     "sampling_params": {"temperature": 0, "max_new_tokens": 64, "ignore_eos": True}}})
        common = ["--model-path", model, "--host", "127.0.0.1", "--port", str(PORT), "--mem-fraction-static", "0.5",
                  "--disable-prefill-cuda-graph", "--cuda-graph-max-bs", "4", "--context-length", "8192",
                  "--disable-radix-cache", "--max-running-requests", "16"]
    else:
        model = "/tmp/llama8b_cfg"
        Path(model).mkdir(exist_ok=True)
        (Path(model) / "config.json").write_text(json.dumps(LLAMA8B))
        for f in Path(a.tokenizer).iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
                (Path(model) / f.name).write_bytes(f.read_bytes())
        lengths = [int(x) for x in (a.lengths or "16384,32768,65536").split(",")]
        rng = random.Random(0)
        reqs = [{"target_tokens": n, "payload": {"input_ids": [rng.randint(1000, 40000) for _ in range(n)],
                                                   "sampling_params": {"temperature": 0, "max_new_tokens": 64,
                                                                       "ignore_eos": True}}} for n in lengths]
        common = ["--model-path", model, "--load-format", "dummy", "--host", "127.0.0.1", "--port", str(PORT),
                  "--mem-fraction-static", "0.85", "--disable-prefill-cuda-graph", "--cuda-graph-max-bs", "4",
                  "--context-length", "70000", "--chunked-prefill-size", "8192", "--max-running-requests", "4",
                  "--disable-radix-cache"]
    plan = make_plan(a.which, model, Path("/tmp/shplb_plans") / a.which)
    results = {"which": a.which, "lengths": lengths, "plan": str(plan), "runs": []}
    for backend in a.backends.split(","):
        if backend.startswith("shplb"):
            p = plan if backend == "shplb" else make_plan(a.which, model, Path("/tmp/shplb_plans") / backend, True)
            cmd = [py, "-m", "sglang_shplb.launch_server", *common, "--shplb-plan", str(p.parent)]
        else:
            cmd = [py, "-m", "sglang.launch_server", *common, "--attention-backend", backend]
        results["runs"].append(run_server(backend, cmd, reqs, out, env))
        (out / f"serve_gpu_{a.which}.json").write_text(json.dumps(results, indent=1))
    if a.which == "smollm2":
        for run in results["runs"]:
            for r in run.get("results", []):
                r["passkey_found"] = str(r["passkey"]) in r["text"]
        (out / f"serve_gpu_{a.which}.json").write_text(json.dumps(results, indent=1))
    print("DONE", out / f"serve_gpu_{a.which}.json")


if __name__ == "__main__":
    main()
