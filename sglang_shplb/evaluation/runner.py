"""``python -m sglang_shplb eval``: the same prompts through a dense and a sparse SGLang server.

:func:`run_eval` checks the plan against the model (a plan for another model is refused), generates the
prompts (:mod:`.tasks`), starts the dense server, answers every prompt, stops it, does the same on the
shplb server (:mod:`.servers`), scores the answers (:mod:`.scoring`) and writes ``eval.json`` and
``eval.png`` (:mod:`.summary`) into the output folder (default: the plan's). Answers are kept as they come
(:mod:`.progress`): run the same command again after a stop and it resumes.
"""
from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from sglang_shplb.core.plan import JSON_NAME, load_plan
from sglang_shplb.evaluation.progress import Progress, answer_key
from sglang_shplb.evaluation.scoring import score
from sglang_shplb.evaluation.servers import DENSE_BACKEND, DTYPE, Server, server_specs
from sglang_shplb.evaluation.summary import PLOT_NAME, plot_accuracy, save_eval, summary_doc, summary_lines
from sglang_shplb.evaluation.tasks import TASKS, EvalPrompt, eval_prompts
from sglang_shplb.planning.model_store import resolve_model

SCHEMA = "shplb-eval/1"
#: tokens kept free at the model's limit for the answer (the longest task answer is 48 tokens)
HEADROOM = 128


@dataclass
class EvalConfig:
    plan: Path
    model: Path | None = None           # None: the embedded SmolLM2 checkpoint
    cache_dir: Path | None = None
    device: str = "cpu"
    dtype: str | None = None            # None: float32 on CPU, bfloat16 on CUDA
    lengths: list[int] | None = None    # None: powers of two from 2K under the model's limit, and the limit
    per_task: int = 20
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    out: Path | None = None             # None: the plan's folder
    max_new_tokens: int | None = None   # None: each task's own (what its answer needs, RULER's cut short)


def default_lengths(limit: int) -> list[int]:
    return [n for n in (2048, 4096, 8192, 16384, 32768, 65536) if n + HEADROOM < limit] + [limit - HEADROOM]


def _max_new(prompt: EvalPrompt, cfg: EvalConfig) -> int:
    return cfg.max_new_tokens or TASKS[prompt.task].max_new_tokens


def _lengths(cfg: EvalConfig, limit: int) -> list[int]:
    lengths = cfg.lengths or default_lengths(limit)
    longest = cfg.max_new_tokens or max(TASKS[t].max_new_tokens for t in cfg.tasks)
    too_long = [n for n in lengths if n + longest > limit]
    if too_long:
        raise ValueError(f"--lengths {too_long}: prompt plus {longest} answer tokens exceed the model's context of "
                         f"{limit} tokens")
    return sorted(lengths)


def _answer(server: Server, prompt: EvalPrompt, cfg: EvalConfig) -> dict:
    g = server.generate(prompt.input_ids, _max_new(prompt, cfg))
    return {"answer": g.text, "ttft_s": g.ttft_s, "latency_s": g.latency_s, "output_tokens": g.output_tokens}


def run_eval(cfg: EvalConfig, log=print) -> Path:
    """Runs the eval; returns the path of ``eval.json``."""
    from tqdm.auto import tqdm
    from transformers import AutoConfig, AutoTokenizer

    unknown = sorted(set(cfg.tasks) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown eval tasks {unknown}; tasks: {', '.join(TASKS)}")
    model = resolve_model(cfg.model, cfg.cache_dir, log)
    plan_file = Path(cfg.plan) / JSON_NAME if Path(cfg.plan).is_dir() else Path(cfg.plan)
    plan = load_plan(plan_file, model)  # PlanModelMismatchError for a plan of another model
    out = Path(cfg.out) if cfg.out else plan_file.parent
    dtype = cfg.dtype or DTYPE[cfg.device]
    lengths = _lengths(cfg, AutoConfig.from_pretrained(model).max_position_embeddings)
    tokenizer = AutoTokenizer.from_pretrained(model)
    prompts = eval_prompts(tokenizer, cfg.tasks, lengths, cfg.per_task)
    context = max(len(p.input_ids) + _max_new(p, cfg) for p in prompts) + 8
    rows = [{"task": p.task, "length": p.length, "index": p.index, "depth": p.depth, "tokens": len(p.input_ids),
             "refs": p.refs} for p in prompts]
    specs = server_specs(model, plan_file, cfg.device, dtype, context)
    plan_digest = hashlib.sha256(plan_file.read_bytes()).hexdigest()  # plan.json holds the arrays' sha256
    keys = {s.name: [answer_key(s.command(0), plan_digest if s.name == "sparse" else None, p.input_ids,
                                _max_new(p, cfg)) for p in prompts] for s in specs}
    progress = Progress.open(out)
    reused = sum(k in progress.answers for ks in keys.values() for k in ks)
    if reused:
        log(f"resuming: {reused} answers from {progress.path}")
    startup = {}
    with tqdm(total=len(specs) * len(prompts), initial=reused, desc="eval", unit="prompt") as bar:
        for spec in specs:
            todo = [(p, k) for p, k in zip(prompts, keys[spec.name]) if k not in progress.answers]
            if todo:
                bar.set_description(f"eval: starting the {spec.name} server")
                with Server(spec, out / "eval_logs" / f"{spec.name}.log") as server:
                    startup[spec.name] = server.startup_s
                    server.generate(min(prompts, key=lambda p: p.length).input_ids, 2)  # first-request costs, untimed
                    bar.set_description(f"eval {spec.name}")
                    for p, k in todo:
                        progress.add(k, _answer(server, p, cfg))
                        bar.update()
            for p, row, k in zip(prompts, rows, keys[spec.name]):
                a = progress.answers[k]
                row[spec.name] = {"score": score(a["answer"], p.refs, TASKS[p.task].scoring), **a}
    doc = {"schema": SCHEMA, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "argv": sys.argv, "model": str(model), "plan": str(plan_file.parent),
           "settings": {"device": cfg.device, "dtype": dtype, "dense_backend": DENSE_BACKEND[cfg.device],
                        "greedy": True, "radix_cache": False, "context_length": context, "lengths": lengths,
                        "per_task": cfg.per_task, "tasks": cfg.tasks, "max_new_tokens": cfg.max_new_tokens,
                        "servers": {s.name: [s.module, *s.args] for s in specs}, "startup_s": startup,
                        "interval": "95 % paired percentile bootstrap over prompts, 10,000 resamples"},
           "density": {str(n): plan.mean_density(n) for n in lengths},
           "summary": summary_doc(rows), "rows": rows}
    path = save_eval(doc, out)
    plot_accuracy(doc, out / PLOT_NAME)
    log("\n".join(summary_lines(doc)))
    progress.finish()
    log(f"eval written to {path} and {out / PLOT_NAME}")
    return path
