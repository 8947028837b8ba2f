"""sglang_shplb: head-adaptive sparse attention with S-HPLB head-parallel load balancing for SGLang.

Parts by role: :mod:`.core` (the shared vocabulary), :mod:`.planning` (the offline pipeline),
:mod:`.kernels` (device code and references), :mod:`.scheduler` (per-batch decisions) and
:mod:`.serving` (SGLang glue). Only :mod:`.serving` and :mod:`.scheduler`'s hooks import SGLang.
Where SGLang is installed it must be the release we serve with: the check reads the installed distribution's version without importing SGLang.
"""
import importlib.metadata as _md

__version__ = "0.1.0"
SUPPORTED_SGLANG = "0.5.17"

try:
    _have = _md.version("sglang")
except _md.PackageNotFoundError:
    _have = None
if _have is not None and _have != SUPPORTED_SGLANG:
    raise ImportError(f"sglang_shplb supports SGLang {SUPPORTED_SGLANG} only; SGLang {_have} is installed. "
                      f"Install sglang=={SUPPORTED_SGLANG} or uninstall SGLang to use the planning tools alone.")
