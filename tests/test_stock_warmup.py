"""The start-up request that warms the stock backend's layers (:mod:`sglang_shplb.serving.stock_warmup`): its
prompt, how it joins SGLang's ``--warmups``, what it sends on CUDA and that it sends nothing elsewhere. (A CPU
server runs it through SGLang's hook in ``test_serving_stock.py``.)"""
import asyncio
import types

from sglang_shplb.core.patterns import BLOCK
from sglang_shplb.serving import stock_warmup
from sglang_shplb.serving.stock_warmup import WARMUP_NAME, warmup_prompt_ids, with_warmup


def test_prompt_is_a_chunk_and_a_page_within_the_context_and_vocabulary():
    ids = warmup_prompt_ids(8192, 131200, 128256)
    assert len(ids) == 8192 + BLOCK and all(0 <= x < 128256 for x in ids) and len(set(ids)) > 1000
    assert len(warmup_prompt_ids(8192, 2048, 49152)) == 2046           # two new tokens fit
    # below the scheduler's limit (SmolLM2 on an H100, round 21: context 8,192, limit 8,186, and a prompt of
    # 8,190 tokens made SGLang refuse the request and the server fail its start-up)
    assert len(warmup_prompt_ids(8192, 8192, 49152, 8186)) == 8185
    assert len(warmup_prompt_ids(8192, 131200, 128256, 131194)) == 8192 + BLOCK
    assert len(warmup_prompt_ids(None, 131200, 100)) == stock_warmup.UNCHUNKED_PROMPT + BLOCK
    assert len(warmup_prompt_ids(-1, 131200, 100)) == stock_warmup.UNCHUNKED_PROMPT + BLOCK
    assert max(warmup_prompt_ids(8192, 131200, 100)) < 100
    assert warmup_prompt_ids(512, 4096, 1000) == warmup_prompt_ids(512, 4096, 1000)   # deterministic


def test_joins_the_users_warmups():
    assert with_warmup(["--port", "1"]) == ["--port", "1", "--warmups", WARMUP_NAME]
    assert with_warmup(["--warmups", "voice_chat", "--port", "1"]) == [
        "--warmups", f"voice_chat,{WARMUP_NAME}", "--port", "1"]
    assert with_warmup(["--warmups=a,b"]) == [f"--warmups=a,b,{WARMUP_NAME}"]


def _manager(device: str, sent: list, chunk: int = 256, max_req_input_len: int = 2042):
    """A stand-in for SGLang's tokenizer manager that refuses prompts as its scheduler does
    (``managers/utils.py: validate_input_length``)."""
    async def generate_request(req, request):
        if len(req.input_ids) >= max_req_input_len:
            raise ValueError(f"Input length ({len(req.input_ids)} tokens) exceeds the maximum allowed length")
        sent.append(req)
        for _ in range(2):
            yield {"text": ""}
    return types.SimpleNamespace(
        server_args=types.SimpleNamespace(device=device, chunked_prefill_size=chunk), context_len=2048,
        max_req_input_len=max_req_input_len, model_config=types.SimpleNamespace(vocab_size=49152),
        generate_request=generate_request)


def test_sends_one_greedy_request_on_cuda_and_none_elsewhere(caplog):
    caplog.set_level("INFO", logger=stock_warmup.__name__)
    sent = []
    asyncio.run(stock_warmup.warm_stock_paths("null", _manager("cuda", sent)))
    assert len(sent) == 1
    req = sent[0]
    assert req.input_ids == warmup_prompt_ids(256, 2048, 49152) and len(req.input_ids) == 256 + BLOCK
    assert req.sampling_params == {"max_new_tokens": 2, "temperature": 0.0}
    assert "shplb stock-path warm-up: a 320-token prompt and 2 new tokens" in caplog.text
    asyncio.run(stock_warmup.warm_stock_paths("null", _manager("cpu", sent)))
    assert len(sent) == 1 and "skipped on cpu" in caplog.text
    # a chunk as long as the context: the prompt stays under the scheduler's limit
    asyncio.run(stock_warmup.warm_stock_paths("null", _manager("cuda", sent, chunk=8192)))
    assert len(sent) == 2 and len(sent[1].input_ids) == 2041


def test_registered_under_its_name_in_sglangs_registry():
    from sglang.srt.entrypoints import warmup
    stock_warmup.register()
    assert warmup._warmup_registry[WARMUP_NAME] is stock_warmup.warm_stock_paths
