"""Triton import helper. Under ``TRITON_INTERPRET=1`` with NumPy >= 2.4, triton 3.6's interpreter turns a
loaded scalar into a Python int with ``int(array_of_one)``, which NumPy now rejects, so a ``for`` loop
over a loaded bound fails; this patches that one conversion (interpreter only, idempotent)."""
from __future__ import annotations

import os


def import_triton():
    import triton
    import triton.language as tl
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        try:
            import triton.runtime.interpreter as ti
        except ImportError:  # pragma: no cover
            return triton, tl
        if not getattr(ti, "_shplb_index_patch", False) and hasattr(ti, "_patch_lang_tensor"):
            orig = ti._patch_lang_tensor

            def _patched(tensor, scope):
                orig(tensor, scope)
                scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

            ti._patch_lang_tensor = _patched
            ti._shplb_index_patch = True
    return triton, tl
