"""SGLang modes the shplb backend does not support yet, refused before serving with the flag named."""
from __future__ import annotations


class UnsupportedModeError(ValueError):
    pass


def _prefill_graph_backend(server_args) -> str | None:
    """The prefill phase's CUDA-graph backend: ``cuda_graph_config.prefill.backend`` once SGLang has folded
    the flags in, else ``--cuda-graph-backend-prefill``."""
    prefill = getattr(getattr(server_args, "cuda_graph_config", None), "prefill", None)
    backend = getattr(prefill, "backend", None) or getattr(server_args, "cuda_graph_backend_prefill", None)
    return None if backend is None else str(getattr(backend, "value", backend))


def unsupported_modes(server_args) -> list[str]:
    """One line per unsupported mode that ``server_args`` turns on, naming the flag."""
    out = []
    if getattr(server_args, "enable_dp_attention", False):
        out.append("--enable-dp-attention (data-parallel attention)")
    if int(getattr(server_args, "attn_cp_size", 1) or 1) > 1 or getattr(server_args, "enable_prefill_cp", False):
        out.append("--attn-cp-size / --enable-prefill-cp (prefill context parallelism)")
    if int(getattr(server_args, "dcp_size", 1) or 1) > 1:
        out.append("--dcp-size (decode context parallelism)")
    if getattr(server_args, "speculative_algorithm", None):
        out.append(f"--speculative-algorithm {server_args.speculative_algorithm} (speculative decoding)")
    if _prefill_graph_backend(server_args) == "full":
        out.append("--cuda-graph-backend-prefill full (a full prefill CUDA graph; breakable is supported)")
    return out


def check_supported(server_args) -> None:
    bad = unsupported_modes(server_args)
    if bad:
        raise UnsupportedModeError("the shplb attention backend does not support " + "; ".join(bad) +
                                   ": drop the flag, or serve with a stock --attention-backend")
