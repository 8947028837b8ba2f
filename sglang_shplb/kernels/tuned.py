"""Launch configs of the autotuned prefill kernels, tuned ahead of time per GPU and shipped with the package.

A fresh server otherwise autotunes each Triton prefill kernel on its first call at every key (head_dim,
group, layout, query-length bucket, dtype): it compiles every candidate config and times it, which is most
of the extra cold start measured against stock SGLang (``bench/results/serve_gpu.md``). A table in
``kernels/tuned/<gpu>.json`` (written by ``bench/tune_kernels.py`` on that GPU) maps each key to the config
the autotuner chose there; a kernel whose key is in the table of the GPU it runs on launches that config
directly (one compile, no timing), any other key is autotuned as before. ``SHPLB_TUNED_CONFIGS=0``
ignores the tables (what the tuning run itself sets).

Table format (JSON): ``{"version": 1, "gpu": "NVIDIA H200", "triton": "3.6.0", "torch": "...",
"kernels": {KERNEL: {"key": [names...], "configs": {"v1,v2,...,dtype": {"num_warps": w, "num_stages": s,
"BLOCK_N": n (tile kernel only)}}}}}``.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

TUNED_DIR = Path(__file__).parent / "tuned"
TABLE_VERSION = 1
# the autotune keys of each kernel (its triton.autotune in triton_prefill takes them from here); q's dtype follows
KERNEL_KEYS: dict[str, tuple[str, ...]] = {
    "index": ("D", "PAGED", "Q_BUCKET"),
    "rule": ("D", "GROUP", "PAGED"),
    "tile": ("D", "GROUP", "PAGED", "TMA", "Q_BUCKET"),
}


@dataclass(frozen=True)
class LaunchConfig:
    num_warps: int
    num_stages: int
    block_n: int | None = None   # the tile kernel's KV step

    def launch_kwargs(self) -> dict[str, int]:
        kw = dict(num_warps=self.num_warps, num_stages=self.num_stages)
        if self.block_n is not None:
            kw["BLOCK_N"] = self.block_n
        return kw


def gpu_slug(name: str) -> str:
    """``"NVIDIA H200"`` → ``"nvidia_h200"``: the table's file name."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def key_string(values: tuple, dtype: torch.dtype | str) -> str:
    return ",".join([str(int(v)) for v in values] + [str(dtype).replace("torch.", "")])


def tables_enabled() -> bool:
    return os.environ.get("SHPLB_TUNED_CONFIGS", "1") not in ("0", "")


@lru_cache(maxsize=None)
def load_table(gpu_name: str, folder: Path = TUNED_DIR) -> dict[str, dict[str, LaunchConfig]]:
    """Kernel → key string → config for ``gpu_name`` (empty when no table ships for it). A table of another
    schema version, or naming another GPU than its file name says, raises: a wrong table is never used."""
    path = Path(folder) / f"{gpu_slug(gpu_name)}.json"
    if not path.exists():
        return {}
    raw = json.loads(path.read_text())
    if raw.get("version") != TABLE_VERSION:
        raise ValueError(f"{path}: tuned-config table version {raw.get('version')!r}, this package reads {TABLE_VERSION}")
    if gpu_slug(raw.get("gpu", "")) != gpu_slug(gpu_name):
        raise ValueError(f"{path}: the table is for {raw.get('gpu')!r}, not {gpu_name!r}")
    out: dict[str, dict[str, LaunchConfig]] = {}
    for kernel, entry in raw["kernels"].items():
        if tuple(entry["key"]) != KERNEL_KEYS.get(kernel):
            raise ValueError(f"{path}: kernel {kernel!r} keyed by {entry['key']}, expected {KERNEL_KEYS.get(kernel)}")
        out[kernel] = {k: LaunchConfig(c["num_warps"], c["num_stages"], c.get("BLOCK_N"))
                       for k, c in entry["configs"].items()}
    return out


def tuned_config(kernel: str, values: tuple, q: torch.Tensor) -> LaunchConfig | None:
    """The shipped config of ``kernel`` at autotune key ``values`` (in :data:`KERNEL_KEYS` order) for q's GPU
    and dtype, or None (not on CUDA, no table for this GPU, key not tuned, tables turned off)."""
    if not q.is_cuda or not tables_enabled():
        return None
    return load_table(_device_name(q.device.index)).get(kernel, {}).get(key_string(values, q.dtype))


@lru_cache(maxsize=None)
def _device_name(index: int) -> str:   # once per device, not per kernel launch
    return torch.cuda.get_device_name(index)


def table_from_autotuners(autotuners: dict[str, Any], gpu_name: str, versions: dict[str, str]) -> dict:
    """The table (JSON-ready) of the configs Triton's autotuners chose: ``autotuners`` maps a kernel name of
    :data:`KERNEL_KEYS` to its ``triton.autotune`` object, whose ``cache`` maps (key values..., dtypes of the
    tensor arguments...) to a ``triton.Config``; the first tensor argument is q."""
    kernels = {}
    for kernel, tuner in autotuners.items():
        names = KERNEL_KEYS[kernel]
        configs = {}
        for key, cfg in sorted(tuner.cache.items(), key=lambda kv: str(kv[0])):
            entry = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
            if "BLOCK_N" in cfg.kwargs:
                entry["BLOCK_N"] = cfg.kwargs["BLOCK_N"]
            configs[key_string(tuple(key[:len(names)]), key[len(names)])] = entry
        kernels[kernel] = {"key": list(names), "configs": configs}
    return {"version": TABLE_VERSION, "gpu": gpu_name, **versions, "kernels": kernels}
