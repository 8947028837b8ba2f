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

    def spy(q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens, budgets, scale, out, *rest, **kw):
        calls.append((int(seq_lens[0]), k_buffer.shape[0], tuple(b.pattern.value for b in budgets)))
        return real(q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens, budgets, scale, out, *rest, **kw)

    monkeypatch.setattr(quality, "sparse_decode", spy)
    # layer 0: streaming heads whose window reaches the decode floor (they decode as streaming); layer 1: heads
    # below it, which the server's rule (core.patterns.decode_budget) decodes as top-k at the floor
    budgets = [[HeadBudget.streaming(64, 1024)] * 9, [HeadBudget.streaming(64, 64)] * 9]
    (row,) = compare_dense_sparse(default_checkpoint(), budgets, [256], prompts=1, max_new_tokens=3, num_layers=2,
                                  log=lambda *_: None)
    n = row["tokens"]
    # 2 decode steps (the first token comes from prefill) x 2 layers, the cache one token longer each step
    assert calls == [(n + 1, n + 1, ("streaming",) * 9), (n + 1, n + 1, ("topk",) * 9),
                     (n + 2, n + 2, ("streaming",) * 9), (n + 2, n + 2, ("topk",) * 9)]


def test_teacher_forced_answer_rows_attend_by_the_servers_decode_rule():
    """masked_prefill(decode_from=P): rows before P are the prefill of the prompt alone (the answer rows
    never enter the prompt's block estimates), rows from P on equal the serving decode path
    (layer_reference.sparse_decode over the cache) step by step; no decode rows, no change. The prompt's
    last DENSE_TAIL rows are dense."""
    import torch

    from sglang_shplb.core.patterns import DENSE_TAIL, decode_budgets
    from sglang_shplb.kernels.layer_reference import sparse_decode
    from sglang_shplb.kernels.reference import SelectionMemory
    from sglang_shplb.planning.quality import masked_prefill

    torch.manual_seed(0)
    n, P, hq, hkv, d = 300, 290, 6, 2, 16
    q, k, v = torch.randn(1, hq, n, d), torch.randn(1, hkv, n, d), torch.randn(1, hkv, n, d)
    k[0, :, 40] *= 6                                    # a key the Quest pages must find
    # head 5 (top-k, one selected block per row): its last prompt rows point at a key in block 3, the answer
    # rows at one in block 2; a last query block pooled over prompt + answer rows would pick block 2
    u, w = torch.randn(d), torch.randn(d)
    k[0, 1, 150], k[0, 1, 200] = 30 * u, 30 * w
    q[0, 5, 256:P] = w
    q[0, 5, P:] = 50 * u
    budgets = [HeadBudget.topk(0.05, 2), HeadBudget.streaming(64, 64), HeadBudget.dense(),
               HeadBudget.topk(0.2, 2), HeadBudget.streaming(64, 128), HeadBudget.topk(0.05, 3)]
    scale = d ** -0.5
    full = masked_prefill(budgets, q, k, v, scale)[0]
    mixed = masked_prefill(budgets, q, k, v, scale, decode_from=P)[0]
    prompt_only = masked_prefill(budgets, q[:, :, :P], k[:, :, :P], v[:, :, :P], scale)[0]
    assert torch.allclose(mixed[:P], prompt_only, atol=1e-5)
    # the prompt's last DENSE_TAIL rows (all of the block that holds P, whose pooled estimate the answer rows
    # would join) are dense in every head; the rows before them follow the budgets
    dense = torch.nn.functional.scaled_dot_product_attention(
        q[:, :, :P], k[:, :, :P].repeat_interleave(hq // hkv, 1), v[:, :, :P].repeat_interleave(hq // hkv, 1),
        is_causal=True, scale=scale)[0].transpose(0, 1)
    assert P - DENSE_TAIL < 256
    assert torch.allclose(prompt_only[P - DENSE_TAIL:], dense[P - DENSE_TAIL:], atol=1e-5)
    assert not torch.allclose(prompt_only[:P - DENSE_TAIL, 5], dense[:P - DENSE_TAIL, 5], atol=1e-3)
    assert torch.allclose(masked_prefill(budgets, q, k, v, scale, decode_from=n)[0], full, atol=1e-6)
    kk, vv = k[0].transpose(0, 1).contiguous(), v[0].transpose(0, 1).contiguous()    # pool [n, Hkv, d]
    memory = SelectionMemory()          # the server's kept selections (DECODE_RESELECT_EVERY steps)
    at_decode = decode_budgets(budgets)   # the streaming heads' windows are below the floor: Quest pages
    assert [b.pattern.value for b in at_decode] == ["topk", "topk", "dense", "topk", "topk", "topk"]
    for t in range(P, n):
        out = torch.zeros(1, hq, d)
        one = torch.zeros(1, dtype=torch.long)
        sparse_decode(q[0, :, t][None], kk, vv, torch.arange(n, dtype=torch.int32)[None], one,
                      torch.tensor([t + 1]), at_decode, scale, out, memory, 0)
        sparse = [h for h, b in enumerate(budgets) if b.pattern.value != "dense"]   # the stock backend does dense
        assert torch.allclose(mixed[t, sparse], out[0, sparse], atol=1e-5), t
    assert torch.allclose(mixed[P:, 2], full[P:, 2], atol=1e-5)   # a dense head is dense in both
