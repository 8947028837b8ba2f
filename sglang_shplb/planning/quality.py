"""Dense vs sparse on the real model: the same prompts, device and dtype, greedy answers compared.

The sparse run replaces every layer's attention by the plan's per-head budgets: prefill by block masks
(:func:`sglang_shplb.core.block_masks.build_block_masks` with the kernels' estimators, computed by the
masked-attention reference of :mod:`sglang_shplb.kernels.reference`), and each decode step of the answer
by the server's own decode reference (:func:`sglang_shplb.kernels.layer_reference.sparse_decode`, over the
model's KV cache laid out as one request in a token pool). Decode must be in the check: a decode rule that
loses the question (a streaming window that, at a block's first token, held only that token) wrecked
answers whose sparse prefill alone was right. Prompts are classic passkey-retrieval prompts
(:func:`sglang_shplb.planning.calibration_data.passkey_prompt`), not the profile's calibration documents.
The rows are kept beside the plan as ``quality.json`` (:func:`save_quality`, :func:`load_quality`).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from sglang_shplb.core.block_masks import build_block_masks
from sglang_shplb.planning.calibration_data import passkey_prompt
from sglang_shplb.kernels.layer_reference import sparse_decode
from sglang_shplb.kernels.reference import (SelectionMemory, dense_tail_rows, masked_attention,
                                            reference_page_summaries)
from sglang_shplb.core.patterns import BLOCK, DECODE_RESELECT_EVERY, HeadBudget
from sglang_shplb.core.patterns import decode_budgets as at_decode

ATTN_NAME = "shplb_sparse_prefill"
QUALITY_NAME = "quality.json"


def register_sparse_attention(budgets: list[list[HeadBudget]],
                              decode_budgets: list[list[HeadBudget]] | None = None,
                              reselect_every: int = DECODE_RESELECT_EVERY) -> None:
    """Register ``ATTN_NAME`` with transformers: the plan's sparse prefill (block masks) and decode (the
    server's rule, page selections kept for ``reselect_every`` steps) for
    ``model.set_attn_implementation(ATTN_NAME)``; ``decode_budgets`` (default: the server's,
    :func:`~sglang_shplb.core.patterns.decode_budgets` of each layer) are the budgets the decode steps follow.
    One request at a time: a prefill starts a new one."""
    decode_budgets = [at_decode(layer) for layer in budgets] if decode_budgets is None else decode_budgets
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    memory = SelectionMemory(reselect_every)

    def sparse(module, query, key, value, attention_mask, **kwargs):
        if query.shape[2] == 1:  # decode step: the serving reference over the cache as a token pool
            out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)  # [1, 1, H, d]
            n = key.shape[2]
            one = torch.zeros(1, dtype=torch.long, device=query.device)
            sparse_decode(query[0].transpose(0, 1).contiguous(), key[0].transpose(0, 1).contiguous(),
                          value[0].transpose(0, 1).contiguous(),
                          torch.arange(n, device=query.device, dtype=torch.int32)[None], one, one + n,
                          decode_budgets[module.layer_idx], kwargs.get("scaling") or module.scaling, out[0],
                          memory, module.layer_idx)
            return out, None
        memory.forget()
        return masked_prefill(budgets[module.layer_idx], query, key, value, kwargs.get("scaling")).to(query.dtype), None

    AttentionInterface.register(ATTN_NAME, sparse)


def masked_prefill(budgets: list[HeadBudget], query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   scaling: float | None, decode_from: int | None = None) -> torch.Tensor:
    """One layer's prefill under its budgets, from transformers' attention inputs (``query [1, H, n, d]``,
    ``key/value [1, Hkv, n, d]``): the kernels' block masks (no gradient through their choice), masked dense
    attention per KV group, the prompt's :data:`~sglang_shplb.core.patterns.DENSE_TAIL` rows dense (as the server
    computes them). Rows from ``decode_from`` on (teacher-forced answer tokens, which the server feeds
    one decode step each) follow the decode rule instead (:func:`decode_rows`). Returns float32 ``[1, n, H,
    d]``, differentiable in q, k, v."""
    q, k, v = query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1)  # [n, H, d]
    n = q.shape[0]
    stop = n if decode_from is None else min(max(decode_from, 0), n)
    with torch.no_grad():   # the prompt's masks from the prompt alone, as the server builds them
        masks = build_block_masks(budgets, query[0, :, :stop], key[0, :, :stop])
    group = q.shape[1] // k.shape[1]
    out = torch.cat([masked_attention(q[:stop, g * group:(g + 1) * group], k[:stop, g:g + 1], v[:stop, g:g + 1],
                                      masks[g * group:(g + 1) * group], scaling)
                     for g in range(k.shape[1])], dim=1)
    tail = dense_tail_rows(q[:stop], k[:stop], v[:stop], scaling)   # the prompt's last rows attend densely
    out = torch.cat([out[:stop - tail.shape[0]], tail])
    if stop < n:
        out = torch.cat([out, decode_rows(at_decode(budgets), q, k, v, stop, scaling)])
    return out[None]


def decode_rows(budgets: list[HeadBudget], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int,
                scaling: float | None, reselect_every: int = DECODE_RESELECT_EVERY) -> torch.Tensor:
    """Rows ``start .. n-1`` of ``q [n, H, d]`` over ``k/v [n, Hkv, d]``, each as the decode step at its
    position (context ``t + 1``): the pages of the server's decode rule
    (:func:`~sglang_shplb.kernels.reference.reference_decode_pages`: Quest pages for top-k / vertical-slash,
    kept for ``reselect_every`` steps as the server keeps them, sink + decode window for streaming, all for
    dense; chosen without gradient), softmax over their keys up to ``t``. Float32 ``[n - start, H, d]``,
    differentiable in q, k, v."""
    n, hq, d = q.shape
    group = hq // k.shape[1]
    scale = scaling if scaling is not None else d ** -0.5
    npg = -(-n // BLOCK)
    with torch.no_grad():   # which pages each (row, head) reads: [R, H, pages] → key positions [R, H, n]
        table = torch.arange(n, dtype=torch.int32, device=q.device)[None]
        summaries = reference_page_summaries(k, table, 0, n)   # once: a row scores its complete pages only
        pages = torch.zeros(n - start, hq, npg, dtype=torch.bool)
        memory = SelectionMemory(reselect_every)
        for r, t in enumerate(range(start, n)):
            for h, ps in enumerate(memory.pages(0, budgets, q[t], k, table, 0, t + 1, summaries=summaries)):
                pages[r, h, ps] = True
        pos = torch.arange(n, device=q.device)
        allowed = pages.to(q.device).repeat_interleave(BLOCK, -1)[..., :n] \
            & (pos[None, :] <= torch.arange(start, n, device=q.device)[:, None])[:, None, :]
    kk = k.float().repeat_interleave(group, 1)                               # [n, H, d]
    vv = v.float().repeat_interleave(group, 1)
    s = torch.einsum("rhd,nhd->rhn", q[start:].float(), kk) * scale
    return torch.einsum("rhn,nhd->rhd", torch.softmax(s.masked_fill(~allowed, float("-inf")), -1), vv)


@torch.no_grad()
def compare_dense_sparse(model_dir, budgets: list[list[HeadBudget]], lengths: list[int], prompts: int = 4,
                         max_new_tokens: int = 12, device: str = "cpu", num_layers: int | None = None,
                         log=print) -> list[dict]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"num_hidden_layers": num_layers} if num_layers else {}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kwargs).to(device).eval()
    if len(budgets) != model.config.num_hidden_layers:
        raise ValueError(f"{len(budgets)} budget layers for a model of {model.config.num_hidden_layers} layers")
    tok = AutoTokenizer.from_pretrained(model_dir)
    # EOS/PAD come from the model's generation config, never the tokenizer (a GGUF-converted tokenizer can
    # name the BOS as its EOS); the explicit all-ones mask keeps generate from masking any prompt token.
    gen_cfg = model.generation_config
    eos = gen_cfg.eos_token_id
    pad_id = gen_cfg.pad_token_id if gen_cfg.pad_token_id is not None else (eos[0] if isinstance(eos, list) else eos)
    register_sparse_attention(budgets)
    rows = []
    for n, seed in ((n, s) for n in lengths for s in range(prompts)):
        p = passkey_prompt(tok, n, seed)
        ids = torch.tensor([p.input_ids], device=device)
        out = {}
        for mode, impl in (("dense", "sdpa"), ("sparse", ATTN_NAME)):
            model.set_attn_implementation(impl)
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, return_dict_in_generate=True, output_logits=True,
                                 pad_token_id=pad_id)
            out[mode] = (tok.decode(gen.sequences[0, ids.shape[1]:], skip_special_tokens=True).strip(),
                         gen.logits[0][0].float())
        ld, ls = out["dense"][1], out["sparse"][1]
        row = {"tokens": len(p.input_ids), "answer": p.answer, "dense": out["dense"][0], "sparse": out["sparse"][0],
               "dense_correct": p.answer in out["dense"][0], "sparse_correct": p.answer in out["sparse"][0],
               "top1_agree": bool(ld.argmax() == ls.argmax()),
               "logit_rel_diff": float((ld - ls).norm() / ld.norm())}
        log(f"  {len(p.input_ids)} tokens: passkey {p.answer}, dense {row['dense']!r}, sparse {row['sparse']!r}")
        rows.append(row)
    model.set_attn_implementation("sdpa")
    return rows


def save_quality(rows: list[dict], folder) -> Path:
    path = Path(folder) / QUALITY_NAME
    path.write_text(json.dumps(rows, indent=1))
    return path


def load_quality(folder) -> list[dict] | None:
    """The rows of ``folder/quality.json``, or None when there is none."""
    path = Path(folder) / QUALITY_NAME
    return json.loads(path.read_text()) if path.exists() else None
