"""SGLang integration of sglang_shplb: the ``shplb`` attention backend, the SGLang plugin entry point, the
launcher (``python -m sglang_shplb.launch_server``). Importing it checks that SGLang 0.5.17 is installed.

Modules: :mod:`.version` (the check), :mod:`.config` (options, passed to SGLang's subprocesses by
environment), :mod:`.modes` (SGLang modes refused), :mod:`.backend` (the AttentionBackend), :mod:`.plugin`
(entry point, hooks), :mod:`.launch` (CLI)."""
from sglang_shplb.serving.version import SUPPORTED_SGLANG, SGLangVersionError, check_sglang_version

check_sglang_version()

from sglang_shplb.serving.config import configure  # noqa: E402

__all__ = ["SUPPORTED_SGLANG", "SGLangVersionError", "check_sglang_version", "configure"]
