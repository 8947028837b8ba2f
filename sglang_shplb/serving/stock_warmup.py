"""One start-up request through SGLang's custom-warmup hook (``--warmups``), so that no served request pays for
the stock backend's JIT.

The layers a plan leaves to the stock backend (short buckets, decode at batch 1) run FlashInfer on CUDA, whose
kernels compile on first use. The backend's own warm-up (:mod:`sglang_shplb.kernels.warmup`) covers the sparse
kernels only. Measured (H100, 2026-12-06, round 19, ``bench/results/serve_h100_round19``): on a machine whose
FlashInfer JIT cache was cold, ``shplb``'s first request took 10.2 s, 9 s of it before its first chunk ran,
against a steady 1.05 s; stock FlashInfer's own first request took 7.97 s.

SGLang runs the functions named by ``--warmups`` in the HTTP server's start-up, before it accepts requests. This
one sends a prompt of one chunk plus one page (a chunk without a prefix, then one after a cached prefix) for two
new tokens (decode): the prefill and decode routes of the stock layers, and the kernel path's, compile there. It
does nothing off CUDA (no JIT: the CPU's stock backend is torch_native). ``--shplb-no-warmup`` leaves it out."""
from __future__ import annotations

import logging
import time

from sglang_shplb.core.patterns import BLOCK

logger = logging.getLogger(__name__)

WARMUP_NAME = "shplb_stock_paths"
#: the chunk the request is cut by when chunked prefill is off (SGLang's ``--chunked-prefill-size -1``)
UNCHUNKED_PROMPT = 4096


def warmup_prompt_ids(chunk: int | None, context_len: int, vocab_size: int,
                      max_input_len: int | None = None) -> list[int]:
    """Token ids of the warm-up prompt: one chunk and one page (``chunk + BLOCK`` tokens; ``UNCHUNKED_PROMPT``
    when chunking is off), within ``context_len`` less the two new tokens and below the scheduler's
    ``max_input_len`` (SGLang's ``max_req_input_len``: it refuses a prompt of that length or more, and it is a
    few tokens under the context, e.g. 8,186 for SmolLM2's 8,192); spread over the vocabulary, deterministic."""
    n = (chunk if chunk and chunk > 0 else UNCHUNKED_PROMPT) + BLOCK
    n = min(n, context_len - 2)
    if max_input_len:
        n = min(n, max_input_len - 1)
    n = max(1, n)
    step = 7919                                  # a prime: consecutive ids spread over the vocabulary
    return [(1 + i * step) % vocab_size for i in range(n)]


def with_warmup(sgl_argv: list[str]) -> list[str]:
    """SGLang's argv with :data:`WARMUP_NAME` added to ``--warmups`` (after the user's own warm-ups, if any)."""
    out, i, found = [], 0, False
    while i < len(sgl_argv):
        a = sgl_argv[i]
        if a == "--warmups" and i + 1 < len(sgl_argv):
            out += [a, f"{sgl_argv[i + 1]},{WARMUP_NAME}"]
            i, found = i + 2, True
            continue
        if a.startswith("--warmups="):
            a, found = f"{a},{WARMUP_NAME}", True
        out.append(a)
        i += 1
    return out if found else out + ["--warmups", WARMUP_NAME]


async def warm_stock_paths(disaggregation_mode: str, tokenizer_manager) -> None:
    """SGLang custom warm-up (``async (disaggregation_mode, tokenizer_manager)``): one greedy request of
    :func:`warmup_prompt_ids`, drained; skipped off CUDA."""
    from sglang.srt.managers.io_struct import GenerateReqInput
    sa = tokenizer_manager.server_args
    if sa.device != "cuda":
        logger.info(f"shplb stock-path warm-up: skipped on {sa.device} (no JIT to warm there)")
        return
    ids = warmup_prompt_ids(sa.chunked_prefill_size, tokenizer_manager.context_len,
                            tokenizer_manager.model_config.vocab_size, tokenizer_manager.max_req_input_len)
    req = GenerateReqInput(input_ids=ids, sampling_params={"max_new_tokens": 2, "temperature": 0.0})
    if disaggregation_mode != "null":      # as SGLang's own warm-ups do for a prefill server
        from sglang.srt.disaggregation.utils import FAKE_BOOTSTRAP_HOST
        req.bootstrap_room, req.bootstrap_host = 0, FAKE_BOOTSTRAP_HOST
    t0 = time.perf_counter()
    async for _ in tokenizer_manager.generate_request(req, None):
        pass
    logger.info(f"shplb stock-path warm-up: a {len(ids)}-token prompt and 2 new tokens in "
                f"{time.perf_counter() - t0:.1f} s (the stock backend's kernels compiled before serving)")


def register() -> None:
    """Name :func:`warm_stock_paths` in SGLang's custom-warmup registry (this process: the HTTP server's)."""
    from sglang.srt.entrypoints.warmup import warmup
    warmup(WARMUP_NAME)(warm_stock_paths)
