"""sglang_shplb: head-adaptive sparse attention with S-HPLB head-parallel load balancing for SGLang.

The planning core (this package's top-level modules) imports no SGLang; the SGLang surface lives in
:mod:`sglang_shplb.serving`. Where SGLang is installed it must be the release we serve with: the check
reads the installed distribution's version without importing SGLang.
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
