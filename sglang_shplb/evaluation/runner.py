"""``python -m sglang_shplb eval``: the same prompts through a dense and a sparse SGLang server.

:func:`run_eval` checks the plan against the model (a plan for another model is refused), generates the
prompts (:mod:`.tasks`), starts the dense server, answers every prompt, stops it, does the same on one
shplb server per plan (:mod:`.servers`), scores the answers (:mod:`.scoring`) and writes each plan's
``eval.json`` and ``eval.png`` (:mod:`.summary`) into its output folder (default: the plan's). Several
plans share one dense run. On a GPU, ``parallel_servers`` starts every server at once and
``concurrency`` keeps several requests in flight (the TTFT then includes queueing and batching: the
settings record both). Answers are kept as they come
(:mod:`.progress`): run the same command again after a stop and it resumes.
"""
from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from sglang_shplb.core.plan import JSON_NAME, load_plan
from sglang_shplb.evaluation.progress import Progress, answer_key, software_id
from sglang_shplb.evaluation.scoring import score
from sglang_shplb.evaluation.servers import DENSE_BACKEND, DTYPE, Server, ServerSpec, server_specs
from sglang_shplb.evaluation.summary import PLOT_NAME, plot_accuracy, save_eval, summary_doc, summary_lines
from sglang_shplb.evaluation.tasks import TASKS, EvalPrompt, eval_prompts
from sglang_shplb.planning.model_store import resolve_model

SCHEMA = "shplb-eval/1"
#: tokens kept free at the model's limit for the answer (the longest task answer is 48 tokens)
HEADROOM = 128


def accelerator_name(device: str) -> str:
    """The card the servers ran on (``nvidia-smi``'s first name, so this process opens no CUDA context beside
    the servers'), or the CPU's model; recorded with the results, since bf16 numbers differ by card."""
    if device == "cuda":
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=30, check=True).stdout
            return out.splitlines()[0].strip()
        except (OSError, subprocess.SubprocessError, IndexError):
            return "cuda (nvidia-smi unavailable)"
    return platform.processor() or platform.machine()


@dataclass
class EvalConfig:
    plans: list[Path]                   # each served by its own shplb server against one dense server
    model: Path | None = None           # None: the embedded SmolLM2 checkpoint
    cache_dir: Path | None = None
    device: str = "cpu"
    dtype: str | None = None            # None: float32 on CPU, bfloat16 on CUDA
    lengths: list[int] | None = None    # None: powers of two from 2K under the model's limit, and the limit
    per_task: int = 20
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    out: Path | None = None             # None: each plan's folder; with several plans, out/<plan folder name>
    max_new_tokens: int | None = None   # None: each task's own (what its answer needs, RULER's cut short)
    concurrency: int = 1                # requests in flight per server (1: TTFT of a lone request)
    parallel_servers: bool = False      # start and query every server at once (one GPU holds them all)
    server_args: tuple[str, ...] = ()   # more SGLang flags for every server (e.g. --mem-fraction-static 0.2)
    dense_backend: str | None = None    # None: torch_native on CPU, flashinfer on CUDA (also the shplb stock one)


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


def answer_keys(spec: ServerSpec, plan_file: Path | None, prompts: list[EvalPrompt], cfg: EvalConfig) -> list[str]:
    """The progress key of each prompt's answer on ``spec``'s server (:func:`answer_key`); ``plan_file``: the
    sparse server's plan (None: the dense server)."""
    digest = None if plan_file is None else hashlib.sha256(plan_file.read_bytes()).hexdigest()  # holds arrays' sha256
    software = software_id(with_package=plan_file is not None)
    return [answer_key(spec.command(0), digest, p.input_ids, _max_new(p, cfg), software) for p in prompts]


@dataclass
class _Side:
    """One server of the run: its spec, where it logs, and the answer key of each prompt."""

    spec: ServerSpec
    log: Path
    keys: list[str]


def _answer_all(server: Server, work: list[tuple[EvalPrompt, str]], cfg: EvalConfig, progress: Progress, bar,
                lock: threading.Lock) -> None:
    def one(item: tuple[EvalPrompt, str]) -> None:
        p, k = item
        answer = _answer(server, p, cfg)
        with lock:
            progress.add(k, answer)
            bar.update()

    with ThreadPoolExecutor(cfg.concurrency) as pool:
        list(pool.map(one, work))


def _warm(server: Server, prompts: list[EvalPrompt]) -> None:
    server.generate(min(prompts, key=lambda p: p.length).input_ids, 2)  # first-request costs, untimed


def _serve(sides: list[_Side], prompts: list[EvalPrompt], cfg: EvalConfig, progress: Progress, bar) -> dict[str, float]:
    """Answers every prompt not yet in ``progress`` on each side's server; returns the startup seconds.

    One server after the other, or with ``parallel_servers`` the first (dense) alone, since its start
    builds the JIT kernels the others then find cached, and the rest at once; then all are queried
    together."""
    todo = [(side, [(p, k) for p, k in zip(prompts, side.keys) if k not in progress.answers]) for side in sides]
    todo = [(side, work) for side, work in todo if work]
    lock = threading.Lock()
    if not cfg.parallel_servers:
        startup = {}
        for side, work in todo:
            bar.set_description(f"eval: starting the {side.spec.name} server")
            with Server(side.spec, side.log) as server:
                startup[side.spec.name] = server.startup_s
                _warm(server, prompts)
                bar.set_description(f"eval {side.spec.name}")
                _answer_all(server, work, cfg, progress, bar, lock)
        return startup
    with ExitStack() as stack:
        servers: list[Server] = []
        for group in (todo[:1], todo[1:]):
            if not group:
                continue
            bar.set_description(f"eval: starting {', '.join(side.spec.name for side, _ in group)}")
            with ThreadPoolExecutor(len(group)) as pool:
                futures = [pool.submit(Server, side.spec, side.log) for side, _ in group]
            for f in futures:  # every server that came up is stopped on the way out, even if another failed
                if f.exception() is None:
                    servers.append(stack.enter_context(f.result()))
            for f in futures:
                f.result()  # raises the first start failure
        bar.set_description("eval: all servers")
        with ThreadPoolExecutor(len(servers)) as pool:
            list(pool.map(lambda s: _warm(s, prompts), servers))
            list(pool.map(lambda sw: _answer_all(sw[0], sw[1][1], cfg, progress, bar, lock), zip(servers, todo)))
        return {s.spec.name: s.startup_s for s in servers}


def run_eval(cfg: EvalConfig, log=print) -> list[Path]:
    """Runs the eval; returns the path of each plan's ``eval.json``."""
    from tqdm.auto import tqdm
    from transformers import AutoConfig, AutoTokenizer

    unknown = sorted(set(cfg.tasks) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown eval tasks {unknown}; tasks: {', '.join(TASKS)}")
    if cfg.concurrency < 1:
        raise ValueError(f"--concurrency must be ≥ 1, got {cfg.concurrency}")
    model = resolve_model(cfg.model, cfg.cache_dir, log)
    plan_files = [Path(p) / JSON_NAME if Path(p).is_dir() else Path(p) for p in cfg.plans]
    if len({f.parent.resolve() for f in plan_files}) != len(plan_files):
        raise ValueError("--plan names the same plan folder twice")
    plans = [load_plan(f, model) for f in plan_files]  # PlanModelMismatchError for a plan of another model
    if cfg.out is None:
        outs = [f.parent for f in plan_files]
    else:
        outs = [Path(cfg.out)] if len(plan_files) == 1 else [Path(cfg.out) / f.parent.name for f in plan_files]
    if len(set(outs)) != len(outs):
        raise ValueError("two plans would write into the same folder: give their folders different names")
    dtype = cfg.dtype or DTYPE[cfg.device]
    lengths = _lengths(cfg, AutoConfig.from_pretrained(model).max_position_embeddings)
    tokenizer = AutoTokenizer.from_pretrained(model)
    with tqdm(total=len(cfg.tasks) * len(lengths) * cfg.per_task, desc="eval: generating prompts", unit="prompt") as bar:
        prompts = eval_prompts(tokenizer, cfg.tasks, lengths, cfg.per_task, bar.update,
                               workers=min(8, os.cpu_count() or 1) if len(cfg.tasks) * len(lengths) * cfg.per_task > 16 else 1)
    context = max(len(p.input_ids) + _max_new(p, cfg) for p in prompts) + 8
    dense_backend = cfg.dense_backend or DENSE_BACKEND[cfg.device]
    dense, sparse = server_specs(model, plan_files, cfg.device, dtype, context, cfg.concurrency, cfg.server_args,
                                 dense_backend)

    sides = [_Side(dense, outs[0] / "eval_logs" / "dense.log", answer_keys(dense, None, prompts, cfg))]
    sides += [_Side(s, o / "eval_logs" / "sparse.log", answer_keys(s, f, prompts, cfg))
              for s, o, f in zip(sparse, outs, plan_files)]
    progress = Progress.open(outs[0])
    reused = sum(k in progress.answers for side in sides for k in side.keys)
    if reused:
        log(f"resuming: {reused} answers from {progress.path}")
    with tqdm(total=len(sides) * len(prompts), initial=reused, desc="eval", unit="prompt") as bar:
        startup = _serve(sides, prompts, cfg, progress, bar)

    def answers(side: _Side) -> list[dict]:
        return [{"score": score(progress.answers[k]["answer"], p.refs, TASKS[p.task].scoring), **progress.answers[k]}
                for p, k in zip(prompts, side.keys)]

    dense_answers = answers(sides[0])
    accelerator = accelerator_name(cfg.device)
    paths = []
    for side, plan, plan_file, out in zip(sides[1:], plans, plan_files, outs):
        rows = [{"task": p.task, "length": p.length, "index": p.index, "depth": p.depth, "tokens": len(p.input_ids),
                 "refs": p.refs, "dense": d, "sparse": s} for p, d, s in zip(prompts, dense_answers, answers(side))]
        doc = {"schema": SCHEMA, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "argv": sys.argv, "model": str(model), "plan": str(plan_file.parent),
               "settings": {"device": cfg.device, "accelerator": accelerator, "dtype": dtype,
                            "dense_backend": dense_backend,
                            "greedy": True, "radix_cache": False, "context_length": context, "lengths": lengths,
                            "per_task": cfg.per_task, "tasks": cfg.tasks, "max_new_tokens": cfg.max_new_tokens,
                            "concurrency": cfg.concurrency, "parallel_servers": cfg.parallel_servers,
                            "servers": {"dense": [dense.module, *dense.args],
                                        "sparse": [side.spec.module, *side.spec.args]},
                            "startup_s": {"dense": startup.get(dense.name), "sparse": startup.get(side.spec.name)},
                            "interval": "95 % paired percentile bootstrap over prompts, 10,000 resamples"},
               "density": {str(n): plan.mean_density(n) for n in lengths},
               "summary": summary_doc(rows), "rows": rows}
        path = save_eval(doc, out)
        plot_accuracy(doc, out / PLOT_NAME)
        log("\n".join(summary_lines(doc)))
        log(f"eval written to {path} and {out / PLOT_NAME}")
        paths.append(path)
    progress.finish()
    return paths
