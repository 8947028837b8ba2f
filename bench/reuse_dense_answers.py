"""Seed an eval's progress file with the dense answers of an earlier run, so that a new plan is compared with
the same dense answers without serving them again (CPU time: a float32 dense server on this 2-core CPU takes
5-12 s a prompt at 2K-4K).

    python bench/reuse_dense_answers.py OLD/eval.json NEW_OUT
    python -m sglang_shplb eval --plan PLAN <the old run's --lengths / --per-task / --tasks> --out NEW_OUT

Only what would be asked again is seeded: the earlier run's settings regenerate its prompts (each row's token
count and references are checked against them), and each dense answer is filed under the key the new run asks
for (:func:`sglang_shplb.evaluation.runner.answer_keys`): the dense server's command line as the earlier run
recorded it, this Python, the installed SGLang release, the prompt's tokens and its answer length. A new run
with other lengths, tasks or flags derives another command line (its context length, its pool), finds no key,
and serves dense itself. The eval's JSON then records ``startup_s.dense = null``: no dense server ran.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from transformers import AutoTokenizer

from sglang_shplb.evaluation.progress import Progress
from sglang_shplb.evaluation.runner import EvalConfig, answer_keys
from sglang_shplb.evaluation.servers import ServerSpec
from sglang_shplb.evaluation.tasks import eval_prompts


def seed(old: Path, out: Path) -> int:
    doc = json.loads(old.read_text())
    st = doc["settings"]
    module, *args = st["servers"]["dense"]
    dense = ServerSpec("dense", module, tuple(args))
    tok = AutoTokenizer.from_pretrained(doc["model"])
    prompts = eval_prompts(tok, st["tasks"], st["lengths"], st["per_task"])
    rows = {(r["task"], r["length"], r["index"]): r for r in doc["rows"]}
    if len(rows) != len(prompts):
        raise SystemExit(f"{old}: {len(rows)} rows, its settings make {len(prompts)} prompts")
    progress = Progress.open(out)
    keys = answer_keys(dense, None, prompts, EvalConfig(plans=[], max_new_tokens=st["max_new_tokens"]))
    for p, key in zip(prompts, keys):
        row = rows[(p.task, p.length, p.index)]
        if row["tokens"] != len(p.input_ids) or row["refs"] != p.refs:
            raise SystemExit(f"{old}: {p.task} {p.length} #{p.index} is not the prompt these settings make now")
        progress.add(key, {k: v for k, v in row["dense"].items() if k != "score"})
    return len(prompts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("old", type=Path, help="an earlier eval.json")
    ap.add_argument("out", type=Path, help="the new eval's --out folder")
    a = ap.parse_args()
    print(f"{seed(a.old, a.out)} dense answers of {a.old} → {a.out / 'eval_progress.jsonl'}")


if __name__ == "__main__":
    main()
