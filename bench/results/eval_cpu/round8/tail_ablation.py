"""Does a dense last query block fix qa at 2K? In-process reference, dense vs plan vs plan + dense tail."""
import sys, time, torch
import sglang_shplb.core.block_masks as bm
import sglang_shplb.planning.quality as quality
from sglang_shplb.planning.budget import load_budgets
from sglang_shplb.planning.model_store import resolve_model, load_model
from sglang_shplb.evaluation.tasks import make_prompt
from sglang_shplb.evaluation.scoring import score
from sglang_shplb.planning.refine import generate_greedy

plan, task, length, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
device = sys.argv[5] if len(sys.argv) > 5 else "cpu"
model, tok = load_model(resolve_model(None) if device == "cpu" else "/tmp/smollm2", device)
budgets = load_budgets(plan).budgets
orig = bm.build_block_masks
TAIL = {"on": False}
def with_tail(b, q, k):
    m = orig(b, q, k)
    if TAIL["on"]:
        m[:, -1, :] = True   # the last query block (the question) reads every block, causal inside the kernel
    return m
quality.build_block_masks = with_tail
quality.register_sparse_attention(budgets)
res = {m: [] for m in ("dense", "plan", "plan+tail")}
t0 = time.time()
for i in range(count):
    p = make_prompt(tok, task, length, i)
    row = []
    for mode in res:
        model.set_attn_implementation("sdpa" if mode == "dense" else quality.ATTN_NAME)
        TAIL["on"] = mode == "plan+tail"
        out = tok.decode(generate_greedy(model, p.input_ids, 16), skip_special_tokens=True)
        s = score(out, p.refs)
        res[mode].append(s); row.append(f"{mode} {s:.0f} {out.strip()[:30]!r}")
    print(i, p.refs, " | ".join(row), f"{time.time()-t0:.0f}s", flush=True)
for m, v in res.items():
    print(m, f"{100*sum(v)/len(v):.1f}", flush=True)
