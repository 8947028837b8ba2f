"""CI WORKAROUND, never shipped: a pure-torch stand-in for sgl-kernel's CPU build (not on PyPI).

SGLang 0.5.17's CPU engine imports a handful of CPU ops at import time. This module implements the
three the CPU server path calls (KV-slot bookkeeping) in plain torch and defines the speculative-
decoding names it imports as functions raising NotImplementedError. It deliberately does NOT define
``convert_weight_packed`` (its presence switches SGLang to the Intel AMX path) and registers nothing
under ``torch.ops.sgl_kernel``. Installed by tests/scaffolding/install_sglang_cpu.sh.
"""
import ctypes

import torch

__version__ = "0.0.0+shplb-ci-cpu-stub"


def _starts(start_offset, end_offset):
    lens = (end_offset - start_offset).to(torch.int64)
    return torch.cumsum(lens, 0) - lens, lens


def assign_req_to_token_pool_cpu(req_pool_indices, req_to_token, start_offset, end_offset, out_cache_loc,
                                 pool_len):
    """req_to_token[req_pool_indices[i], start[i]:end[i]] = out_cache_loc[packed offset of i]."""
    outs, lens = _starts(start_offset, end_offset)
    for i in range(req_pool_indices.numel()):
        s, e, o = int(start_offset[i]), int(end_offset[i]), int(outs[i])
        if e > s:
            req_to_token[int(req_pool_indices[i]), s:e] = out_cache_loc[o:o + e - s].to(req_to_token.dtype)


def assign_extend_cache_locs_cpu(req_pool_indices, req_to_token, start_offset, end_offset, out_cache_loc,
                                 pool_len):
    """out_cache_loc[packed offset of i ...] = req_to_token[req_pool_indices[i], start[i]:end[i]]."""
    outs, lens = _starts(start_offset, end_offset)
    for i in range(req_pool_indices.numel()):
        s, e, o = int(start_offset[i]), int(end_offset[i]), int(outs[i])
        if e > s:
            out_cache_loc[o:o + e - s] = req_to_token[int(req_pool_indices[i]), s:e].to(out_cache_loc.dtype)


def copy_all_layer_kv_cache_cpu(data_ptrs, strides, tgt_loc, src_loc):
    """For every KV buffer (base pointer data_ptrs[b], bytes per token strides[b]): copy the rows at
    src_loc onto the rows at tgt_loc."""
    tgt = [int(x) for x in tgt_loc.tolist()]
    src = [int(x) for x in src_loc.tolist()]
    for ptr, stride in zip(data_ptrs.tolist(), strides.tolist()):
        ptr, stride = int(ptr), int(stride)
        for t, s in zip(tgt, src):
            if t != s:
                ctypes.memmove(ptr + t * stride, ptr + s * stride, stride)


def _unsupported(name):
    def op(*args, **kwargs):
        raise NotImplementedError(f"sgl_kernel.{name} is not provided by the CI CPU stand-in "
                                  f"(tests/scaffolding/sgl_kernel_cpu_stub)")
    op.__name__ = name
    return op


# Names SGLang imports at module load on CPU (speculative decoding, mamba); never called on our path.
for _n in ("fill_accept_out_cache_loc_cpu", "fill_bonus_tokens_cpu", "verify_tree_greedy_cpu",
           "rotate_input_ids_cpu", "reconstruct_indices_from_tree_mask", "build_tree_kernel_efficient_cpu",
           "assign_draft_cache_locs_contiguous_cpu"):
    globals()[_n] = _unsupported(_n)
del _n
