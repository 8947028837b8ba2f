"""Launch configs of the autotuned prefill kernels, tuned ahead of time per GPU and shipped with the package.

A fresh server otherwise autotunes each Triton prefill kernel on its first call at every key (head_dim,
group, layout, query-length bucket, dtype): it compiles every candidate config and times it, which is most
of the extra cold start measured against stock SGLang (``bench/results/serve_gpu.md``). A table in
``kernels/tuned/<gpu>.json`` (written by ``bench/tune_kernels.py`` on that GPU) maps each key to the config
the autotuner chose there; a kernel whose key is in the table of the GPU it runs on launches that config
directly (one compile, no timing), any other key is autotuned as before. A GPU without a table of its own
takes the table of a GPU of the same compute capability (``"capability"``; an H100 takes the H200's: same SM,
same shared memory, so every config is valid there, tuned for another memory bandwidth) rather than spending
the first requests on autotuning (25 s for the first 64K prompt on an H100, ``bench/results/
serve_h100_round12``). ``SHPLB_TUNED_CONFIGS=0`` ignores the tables (what the tuning run itself sets).

Table format (JSON): ``{"version": 1, "gpu": "NVIDIA H200", "capability": "9.0", "triton": "3.6.0", "torch": "...",
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


def table_path(gpu_name: str, capability: str | None = None, folder: Path = TUNED_DIR) -> Path | None:
    """The table a GPU reads: its own (``<gpu_slug>.json``), else the first (by file name) whose ``capability``
    is ``capability`` (``"9.0"``), else None."""
    own = Path(folder) / f"{gpu_slug(gpu_name)}.json"
    if own.exists():
        return own
    if capability is not None:
        for path in sorted(Path(folder).glob("*.json")):
            if json.loads(path.read_text()).get("capability") == capability:
                return path
    return None


@lru_cache(maxsize=None)
def load_table(gpu_name: str, folder: Path = TUNED_DIR,
               capability: str | None = None) -> dict[str, dict[str, LaunchConfig]]:
    """Kernel → key string → config for ``gpu_name`` (:func:`table_path`; empty when none applies). A table of
    another schema version, or naming another GPU than its file name says, raises: a wrong table is never used."""
    path = table_path(gpu_name, capability, folder)
    if path is None:
        return {}
    raw = json.loads(path.read_text())
    if raw.get("version") != TABLE_VERSION:
        raise ValueError(f"{path}: tuned-config table version {raw.get('version')!r}, this package reads {TABLE_VERSION}")
    if gpu_slug(raw.get("gpu", "")) != path.stem:
        raise ValueError(f"{path}: the table is for {raw.get('gpu')!r}, not the GPU its file name says")
    out: dict[str, dict[str, LaunchConfig]] = {}
    for kernel, entry in raw["kernels"].items():
        if tuple(entry["key"]) != KERNEL_KEYS.get(kernel):
            raise ValueError(f"{path}: kernel {kernel!r} keyed by {entry['key']}, expected {KERNEL_KEYS.get(kernel)}")
        out[kernel] = {k: LaunchConfig(c["num_warps"], c["num_stages"], c.get("BLOCK_N"))
                       for k, c in entry["configs"].items()}
    return out


def tuned_config(kernel: str, values: tuple, q: torch.Tensor) -> LaunchConfig | None:
    """The shipped config of ``kernel`` at autotune key ``values`` (in :data:`KERNEL_KEYS` order) for q's GPU
    and dtype, or None (not on CUDA, no table for this GPU or its capability, key not tuned, tables off)."""
    if not q.is_cuda or not tables_enabled():
        return None
    name, capability = device_identity(q.device.index)
    return load_table(name, TUNED_DIR, capability).get(kernel, {}).get(key_string(values, q.dtype))


@lru_cache(maxsize=None)
def device_identity(index: int) -> tuple[str, str]:   # once per device, not per kernel launch
    """``(name, "major.minor")`` of CUDA device ``index``."""
    major, minor = torch.cuda.get_device_capability(index)
    return torch.cuda.get_device_name(index), f"{major}.{minor}"


def table_note(gpu_name: str, capability: str | None) -> str:
    """Which launch-config table a GPU reads, for the server's log."""
    if not tables_enabled():
        return "launch-config tables off (SHPLB_TUNED_CONFIGS=0): autotuned on first use"
    path = table_path(gpu_name, capability)
    if path is None:
        return f"no launch-config table for {gpu_name} (sm {capability}): autotuned on first use"
    if path.stem == gpu_slug(gpu_name):
        return f"launch configs from {path.name}"
    return f"launch configs from {path.name} (no table for {gpu_name}; same compute capability {capability})"


def table_from_autotuners(autotuners: dict[str, Any], gpu_name: str, versions: dict[str, str],
                          capability: str | None = None) -> dict:
    """The table (JSON-ready) of the configs Triton's autotuners chose: ``autotuners`` maps a kernel name of
    :data:`KERNEL_KEYS` to its ``triton.autotune`` object, whose ``cache`` maps (key values..., dtypes of the
    tensor arguments...) to a ``triton.Config``; the first tensor argument is q. ``capability`` (``"9.0"``) lets
    GPUs without a table of their own use it."""
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
    head = {"version": TABLE_VERSION, "gpu": gpu_name}
    if capability is not None:
        head["capability"] = capability
    return {**head, **versions, "kernels": kernels}
