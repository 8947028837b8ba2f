"""sglang_shplb: head-adaptive sparse attention with S-HPLB head-parallel load balancing for SGLang.

The planning core (this package's top-level modules) imports no SGLang; the SGLang surface lives in
:mod:`sglang_shplb.serving`.
"""
__version__ = "0.1.0"
