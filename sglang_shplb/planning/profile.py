"""Stage 1: profile each head's sparsity elasticity on a real model.

For every layer and query head we capture post-RoPE q and k (and v) inside the model's attention,
and for every candidate budget (:func:`default_options`) measure, over sampled query rows:

* **recall**: the attention mass (dense softmax) that falls in the blocks the pattern keeps;
* **output error**: ``‖o_sparse − o_dense‖ / ‖o_dense‖`` where ``o_sparse`` renormalises attention
  over the kept blocks (what a sparse kernel computes);
* **question recall**: the recall of the last ``QUESTION_ROWS`` rows only. Calibration prompts end with
  their retrieval question and the chat template's turn to answer, so these are the rows that must find
  the needle, and the rows decode continues from. The mean over all rows is dominated by rows whose attention is local (a streaming window keeps
  0.95 of it while the question rows lose the needle); the budget stage holds both. Kept as the worst
  prompt of each (set, length), since one missed needle is one wrong answer;
* **needle mass** and **needle recall**: of the question rows' dense attention, the share on the tokens
  of the needle that answers the question (a head's retrieval score, as DuoAttention and RazorAttention
  score retrieval heads), and the share of that mass an option keeps. A needle is a few tokens among
  thousands, so a head can keep 0.9 of its mass and lose the answer: the budget stage weighs needle
  recall by needle mass (:func:`sglang_shplb.planning.budget.option_table`).

Top-k is measured twice: with the oracle selection (true block mass, an upper bound) and with the
pooled-q·k estimator a kernel can afford (this one feeds the budgets). Vertical-slash selects from
the last query block's attention, as MInference does.

Cost per head at ``n`` tokens with ``R`` sampled rows: one ``R×n`` score matrix and one block-wise
``P·V`` (``R·n·d`` each); every option then costs ``R·nb·d`` on top.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from sglang_shplb.core import block_masks as bm
from sglang_shplb.core.patterns import BLOCK, HeadBudget, Pattern

STREAM_WINDOWS = (64, 128, 256, 512, 1024, 2048)
#: the prompt's last rows: the calibration question (12 tokens) and the chat template's answer turn (5)
QUESTION_ROWS = 16
TOPK_FRACTIONS = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75)
VSLASH_FRACTIONS = (0.05, 0.1, 0.2, 0.3, 0.5)


@dataclass(frozen=True)
class Option:
    """One candidate (pattern, budget). ``family`` tells top-k oracle from estimator apart."""

    family: str  # "dense" | "streaming" | "topk" | "topk_oracle" | "vslash"
    budget: HeadBudget

    @property
    def deployable(self) -> bool:
        """Can a kernel run it (the oracle needs the dense attention it wants to avoid)?"""
        return self.family != "topk_oracle"

    def label(self) -> str:
        return ("oracle-" if self.family == "topk_oracle" else "") + self.budget.describe()


def default_options(sink_tokens: int = BLOCK, min_blocks: int = 4,
                    topk_tiles: tuple[int, ...] = (BLOCK,)) -> list[Option]:
    """``topk_tiles``: selection granularities of the top-k options (``(64, 128)`` profiles both)."""
    opts = [Option("dense", HeadBudget.dense())]
    opts += [Option("streaming", HeadBudget.streaming(sink_tokens, w)) for w in STREAM_WINDOWS]
    for fam in ("topk", "topk_oracle"):
        opts += [Option(fam, HeadBudget.topk(f, min_blocks, t)) for t in topk_tiles for f in TOPK_FRACTIONS]
    opts += [Option("vslash", HeadBudget.vslash(f, min_blocks)) for f in VSLASH_FRACTIONS]
    return opts


def sample_rows(n: int, rows_per_block: int, seed: int = 0) -> torch.Tensor:
    """Query rows to score: ``rows_per_block`` seeded rows of every block, the whole last block
    (vertical-slash reads it) and the last ``QUESTION_ROWS`` rows."""
    g = torch.Generator().manual_seed(seed)
    nb = math.ceil(n / BLOCK)
    rows = []
    for b in range(nb - 1):
        rows.append(b * BLOCK + torch.randperm(BLOCK, generator=g)[:rows_per_block])
    rows.append(torch.arange(max(0, min((nb - 1) * BLOCK, n - QUESTION_ROWS)), n))
    return torch.cat(rows).unique()  # sorted


class Elasticity(NamedTuple):
    """One layer on one sequence, each ``[Hq, options]``."""

    recall: torch.Tensor   # mean over the sampled rows
    err: torch.Tensor      # relative output error over the sampled rows
    qrecall: torch.Tensor  # mean over the last QUESTION_ROWS rows (the question)
    nmass: torch.Tensor    # [Hq]: the question rows' mean dense attention on the answer's needle
    nrecall: torch.Tensor  # the share of that mass each option keeps (1 where there is none)


def layer_elasticity(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, options: list[Option],
                     rows: torch.Tensor, needle: tuple[int, int] | None = None) -> Elasticity:
    """Recall, output error, question recall and needle recall of one layer on one sequence.

    ``q [Hq, n, d]``, ``k, v [Hkv, n, d]`` (post-RoPE), float32 on any device; ``needle``: the token
    range ``[start, end)`` of the answer's needle (None: no needle, mass 0 and recall 1).
    """
    hq, n, d = q.shape
    group = hq // k.shape[0]
    nb = math.ceil(n / BLOCK)
    pad = nb * BLOCK - n
    rows = rows.to(q.device)
    row_block = rows // BLOCK
    last_rows = row_block == nb - 1
    question = rows >= n - QUESTION_ROWS  # all of them when the rows come from sample_rows
    causal = torch.arange(n, device=q.device)[None, :] > rows[:, None]
    tiles = {o.budget.tile for o in options if o.budget.pattern is Pattern.TOPK}
    est_scores = {t: bm.pooled_block_scores(q, k, t) for t in tiles if any(o.family == "topk" for o in options)}
    recall = torch.zeros(hq, len(options))
    err = torch.zeros(hq, len(options))
    qrecall = torch.zeros(hq, len(options))
    nmass = torch.zeros(hq)
    nrecall = torch.ones(hq, len(options))
    in_needle = torch.zeros(n, device=q.device)
    if needle is not None:
        in_needle[needle[0]:needle[1]] = 1.0
    needle_mass = torch.nn.functional.pad(in_needle, (0, pad)).view(nb, BLOCK)  # [nb, BLOCK] 0/1
    for h in range(hq):
        kh, vh = k[h // group].float(), v[h // group].float()
        s = (q[h, rows].float() @ kh.T) / math.sqrt(d)
        p = s.masked_fill(causal, float("-inf")).softmax(-1)  # [R, n]
        pb = torch.nn.functional.pad(p, (0, pad)).view(-1, nb, BLOCK)
        mass = pb.sum(-1)  # [R, nb]
        vb = torch.nn.functional.pad(vh, (0, 0, 0, pad)).view(nb, BLOCK, d)
        ob = torch.einsum("rbt,btd->rbd", pb, vb)  # per-block partial outputs
        dense_out = ob.sum(1)
        dense_norm = dense_out.norm()
        # true block mass per query block [nb, nb]; per query pair and KV superblock for tile-128 top-k
        oracle = {t: _mean_by_block(torch.nn.functional.pad(mass, (0, -nb % (t // BLOCK))).view(len(rows), -1, t // BLOCK)
                                    .sum(-1), row_block // (t // BLOCK), math.ceil(nb * BLOCK / t)) for t in tiles}
        last_mass = mass[last_rows].mean(0)
        # per question row and KV block, the attention on needle tokens [R_question, nb]
        on_needle = (pb[question] * needle_mass[None]).sum(-1)
        nmass[h] = on_needle.sum(-1).mean().item()
        for j, opt in enumerate(options):
            b = opt.budget
            if b.pattern is Pattern.DENSE:
                mask = bm.causal_block_mask(nb, q.device)
            elif b.pattern is Pattern.STREAMING:
                mask = bm.streaming_mask(b, nb, q.device)
            elif b.pattern is Pattern.TOPK:
                mask = bm.topk_mask(b, oracle[b.tile] if opt.family == "topk_oracle" else est_scores[b.tile][h], nb)
            else:
                mask = bm.vslash_mask(b, last_mass)
            sel = mask[row_block].float()  # [R, nb]
            kept = (mass * sel).sum(1)
            out = torch.einsum("rb,rbd->rd", sel, ob) / kept.clamp_min(1e-30)[:, None]
            recall[h, j] = kept.mean().item()
            qrecall[h, j] = kept[question].mean().item()
            if nmass[h] > 0:
                nrecall[h, j] = ((on_needle * sel[question]).sum(-1).mean() / nmass[h]).item()
            err[h, j] = ((out - dense_out).norm() / dense_norm).item()
    return Elasticity(recall, err, qrecall, nmass, nrecall)


def _mean_by_block(mass: torch.Tensor, row_block: torch.Tensor, nb: int) -> torch.Tensor:
    out = torch.zeros(nb, mass.shape[1], device=mass.device)
    out.index_add_(0, row_block, mass)
    cnt = torch.bincount(row_block, minlength=nb).clamp_min(1)
    return out / cnt[:, None]


@dataclass
class ProfileResult:
    """Mean recall/error over the prompts of each (calibration set, context length); question recall is
    the worst prompt's."""

    options: list[Option]
    lengths: list[int]
    num_layers: int
    num_heads: int
    # key (set, length) → [layers, heads, options]
    recall: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)
    err: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)
    qrecall: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)  # empty in profiles before it
    nmass: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)  # [layers, heads], the prompts' max
    nrecall: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)  # the worst prompt's
    prompts: list[dict] = field(default_factory=list)
    model: dict = field(default_factory=dict)  # ModelSpec.to_dict() of the profiled checkpoint, and its path

    @property
    def sets(self) -> list[str]:
        return sorted({s for s, _ in self.recall})

    def pooled(self, what: str = "recall") -> dict[int, torch.Tensor]:
        """Per length, over calibration sets: ``[layers, heads, options]`` (``[layers, heads]`` for
        ``"nmass"``), the mean; the worst set for question and needle recall, the largest needle mass."""
        src = self._metrics()[what]
        stacked = {n: torch.stack([src[(s, n)] for s in self.sets if (s, n) in src]) for n in self.lengths}
        worst = {"qrecall": lambda t: t.min(0).values, "nrecall": lambda t: t.min(0).values,
                 "nmass": lambda t: t.max(0).values}
        return {n: worst.get(what, lambda t: t.mean(0))(t) for n, t in stacked.items()}

    def _metrics(self) -> dict[str, dict[tuple[str, int], torch.Tensor]]:
        return {"recall": self.recall, "err": self.err, "qrecall": self.qrecall, "nmass": self.nmass,
                "nrecall": self.nrecall}


class ElasticityProfiler:
    """Runs a Hugging Face causal LM on calibration prompts with a capturing attention function."""

    ATTN_NAME = "shplb_elasticity"

    def __init__(self, model, options: list[Option], rows_per_block: int = 8, progress=None):
        from transformers import AttentionInterface
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        self.model = model
        self.options = options
        self.rows_per_block = rows_per_block
        self.progress = progress
        self._acc: dict[int, Elasticity] = {}
        self._needle: tuple[int, int] | None = None

        def capture(module, query, key, value, attention_mask, **kwargs):
            # query [1, Hq, n, d], key/value [1, Hkv, n, d], RoPE applied
            n = query.shape[2]
            rows = sample_rows(n, self.rows_per_block, seed=n)
            with torch.no_grad():
                self._acc[module.layer_idx] = layer_elasticity(query[0], key[0], value[0], self.options, rows,
                                                               self._needle)
            if self.progress is not None:
                self.progress.update(1)
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

        AttentionInterface.register(self.ATTN_NAME, capture)
        model.set_attn_implementation(self.ATTN_NAME)

    @torch.no_grad()
    def run(self, input_ids: list[int], needle: tuple[int, int] | None = None) -> Elasticity:
        """Each ``[layers, heads, options]`` (``nmass [layers, heads]``), for one prompt."""
        self._acc.clear()
        self._needle = needle
        dev = next(self.model.parameters()).device
        self.model(torch.tensor([input_ids], device=dev), use_cache=False, logits_to_keep=1)
        layers = sorted(self._acc)
        return Elasticity(*(torch.stack([getattr(self._acc[i], f) for i in layers]) for f in Elasticity._fields))


def profile_model(model_dir, lengths: list[int], sets: tuple[str, ...] = ("A", "B"), per_length: int = 1,
                  device: str = "cpu", rows_per_block: int = 4, num_layers: int | None = None,
                  options: list[Option] | None = None, log=print) -> ProfileResult:
    """Profile every head of the checkpoint at ``model_dir`` on generated calibration prompts.

    ``num_layers`` truncates the model (tests); lengths above the model's context are refused.
    """
    from tqdm.auto import tqdm
    from transformers import AutoConfig

    from sglang_shplb.planning.calibration_data import calibration_prompts
    from sglang_shplb.planning.model_store import load_model

    cfg = AutoConfig.from_pretrained(model_dir)
    limit = getattr(cfg, "max_position_embeddings", None)
    if limit and max(lengths) > limit:
        raise ValueError(f"calibration length {max(lengths)} exceeds the model's context {limit}")
    model, tok = load_model(model_dir, device, num_layers)
    options = options or default_options()
    n_layers, n_heads = model.config.num_hidden_layers, model.config.num_attention_heads
    from sglang_shplb.core.model_spec import ModelSpec

    res = ProfileResult(options, sorted(lengths), n_layers, n_heads,
                        model={**ModelSpec.from_config(model.config).to_dict(), "checkpoint": str(model_dir)})
    work = [(s, p) for s in sets for p in calibration_prompts(tok, sorted(lengths), s, per_length)]
    bar = tqdm(total=len(work) * n_layers, desc="profiling heads", unit="layer")
    prof = ElasticityProfiler(model, options, rows_per_block, progress=bar)
    runs: dict[tuple[str, int], list[Elasticity]] = {}
    for s, p in work:
        bar.set_postfix_str(f"set {s}, {len(p.input_ids)} tokens")
        runs.setdefault((s, len(p.input_ids)), []).append(prof.run(p.input_ids, p.needles[0]))
        res.prompts.append({"set": s, "name": p.name, "tokens": len(p.input_ids)})
    bar.close()
    for key, vals in runs.items():
        res.recall[key] = torch.stack([e.recall for e in vals]).mean(0)
        res.err[key] = torch.stack([e.err for e in vals]).mean(0)
        res.qrecall[key] = torch.stack([e.qrecall for e in vals]).min(0).values
        res.nmass[key] = torch.stack([e.nmass for e in vals]).max(0).values
        res.nrecall[key] = torch.stack([e.nrecall for e in vals]).min(0).values
    return res


def save_profile(res: ProfileResult, out_dir) -> Path:
    import json
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for (s, n), t in res.recall.items():
        tensors[f"recall.{s}.{n}"] = t.contiguous()
        tensors[f"err.{s}.{n}"] = res.err[(s, n)].contiguous()
        for what in ("qrecall", "nmass", "nrecall"):
            if (s, n) in getattr(res, what):
                tensors[f"{what}.{s}.{n}"] = getattr(res, what)[(s, n)].contiguous()
    save_file(tensors, str(out / "profile.safetensors"))
    doc = {"schema": "shplb-profile/1", "num_layers": res.num_layers, "num_heads": res.num_heads,
           "lengths": res.lengths, "options": [{"family": o.family, "budget": o.budget.to_dict()} for o in res.options],
           "prompts": res.prompts, "model": res.model}
    path = out / "profile.json"
    path.write_text(json.dumps(doc, indent=1))
    return path


def load_profile(path) -> ProfileResult:
    import json
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        path = path / "profile.json"
    doc = json.loads(path.read_text())
    if doc.get("schema") != "shplb-profile/1":
        raise ValueError(f"{path} is not a sglang_shplb profile (schema {doc.get('schema')!r})")
    opts = [Option(o["family"], HeadBudget.from_dict(o["budget"])) for o in doc["options"]]
    res = ProfileResult(opts, doc["lengths"], doc["num_layers"], doc["num_heads"], prompts=doc["prompts"],
                        model=doc.get("model", {}))
    for key, t in load_file(str(path.parent / "profile.safetensors")).items():
        what, s, n = key.split(".")
        res._metrics()[what][(s, int(n))] = t
    return res
