"""The one SGLang release this integration targets, and the check that enforces it."""
from __future__ import annotations

import importlib.metadata

from sglang_shplb import SUPPORTED_SGLANG


class SGLangVersionError(ImportError):
    pass


def installed_sglang_version() -> str | None:
    try:
        return importlib.metadata.version("sglang")
    except importlib.metadata.PackageNotFoundError:
        return None


def check_sglang_version() -> str:
    """Raise :class:`SGLangVersionError` naming the supported release unless SGLang 0.5.17 is installed."""
    have = installed_sglang_version()
    if have is None:
        raise SGLangVersionError(
            f"sglang_shplb.serving needs SGLang {SUPPORTED_SGLANG}, which is not installed: "
            f"pip install 'sglang_shplb[serve]' (pulls sglang=={SUPPORTED_SGLANG})")
    if have != SUPPORTED_SGLANG:
        raise SGLangVersionError(
            f"sglang_shplb.serving supports SGLang {SUPPORTED_SGLANG} only; SGLang {have} is installed. "
            f"Install sglang=={SUPPORTED_SGLANG} (its plugin API and attention-backend interface are "
            f"version specific).")
    return have
