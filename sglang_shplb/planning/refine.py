"""Stage 2b: budgets refined on the model's answers (which heads' sparsity changes what the model says).

The budget stage prices a head's options by attention recall, what a head drops; it cannot see what the
drop does to the answer. This stage measures that on the real model, in the serving dtype, and spends
the density there (DuoAttention's gated heads, to first order):

* **Gate.** Each query head's output becomes ``o_h = s_h + α_h (d_h − s_h)``: ``s_h`` its output under
  its current budget (the kernels' estimators and masks, :func:`build_block_masks`), ``d_h`` its dense
  output; ``α = 0`` is the plan as it is.
* **Loss.** On held-in prompts (calibration-style documents, :func:`held_in_prompts`: the profile's text
  with seeds the profile never used, never the eval's text or needles) the dense model's own greedy answer
  is teacher-forced (:data:`ANSWER_TOKENS` of it, per question), and the loss is ``KL(dense ‖ gated)`` of
  the next-token distributions over the answer tokens: zero when the plan answers like dense. The prompt's
  rows attend by the prefill masks, the answer's rows by the server's decode rule (the server feeds each
  answer token as one decode step; sparse decode cost 4-12 points of the eval's needle tasks on the H200,
  ``bench/results/eval_h200_round3``).
* **Sensitivity.** ``S_h = max(0, −∂loss/∂α_h)`` at ``α = 0``, summed over the prompts: how much making
  head ``h`` dense would lower the loss, to first order. One backward pass per prompt gives all heads.
* **Allocation.** Option ``o`` of head ``h`` closes ``(R_ho − R_hc) / (1 − R_hc)`` of the head's recall gap
  (``R`` the budget stage's recall table, ``c`` the current option), so its predicted gain is ``S_h`` times
  that; heads are upgraded greedily by gain per unit of extra mean density, ``step`` of density per round,
  with the sensitivities measured again after each round (upgrading one head changes what the others
  matter), until the density target (or until less than :data:`LAST_ROUND_MIN` of a step is left).
* **Validation.** After each round the held-in prompts are answered greedily by dense and by the plan
  (sparse prefill and the server's sparse decode rule, :func:`register_sparse_attention`); a prompt is
  kept when the plan is right wherever dense is. With ``until_match`` the rounds go on past the target
  until every held-in prompt is kept (or ``max_density``).
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from sglang_shplb.core.patterns import HeadBudget
from sglang_shplb.planning.budget import (BudgetResult, BudgetsFile, budget_result, budgets_of, greedy_upgrade,
                                          option_table, topk_floor, upgrades_within)
from sglang_shplb.planning.calibration_data import DEFAULT_QUESTIONS, CalibrationPrompt, make_prompt
from sglang_shplb.planning.profile import ProfileResult
from sglang_shplb.planning.quality import ATTN_NAME, masked_prefill, register_sparse_attention

GATED_NAME = "shplb_gated"
REFINE_NAME = "refine.json"
#: held-in prompts use seeds from here on (the profile's prompts use 0 .. per_length - 1)
HELD_IN_SEED = 1000
#: how much of the dense answer is teacher-forced, per question: its answer sentence and a few tokens more
#: ("The value of the register harbor-70 is 422." is 15 tokens, a reply to "values" ~25); what the model
#: rambles on after it says nothing of retrieval and would dominate the KL (round 7 forced 32 for all)
ANSWER_TOKENS = {"passkey": 14, "register": 18, "facts": 12, "keepers": 16, "values": 32}
#: refine stops when the density left is under this fraction of a round's step: a sensitivity pass costs
#: as much for one head's upgrade as for fifty (round 7 spent its third pass on 0.00005 of density)
LAST_ROUND_MIN = 0.1
#: ``plan``'s default refine: one round from the budget stage's density target to this mean density (at the
#: longest profiled length) on 16 held-in prompts of 2048 tokens (19 minutes of the 2-core CPU in the default run
#: of 2026-12-05; the recipe of the plans that kept every eval task within 2 points, bench/results/eval_cpu
#: rounds 10-14, eval_h100_round11-13)
DEFAULT_REFINE_TO = 0.25
DEFAULT_REFINE_PROMPTS = 16
DEFAULT_REFINE_LENGTHS = (2048,)


@dataclass
class HeldIn:
    prompt: CalibrationPrompt
    answer_ids: list[int]      # the dense model's greedy answer (up to and with its first EOS)
    dense_answer: str
    dense_logprobs: torch.Tensor  # [A, vocab] float32, the dense next-token log-probs over the answer

    @property
    def dense_correct(self) -> bool:
        return replied(self.prompt, self.dense_answer)


@dataclass
class Round:
    density: float                 # mean density at the reference length after this round
    loss: float                    # KL summed over the held-in prompts before this round's upgrades
    upgraded: int                  # heads upgraded in this round
    kept: int                      # held-in prompts where the plan is right wherever dense is
    sparse_correct: int
    answers: list[str] = field(default_factory=list)


@dataclass
class RefineResult:
    result: BudgetResult           # the refined budgets, their recall and density
    sensitivity: np.ndarray        # [L, H] of the last round measured
    rounds: list[Round]
    dense_correct: int
    prompts: int


def held_in_prompts(tokenizer, lengths: list[int], count: int,
                    questions: tuple[str, ...] = DEFAULT_QUESTIONS) -> list[CalibrationPrompt]:
    """``count`` calibration-style documents, lengths cycling, sets A/B alternating, ``questions`` cycling in
    pairs (:data:`~sglang_shplb.planning.calibration_data.QUESTIONS` names them all: pass key, register
    lookup, a word from a fact list, every value of a register, a lighthouse's keeper), seeds from
    :data:`HELD_IN_SEED` (disjoint from the profile's)."""
    return [make_prompt(tokenizer, lengths[i % len(lengths)], "AB"[i % 2], HELD_IN_SEED + i,
                        questions[(i // 2) % len(questions)]) for i in range(count)]


def answered(answer: str, text: str) -> bool:
    """``answer`` (a number or a word) stands in ``text`` whole, not inside a longer number or word (case
    ignored)."""
    return re.search(rf"(?<![0-9A-Za-z]){re.escape(answer)}(?![0-9A-Za-z])", text, re.IGNORECASE) is not None


def replied(prompt: CalibrationPrompt, text: str) -> bool:
    """``text`` names every value the prompt asks for (:func:`answered`)."""
    return all(answered(a, text) for a in prompt.answers)


def _progress(items: list, desc: str):
    """A progress bar over the held-in prompts (a round takes minutes per prompt set on a CPU thread)."""
    from tqdm.auto import tqdm
    return tqdm(items, desc=desc, unit="prompt", leave=False)


def _eos_ids(model) -> set[int]:
    eos = model.generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [eos])


def generate_greedy(model, ids: list[int], max_new: int) -> list[int]:
    """Greedy continuation of ``ids`` (at most ``max_new`` tokens, up to and including the first EOS)."""
    x = torch.tensor([ids], device=model.device)
    eos = _eos_ids(model)
    gen = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new, do_sample=False,
                         pad_token_id=min(eos))[0, len(ids):].tolist()
    end = next((i + 1 for i, t in enumerate(gen) if t in eos), len(gen))
    return gen[:end]


def _answer_logprobs(model, ids: list[int], answer: list[int]) -> torch.Tensor:
    """``[A, vocab]`` log-probs of the next token at each answer position, teacher-forced."""
    x = torch.tensor([ids + answer], device=model.device)
    logits = model(input_ids=x, logits_to_keep=len(answer) + 1, use_cache=False).logits[0, :len(answer)]
    return torch.log_softmax(logits.float(), -1)


@torch.no_grad()
def dense_answers(model, tokenizer, prompts: list[CalibrationPrompt], max_new: int | None = None) -> list[HeldIn]:
    """The dense model's greedy answers, :data:`ANSWER_TOKENS` of the prompt's question (or ``max_new``)."""
    model.set_attn_implementation("sdpa")
    out = []
    for p in _progress(prompts, "refine: dense answers"):
        ans = generate_greedy(model, p.input_ids, max_new or ANSWER_TOKENS[p.question])
        out.append(HeldIn(p, ans, tokenizer.decode(ans, skip_special_tokens=True).strip(),
                          _answer_logprobs(model, p.input_ids, ans)))
    return out


def _register_gated(budgets: list[list[HeadBudget]], alpha: torch.Tensor, prompt: dict) -> None:
    """``prompt["len"]``: the prompt's length in the forward to come; the answer rows after it take the
    decode rule (:func:`masked_prefill`'s ``decode_from``)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def gated(module, query, key, value, attention_mask, **kwargs):
        dense, _ = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)  # [1, n, H, d]
        sparse = masked_prefill(budgets[module.layer_idx], query, key, value, kwargs.get("scaling"),
                                decode_from=prompt["len"])
        a = alpha[module.layer_idx][None, None, :, None]
        return (sparse + a * (dense.float() - sparse)).to(query.dtype), None

    AttentionInterface.register(GATED_NAME, gated)


def gate_sensitivity(model, budgets: list[list[HeadBudget]], held: list[HeldIn]) -> tuple[np.ndarray, float]:
    """``S [L, H]`` (see the module docstring) and the loss at ``α = 0``, summed over ``held``."""
    cfg = model.config
    alpha = torch.zeros(cfg.num_hidden_layers, cfg.num_attention_heads, device=model.device, requires_grad=True)
    prompt = {"len": None}
    _register_gated(budgets, alpha, prompt)
    model.set_attn_implementation(GATED_NAME)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()  # checkpointing is active in training mode only; SmolLM2/Llama attention has no dropout
    total = 0.0
    try:
        for h in _progress(held, "refine: head sensitivities"):
            prompt["len"] = len(h.prompt.input_ids)
            lp = _answer_logprobs(model, h.prompt.input_ids, h.answer_ids)
            ref = h.dense_logprobs.to(lp.device)
            loss = (ref.exp() * (ref - lp)).sum()
            loss.backward()
            total += loss.item()
    finally:
        model.eval()
        model.gradient_checkpointing_disable()
        model.set_attn_implementation("sdpa")
    return (-alpha.grad).clamp(min=0).cpu().numpy(), total


@torch.no_grad()
def sparse_answers(model, tokenizer, budgets: list[list[HeadBudget]], held: list[HeldIn]) -> list[str]:
    """Greedy answers with the plan's sparse prefill and the server's sparse decode rule."""
    register_sparse_attention(budgets)
    model.set_attn_implementation(ATTN_NAME)
    try:
        return [tokenizer.decode(generate_greedy(model, h.prompt.input_ids, len(h.answer_ids) or 1),
                                 skip_special_tokens=True).strip()
                for h in _progress(held, "refine: sparse answers")]
    finally:
        model.set_attn_implementation("sdpa")


def upgrade(choice: np.ndarray, dens: np.ndarray, recall: np.ndarray, sens: np.ndarray, spend: float) -> np.ndarray:
    """Spend ``spend`` of mean density on the best predicted gain per unit of density (module docstring):
    gain of option ``o`` for head ``h`` = ``sens[h] · (R[h,o] − R[h,c]) / (1 − R[h,c])``. Pure."""
    def gain(choice: np.ndarray) -> np.ndarray:
        cur = np.take_along_axis(recall, choice[..., None], -1)
        return sens[..., None] * (recall - cur) / np.maximum(1.0 - cur, 1e-6)

    return greedy_upgrade(choice, dens, spend, gain)


def option_choice(budgets: list[list[HeadBudget]], opts) -> np.ndarray:
    """The option index of every head's budget; a budget that is not one of the profile's options is refused."""
    index = {o.budget: i for i, o in enumerate(opts)}
    try:
        return np.array([[index[b] for b in layer] for layer in budgets])
    except KeyError as e:
        raise ValueError(f"budget {e.args[0]} is not one of the profile's options: refine budgets made from "
                         f"this profile") from None


def refine_budgets(model, tokenizer, budgets: BudgetsFile, profile: ProfileResult, held: list[HeldIn],
                   density_target: float | None = None, step: float = 0.05, until_match: bool = False,
                   max_density: float = 1.0, log=print) -> RefineResult:
    if density_target is None and not until_match:
        raise ValueError("give a density target, or until_match")
    if not step > 0:
        raise ValueError(f"step must be > 0, got {step}")
    mode = budgets.mode
    rows = "all" if "all rows" in mode else "question" if "question rows" in mode else "needle"
    # the options with the top-k floor the budgets were chosen with, so upgrades keep it
    opts, dens, recall = option_table(profile, budgets.ref_len, rows=rows, topk_min_blocks=topk_floor(budgets.budgets))
    cfg = model.config
    if (len(budgets.budgets), len(budgets.budgets[0])) != (cfg.num_hidden_layers, cfg.num_attention_heads):
        raise ValueError(f"budgets for {len(budgets.budgets)} x {len(budgets.budgets[0])} heads, the model has "
                         f"{cfg.num_hidden_layers} x {cfg.num_attention_heads}")
    choice = option_choice(budgets.budgets, opts)
    target = min(max_density, density_target if density_target is not None else max_density)
    if dens[choice].mean() > target + 1e-9:
        raise ValueError(f"the budgets' mean density {dens[choice].mean():.3f} is already above the target {target}")
    rounds: list[Round] = []
    sens = np.zeros(choice.shape)
    dense_ok = [h.dense_correct for h in held]

    def validate(loss: float, upgraded: int) -> Round:
        answers = sparse_answers(model, tokenizer, budgets_of(opts, choice), held)
        right = [replied(h.prompt, a) for h, a in zip(held, answers)]
        r = Round(float(dens[choice].mean()), loss, upgraded, sum(s or not d for s, d in zip(right, dense_ok)),
                  sum(right), answers)
        log(f"  refine round {len(rounds)}: density {r.density:.3f}, loss before {loss:.3f}, {upgraded} heads "
            f"upgraded; held-in kept {r.kept}/{len(held)}, sparse right {r.sparse_correct}, dense right "
            f"{sum(dense_ok)}")
        return r

    rounds.append(validate(float("nan"), 0))
    while True:
        done_target = density_target is None or dens[choice].mean() >= density_target - 1e-6
        done_match = not until_match or rounds[-1].kept == len(held)
        if (done_target and done_match) or dens[choice].mean() >= max_density - 1e-6:
            break
        left = (density_target if not done_target else max_density) - dens[choice].mean()
        if left < LAST_ROUND_MIN * step:
            log(f"  refine: the density left ({left:.4f}) is under {LAST_ROUND_MIN:g} of a round's step; stopping")
            break
        if not upgrades_within(choice, dens, min(step, left))[1].any():
            log(f"  refine: no head's upgrade fits in the density left ({left:.4f}); stopping")
            break
        sens, loss = gate_sensitivity(model, budgets_of(opts, choice), held)
        new = upgrade(choice, dens, recall, sens, min(step, left))
        changed = int((new != choice).sum())
        if changed == 0:
            log("  refine: no upgrade has a predicted gain within the density left; stopping")
            break
        choice = new
        rounds.append(validate(loss, changed))
    result = budget_result(opts, dens, recall, choice, budgets.ref_len,
                           f"{budgets.mode}, refined to {rounds[-1].density:.3f} on answers")
    return RefineResult(result, sens, rounds, sum(dense_ok), len(held))


def refined_file(budgets: BudgetsFile, res: RefineResult) -> BudgetsFile:
    r = res.result
    return BudgetsFile(budgets.model, r.mode, r.ref_len, budgets.tau, r.budgets, r.recall, r.density, budgets.stability)


def save_refine(res: RefineResult, held: list[HeldIn], folder) -> Path:
    path = Path(folder) / REFINE_NAME
    doc = {"prompts": [{"name": h.prompt.name, "tokens": len(h.prompt.input_ids), "answer": h.prompt.answer,
                        "dense": h.dense_answer} for h in held],
           "dense_correct": res.dense_correct, "rounds": [asdict(r) for r in res.rounds],
           "sensitivity": np.round(res.sensitivity, 6).tolist()}
    path.write_text(json.dumps(doc, indent=1, allow_nan=True))
    return path

