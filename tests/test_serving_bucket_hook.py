"""The per-batch bucket hook: buckets at and across edges, the mixed-batch rule, grouping, histogram."""
import types

import pytest
import torch

from sglang_shplb.core.buckets import Buckets
from sglang_shplb.scheduler import bucket_hook as bh

B = Buckets((4096, 8192, 16384, 32768))


@pytest.mark.parametrize("n,want", [(1, 0), (4096, 0), (4097, 1), (8192, 1), (8193, 2), (16384, 2),
                                    (16385, 3), (32768, 3), (10 ** 6, 3)])
def test_single_request_at_and_across_edges(n, want):
    assert bh.batch_bucket(B, torch.tensor([n])) == want


def test_mixed_batch_takes_the_longest_context():
    assert bh.batch_bucket(B, torch.tensor([100, 4097, 3000])) == 1
    assert bh.batch_bucket(B, [4096, 4096]) == 0
    assert bh.batch_bucket(B, [10, 8193]) == 2
    assert bh.batch_bucket(B, torch.tensor([], dtype=torch.int64)) == 0


def test_hook_attaches_bucket_and_counts():
    stats = bh.configure_buckets(B, log_every=0)
    fb = types.SimpleNamespace()
    batch = types.SimpleNamespace(seq_lens_cpu=torch.tensor([5000, 12]))
    bh.after_forward_batch_init_new(fb, object, batch, None)
    assert fb.shplb_bucket == 1
    bh.after_forward_batch_init_new(fb, object, batch=types.SimpleNamespace(seq_lens_cpu=torch.tensor([9000])))
    assert fb.shplb_bucket == 2
    assert stats.hist == {1: 1, 2: 1} and "<= 8192: 1" in stats.format()
    bh._STATE.update(buckets=None, stats=None)


def _req(n_prompt: int, start: int, end: int):
    """A real SGLang 0.5.17 ``Req`` of ``n_prompt`` prompt tokens, its extend range set as the ``PrefillAdder``
    sets it (``(prefix, prefix + chunk)`` truncated, ``(prefix, len(fill ids))`` for the last chunk)."""
    from array import array

    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.sampling.sampling_params import SamplingParams
    req = Req(f"r{n_prompt}-{start}", "", array("q", range(1, n_prompt + 1)), SamplingParams(max_new_tokens=4))
    req._refresh_fill_ids()
    req.set_extend_range(start, end)
    return req


def test_prompt_ends_on_sglang_requests():
    """A 20K-token prompt in 8K chunks: the first two chunks do not end it, the third does; a whole 3K prompt
    and a request extending to its end after a cached prefix do; a request without SGLang's fields: unknown."""
    chunks = [_req(20000, 0, 8192), _req(20000, 8192, 16384), _req(20000, 16384, 20000)]
    assert bh.prompt_ends(chunks) == (False, False, True)
    assert bh.prompt_ends([_req(3000, 0, 3000), _req(5000, 4096, 5000), chunks[0]]) == (True, True, False)
    assert bh.prompt_ends([_req(3000, 0, 3000), types.SimpleNamespace()]) is None
    assert bh.prompt_ends([]) == ()


def test_hook_keeps_prompt_ends_of_extend_batches_only():
    """The hook keeps an extend batch's :func:`prompt_ends` (SGLang's ForwardMode) with its host sequence lengths;
    :func:`batch_prompt_ends` gives them for those lengths only; a decode batch or a batch without requests
    leaves the kept ones; the batch's bucket is attached as before."""
    from sglang.srt.model_executor.forward_batch_info import ForwardMode
    bh.configure_buckets(B, log_every=0)
    reqs = [_req(20000, 0, 8192), _req(3000, 0, 3000)]
    fb = types.SimpleNamespace()
    bh.after_forward_batch_init_new(fb, object, types.SimpleNamespace(
        seq_lens_cpu=torch.tensor([8192, 3000]), forward_mode=ForwardMode.EXTEND, reqs=reqs))
    assert fb.shplb_bucket == 1
    assert bh.batch_prompt_ends([8192, 3000]) == (False, True)
    assert bh.batch_prompt_ends([8192, 3001]) is None and bh.batch_prompt_ends([8192]) is None
    for batch in (types.SimpleNamespace(seq_lens_cpu=torch.tensor([8193, 3001]), forward_mode=ForwardMode.DECODE,
                                        reqs=reqs),
                  types.SimpleNamespace(seq_lens_cpu=torch.tensor([5]), forward_mode=ForwardMode.EXTEND)):
        bh.after_forward_batch_init_new(types.SimpleNamespace(), object, batch)
        assert bh.batch_prompt_ends([8192, 3000]) == (False, True)
    bh.after_forward_batch_init_new(types.SimpleNamespace(), object, types.SimpleNamespace(
        seq_lens_cpu=torch.tensor([16384]), forward_mode=ForwardMode.EXTEND, reqs=[_req(20000, 8192, 16384)]))
    assert bh.batch_prompt_ends([16384]) == (False,) and bh.batch_prompt_ends([8192, 3000]) is None
    bh._STATE.update(buckets=None, stats=None, prompt_ends=None)


def test_group_prefill_by_bucket_is_stable():
    def req(n, name):
        return types.SimpleNamespace(origin_input_ids=[0] * n, output_ids=[], name=name)
    q = [req(5000, "a"), req(100, "b"), req(6000, "c"), req(9000, "d"), req(4097, "e")]
    bh.group_by_bucket(q, B)
    assert [r.name for r in q] == ["a", "c", "e", "b", "d"]
    bh.configure_buckets(B, group_prefill=True)
    q2 = [req(10, "x"), req(5000, "y"), req(20, "z")]
    bh.after_calc_priority(None, object(), q2)
    assert [r.name for r in q2] == ["x", "z", "y"]
    bh._STATE.update(buckets=None, stats=None, group_prefill=False)


def test_lookup_is_constant_time_shape():
    # O(1): Buckets.index is one bit_length; the hook reads the host max SGLang already holds
    import inspect
    assert "bit_length" in inspect.getsource(Buckets.index)
