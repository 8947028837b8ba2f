"""The identity of a model as far as a plan cares: its attention geometry and a hash of its config."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

# Config keys that decide attention geometry; the hash covers these and nothing volatile
# (dtype, transformers version, file paths), so a plan survives a re-save of the checkpoint.
_HASHED_KEYS = ("architectures", "model_type", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "hidden_size", "intermediate_size",
                "max_position_embeddings", "rope_theta", "rope_scaling", "rope_parameters",
                "vocab_size")


@dataclass(frozen=True)
class ModelSpec:
    architecture: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_context: int
    config_hash: str

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    def kv_head_of(self, q_head: int) -> int:
        return q_head // self.group_size

    @staticmethod
    def from_config_dict(cfg: dict) -> "ModelSpec":
        heads = int(cfg["num_attention_heads"])
        kv = int(cfg.get("num_key_value_heads") or heads)
        if heads % kv:
            raise ValueError(f"{heads} query heads do not divide into {kv} KV heads")
        head_dim = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads)
        archs = cfg.get("architectures") or [cfg.get("model_type", "unknown")]
        hashed = {key: cfg.get(key) for key in _HASHED_KEYS}
        hashed["head_dim"] = head_dim
        digest = hashlib.sha256(json.dumps(hashed, sort_keys=True, default=str).encode()).hexdigest()[:16]
        return ModelSpec(archs[0], int(cfg["num_hidden_layers"]), heads, kv, head_dim,
                         int(cfg.get("max_position_embeddings") or 0), digest)

    @staticmethod
    def from_config(config) -> "ModelSpec":
        """From a ``transformers.PretrainedConfig``, a dict, or a checkpoint directory."""
        if isinstance(config, (str, Path)):
            return ModelSpec.from_config_dict(json.loads((Path(config) / "config.json").read_text()))
        if isinstance(config, dict):
            return ModelSpec.from_config_dict(config)
        return ModelSpec.from_config_dict(config.to_dict())

    def to_dict(self) -> dict:
        return asdict(self)
