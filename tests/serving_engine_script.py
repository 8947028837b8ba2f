"""Run greedy generations through an in-process sgl.Engine in THIS process (a subprocess of the test:
Engine.shutdown() kills every child of its caller). Prints one JSON line: {"texts": [...], "ttft": ...}.

usage: python serving_engine_script.py MODEL_DIR BACKEND PLAN|- PROMPTS_JSON MAX_NEW [extra engine kwargs JSON]
"""
import json
import os
import sys
import time

os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")


def main():
    model, backend, plan, prompts_path, max_new = sys.argv[1:6]
    extra = json.loads(sys.argv[6]) if len(sys.argv) > 6 else {}
    if backend == "shplb":
        from sglang_shplb.serving import configure
        if plan == "-":
            configure(None, dense_fallback=True, bucket_log_every=1)
        else:
            configure(plan, bucket_log_every=1)
    import sglang as sgl
    prompts = json.loads(open(prompts_path).read())
    kw = dict(model_path=model, device="cpu", attention_backend=backend, dtype="float32", max_total_tokens=16384,
              sleep_on_idle=True, log_level="warning", random_seed=0)
    kw.update(extra)
    t0 = time.time()
    eng = sgl.Engine(**kw)
    ready = time.time() - t0
    try:
        out = eng.generate(prompts, {"temperature": 0.0, "max_new_tokens": int(max_new)})
        texts = [o["text"] for o in out]
        ids = [o.get("output_ids") for o in out]
        # a second pass on the same prompts: radix-cache prefix hits
        out2 = eng.generate(prompts, {"temperature": 0.0, "max_new_tokens": int(max_new)})
        cached = [o["meta_info"].get("cached_tokens", 0) for o in out2]
        print("RESULT " + json.dumps({"texts": texts, "ids": ids, "texts2": [o["text"] for o in out2],
                                      "cached": cached, "ready_s": ready}), flush=True)
    finally:
        eng.shutdown()


if __name__ == "__main__":
    main()
