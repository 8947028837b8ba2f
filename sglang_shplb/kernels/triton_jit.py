"""How the extend path's Triton kernels are compiled: once per compile-time constant and launch config, not per
request length. Triton specialises every integer argument by default (one compile where it is 1, one where it
is a multiple of 16, one otherwise); arguments that follow a batch's lengths (key-block counts, index row widths
and strides, tail slices) would then compile the kernel anew for almost every prompt length. Measured (H100,
2026-12-06, ``bench/first_call.py --diagnose``, rounds 18–19): after the start-up warm-up, 4 of 6 new lengths paid
0.6–1.3 s for such compiles of the selection, pooling and index-prefill kernels; without the specialisation
none did, and the steady times stayed within 1.3 %. These arguments are loop bounds and scalar offsets. No
SGLang."""
from __future__ import annotations

import inspect
from typing import Any, Callable

#: argument names, across the extend kernels, whose values follow the batch's lengths
LENGTH_ARGS = frozenset({
    "NB", "MAXK", "NB64", "NCH", "NTAB_W", "MAXW",            # key blocks, selection width (index builders)
    "s_ib", "s_ih", "s_iq", "s_cb", "s_ch",                   # block index strides (index builders)
    "s_bi_b", "s_bi_h", "s_bi_q", "s_bc_b", "s_bc_h",         # block index strides (prefill kernels)
    "slice_len", "NS",                                        # dense tail slices
})


def int_specialisation(n: int) -> int:
    """The class Triton (3.6) compiles an integer argument for: 0 (zero), 1, 16 (a multiple of 16), 2 (other)."""
    return 0 if n == 0 else 1 if n == 1 else 16 if n % 16 == 0 else 2


def length_free_jit(triton) -> Callable[[Callable], Any]:
    """``triton.jit`` with the kernel's :data:`LENGTH_ARGS` not specialised (``do_not_specialize``)."""
    def jit(fn: Callable) -> Any:
        return triton.jit(fn, do_not_specialize=[p for p in inspect.signature(fn).parameters if p in LENGTH_ARGS])
    return jit
