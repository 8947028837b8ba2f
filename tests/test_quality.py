"""The built-in quality check compares like with like: an all-dense plan's sparse run is the dense run."""
from transformers import AutoTokenizer

from sglang_shplb.core.patterns import HeadBudget
from sglang_shplb.planning.model_store import default_checkpoint, special_token_mismatches
from sglang_shplb.planning.quality import compare_dense_sparse


def test_converted_tokenizer_special_tokens_match_the_config():
    assert special_token_mismatches(default_checkpoint()) == []


def test_all_dense_plan_gives_identical_dense_and_sparse_logits(tmp_path):
    """Even with a tokenizer that names the BOS as its EOS (as the GGUF conversion once did): the check
    takes EOS/PAD from the model and masks no prompt token in either run."""
    ckpt = default_checkpoint()
    for f in ckpt.iterdir():
        if not f.name.startswith("tokenizer"):
            (tmp_path / f.name).symlink_to(f)
    tok = AutoTokenizer.from_pretrained(ckpt)
    tok.eos_token = tok.bos_token
    tok.save_pretrained(tmp_path)
    budgets = [[HeadBudget.dense()] * 9 for _ in range(2)]
    (row,) = compare_dense_sparse(tmp_path, budgets, [256], prompts=1, max_new_tokens=3, num_layers=2,
                                  log=lambda *_: None)
    assert row["logit_rel_diff"] < 1e-5 and row["top1_agree"] and row["dense"] == row["sparse"], row


def test_the_check_decodes_through_the_servers_decode_reference(monkeypatch):
    """Every decode step of every layer goes through the serving path's sparse_decode with the layer's
    budgets and the whole cache as one request (a decode rule that loses the question must show here)."""
    import sglang_shplb.planning.quality as quality

    calls = []
    real = quality.sparse_decode

    def spy(q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens, budgets, scale, out, **kw):
        calls.append((int(seq_lens[0]), k_buffer.shape[0], tuple(b.pattern.value for b in budgets)))
        return real(q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens, budgets, scale, out, **kw)

    monkeypatch.setattr(quality, "sparse_decode", spy)
    budgets = [[HeadBudget.streaming(64, 64)] * 9, [HeadBudget.topk(0.2, 2)] * 9]
    (row,) = compare_dense_sparse(default_checkpoint(), budgets, [256], prompts=1, max_new_tokens=3, num_layers=2,
                                  log=lambda *_: None)
    n = row["tokens"]
    # 2 decode steps (the first token comes from prefill) x 2 layers, the cache one token longer each step
    assert calls == [(n + 1, n + 1, ("streaming",) * 9), (n + 1, n + 1, ("topk",) * 9),
                     (n + 2, n + 2, ("streaming",) * 9), (n + 2, n + 2, ("topk",) * 9)]
